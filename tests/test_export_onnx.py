"""ONNX export: the ε and step graphs against PyTorch, the sampler loop over the step graph, the
onnxruntime backend, and every bad input ending in one line with nothing written."""
import json

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
from onnx import TensorProto, helper
from tiny import TINY_WIDE, tiny_model

from fastddpm import checkpoint, kernels
from fastddpm.cli import build_parser, main
from fastddpm.errors import UserError
from fastddpm.export.onnx import (
    METADATA_KEY,
    OnnxOptions,
    export_onnx,
    metadata,
    read_metadata,
    write_validated,
)
from fastddpm.export.runners import OrtRunner
from fastddpm.export.step_loop import sample_with_step_graph
from fastddpm.model import DiffusionModel
from fastddpm.options import SamplingOptions
from fastddpm.runtime import sample
from fastddpm.schedule import ScheduleConfig
from fastddpm.unet import CONFIGS, UNetConfig

CONTROL_FLOW = {"If", "Loop", "Scan"}


@pytest.fixture(scope="module")
def model():
    m = tiny_model(TINY_WIDE, ScheduleConfig("linear", 50))
    # random, not default-initialised, norms: a wrong scale/bias mapping must show
    with torch.no_grad():
        for name, p in m.unet.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return m


@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    checkpoint.save(model, path)
    return path


@pytest.fixture(scope="module")
def eps_onnx(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("eps") / "eps.onnx", OnnxOptions())["eps"]


@pytest.fixture(scope="module")
def ddim_step_onnx(model_file, tmp_path_factory):
    """Through the CLI: fixed batch 2, DDIM η = 1 (noise matters), 10 steps."""
    out = tmp_path_factory.mktemp("step") / "ddim.onnx"
    code = main(["export", str(model_file), "--what", "step", "--batch", "2", "--sampler", "ddim",
                 "--eta", "1.0", "--steps", "10", "-o", str(out)])
    assert code == 0
    return out


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _torch_loop(model, table, noise):
    """The sampler with explicit noise, straight from the table, the U-Net and the reference step
    (the x̂0 — or ε — history as a list, newest first: no ring)."""
    x = noise[0]
    history = []
    eps_history = table.history_kind == "eps"
    with torch.no_grad():
        for i in range(table.num_steps):
            eps = model.unet(x, table.timesteps[i].expand(x.shape[0]))
            x, x0 = kernels.reverse_step_reference(x, eps, table.coef[i].float(), noise[i + 1],
                                                   history, table.clip, eps_history=eps_history)
            history = [eps if eps_history else x0, *history][:table.history]
    return x


def test_eps_graph_matches_torch_at_any_batch(model, eps_onnx):
    assert "GroupNormalization" in _ops(eps_onnx) and not _ops(eps_onnx) & CONTROL_FLOW
    runner = OrtRunner(eps_onnx)
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 5):  # neither is the traced batch (2)
        x = torch.randn(batch, 3, 8, 8, generator=gen)
        t = torch.randint(0, 50, (batch,), generator=gen)
        with torch.no_grad():
            want = model.unet(x, t)
        assert (runner(x=x, t=t)["eps"] - want).abs().max() < 1e-4


def test_metadata_carries_model_and_schedule(model, eps_onnx):
    meta = read_metadata(onnx.load(str(eps_onnx)))
    assert UNetConfig.from_dict(meta["unet"]) == TINY_WIDE
    assert meta["schedule"]["num_timesteps"] == 50 and meta["graph"] == "eps"
    assert meta["batch"] == "dynamic" and meta["opset"] == 21


def test_step_metadata_names_the_resolved_steps_and_grid(model):
    """Left to the defaults, the step graph's metadata says what they resolved to on the model:
    the fast step count on its tuned grid ('tuned'), else the safe count on the fallback grid."""
    tuned = DiffusionModel(model.unet, model.schedule, model.sampling.with_grid("unipc", 4, (49, 30, 12, 3)))
    for m, steps, spacing in ((tuned, 4, "tuned"), (model, 10, "trailing")):
        options = OnnxOptions(what="step", sampling=SamplingOptions(sampler="unipc"))
        info = json.loads(metadata(m, "step", options, 21, m.table(options.sampling))[METADATA_KEY])
        assert (info["sampler"]["steps"], info["sampler"]["spacing"]) == (steps, spacing)
    assert info["sampler"]["timesteps"] == model.table(sampler="unipc").timesteps.tolist()


