"""`--dtype auto`, the sampling default: bf16 on a CPU that multiplies bf16 natively under a
backend declared faster in it (openvino) or under auto with such a candidate installed, fp32
under any other backend, on other CPUs and on CUDA; a named dtype is itself; the detection agrees
with the kernel's CPU flags; and a default sample and command really run in the resolved dtype."""
from pathlib import Path

import pytest
import torch
from tiny import tiny_model

from fastddpm import SamplingOptions, autoselect, dtypes, options, sessions
from fastddpm.backends import get_backend
from fastddpm.cli import main
from fastddpm.runtime import Sampler, sample

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(params=[True, False], ids=["native-bf16", "no-bf16"])
def native(request, monkeypatch):
    monkeypatch.setattr(options, "cpu_has_native_bf16", lambda: request.param)
    sessions.clear()  # no Sampler an earlier parameter resolved
    return request.param


def test_auto_is_the_default():
    assert SamplingOptions().dtype == "auto" and SamplingOptions().backend == "auto"


@pytest.mark.parametrize("backend", ["openvino", "torch", "compile", "onnxruntime"])
def test_auto_is_bf16_only_on_a_native_cpu_under_a_backend_faster_in_it(native, backend):
    auto = SamplingOptions(backend=backend)
    faster = backend == "openvino"
    assert get_backend(backend).bf16_when_auto == faster
    assert auto.torch_dtype(CPU) == (torch.bfloat16 if native and faster else torch.float32)
    assert auto.torch_dtype(CUDA) == torch.float32  # the GPU path keeps fp32 (TF32 convs)
    for name, dtype in dtypes.DTYPES.items():  # a named dtype is itself, native or not
        named = auto.replace(dtype=name)
        assert named.torch_dtype(CPU) == dtype and named.torch_dtype(CUDA) == dtype


@pytest.mark.parametrize("candidates,any_faster", [("torch,openvino", True), ("torch", False),
                                                   ("onnxruntime,torch", False)])
def test_under_auto_bf16_needs_a_candidate_faster_in_it(native, monkeypatch, candidates, any_faster):
    """auto's candidates are timed in one dtype: bf16 only where one of them runs faster in it (a
    torch-only auto stays fp32, as torch itself does)."""
    monkeypatch.setattr(autoselect, "installed_engines", lambda: candidates.split(","))
    want = torch.bfloat16 if native and any_faster else torch.float32
    assert SamplingOptions().torch_dtype(CPU) == want
    assert SamplingOptions().torch_dtype(CUDA) == torch.float32


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo to check against")
def test_detection_agrees_with_the_cpu_flags():
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    if not flags:
        pytest.skip("/proc/cpuinfo lists no flags here (not x86)")
    assert dtypes.cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_tile"})


def _expected_default() -> str:
    """What `auto` is here, from the CPU's own flags and auto's installed candidates."""
    faster = "openvino" in autoselect.installed_engines()
    return "bf16" if dtypes.cpu_has_native_bf16() and faster else "fp32"


def test_a_default_sample_runs_in_the_resolved_dtype(monkeypatch):
    """On this machine, with OpenVINO among auto's candidates: the Sampler's dtype is what the
    CPU's flags say, and the images are those of naming that dtype, bit for bit."""
    monkeypatch.setenv("FASTDDPM_AUTO_ENGINES", "torch,openvino")
    sessions.clear()
    model = tiny_model()
    resolved = _expected_default()
    assert Sampler(model, sampler="ddim", steps=5, device="cpu").dtype == dtypes.DTYPES[resolved]
    kwargs = dict(num=3, sampler="ddim", steps=5, device="cpu", seed=4)
    got = sample(model, **kwargs)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert torch.equal(got, sample(model, dtype=resolved, **kwargs))


def test_the_command_line_default_says_what_it_ran(monkeypatch, tmp_path, capsys, tiny_model_file):
    monkeypatch.setenv("FASTDDPM_AUTO_ENGINES", "torch,openvino")
    out = tmp_path / "x.png"
    assert main(["sample", "--model", str(tiny_model_file), "--num", "2", "--sampler", "ddim",
                 "--steps", "2", "--device", "cpu", "--out", str(out), "--verbose",
                 "--no-progress"]) == 0
    assert f"for batch 2 in {_expected_default()}" in capsys.readouterr().err
    assert out.is_file()
