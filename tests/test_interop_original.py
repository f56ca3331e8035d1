"""Bare state dicts of the original DDPM checkpoints' PyTorch port (pesser/pytorch_diffusion
layout): config read off the shapes, same ε as the same weights in diffusers' UNet2DModel.

The original layout is built here from a diffusers model with a key table written out
independently of fastddpm.interop.names (from the port's model definition), and its shapes are
checked against facts of that definition, so a wrong name or level order in either shows."""
import re

import pytest
import torch
from interop_models import CIFAR10_CONFIG, DDPM_256_CONFIG, narrow, random_unet

import fastddpm
from fastddpm.cli import main
from fastddpm.errors import UserError
from fastddpm.model import SamplingDefaults
from fastddpm.schedule import ScheduleConfig
from fastddpm.unet import CONFIGS


def original_state_dict(unet) -> dict[str, torch.Tensor]:
    """diffusers UNet2DModel weights renamed (and reshaped) into the original port's layout."""
    levels = len(unet.config.block_out_channels)
    rules = [
        (r"time_embedding\.linear_1\.", "temb.dense.0."),
        (r"time_embedding\.linear_2\.", "temb.dense.1."),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.", r"down.\1.block.\2."),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.", r"down.\1.attn.\2."),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
        (r"mid_block\.resnets\.0\.", "mid.block_1."),
        (r"mid_block\.resnets\.1\.", "mid.block_2."),
        (r"mid_block\.attentions\.0\.", "mid.attn_1."),
        # the port indexes up levels from full resolution; diffusers from the deepest
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"up.{levels - 1 - int(m[1])}.block.{m[2]}."),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.", lambda m: f"up.{levels - 1 - int(m[1])}.attn.{m[2]}."),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{levels - 1 - int(m[1])}.upsample."),
        (r"conv_norm_out\.", "norm_out."),
        (r"\.time_emb_proj\.", ".temb_proj."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"\.group_norm\.", ".norm."),
        (r"\.to_q\.", ".q."), (r"\.to_k\.", ".k."), (r"\.to_v\.", ".v."),
        (r"\.to_out\.0\.", ".proj_out."),
    ]
    out = {}
    for key, value in unet.state_dict().items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        if re.search(r"attn(_1|\.\d+)\.(q|k|v|proj_out)\.weight$", key):
            value = value[:, :, None, None]  # the port's attention projections are 1×1 convs
        out[key] = value.clone()
    return out


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    unet = random_unet(CIFAR10_CONFIG, seed=21)
    state = original_state_dict(unet)
    path = tmp_path_factory.mktemp("original") / "model-790000.ckpt"
    torch.save(state, path)
    return unet, state, path


def test_layout_has_the_ports_shapes(cifar10):
    """Facts of the port's CIFAR-10 model definition (ch 128, ch_mult (1, 2, 2, 2))."""
    _, state, _ = cifar10
    assert state["temb.dense.0.weight"].shape == (512, 128)
    assert state["up.0.block.0.conv1.weight"].shape == (128, 384, 3, 3)  # 256 up + 128 skip
    assert state["up.3.block.0.conv1.weight"].shape == (256, 512, 3, 3)  # the deepest level
    assert state["up.0.block.2.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert state["up.1.attn.2.q.weight"].shape == (256, 256, 1, 1)  # attention at 16²
    assert state["mid.attn_1.proj_out.weight"].shape == (256, 256, 1, 1)
    assert "down.3.downsample.conv.weight" not in state and "up.0.upsample.conv.weight" not in state
    assert "down.0.attn.0.q.weight" not in state
    assert sum(v.numel() for v in state.values()) == 35_746_307


def test_cifar10_checkpoint_loads_as_the_papers_model(cifar10):
    unet, _, path = cifar10
    model = fastddpm.load(path)
    assert model.config == CONFIGS["cifar10"]
    assert model.sampling == SamplingDefaults("fixed_large", clip=True)
    assert model.schedule.config == ScheduleConfig("linear", 1000, 1e-4, 0.02)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(22))
    t = torch.tensor([400, 3])
    with torch.no_grad():
        ours, theirs = model.unet(x, t), unet(x, t).sample
    assert theirs.abs().max() > 0.1
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_256_checkpoint_loads_with_its_image_size(tmp_path):
    # the LSUN / CelebA-HQ architecture at reduced width (the port's GroupNorm has 32 groups)
    config = {**narrow(DDPM_256_CONFIG, (32, 32, 64, 64, 128, 128), groups=32)}
    unet = random_unet(config, seed=23)
    torch.save(original_state_dict(unet), tmp_path / "lsun.ckpt")
    model = fastddpm.load(tmp_path / "lsun.ckpt")
    assert model.config.image_size == 256 and model.config.attn_resolutions == (16,)
    assert model.config.channel_mult == CONFIGS["ddpm-256"].channel_mult
    assert model.sampling == SamplingDefaults("fixed_small", clip=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(24))
    t = torch.tensor([999, 0])
    with torch.no_grad():
        assert (model.unet(x, t) - unet(x, t).sample).abs().max().item() <= 1e-5


def test_convert_to_model_file_and_to_diffusers(cifar10, tmp_path, capsys):
    _, _, path = cifar10
    assert main(["convert", str(path), "-o", str(tmp_path / "m.pt")]) == 0
    assert main(["convert", str(path), "--to", "diffusers", "-o", str(tmp_path / "hub")]) == 0
    a, b = fastddpm.load(tmp_path / "m.pt"), fastddpm.load(tmp_path / "hub")
    for (k, va), (_, vb) in zip(a.unet.state_dict().items(), b.unet.state_dict().items(), strict=True):
        assert torch.equal(va, vb), k
    assert a.sampling == b.sampling and a.schedule.config == b.schedule.config


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("mid.attn_1.k.weight"), "missing weight 'mid.attn_1.k.weight'"),
    (lambda s: s.update({"up.0.block.0.conv_shortcut.weight": torch.ones(1)}),
     "unexpected weight 'up.0.block.0.conv_shortcut.weight'"),
    (lambda s: s.update({"up.1.attn.0.v.weight": torch.ones(256, 256)}),
     r"weight 'up.1.attn.0.v.weight' has shape \(256, 256\), the config needs \(256, 256, 1, 1\)"),
    (lambda s: [s.pop(k) for k in [k for k in s if ".attn." in k or "attn_1" in k]],
     "no attention level"),
])
def test_bad_checkpoints_name_the_first_offending_key(cifar10, tmp_path, edit, message):
    state = dict(cifar10[1])
    edit(state)
    torch.save(state, tmp_path / "bad.ckpt")
    with pytest.raises(UserError, match=message) as info:
        fastddpm.load(tmp_path / "bad.ckpt")
    assert "\n" not in str(info.value)