def test_ddim_step_graph_runs_the_sampler(model, ddim_step_onnx):
    info = read_metadata(onnx.load(str(ddim_step_onnx)))
    assert info["sampler"]["name"] == "ddim" and info["sampler"]["num_steps"] == 10
    assert not _ops(ddim_step_onnx) & CONTROL_FLOW
    table = model.table(sampler="ddim", steps=10, eta=1.0)
    noise = torch.randn(11, 2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    assert info["sampler"]["history"] == 0 and "x0_history" not in OrtRunner(ddim_step_onnx).input_names
    got = sample_with_step_graph(OrtRunner(ddim_step_onnx), noise, history=0)
    want = _torch_loop(model, table, noise)
    assert (got - want).abs().max() < 1e-4
    # the noise reaches the result (σ > 0): other step noise, other images
    other = noise.clone()
    other[1:] = torch.randn(10, 2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    assert (sample_with_step_graph(OrtRunner(ddim_step_onnx), other, 0) - got).abs().max() > 1e-2


@pytest.mark.slow  # one more export
def test_multistep_step_graph_decomposed_with_external_data(model, tmp_path):
    """UniPC-3 reads the x̂0 of three earlier steps: the graph's ring input, fed back by the host,
    against the reference loop (7 steps: the ring wraps around twice)."""
    out = tmp_path / "dpm.onnx"
    options = OnnxOptions(what="step", sampling=SamplingOptions(sampler="unipc3", steps=7), opset=18,
                          external_data_bytes=0)
    export_onnx(model, out, options, log=None)
    assert (tmp_path / "dpm.onnx.data").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dpm.onnx", "dpm.onnx.data"]
    ops = _ops(out)
    assert "InstanceNormalization" in ops and "GroupNormalization" not in ops
    runner = OrtRunner(out)
    assert "x0_history" in runner.input_names
    assert read_metadata(onnx.load(str(out), load_external_data=False))["sampler"]["history"] == 3
    noise = torch.randn(8, 3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    got = sample_with_step_graph(runner, noise, history=3)
    table = model.table(sampler="unipc3", steps=7)
    assert (got - _torch_loop(model, table, noise)).abs().max() < 1e-4
    # the host's ring is what the graph reads: a ring left at zero gives another result
    blind = sample_with_step_graph(lambda **kw: runner(**{**kw, "x0_history": torch.zeros(3, 3, 3, 8, 8)}),
                                   noise, history=3)
    assert (blind - got).abs().max() > 1e-3


@pytest.mark.slow  # one more export
def test_ipndm_step_graph_carries_an_eps_ring(model, tmp_path):
    """iPNDM mixes the ε of three earlier steps into ε: the graph reads the ring as eps_history,
    returns its ε as `eps` for the host to keep, and says so in its metadata; the host loop
    matches the reference loop (7 steps: the ring wraps around twice)."""
    out = tmp_path / "ipndm.onnx"
    export_onnx(model, out, OnnxOptions(what="step", sampling=SamplingOptions(sampler="ipndm", steps=7)),
                log=None)
    runner = OrtRunner(out)
    assert "eps_history" in runner.input_names and "x0_history" not in runner.input_names
    proto = onnx.load(str(out))
    info = read_metadata(proto)
    assert info["sampler"]["history"] == 3 and info["sampler"]["history_kind"] == "eps"
    assert {p.key: p.value for p in proto.metadata_props}["fastddpm.history_kind"] == "eps"
    assert [o.name for o in proto.graph.output] == ["x_prev", "x0", "eps"]
    noise = torch.randn(8, 3, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    got = sample_with_step_graph(runner, noise, 3, "eps")
    table = model.table(sampler="ipndm", steps=7)
    assert torch.isfinite(got).all() and (got - _torch_loop(model, table, noise)).abs().max() < 1e-4
    # the ring reaches the result, and it must be the ε ring: x̂0's in it give another result
    for wrong in (lambda **kw: runner(**{**kw, "eps_history": torch.zeros(3, 3, 3, 8, 8)}),
                  lambda **kw: {**runner(**kw), "eps": runner(**kw)["x0"]}):
        assert (sample_with_step_graph(wrong, noise, 3, "eps") - got).abs().max() > 1e-3


@pytest.mark.slow  # one more export
def test_fp16_graph_keeps_group_norm_statistics_in_fp32(model, tmp_path):
    out = tmp_path / "h.onnx"
    export_onnx(model, out, OnnxOptions(dtype="fp16"), log=None)
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(out))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input]}
    norms = [n for n in graph.node if n.op_type == "GroupNormalization"]
    assert norms and all(types[n.input[0]] == TensorProto.FLOAT for n in norms)
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    x = torch.randn(3, 3, 8, 8).half()
    t = torch.randint(0, 50, (3,))
    with torch.no_grad():
        want = model.unet(x.float(), t)
    assert (OrtRunner(out)(x=x, t=t)["eps"].float() - want).abs().max() < 2e-2


@pytest.mark.slow  # one more export
def test_digits_config_exports(tmp_path, capsys):
    """The bundled model's architecture (attention, 3 levels, 1 channel) through the CLI."""
    torch.manual_seed(6)
    checkpoint.save(DiffusionModel.create(CONFIGS["digits"]), tmp_path / "digits.pt")
    out = tmp_path / "digits.onnx"
    assert main(["export", str(tmp_path / "digits.pt"), "-o", str(out)]) == 0
    assert "max abs error" in capsys.readouterr().out
    assert read_metadata(onnx.load(str(out)))["unet"]["image_size"] == 16


@pytest.mark.slow  # one more export
def test_onnxruntime_backend_matches_torch(model):
    kwargs = dict(num=3, steps=4, sampler="ddpm", seed=5, device="cpu")
    got = sample(model, backend="onnxruntime", **kwargs)
    want = sample(model, backend="torch", **kwargs)
    assert (got - want).abs().max() < 1e-4
    args = build_parser("sample").parse_args(["sample", "--backend", "onnxruntime"])
    assert args.backend == "onnxruntime"


# --- bad input: one line, exit 2, nothing written ---------------------------------------------

def _export_fails(capsys, tmp_path, *argv):
    code = main(["export", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fastddpm export: error:")
    assert not [p for p in tmp_path.iterdir() if p.name != "notes.txt"]
    return err


def test_a_file_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    err = _export_fails(capsys, tmp_path, str(tmp_path / "notes.txt"), "-o", str(tmp_path / "x.onnx"))
    assert "not a readable model file" in err


def test_an_output_path_that_cannot_be_written(model_file, tmp_path, capsys):
    err = _export_fails(capsys, tmp_path, str(model_file), "-o", str(tmp_path / "missing" / "x.onnx"))
    assert "does not exist" in err


@pytest.mark.parametrize("argv, words", [
    (["--opset", "17"], "opset 17 is too old"),
    (["--dtype", "bf16", "--opset", "21"], "bf16 needs opset 22"),
    (["--opset", "99"], "newer than this onnx"),
])
def test_an_opset_too_old_or_new_for_the_options(model_file, tmp_path, capsys, argv, words):
    err = _export_fails(capsys, tmp_path, str(model_file), *argv, "-o", str(tmp_path / "x.onnx"))
    assert words in err


def test_bf16_cannot_be_validated_on_cpu_onnxruntime(model_file, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU validates bf16 with the CUDA EP")
    err = _export_fails(capsys, tmp_path, str(model_file), "--dtype", "bf16", "-o", str(tmp_path / "x.onnx"))
    assert "no bf16 kernels" in err and "GPU" in err


def _hand_made_model(graph, opset: int) -> onnx.ModelProto:
    """A model around a hand-built graph, at IR version 10 (onnx 1.16), which every ONNX Runtime
    the project supports reads: onnx's default is its own newest IR, which can be newer than the
    installed ONNX Runtime's (onnx 1.23 writes IR 14; ONNX Runtime 1.30 reads up to 13)."""
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def test_missing_kernel_is_named(tmp_path):
    """ORT's NOT_IMPLEMENTED (here: bf16 Gemm on the CPU EP) becomes one line naming the op."""
    node = helper.make_node("Gemm", ["a", "b"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.BFLOAT16, [2, 2]),
                                            helper.make_tensor_value_info("b", TensorProto.BFLOAT16, [2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 2])])
    path = tmp_path / "bf16.onnx"
    onnx.save(_hand_made_model(graph, opset=22), path)
    with pytest.raises(UserError, match="no kernel for Gemm"):
        OrtRunner(path)


@pytest.mark.parametrize("dtype,onnx_type", [(torch.float32, TensorProto.FLOAT),
                                              (torch.float16, TensorProto.FLOAT16),
                                              (torch.bfloat16, TensorProto.BFLOAT16)])
def test_runner_binds_torch_buffers_in_every_io_dtype(tmp_path, dtype, onnx_type):
    """IOBinding on the CPU as on CUDA: ORT reads x and t from torch memory and writes `eps`
    into a torch tensor; bf16 (which numpy lacks) is bound by its ONNX type number. The graph
    is an Identity: the CPU provider has no bf16 arithmetic."""
    inputs = [helper.make_tensor_value_info("x", onnx_type, ["batch", 2, 3]),
              helper.make_tensor_value_info("t", TensorProto.INT64, ["batch"])]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["eps"])], "g", inputs,
                              [helper.make_tensor_value_info("eps", onnx_type, ["batch", 2, 3])])
    path = tmp_path / "identity.onnx"
    onnx.save(_hand_made_model(graph, opset=21), path)
    x = torch.randn(4, 2, 3).to(dtype)
    out = OrtRunner(path)(x=x, t=torch.arange(4))["eps"]
    assert out.dtype == dtype and out.shape == x.shape and out.data_ptr() != x.data_ptr()
    assert torch.equal(out, x)


