"""A learned-variance model (out_channels = 2C) through the export path: the ε graph carries the
network's 2C output, the step graph splits it inside and reads w (its inputs and outputs keep
the image's C, so hosts and the C++ sampler see no change), and the onnxruntime and openvino
backends sample as the torch one does."""
import pytest
import torch
from learned_models import learned_model, reference_loop

import fastddpm
from fastddpm.export.onnx import OnnxOptions, export_onnx
from fastddpm.export.runners import OrtRunner
from fastddpm.export.step_loop import sample_with_step_graph
from fastddpm.options import SamplingOptions

STEPS = 6

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: hundreds of tiny ops


@pytest.fixture(scope="module", params=["learned", "learned_range"])
def exported(request, tmp_path_factory):
    """(model, {graph: path}): both graphs, dynamic batch, the step graph DDPM over STEPS steps."""
    model = learned_model(request.param, "v_prediction", channels=3)
    options = OnnxOptions(what="both", sampling=SamplingOptions(sampler="ddpm", steps=STEPS))
    return model, export_onnx(model, tmp_path_factory.mktemp("lv") / "m.onnx", options, log=None)


def test_eps_graph_outputs_both_halves(exported):
    model, paths = exported
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([49, 20, 0])
    got = OrtRunner(paths["eps"])(x=x, t=t)["eps"]
    with torch.no_grad():
        want = model.unet(x, t)
    assert got.shape == want.shape == (3, 6, 8, 8)
    assert (got - want).abs().max() < 1e-4


def test_ddpm_step_graph_reads_the_variance(exported):
    model, paths = exported
    noise = torch.randn(STEPS + 1, 2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    got = sample_with_step_graph(OrtRunner(paths["step"]), noise, history=0)
    table = model.table(sampler="ddpm", steps=STEPS)
    want = reference_loop(model, table, noise)
    assert got.shape == (2, 3, 8, 8) and bool(torch.isfinite(got).all())
    assert (got - want).abs().max() < 1e-4
    assert (reference_loop(model, table, noise, read_w=False) - want).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_exported_backends_sample_like_torch(exported, backend):
    """Each engine runs the network (2C out) and the runtime splits its output, as for torch."""
    if backend == "openvino":
        pytest.importorskip("openvino", reason="the openvino extra is not installed")
    model, _ = exported
    kwargs = dict(num=2, steps=STEPS, sampler="ddpm", seed=4, device="cpu", dtype="fp32")
    got = fastddpm.sample(model, backend=backend, **kwargs)
    torch.testing.assert_close(got, fastddpm.sample(model, backend="torch", **kwargs),
                               rtol=1e-4, atol=1e-4)
