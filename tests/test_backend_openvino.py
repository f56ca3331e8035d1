"""The openvino ε backend: ε and a whole DDIM sample against torch fp32, any batch (each size
compiled once, static, the last few kept), bf16 where the CPU has it (its one-line refusal where
not), CUDA refused in one line, the entry point, torch's thread count reaching the engine, and
fastddpm's --verbose kept from the converter."""
import sys

import pytest
import torch

ov = pytest.importorskip("openvino", reason="the openvino extra is not installed")

from tiny import perturbed_engine_model  # noqa: E402

from fastddpm import sessions  # noqa: E402
from fastddpm.backends import backend_names, get_backend  # noqa: E402
from fastddpm.errors import UserError  # noqa: E402
from fastddpm.export import openvino  # noqa: E402
from fastddpm.export.openvino import OPENVINO, make  # noqa: E402
from fastddpm.runtime import Sampler, sample  # noqa: E402

CPU = torch.device("cpu")
HAS_BF16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
pytestmark = pytest.mark.usefixtures("module_cache")


@pytest.fixture(scope="module")
def model():
    return perturbed_engine_model()


@pytest.fixture(scope="module")
def denoise(model):
    return make(model, CPU, torch.float32)


def _inputs(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 8, 8, generator=g)
    t = torch.randint(0, 50, (batch,), generator=g, dtype=torch.int64)
    return x, t


def _torch_eps(model, x, t):
    with torch.inference_mode():
        return model.unet.float()(x, t)


@pytest.mark.parametrize("batch", [1, 5])
def test_eps_matches_torch_at_any_batch(model, denoise, batch):
    x, t = _inputs(batch, batch)
    want = _torch_eps(model, x, t)
    assert want.abs().max() > 0.1  # not a trivially small output
    got = denoise(x, t)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max().item() < 1e-4


def test_each_batch_size_is_compiled_once_with_its_shape_fixed(model):
    denoise = make(model, CPU, torch.float32)
    for batch in (3, 2, 3, 2):
        x, t = _inputs(batch, 40 + batch)
        assert (denoise(x, t) - _torch_eps(model, x, t)).abs().max().item() < 1e-4
    assert denoise.compiles == 2
    shape = denoise.compiled(3).input("x").get_partial_shape()
    assert shape.is_static and list(shape.to_shape()) == [3, 3, 8, 8]
    assert denoise.compiles == 2  # asking for a kept size's compiled model compiles nothing


def test_a_second_sample_call_compiles_nothing(model):
    sessions.clear()  # the engine of this call, not one an earlier test left
    kwargs = dict(num=3, steps=2, sampler="ddim", device="cpu", backend="openvino")
    sample(model, seed=1, **kwargs)
    denoise = Sampler(model, sampler="ddim", steps=2, device="cpu", backend="openvino").denoise
    assert isinstance(denoise, openvino.OpenVINODenoiser) and denoise.compiles == 1
    sample(model, seed=2, **kwargs)
    assert denoise.compiles == 1 and list(denoise.requests) == [3]


def test_only_the_last_sizes_stay_compiled(model, monkeypatch):
    monkeypatch.setattr(openvino, "SHAPES_KEPT", 2)
    denoise = make(model, CPU, torch.float32)
    for batch in (1, 2, 3):
        denoise(*_inputs(batch, batch))
    assert list(denoise.requests) == [2, 3] and denoise.compiles == 3
    x, t = _inputs(1, 50)
    assert (denoise(x, t) - _torch_eps(model, x, t)).abs().max().item() < 1e-4
    assert list(denoise.requests) == [3, 1] and denoise.compiles == 4


def test_our_verbose_flag_does_not_reach_the_converter(model, monkeypatch, capsys):
    """OpenVINO's converter reads `--verbose` off the command line and prints to stdout."""
    argv = ["fastddpm", "sample", "--verbose", "--out", "grid.png"]
    monkeypatch.setattr(sys, "argv", list(argv))
    graph, _ = openvino.convert(model)
    assert capsys.readouterr().out == ""
    assert sys.argv == argv and graph.input("x").get_partial_shape().is_dynamic


def test_result_outlives_the_next_call(denoise):
    x1, t1 = _inputs(2, 10)
    first = denoise(x1, t1)
    kept = first.clone()
    denoise(*_inputs(2, 11))
    assert torch.equal(first, kept)


def test_ddim_sample_matches_torch(model):
    kwargs = dict(num=3, steps=20, sampler="ddim", device="cpu", seed=3, dtype="fp32")
    want = sample(model, backend="torch", **kwargs)
    got = sample(model, backend="openvino", **kwargs)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no native bf16 (the refusal is tested)")
