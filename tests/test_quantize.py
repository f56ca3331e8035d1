"""`--quantize int8` (the openvino backend, NNCF): ε close to torch fp32 with int8 convolutions
really in the compiled graph, calibration from the model's own trajectory, the disk cache (hit:
no calibration; corrupt: rebuilt), sessions keyed by the quantization, auto narrowed to the
engines that quantize, and one-line refusals (another backend, CUDA, no nncf, --bpd)."""
import sys

import pytest
import torch

ov = pytest.importorskip("openvino", reason="the openvino extra is not installed")
pytest.importorskip("nncf", reason="the int8 extra is not installed")

from tiny import perturbed_engine_model  # noqa: E402

from fastddpm import cli, disk_cache, sessions  # noqa: E402
from fastddpm.errors import UserError  # noqa: E402
from fastddpm.export import quantize  # noqa: E402
from fastddpm.export.openvino import make  # noqa: E402
from fastddpm.runtime import Sampler, sample  # noqa: E402

CPU = torch.device("cpu")
HAS_BF16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
pytestmark = pytest.mark.usefixtures("module_cache")


@pytest.fixture(autouse=True)
def no_kept_engines():
    sessions.clear()
    yield
    sessions.clear()


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache folder for this test: whether it calibrates is what it checks."""
    monkeypatch.setenv("FASTDDPM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model():
    return perturbed_engine_model()


def _on_trajectory(model, batch: int, seed: int):
    """ε inputs a sampler feeds the network: x_t = √ᾱ x_0 + √(1−ᾱ) z at t over [0, T), x_0 in
    [−1, 1] (fresh ones: not the calibration's)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 50, (batch,), generator=g)
    a = model.schedule.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
    x0 = torch.rand(batch, 3, 8, 8, generator=g) * 2 - 1
    return a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g), t


def _int8_convolutions(denoise, batch: int = 6) -> int:
    """How many convolutions the CPU plugin runs in int8 (u8/i8 activations) at `batch`."""
    precisions = [str(op.get_rt_info()["runtimePrecision"].astype(str))
                  for op in denoise.compiled(batch).get_runtime_model().get_ops()
                  if str(op.get_rt_info()["layerType"].astype(str)) == "Convolution"]
    assert precisions, "no convolutions in the runtime graph"
    return sum(p in ("u8", "i8") for p in precisions)


def _relative_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_eps_close_to_torch_fp32(model, dtype):
    if dtype == torch.bfloat16 and not HAS_BF16:
        pytest.skip("this CPU has no native bf16 (the refusal is tested in test_backend_openvino)")
    denoise = make(model, CPU, dtype, threads=1, quantize="int8")
    # not every convolution: the first and last stay in float by the recipe
    assert _int8_convolutions(denoise) >= 4
    x, t = _on_trajectory(model, 6, seed=11)
    with torch.inference_mode():
        want = model.unet.float()(x, t)
    got = denoise(x.to(dtype), t)
    assert got.shape == want.shape and got.dtype == dtype and torch.isfinite(got).all()
    error = _relative_rms(got.float(), want)
    # 8-bit codes carry ~2^-8 of each tensor's range per element, over a dozen layers: a few % of
    # ε's RMS (the bundled model: 1-3 %, benchmarks/results/cpu-20261205); and it is not fp32
    assert 1e-4 < error < 0.08, error


def test_calibration_is_the_models_own_trajectory(model):
    items = quantize.calibration_items(model, threads=1)
    cal = quantize.CALIBRATION
    assert len(items) == cal["images"] * cal["steps"]
    ts = sorted({int(i["t"][0]) for i in items})
    assert ts[0] == 0 and ts[-1] == 49  # linspace: the whole of [0, T)
    assert all(i["x"].shape == (1, 3, 8, 8) and i["x"].dtype.name == "float32" for i in items)
    # copies, not views of the sampler's buffer: the first step's inputs are the initial noise
    first = [i["x"] for i in items if int(i["t"][0]) == 49]
    later = [i["x"] for i in items if int(i["t"][0]) == 0]
    assert not any((a == b).all() for a, b in zip(first, later, strict=True))


