"""What we cannot run is refused up front, in one line that names it; a pickle that holds code is
refused without running it; a failed or refused conversion leaves nothing half-written."""
import json

import pytest
import torch
from interop_models import CIFAR10_CONFIG, narrow, random_unet
from safetensors.torch import load_file, save_file

import fastddpm
from fastddpm.cli import main
from fastddpm.errors import UserError
from fastddpm.interop import save_folder

SMALL = narrow(CIFAR10_CONFIG, (16, 32, 32, 32), groups=8)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid UNet2DModel folder: its config dict and its state dict."""
    folder = tmp_path_factory.mktemp("good")
    random_unet(SMALL, seed=31).save_pretrained(folder)
    return json.loads((folder / "config.json").read_text()), load_file(folder / WEIGHTS)


def _folder(path, config, state=None, scheduler=None, index=None):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if state is not None:
        save_file(state, path / WEIGHTS)
    if scheduler is not None:
        (path / "scheduler_config.json").write_text(json.dumps(scheduler))
    if index is not None:
        (path / "model_index.json").write_text(json.dumps(index))
    return path


def _refused(path, message):
    with pytest.raises(UserError, match=message) as info:
        fastddpm.load(path)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("change,message", [
    ({"_class_name": "UNet2DConditionModel"}, "model class 'UNet2DConditionModel' is not supported"),
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]},
     "down block type 'CrossAttnDownBlock2D' .* not supported"),
    ({"up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D", "SkipUpBlock2D"]},
     "up block type 'SkipUpBlock2D'"),
    ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]},
     "attention in up blocks that does not mirror"),
    ({"out_channels": 5}, "out_channels 5"),
    ({"out_channels": 6}, r"variance_type 'fixed_large' needs out_channels = in_channels \(3\), "
                          "the network has 6"),
    ({"num_train_timesteps": 500}, "num_train_timesteps=500, the scheduler 1000"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type='fourier'"),
    ({"resnet_time_scale_shift": "spatial"}, "resnet_time_scale_shift='spatial'"),
    # UNet2DModel builds attention levels that do not resample from any other value
    ({"downsample_type": "none", "upsample_type": "none"}, "downsample_type='none'"),
    ({"upsample_type": ["resnet"]}, r"upsample_type=\['resnet'\]"),
    ({"mid_block_type": None}, "mid_block_type=None"),
    ({"downsample_padding": 2}, "downsample_padding=2"),
    ({"flip_sin_to_cos": "yes"}, "flip_sin_to_cos='yes'"),
    ({"freq_shift": 9}, "freq_shift must be an integer in 0..7"),
    ({"attention_head_dim": 12}, "divisible by attention_head_dim=12"),
    ({"attn_norm_num_groups": 5}, "divisible by mid_attn_groups=5"),
    ({"norm_num_groups": None}, "norm_num_groups=None"),
    ({"mid_block_scale_factor": 0}, "mid_scale must be a number"),
    ({"mid_block_scale_factor": "1"}, "mid_block_scale_factor must be a number, got '1'"),
    ({"attention_head_dim": [8, 8, 8, 8]}, "attention_head_dim must be null or an integer"),
    ({"block_out_channels": 32}, "block_out_channels must be a list of ints, got 32"),
    ({"in_channels": {"c": 3}}, "in_channels and out_channels must be integers"),
    ({"down_block_types": [["DownBlock2D"]] * 4}, "down_block_types must be a list of strs"),
    ({"resnet_time_scale_shift": ["default"]}, r"resnet_time_scale_shift=\['default'\]"),
    ({"num_class_embeds": 10}, "num_class_embeds=10"),
    ({"act_fn": "gelu"}, "act_fn='gelu'"),
    ({"sample_size": [32, 64]}, "non-square sample_size"),
    ({"some_future_setting": 1}, "UNet2DModel setting 'some_future_setting'"),
])
def test_unsupported_unet_configs(good, tmp_path, change, message):
    config = {**good[0], **change}
    _refused(_folder(tmp_path / "m", config), message)  # refused before weights are looked for


def test_a_network_diffusers_cannot_express_is_not_written(tmp_path):
    """UNet2DModel has one downsample_type for all its attention blocks: attention levels that
    downsample by conv and by ResBlock both are refused in one line, before any folder exists."""
    from fastddpm.model import DiffusionModel
    from fastddpm.unet import UNetConfig

    cfg = UNetConfig(image_size=16, base_channels=8, channel_mult=(1, 1, 1), num_res_blocks=1,
                     attn_resolutions=(16, 8), groups=4, resnet_down_resolutions=(16,))
    with pytest.raises(UserError, match="one downsample_type for them all") as info:
        save_folder(DiffusionModel.create(cfg), tmp_path / "out")
    assert "\n" not in str(info.value) and list(tmp_path.iterdir()) == []


def test_missing_settings_take_diffusers_defaults():
    from fastddpm.interop.diffusers_config import unet_config_from_diffusers

    cfg = unet_config_from_diffusers({"_class_name": "UNet2DModel", "sample_size": 32}, "m")
    assert (cfg.flip_sin_to_cos, cfg.freq_shift, cfg.downsample_padding) == (True, 0, 1)
    assert (cfg.attention_head_dim, cfg.eps, cfg.base_channels) == (8, 1e-5, 224)
    assert cfg.attn_resolutions == (16, 8, 4)  # DownBlock2D + AttnDownBlock2D × 3


@pytest.mark.parametrize("scheduler,message", [
    ({"prediction_type": "flow_prediction"}, "prediction_type='flow_prediction'"),
    ({"beta_schedule": "laplace"}, "beta_schedule='laplace'"),
    ({"variance_type": "learned_range"},
     r"variance_type 'learned_range' needs out_channels = 2 × in_channels \(6\), the network has 3"),
    ({"variance_type": "fixed_large_log"}, "variance_type='fixed_large_log'"),
    ({"thresholding": True}, "thresholding=True .*per-sample quantile"),
    ({"rescale_betas_zero_snr": 1}, "rescale_betas_zero_snr must be true or false"),
    ({"steps_offset": -1}, "steps_offset must be an integer ≥ 0, got -1"),
    ({"steps_offset": 1.5}, "steps_offset must be an integer ≥ 0, got 1.5"),
    ({"timestep_spacing": "karras"}, "timestep_spacing='karras'"),
    ({"clip_sample_range": 0.0}, "clip_sample_range must be a finite number > 0, got 0.0"),
    ({"clip_sample_range": "2"}, "clip_sample_range must be a finite number > 0, got '2'"),
    ({"set_alpha_to_one": False}, "DDPMScheduler setting 'set_alpha_to_one'"),
    ({"_class_name": "DDIMScheduler", "set_alpha_to_one": "no"}, "set_alpha_to_one must be true or false"),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_flow_sigmas": True}, "use_flow_sigmas=True"),
    ({"solver_order": 2}, "DDPMScheduler setting 'solver_order'"),
    ({"beta_end": "0.02"}, "beta_end must be a number"),
    ({"beta_end": 1.5}, "beta_end must be a number in \\(0, 1\\)"),
    ({"_class_name": "EulerDiscreteScheduler"}, "scheduler 'EulerDiscreteScheduler'"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas has 2 values, num_train_timesteps is 1000"),
])
def test_unsupported_scheduler_configs(good, tmp_path, scheduler, message):
    scheduler = {"_class_name": "DDPMScheduler", **scheduler}
    _refused(_folder(tmp_path / "m", good[0], scheduler=scheduler), message)


@pytest.mark.parametrize("component,message", [
    ({"vqvae": ["diffusers", "VQModel"]}, "'vqvae' component .*VQModel.* not supported"),
    ({"unet": ["diffusers", "UNet2DConditionModel"]}, "unet is a UNet2DConditionModel"),
])
def test_unsupported_pipelines(good, tmp_path, component, message):
    index = {"_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"],
             "scheduler": ["diffusers", "DDIMScheduler"], **component}
    _refused(_folder(tmp_path / "m", good[0], good[1], index=index), message)


def test_missing_and_sharded_weights(good, tmp_path):
    _refused(_folder(tmp_path / "none", good[0]), "no weights")
    sharded = _folder(tmp_path / "sharded", good[0])
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    _refused(sharded, "sharded weights are not supported")
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", "without config.json or model_index.json")


def test_weights_that_do_not_fit_name_the_first_offending_key(good, tmp_path):
    config, state = good
    missing = {k: v for k, v in state.items() if k != "down_blocks.1.attentions.0.to_k.bias"}
    _refused(_folder(tmp_path / "a", config, missing),
             "missing weight 'down_blocks.1.attentions.0.to_k.bias'")
    extra = {**state, "down_blocks.0.resnets.0.extra.weight": torch.ones(2)}
    _refused(_folder(tmp_path / "b", config, extra),
             "unexpected weight 'down_blocks.0.resnets.0.extra.weight'")
    wrong = {**state, "mid_block.resnets.1.conv2.weight": torch.ones(32, 32, 1, 1)}
    _refused(_folder(tmp_path / "c", config, wrong),
             r"weight 'mid_block.resnets.1.conv2.weight' has shape \(32, 32, 1, 1\), "
             r"the config needs \(32, 32, 3, 3\)")
    narrower = {**config, "block_out_channels": [16, 32, 32, 48]}
    _refused(_folder(tmp_path / "d", narrower, state),
             "weight 'down_blocks.3.resnets.0.conv1.weight' has shape")


class _RunsCode:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bin_weights_holding_code_are_refused_unrun(good, tmp_path):
    marker = tmp_path / "pwned"
    folder = _folder(tmp_path / "m", good[0])
    torch.save({**good[1], "payload": _RunsCode(marker)}, folder / "diffusion_pytorch_model.bin")
    _refused(folder, "safe loading refuses")
    assert not marker.exists()
    code = main(["convert", str(folder), "-o", str(tmp_path / "out.pt")])
    assert code == 2 and not marker.exists() and not (tmp_path / "out.pt").exists()


def test_bare_state_dicts_in_unknown_layouts(good, tmp_path):
    torch.save(dict(good[1]), tmp_path / "diffusers.pt")
    _refused(tmp_path / "diffusers.pt", "bare diffusers state dict; pass the folder")
    torch.save({"encoder.weight": torch.ones(2)}, tmp_path / "other.pt")
    _refused(tmp_path / "other.pt", "no layout fastddpm knows .first key 'encoder.weight'")


def test_cli_error_is_one_line_and_exit_2(good, tmp_path, capsys):
    folder = _folder(tmp_path / "m", {**good[0], "time_embedding_type": "fourier"}, good[1])
    code = main(["convert", str(folder), "-o", str(tmp_path / "out.pt")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fastddpm convert: error:") and "fourier" in err
    assert not (tmp_path / "out.pt").exists()


@pytest.fixture
def model(good, tmp_path):
    return fastddpm.load(_folder(tmp_path / "src", good[0], good[1]))


def test_failed_write_leaves_no_folder_and_keeps_the_old_one(model, tmp_path, monkeypatch):
    import safetensors.torch

    save_folder(model, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_folder(model, tmp_path / "out")
    with pytest.raises(OSError, match="disk full"):
        save_folder(model, tmp_path / "new")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp folders left


def test_replacing_an_existing_model_folder(model, tmp_path):
    """Our own untouched folder is replaced; once someone adds a file, it is theirs."""
    save_folder(model, tmp_path / "out")
    save_folder(model, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    (tmp_path / "out" / "notes.txt").write_text("added by the user")
    with pytest.raises(UserError, match="did not write"):
        save_folder(model, tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "added by the user"


def test_refuses_to_overwrite_a_folder_that_is_not_a_model(model, tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(UserError, match="did not write"):
        save_folder(model, tmp_path / "photos")
    code = main(["convert", str(tmp_path / "src"), "--to", "diffusers", "-o", str(tmp_path / "photos")])
    assert code == 2 and "did not write" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["cat.jpg"]
    code = main(["convert", str(tmp_path / "src"), "--to", "diffusers", "-o", str(tmp_path / "no" / "x")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("failing_move", [1, 2])  # moving the old folder aside / the new one in
def test_swap_failing_half_way_restores_the_old_folder(model, tmp_path, monkeypatch, failing_move):
    import os

    from fastddpm import files

    save_folder(model, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == failing_move:
            raise OSError("device busy")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(OSError, match="device busy"):
        save_folder(model, tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
