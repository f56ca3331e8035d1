"""The C++ sampler (export/cpp) against the Python loop over the same step graph and noise.

Needs cmake, a C++17 compiler and ONNX Runtime headers: ONNXRUNTIME_ROOT, or build/onnxruntime
as export/cpp/get_onnxruntime.sh lays it out (CI runs that script first). Every test runs against
two builds: the plain one and one with -fsanitize=address,undefined (skipped where the compiler
has no sanitizer runtimes, unless FASTDDPM_REQUIRE_SANITIZER=1 as in CI); under the sanitizers
any report fails the test. tests/test_export_cpp_hostile.py feeds it crafted graphs and bad
arguments."""
import os
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fastddpm.export.onnx import OnnxOptions, export_onnx
from fastddpm.export.runners import OrtRunner
from fastddpm.export.step_loop import (
    noise_shape,
    read_noise_file,
    sample_with_step_graph,
    step_graph_info,
    write_noise_file,
)
from fastddpm.images import grid
from fastddpm.model import DiffusionModel, SamplingDefaults
from fastddpm.options import SamplingOptions
from fastddpm.schedule import ScheduleConfig
from fastddpm.unet import UNetConfig
from fastddpm.variance import output_channels

REPO = Path(__file__).resolve().parents[1]
ORT_ROOT = Path(os.environ.get("ONNXRUNTIME_ROOT", REPO / "build" / "onnxruntime"))
TINY = UNetConfig(image_size=8, in_channels=3, out_channels=3, base_channels=16, channel_mult=(1, 2),
                  num_res_blocks=1, attn_resolutions=(4,), groups=4, dropout=0.0)
COUNT = 5


