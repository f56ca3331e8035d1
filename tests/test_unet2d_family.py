"""diffusers' UNet2DModel family, setting by setting: the same output as UNet2DModel to 1e-5 on
random weights, the same parameter count, and the same network written back out.

Each config below is tiny (16², widths ≤ 64) and switches on settings the paper's network does
not have; together they cover every setting fastddpm reads (see FAMILY's comments)."""
import pytest
import torch
from diffusers import UNet2DModel
from interop_models import perturbed_unet

import fastddpm
from fastddpm.interop import save_folder
from fastddpm.interop.diffusers_config import unet_config_from_diffusers
from fastddpm.unet import CONFIGS, ResBlock, UNet

BASE = {
    "sample_size": 16, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
    "block_out_channels": (16, 32, 32), "norm_num_groups": 8,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
}
FAMILY = {
    # diffusers' own defaults: flipped [cos, sin], freq_shift 0, symmetric downsample padding,
    # 8-channel heads (4 heads at 32 channels), norm_eps 1e-5
    "defaults": {},
    # the training example's shape: attention in the last two levels, two blocks per level
    "two-attention-levels": {"layers_per_block": 2, "attention_head_dim": 16,
                             "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                             "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")},
    # scale-shift norms; the middle attention then has no norm (attn_norm_num_groups unset)
    "scale-shift": {"resnet_time_scale_shift": "scale_shift", "mid_block_scale_factor": 1.4142},
    # scale-shift with a normed middle attention, centred input, a wider time embedding
    "scale-shift-mid-norm": {"resnet_time_scale_shift": "scale_shift", "attn_norm_num_groups": 4,
                             "center_input_sample": True, "time_embedding_dim": 96},
    # the paper's embedding and padding with multi-head attention, no middle attention
    "paper-embedding-no-mid-attention": {"flip_sin_to_cos": False, "freq_shift": 1,
                                         "downsample_padding": 0, "attention_head_dim": 16,
                                         "add_attention": False, "norm_eps": 1e-6},
    # an odd embedding width (a zero column), 5-channel heads, other middle-attention groups
    "odd-width": {"block_out_channels": (15, 30, 30), "norm_num_groups": 5,
                  "attention_head_dim": 5, "attn_norm_num_groups": 3, "freq_shift": 2},
    # attention blocks resampling through ResNet blocks (downsample_type/upsample_type "resnet")
    # with scale-shift norms, beside a conv-upsampling UpBlock2D
    "attention-resnet-resampling": {
        "down_block_types": ("AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"),
        "downsample_type": "resnet", "upsample_type": "resnet",
        "resnet_time_scale_shift": "scale_shift", "attention_head_dim": 16},
    # ResnetDownsampleBlock2D / ResnetUpsampleBlock2D beside a conv-resampling attention level
    # (the paper's padding there), two blocks per level; the last ones resample nothing
    "resnet-resampling-blocks": {
        "down_block_types": ("ResnetDownsampleBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D"),
        "up_block_types": ("ResnetUpsampleBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
        "layers_per_block": 2, "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1},
}
RESNET_RESAMPLING = ["attention-resnet-resampling", "resnet-resampling-blocks"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: hundreds of tiny ops


@pytest.fixture(scope="module", params=list(FAMILY))
def member(request, tmp_path_factory):
    config = {**BASE, **FAMILY[request.param]}
    unet = perturbed_unet(config, seed=len(request.param))
    folder = tmp_path_factory.mktemp(request.param)
    unet.save_pretrained(folder)
    return unet, folder


def _inputs(batch=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.tensor([3, 871][:batch])


def test_output_matches_unet2dmodel(member):
    unet, folder = member
    model = fastddpm.load(folder)
    assert sum(p.numel() for p in model.unet.parameters()) == sum(p.numel() for p in unet.parameters())
    x, t = _inputs()
    with torch.no_grad():
        ours, theirs = model.unet(x, t), unet(x, t).sample
    assert theirs.abs().max() > 0.1
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_written_back_diffusers_builds_the_same_network(member, tmp_path):
    unet, folder = member
    model = fastddpm.load(folder)
    save_folder(model, tmp_path / "out")
    back = fastddpm.load(tmp_path / "out")
    assert back.config == model.config
    for (key, a), b in zip(model.unet.state_dict().items(), back.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    theirs, info = UNet2DModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    x, t = _inputs(seed=1)
    with torch.no_grad():
        assert (theirs.eval()(x, t).sample - unet(x, t).sample).abs().max().item() == 0.0


@pytest.mark.slow  # an OpenVINO conversion each
def test_openvinos_bf16_groupnorm_rewrite_computes_each_member(member):
    """The GroupNorm rewrite that bf16 compiles get (fastddpm.export.openvino), compiled in f32:
    torch's output on every member — norms followed by a SiLU, by scale-shift, by attention,
    5 groups of 3 channels — at a batch other than the traced one."""
    import openvino as ov

    from fastddpm.export import openvino

    model = fastddpm.load(member[1])
    graph, _keep = openvino.convert(model)
    assert openvino.groupnorms_as_mvn(graph) == sum(
        1 for m in model.unet.modules() if isinstance(m, torch.nn.GroupNorm))
    x, t = _inputs(batch=1, seed=5)  # convert traces at batch 2
    compiled = ov.Core().compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    got = torch.from_numpy(request.infer({"x": x.numpy(), "t": t.numpy()})[0])
    with torch.no_grad():
        want = model.unet(x, t)
    assert got.shape == want.shape and want.abs().max() > 0.1
    assert (got - want).abs().max().item() <= 1e-4


def test_resnet_resampling_is_read_per_level():
    """Which levels resample through a ResBlock: the attention ones by downsample_type /
    upsample_type, the others by their block type; none at the levels that do not resample."""
    configs = {name: unet_config_from_diffusers({"_class_name": "UNet2DModel", **BASE, **FAMILY[name]},
                                                name) for name in RESNET_RESAMPLING}
    got = {name: (c.resnet_down_resolutions, c.resnet_up_resolutions) for name, c in configs.items()}
    assert got == {"attention-resnet-resampling": ((16, 8), (8,)),
                   "resnet-resampling-blocks": ((16,), (4,))}


def test_resampling_resblocks_norm_through_the_fused_op():
    """Both norms of a resampling ResBlock, norm2 with its scale and shift, are the fused
    group_norm_silu op where it runs (mode "op" reaches it on a CPU): two calls per block."""
    pytest.importorskip("triton", reason="no fused op without triton")
    from torch.fx.experimental.proxy_tensor import make_fx

    name = "attention-resnet-resampling"
    cfg = unet_config_from_diffusers({"_class_name": "UNet2DModel", **BASE, **FAMILY[name]}, name)
    unet = UNet(cfg).eval().set_kernels("op")
    temb = torch.randn(2, 4 * cfg.base_channels)
    for block, x in ((unet.down[0].resample, torch.randn(2, 16, 16, 16)),
                     (unet.up[1].resample, torch.randn(2, 32, 8, 8))):
        assert isinstance(block, ResBlock) and block.scale_shift
        with torch.no_grad():
            graph = make_fx(block)(x, temb).graph
        targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
        assert sum("fastddpm.group_norm_silu" in t for t in targets) == 2


def test_the_papers_configs_keep_their_parameter_counts():
    counts = {name: sum(p.numel() for p in UNet(cfg).parameters()) for name, cfg in CONFIGS.items()
              if name != "digits"}
    assert counts == {"cifar10": 35_746_307, "ddpm-256": 113_673_219}


@pytest.mark.slow  # two ONNX exports (one by the onnxruntime backend) and an OpenVINO conversion
def test_backends_and_onnx_graphs_run_the_family(tmp_path, monkeypatch):
    """On the member with the most settings (scale-shift norms, a normed middle attention,
    centred input, a wider time embedding, multi-head attention): onnxruntime and openvino run
    the same network as torch, and the ONNX step graph exports with a v-prediction table —
    export runs it with ONNX Runtime against PyTorch (ε and step) and writes nothing when they
    differ."""
    name = "scale-shift-mid-norm"
    import onnx
    from diffusers import DDPMScheduler

    from fastddpm.backends import make_denoiser
    from fastddpm.export.onnx import OnnxOptions, export_onnx, read_metadata
    from fastddpm.options import SamplingOptions

    monkeypatch.setenv("FASTDDPM_CACHE", str(tmp_path / "cache"))
    perturbed_unet({**BASE, **FAMILY[name]}, seed=3).save_pretrained(tmp_path / "m")
    DDPMScheduler(prediction_type="v_prediction").save_pretrained(tmp_path / "m")
    model = fastddpm.load(tmp_path / "m")
    x, t = _inputs()
    with torch.no_grad():
        want = model.unet(x, t)
    for backend in ("onnxruntime", "openvino"):
        got = make_denoiser(model, backend, torch.device("cpu"), torch.float32)(x, t)
        assert (got - want).abs().max().item() <= 1e-4, backend

    options = OnnxOptions(what="step", sampling=SamplingOptions(sampler="ddim", steps=4, backend="torch"))
    paths = export_onnx(model, tmp_path / "m.onnx", options, log=None)
    step = read_metadata(onnx.load(paths["step"], load_external_data=False))
    assert step["sampling"]["prediction"] == "v_prediction"
    assert step["unet"] == model.config.to_dict()


@pytest.mark.slow  # an ONNX export and an OpenVINO conversion each
@pytest.mark.parametrize("name", RESNET_RESAMPLING)
def test_resnet_resampling_exports_and_runs_on_openvino(name, tmp_path, monkeypatch):
    """The resampling ResBlocks (average pooling, nearest upsampling after norm1) in the ε graph,
    and in OpenVINO's conversion of the torch module (its own path, not the ONNX one): both give
    PyTorch's output, at batches other than the traced one."""
    from fastddpm.backends import make_denoiser
    from fastddpm.export.onnx import OnnxOptions, export_onnx
    from fastddpm.export.runners import OrtRunner

    monkeypatch.setenv("FASTDDPM_CACHE", str(tmp_path / "cache"))
    perturbed_unet({**BASE, **FAMILY[name]}, seed=7).save_pretrained(tmp_path / "m")
    model = fastddpm.load(tmp_path / "m")
    runner = OrtRunner(export_onnx(model, tmp_path / "eps.onnx", OnnxOptions(), log=None)["eps"])
    openvino = make_denoiser(model, "openvino", torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(8)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 16, 16, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        with torch.no_grad():
            want = model.unet(x, t)
        assert want.abs().max() > 0.1
        assert (runner(x=x, t=t)["eps"] - want).abs().max().item() <= 1e-4
        assert (openvino(x, t) - want).abs().max().item() <= 1e-4