def test_a_model_with_fewer_timesteps_than_the_calibration_steps():
    from tiny import tiny_model

    from fastddpm.schedule import ScheduleConfig

    short = tiny_model(schedule=ScheduleConfig("linear", 10))
    items = quantize.calibration_items(short, threads=1)
    assert sorted({int(i["t"][0]) for i in items}) == list(range(10))


def test_disk_cache_hit_needs_no_calibration(model, fresh_cache, monkeypatch):
    make(model, CPU, torch.float32, threads=1, quantize="int8")

    def no_quantize(*args):
        raise AssertionError("quantized again")

    monkeypatch.setattr(quantize, "quantize", no_quantize)
    again = make(model, CPU, torch.float32, threads=1, quantize="int8")
    assert _int8_convolutions(again) >= 4


def test_corrupt_cache_entry_is_rebuilt(model, fresh_cache, monkeypatch):
    first = make(model, CPU, torch.float32, threads=1, quantize="int8")
    entries = list(disk_cache.cache_root().glob("openvino-int8-*"))
    assert len(entries) == 1
    weights = entries[0] / "eps.bin"
    weights.write_bytes(weights.read_bytes()[:-16])  # a truncated write
    calls = []
    real = quantize.quantize
    monkeypatch.setattr(quantize, "quantize", lambda *a: calls.append(1) or real(*a))
    rebuilt = make(model, CPU, torch.float32, threads=1, quantize="int8")
    assert calls == [1]
    x, t = _on_trajectory(model, 2, seed=3)
    assert torch.allclose(rebuilt(x, t), first(x, t), atol=1e-5)


def test_ddim_sample_close_to_fp32(model):
    kwargs = dict(num=4, steps=10, sampler="ddim", device="cpu", seed=5, threads=1)
    want = sample(model, backend="torch", **kwargs)
    got = sample(model, backend="openvino", quantize="int8", **kwargs)
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert (got - want).abs().mean().item() < 0.05


def test_sessions_keep_the_quantized_engine_apart(model):
    plain = Sampler(model, backend="openvino", device="cpu", threads=1).denoise
    int8 = Sampler(model, backend="openvino", quantize="int8", device="cpu", threads=1).denoise
    assert int8 is not plain
    assert Sampler(model, backend="openvino", quantize="int8", device="cpu", threads=1).denoise is int8
    assert int8.compiled(1).get_property("INFERENCE_NUM_THREADS") == 1


def test_auto_runs_an_engine_that_quantizes(model, monkeypatch):
    monkeypatch.setenv("FASTDDPM_AUTO_ENGINES", "torch,openvino")
    runner = Sampler(model, quantize="int8", device="cpu", threads=1, steps=2, sampler="ddim")
    runner.run(0, 0, 2)
    assert runner.denoise.choices[2]["engine"] == "openvino"
    assert runner.denoise.choices[2]["why"] == "the only candidate"


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_other_backends_refused_in_one_line(model, backend):
    with pytest.raises(UserError, match=f"the {backend} backend does not run --quantize int8; "
                                        "use --backend .*openvino") as e:
        Sampler(model, backend=backend, quantize="int8", device="cpu")
    assert "\n" not in str(e.value)


def test_cuda_refused_in_one_line(model):
    from fastddpm.autoselect import make as auto_make

    with pytest.raises(UserError, match="runs on the CPU; add --device cpu") as e:
        auto_make(model, torch.device("cuda"), torch.float32, 1, quantize="int8")
    assert "\n" not in str(e.value)


def test_without_nncf_one_line_names_the_extra(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "nncf", None)  # an import of it fails as if not installed
    with pytest.raises(UserError, match=r"--quantize int8 needs nncf; pip install 'fastddpm\[int8\]'") as e:
        make(model, CPU, torch.float32, threads=1, quantize="int8")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["sample", "--quantize", "int8", "--backend", "torch", "--device", "cpu"],
     "the torch backend does not run --quantize int8"),
    (["eval", "--bpd", "--quantize", "int8"], "drop --backend, --dtype and --quantize"),
])
def test_cli_refusals_exit_2_with_one_line(argv, message, tmp_path, tiny_model_file, capsys):
    argv = [*argv[:1], *(["--model", str(tiny_model_file)]), *argv[1:],
            *(["--out", str(tmp_path / "x.png")] if argv[0] == "sample" else [])]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()
