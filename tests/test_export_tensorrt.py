"""TensorRT engines from the ONNX export (skipped where TensorRT or a GPU is absent — everywhere
in this project's CI: TensorRT installs only from NVIDIA's index, onto a GPU machine)."""
import pytest
import torch
from tiny import TINY_WIDE, tiny_model

from fastddpm import checkpoint
from fastddpm.cli import main
from fastddpm.errors import UserError
from fastddpm.export.onnx import OnnxOptions, export_onnx
from fastddpm.export.tensorrt import TensorRTRunner, build_engine
from fastddpm.runtime import sample
from fastddpm.schedule import ScheduleConfig

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed "
                                             "(pip install tensorrt on a machine with an NVIDIA GPU)")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT needs an NVIDIA GPU")


@pytest.fixture(scope="module")
def model():
    return tiny_model(TINY_WIDE, ScheduleConfig("linear", 50))


@pytest.fixture(scope="module")
def engine(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("trt")
    export_onnx(model, folder / "eps.onnx", OnnxOptions(), log=None)
    build_engine(folder / "eps.onnx", folder / "eps.plan", batch_range=(1, 4))
    return folder / "eps.plan"


def test_engine_matches_torch_across_its_profile(model, engine):
    runner = TensorRTRunner(engine, torch.device("cuda"))
    assert runner.batch_range == (1, 4)
    unet = model.unet.to("cuda")
    for batch in (1, 3, 4):
        x = torch.randn(batch, 3, 8, 8, device="cuda")
        t = torch.randint(0, 50, (batch,), device="cuda")
        with torch.no_grad():
            want = unet(x, t)
        assert (runner(x=x, t=t)["eps"] - want).abs().max() < 1e-3
    model.unet.to("cpu")


def test_a_batch_outside_the_profile(engine):
    runner = TensorRTRunner(engine, torch.device("cuda"))
    x = torch.randn(5, 3, 8, 8, device="cuda")
    with pytest.raises(UserError, match="built for batches 1..4, got 5"):
        runner(x=x, t=torch.zeros(5, dtype=torch.int64, device="cuda"))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_cli_builds_validated_low_precision_step_engines(model, tmp_path, capsys, dtype):
    checkpoint.save(model, tmp_path / "m.pt")
    out = tmp_path / "step.plan"
    code = main(["export", str(tmp_path / "m.pt"), "--format", "tensorrt", "--what", "step",
                 "--dtype", dtype, "--max-batch", "4", "--sampler", "ddim", "--steps", "5", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert out.is_file() and "validated" in capsys.readouterr().out


def test_tensorrt_backend_matches_torch(model):
    kwargs = dict(num=2, steps=4, sampler="ddpm", seed=3, device="cuda", cuda_graph=False)
    got = sample(model, backend="tensorrt", **kwargs)
    want = sample(model, backend="torch", **kwargs)
    assert (got - want).abs().max() < 1e-3