def test_a_batch_the_graph_was_not_built_for(ddim_step_onnx):
    runner = OrtRunner(ddim_step_onnx)
    x = torch.randn(3, 3, 8, 8)
    with pytest.raises(UserError, match="built for batch 2, got 3"):
        runner(x=x, step=torch.tensor([0]), noise=torch.randn_like(x))


def test_a_failed_check_leaves_no_artifact(tmp_path):
    n = 512  # 2 KiB: above the 1 KiB below which onnx keeps a tensor inline
    weight = onnx.numpy_helper.from_array(np.arange(n, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])], [weight])

    def proto():
        return _hand_made_model(graph, opset=21)

    def refuse(staged):
        assert staged.is_file() and (staged.parent / "m.onnx.data").is_file()
        raise UserError("validation failed")

    with pytest.raises(UserError):
        write_validated(proto(), tmp_path / "m.onnx", refuse, external_data_bytes=0)
    assert list(tmp_path.iterdir()) == []
    assert write_validated(proto(), tmp_path / "m.onnx", lambda staged: None, external_data_bytes=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    loaded = onnx.load(str(tmp_path / "m.onnx"))  # reads the sidecar by its final name
    assert list(onnx.numpy_helper.to_array(loaded.graph.initializer[0])[:3]) == [0.0, 1.0, 2.0]


def test_tensorrt_missing_is_one_line(model_file, tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed")
    except ImportError:
        pass
    err = _export_fails(capsys, tmp_path, str(model_file), "--format", "tensorrt",
                        "-o", str(tmp_path / "x.plan"))
    assert "pip install tensorrt" in err and "NVIDIA GPU" in err