def test_bf16_close_to_fp32(model):
    denoise = make(model, CPU, torch.bfloat16)
    assert denoise.compiled(1).get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
    assert "GroupNormalization" in _types(denoise.graph)  # the kept graph is left as it was
    x, t = _inputs(4, 20)
    want = _torch_eps(model, x, t)
    got = denoise(x.to(torch.bfloat16), t)
    assert got.dtype == torch.bfloat16
    scale = want.abs().max().item()
    assert (got.float() - want).abs().max().item() < 0.15 * max(scale, 1.0)


def _types(graph) -> set[str]:
    return {node.get_type_name() for node in graph.get_ordered_ops()}


def test_groupnorms_rewritten_as_mvn_compute_the_same(model):
    """Compiled in f32, the rewritten graph gives torch's ε to fp32 rounding (a wrong group
    split, axis, eps placement, spread of the affine, placement of the SiLU or grouping of the
    time-embedding sum would not)."""
    graph, _ = openvino.convert(model)
    norms = sum(1 for m in model.unet.modules() if isinstance(m, torch.nn.GroupNorm))
    assert norms > 0 and "GroupNormalization" in _types(graph)

    def consumers(node):
        return [i.get_node().get_type_name() for i in node.output(0).get_target_inputs()]

    group_norms = [node for node in graph.get_ordered_ops() if node.get_type_name() == "GroupNormalization"]
    followed_by_silu = sum(1 for node in group_norms if consumers(node) == ["Swish"])
    after_time_bias = sum(1 for node in group_norms
                          if openvino._sum_with_per_sample_bias(node.input_value(0)) is not None)
    assert followed_by_silu > 0 and after_time_bias > 0
    assert openvino.groupnorms_as_mvn(graph) == norms
    assert "GroupNormalization" not in _types(graph) and "MVN" in _types(graph)
    # each of those SiLUs now runs on the grouped (N, groups, rest) tensor, and each of those
    # sums is taken on the (N, groups, C/groups, H·W) view that feeds its MVN
    assert sum(1 for node in graph.get_ordered_ops() if node.get_type_name() == "Swish"
               and node.input_value(0).get_partial_shape().rank.get_length() == 3) == followed_by_silu
    def adds_a_computed_bias(node):
        return node.get_type_name() == "Add" and any(
            v.get_node().get_type_name() != "Constant" and list(v.get_partial_shape())[-1] == 1
            for v in node.input_values())

    regrouped = [node.input_value(0).get_node().input_value(0).get_node()
                 for node in graph.get_ordered_ops() if node.get_type_name() == "MVN"]
    assert sum(1 for node in regrouped if adds_a_computed_bias(node)) == after_time_bias
    x, t = _inputs(3, 30)
    compiled = ov.Core().compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    got = torch.from_numpy(request.infer({"x": x.numpy(), "t": t.numpy()})[0])
    assert (got - _torch_eps(model, x, t)).abs().max().item() < 1e-4


def test_only_bf16_compiles_rewrite_the_groupnorms(model, monkeypatch):
    rewritten = []
    monkeypatch.setattr(openvino, "groupnorms_as_mvn", lambda graph: rewritten.append(graph) or 0)
    make(model, CPU, torch.float32).compiled(2)
    assert rewritten == []
    if HAS_BF16:
        make(model, CPU, torch.bfloat16).compiled(2)
        assert len(rewritten) == 1


@pytest.mark.skipif(HAS_BF16, reason="this CPU has native bf16 (its accuracy is tested)")
def test_bf16_refused_without_native_support(model):
    with pytest.raises(UserError, match="no native bf16") as e:
        make(model, CPU, torch.bfloat16)
    assert "\n" not in str(e.value)


def test_fp16_where_supported_else_refused(model):
    if "FP16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        denoise = make(model, CPU, torch.float16)
        x, t = _inputs(2, 30)
        got = denoise(x.half(), t)
        assert got.dtype == torch.float16
        assert (got.float() - _torch_eps(model, x, t)).abs().max().item() < 0.05
    else:
        with pytest.raises(UserError, match="no native fp16.*--dtype fp32") as e:
            make(model, CPU, torch.float16)
        assert "\n" not in str(e.value)


def test_cuda_device_refused_in_one_line(model, monkeypatch):
    # refused before anything touches CUDA: make it an error to ask torch about it
    def no_cuda(*args, **kwargs):
        raise AssertionError("touched CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", no_cuda)
    monkeypatch.setattr(torch.cuda, "init", no_cuda)
    with pytest.raises(UserError, match="runs on the CPU; pass --device cpu") as e:
        make(model, torch.device("cuda"), torch.float32)
    assert "\n" not in str(e.value)


def test_entry_point_is_declared_and_loads():
    assert "openvino" in backend_names()
    assert get_backend("openvino") is OPENVINO  # the entry point names this module's Backend
    assert not get_backend("openvino").graph_capturable


def test_torch_threads_reach_the_engine(model):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        denoise = make(model, CPU, torch.float32)
    finally:
        torch.set_num_threads(before)
    assert denoise.compiled(1).get_property("INFERENCE_NUM_THREADS") == 1
