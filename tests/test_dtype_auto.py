"""`--dtype auto`, the sampling default: bf16 on a CPU that multiplies bf16 natively under a
backend declared faster in it (auto, openvino), fp32 under any other backend, on other CPUs and on
CUDA; a named dtype is itself; the detection agrees with the kernel's CPU flags; and a default
sample really runs in the resolved dtype."""
from pathlib import Path

import pytest
import torch
from tiny import tiny_model

from fastddpm import SamplingOptions, dtypes, options, sessions
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


@pytest.mark.parametrize("backend", ["auto", "openvino", "torch", "compile", "onnxruntime"])
def test_auto_is_bf16_only_on_a_native_cpu_under_a_backend_faster_in_it(native, backend):
    auto = SamplingOptions(backend=backend)
    faster = backend in ("auto", "openvino")
    assert get_backend(backend).bf16_when_auto == faster
    assert auto.torch_dtype(CPU) == (torch.bfloat16 if native and faster else torch.float32)
    assert auto.torch_dtype(CUDA) == torch.float32  # the GPU path keeps fp32 (TF32 convs)
    for name, dtype in dtypes.DTYPES.items():  # a named dtype is itself, native or not
        named = auto.replace(dtype=name)
        assert named.torch_dtype(CPU) == dtype and named.torch_dtype(CUDA) == dtype


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo to check against")
def test_detection_agrees_with_the_cpu_flags():
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    if not flags:
        pytest.skip("/proc/cpuinfo lists no flags here (not x86)")
    assert dtypes.cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_tile"})


def test_a_default_sample_runs_in_the_resolved_dtype(native, monkeypatch):
    """The same images as naming that dtype, bit for bit; and bf16 really differs from fp32
    (auto narrowed to the torch engine: it runs bf16 on any CPU, emulated where not native)."""
    monkeypatch.setenv("FASTDDPM_AUTO_ENGINES", "torch")
    model = tiny_model()
    kwargs = dict(num=3, sampler="ddim", steps=5, device="cpu", seed=4)
    resolved = "bf16" if native else "fp32"
    assert Sampler(model, sampler="ddim", steps=5, device="cpu").dtype == dtypes.DTYPES[resolved]
    got = sample(model, **kwargs)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert torch.equal(got, sample(model, dtype=resolved, **kwargs))
    fp32, bf16 = sample(model, dtype="fp32", **kwargs), sample(model, dtype="bf16", **kwargs)
    assert not torch.equal(fp32, bf16)
    assert (fp32 - bf16).abs().max().item() < 0.2  # bf16's rounding, not another image


def test_the_command_line_default_says_what_it_ran(native, tmp_path, capsys, tiny_model_file):
    out = tmp_path / "x.png"
    assert main(["sample", "--model", str(tiny_model_file), "--num", "2", "--sampler", "ddim",
                 "--steps", "2", "--device", "cpu", "--out", str(out), "--verbose",
                 "--no-progress"]) == 0
    assert f"for batch 2 in {'bf16' if native else 'fp32'}" in capsys.readouterr().err
    assert out.is_file()