def _missing() -> str | None:
    for tool in ("cmake", "g++"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not (ORT_ROOT / "include" / "onnxruntime_cxx_api.h").is_file():
        return f"no ONNX Runtime headers in {ORT_ROOT}; run export/cpp/get_onnxruntime.sh"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


# Under the sanitizers a report must end the program with a non-zero status (abort, not a log
# line), and ONNX Runtime's own allocations (its library is not instrumented) are not leaks of ours.
SANITIZER_ENV = {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:halt_on_error=1",
                 "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
SANITIZER_REPORTS = ("runtime error", "AddressSanitizer", "UndefinedBehaviorSanitizer", "LeakSanitizer")
VARIANTS = ["plain", "sanitized"]


@dataclass(frozen=True)
class Sampler:
    """One build of fastddpm_sample; `run` fails the test on any sanitizer report."""

    exe: Path
    sanitized: bool

    def run(self, *argv) -> subprocess.CompletedProcess:
        env = {**os.environ, **SANITIZER_ENV} if self.sanitized else None
        done = subprocess.run([str(self.exe), *map(str, argv)], capture_output=True, text=True, env=env,
                              timeout=300)
        for report in SANITIZER_REPORTS:
            assert report not in done.stderr, done.stderr[-4000:]
        assert done.returncode >= 0, f"killed by signal {-done.returncode}: {done.stderr[-4000:]}"
        return done


def _sanitizers_missing() -> str | None:
    """Why the compiler cannot link a sanitized program here (libasan/libubsan missing), or None."""
    done = subprocess.run(["bash", str(REPO / "export" / "cpp" / "sanitize.sh"), "--probe"],
                          capture_output=True, text=True)
    return None if done.returncode == 0 else done.stderr.strip() or "sanitize.sh --probe failed"


def sampler_build(variant: str, tmp_path_factory) -> Sampler:
    """The `variant` build ("plain" or "sanitized"), made once per session: both test modules
    ask for it, and a second `cmake --build` of an unchanged tree does nothing."""
    build = tmp_path_factory.getbasetemp() / f"cpp-build-{variant}"
    build.mkdir(exist_ok=True)
    sanitized = variant == "sanitized"
    if sanitized and (reason := _sanitizers_missing()) is not None:
        if os.environ.get("FASTDDPM_REQUIRE_SANITIZER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    for cmd in (["cmake", "-S", str(REPO / "export" / "cpp"), "-B", str(build),
                 f"-DONNXRUNTIME_ROOT={ORT_ROOT}", f"-DFASTDDPM_SANITIZE={'ON' if sanitized else 'OFF'}"],
                ["cmake", "--build", str(build), "-j", "2"]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "warning:" not in done.stdout + done.stderr, done.stdout[-4000:] + done.stderr[-2000:]
    return Sampler(build / "fastddpm_sample", sanitized)


@pytest.fixture(scope="module", params=VARIANTS)
def sampler(request, tmp_path_factory) -> Sampler:
    return sampler_build(request.param, tmp_path_factory)


def _export_step_graph(folder: Path, sampler_name: str, variance: str = "fixed_large") -> Path:
    """A random tiny model's step graph; a learned `variance` gives it 2 × 3 output channels."""
    torch.manual_seed(0)
    config = replace(TINY, out_channels=output_channels(TINY.in_channels, variance))
    model = DiffusionModel.create(config, ScheduleConfig("linear", 40), SamplingDefaults(variance))
    path = folder / f"{sampler_name}-{variance}.onnx"
    options = OnnxOptions(what="step", sampling=SamplingOptions(sampler=sampler_name, steps=8))
    export_onnx(model, path, options, log=None)
    return path


@pytest.fixture(scope="module")
def step_graph(tmp_path_factory):
    """DDPM (σ > 0 on every step but the last), dynamic batch, 8 steps."""
    return _export_step_graph(tmp_path_factory.mktemp("graph"), "ddpm")


def _read_pnm(path: Path) -> np.ndarray:
    data = path.read_bytes()
    magic, dims, maxval, pixels = data.split(b"\n", 3)
    width, height = map(int, dims.split())
    assert maxval == b"255"
    channels = 3 if magic == b"P6" else 1
    return np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, channels)


def test_cpp_loop_matches_python_loop_on_the_same_noise(sampler, step_graph, tmp_path):
    _compare_loops(sampler, step_graph, tmp_path)


@pytest.mark.slow  # one more export
def test_cpp_loop_carries_the_x0_ring_for_multistep_samplers(sampler, tmp_path):
    """UniPC-3 over 8 steps reads the x0 of 3 earlier steps: the ring wraps around twice."""
    graph = _export_step_graph(tmp_path, "unipc3")
    assert step_graph_info(graph)["sampler"]["history"] == 3
    _compare_loops(sampler, graph, tmp_path)


@pytest.mark.slow  # one more export
def test_cpp_loop_carries_the_eps_ring_of_ipndm(sampler, tmp_path):
    """iPNDM over 8 steps mixes the ε of 3 earlier steps into ε: the C++ host keeps the graph's
    eps output in the eps_history ring, as the Python host does."""
    graph = _export_step_graph(tmp_path, "ipndm")
    info = step_graph_info(graph)
    assert info["sampler"]["history"] == 3 and info["sampler"]["history_kind"] == "eps"
    _compare_loops(sampler, graph, tmp_path)


@pytest.mark.slow  # one more export
def test_cpp_loop_runs_a_learned_variance_graph(sampler, tmp_path):
    """A learned-variance DDPM: the graph splits the network's 2C output inside, so the C++
    sampler's strict shape checks see the image's C on every input and output, as before."""
    graph = _export_step_graph(tmp_path, "ddpm", "learned_range")
    assert step_graph_info(graph)["unet"]["out_channels"] == 6
    _compare_loops(sampler, graph, tmp_path)


def _compare_loops(sampler, step_graph, tmp_path):
    info = step_graph_info(step_graph)
    shape = noise_shape(info, COUNT)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    write_noise_file(tmp_path / "noise.f32", noise)
    assert torch.equal(read_noise_file(tmp_path / "noise.f32", shape), noise)

    done = sampler.run("--model", step_graph, "--count", COUNT, "--noise", tmp_path / "noise.f32",
                       "--threads", 1, "--out", tmp_path / "grid.ppm", "--raw-out", tmp_path / "x.f32")
    assert done.returncode == 0, done.stderr
    cpp = torch.from_numpy(np.fromfile(tmp_path / "x.f32", dtype="<f4").reshape(COUNT, 3, 8, 8))
    python = sample_with_step_graph(OrtRunner(step_graph, threads=1), noise, info["sampler"]["history"],
                                    info["sampler"]["history_kind"])
    assert (cpp - python).abs().max() < 1e-4
    assert python.std() > 0.1  # real images, not a constant
    # the grid is the one fastddpm.images draws (a pixel may round the other way at .5)
    want = np.asarray(grid(python))
    got = _read_pnm(tmp_path / "grid.ppm")
    assert got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_cpp_seeded_noise_is_deterministic(sampler, step_graph, tmp_path):
    outs = []
    for seed in (1, 1, 2):
        raw = tmp_path / f"x{len(outs)}.f32"
        done = sampler.run("--model", step_graph, "--count", 2, "--seed", seed,
                           "--out", tmp_path / "g.ppm", "--raw-out", raw)
        assert done.returncode == 0, done.stderr
        outs.append(np.fromfile(raw, dtype="<f4"))
    assert np.array_equal(outs[0], outs[1]) and np.abs(outs[0] - outs[2]).max() > 1e-2


def test_cpp_bad_input_is_one_line(sampler, step_graph, tmp_path):
    (tmp_path / "short.f32").write_bytes(b"\0" * 64)
    done = sampler.run("--model", step_graph, "--count", 2, "--noise", tmp_path / "short.f32",
                       "--out", tmp_path / "g.ppm")
    assert done.returncode == 2 and "holds 16 floats" in done.stderr
    done = sampler.run("--model", tmp_path / "short.f32", "--out", tmp_path / "g.ppm")
    assert done.returncode == 2 and done.stderr.startswith("fastddpm_sample: error:")
    assert not (tmp_path / "g.ppm").exists()
