"""The one threads knob (SamplingOptions.threads, --threads) reaches whichever engine runs: torch's
process-wide pool, ONNX Runtime's intra-op pool (tuned: full graph optimisation, no spinning),
OpenVINO's INFERENCE_NUM_THREADS; by default each takes the threads torch uses."""
import argparse

import pytest
import torch
from tiny import TINY, tiny_model

from fastddpm import SamplingOptions, UserError
from fastddpm.backends import make_denoiser
from fastddpm.options import add_sampling_arguments
from fastddpm.runtime import Sampler

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    return tiny_model(TINY)


@pytest.fixture
def restore_torch_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def _inputs():
    return torch.randn(2, 1, 8, 8), torch.randint(0, 50, (2,))


def test_flag_and_field(restore_torch_threads):
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    assert SamplingOptions.from_args(parser.parse_args(["--threads", "3"])).threads == 3
    assert SamplingOptions.from_args(parser.parse_args([])).threads is None
    for bad in (0, -1):
        with pytest.raises(UserError, match="threads must be positive"):
            SamplingOptions(threads=bad)


@pytest.mark.parametrize("backend", ["torch", "compile"])
def test_torch_pool_follows_the_knob(model, backend, restore_torch_threads):
    denoise = make_denoiser(model, backend, CPU, torch.float32, threads=1)
    torch.set_num_threads(2)  # moved by someone else between calls
    if backend == "torch":  # compiling is slow; the knob is set before the call either way
        denoise(*_inputs())
        assert torch.get_num_threads() == 1


def test_sampler_passes_the_knob(model, restore_torch_threads):
    sampler = Sampler(model, sampler="ddim", steps=2, device="cpu", backend="torch", threads=1)
    torch.set_num_threads(2)
    sampler.run(seed=0, first=0, batch=1)
    assert torch.get_num_threads() == 1


def test_onnxruntime_session_is_tuned_and_takes_the_knob(model, restore_torch_threads, tmp_path,
                                                        monkeypatch):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    pytest.importorskip("onnxscript", reason="the onnx extra is not installed")
    from fastddpm.export import onnx as export_module

    monkeypatch.setenv("FASTDDPM_CACHE", str(tmp_path))
    exports = []
    real = export_module.export_onnx
    monkeypatch.setattr(export_module, "export_onnx", lambda *a, **k: exports.append(1) or real(*a, **k))
    denoise = make_denoiser(model, "onnxruntime", CPU, torch.float32, threads=1)
    options = denoise.runner.session.get_session_options()
    import onnxruntime as ort

    assert options.intra_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    torch.set_num_threads(1)
    default = make_denoiser(model, "onnxruntime", CPU, torch.float32)  # default: torch's count
    assert default.runner.session.get_session_options().intra_op_num_threads == 1
    # the second session read the ε graph from the disk cache: one export, and the same ε
    assert exports == [1] and len(list(tmp_path.glob("onnx-*/eps.onnx"))) == 1
    x, t = _inputs()
    with torch.inference_mode():
        want = model.unet(x, t)
    assert (default(x, t) - want).abs().max() < 1e-4 and (denoise(x, t) - want).abs().max() < 1e-4


def test_openvino_takes_the_knob(model, restore_torch_threads, tmp_path, monkeypatch):
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    monkeypatch.setenv("FASTDDPM_CACHE", str(tmp_path))
    torch.set_num_threads(2)
    denoise = make_denoiser(model, "openvino", CPU, torch.float32, threads=1)
    assert denoise.compiled(1).get_property("INFERENCE_NUM_THREADS") == 1
