"""`fastddpm sample` under torchrun (2 gloo processes, launched as a user would): the same bytes as
one process, shards resumed after a rank is killed, and runs that do not match refused."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import tiny_model

from fastddpm import shards
from fastddpm.checkpoint import load
from fastddpm.cli import main
from fastddpm.distributed import Distributed, rank_device
from fastddpm.dtypes import dtype_name
from fastddpm.errors import UserError
from fastddpm.options import SamplingOptions

# 10 images in batches of 3: shards of 3, 3, 3, 1, so rank 0 draws shards 0 and 2, rank 1 shards
# 1 and 3 — uneven rounds and a short last shard
NUM, BATCH = 10, 3
SAMPLING = ["--sampler", "ddim", "--steps", "4", "--batch-size", str(BATCH), "--seed", "5",
            "--device", "cpu", "--backend", "torch"]

# torchrun runs this instead of `-m fastddpm` to kill rank 1 right after its first shard is on
# disk, leaving a half-written temp file of its next one, as a kill in the middle of a write does
KILL_RANK_1 = """
import contextlib, os, signal, sys
from fastddpm import shards
from fastddpm.cli import main
real = shards.atomic_write
@contextlib.contextmanager
def write_then_die(path):
    with real(path) as tmp:
        yield tmp
    if os.environ["RANK"] == "1":
        (path.parent / ".shard-000003.npy.x.tmp").write_bytes(b"half a shard")
        os.kill(os.getpid(), signal.SIGKILL)
shards.atomic_write = write_then_die
sys.exit(main(sys.argv[1:]))
"""




def _torchrun(tmp_path: Path, *argv: str, script: str | None = None) -> subprocess.CompletedProcess:
    if script is None:
        target = ["-m", "fastddpm"]
    else:
        (tmp_path / "run.py").write_text(script)
        target = [str(tmp_path / "run.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # -n, as the README writes it: torchrun takes a --num after the script for its --numa-binding
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", *target, "sample", "-n", str(NUM), *argv],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)


def _one_process(out: Path | str, model: str) -> None:
    assert main(["sample", "--model", model, "--num", str(NUM), "--out", str(out),
                 "--no-progress", *SAMPLING]) == 0


@pytest.mark.slow  # torchrun starts three Python processes
def test_two_processes_write_the_bytes_of_one(tmp_path, tiny_model_file, one_thread):
    out = tmp_path / "two.npz"
    proc = _torchrun(tmp_path, "--model", str(tiny_model_file), "--out", str(out), *SAMPLING)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _one_process(tmp_path / "one.npz", str(tiny_model_file))
    two, one = np.load(out)["images"], np.load(tmp_path / "one.npz")["images"]
    assert two.shape == (NUM, 8, 8, 1) and two.std() > 0
    assert two.tobytes() == one.tobytes()
    assert not shards.work_folder(out).exists()  # joined, then cleared
    # rank 0 alone reports, and every image was drawn once (all ranks' count, all-reduced)
    assert proc.stderr.count(f"wrote {NUM} images to {out} ({NUM} drawn now on 2 ranks") == 1
    assert "sampling on 2 ranks" in proc.stderr


@pytest.mark.slow  # torchrun starts three Python processes
def test_a_killed_rank_resumes_to_the_same_folder(tmp_path, tiny_model_file, one_thread, capsys):
    out, model = tmp_path / "imgs", str(tiny_model_file)
    argv = ["--model", model, "--out", f"{out}/", *SAMPLING]
    killed = _torchrun(tmp_path, *argv, script=KILL_RANK_1)
    assert killed.returncode != 0
    work = shards.work_folder(out)
    # round 0: rank 0's shard 0 and rank 1's shard 1 are on disk, then rank 1 died
    assert sorted(p.name for p in work.glob("shard-*")) == ["shard-000000.npy", "shard-000001.npy"]
    assert list(work.glob(".*.tmp")) and not out.exists()

    # one process cannot finish two ranks' job: refused in one line, nothing written or removed
    assert main(["sample", "-n", str(NUM), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unfinished sharded run" in err and not out.exists()
    # nor can the same layout with another seed (the manifest records the job)
    options = SamplingOptions(sampler="ddim", steps=4, batch_size=BATCH, device="cpu", backend="torch")
    with pytest.raises(UserError, match=r"seed 5 → 6.*world 2 → 1"):
        shards.sample_to(f"{out}/", load(model), NUM, 6, options, Distributed(), progress=False)
    assert work.is_dir() and len(list(work.glob("shard-*"))) == 2

    resumed = _torchrun(tmp_path, *argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming: 6 of {NUM} images already drawn" in resumed.stderr
    assert f"({NUM - 6} drawn now on 2 ranks" in resumed.stderr  # the missing shards, once
    assert not work.exists()
    _one_process(f"{tmp_path / 'one'}/", model)
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == [f"{k:06d}.png" for k in range(NUM)]  # none missing, none twice
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_a_numbered_gpu_under_torchrun_is_refused(monkeypatch):
    """Every rank would draw on the same GPU: each takes LOCAL_RANK's instead."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match="LOCAL_RANK; pass --device cuda"):
        rank_device("cuda:0")
    assert rank_device("cpu") == "cpu"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert rank_device("cuda:0") == "cuda:0"  # one process: as given


def test_a_damaged_shard_is_refused_when_joined(tmp_path):
    np.save(tmp_path / "shard-000000.npy", np.zeros((3, 8, 8, 1), np.uint8))
    (tmp_path / "shard-000001.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(UserError, match="shard-000001.npy is unreadable.*delete it and re-run"):
        shards._join(tmp_path, [(0, 3), (3, 2)], (1, 8, 8))
    np.save(tmp_path / "shard-000001.npy", np.zeros((3, 8, 8, 1), np.uint8))  # 3 images, not 2
    with pytest.raises(UserError, match=r"holds uint8 \(3, 8, 8, 1\), not \(2, 8, 8, 1\)"):
        shards._join(tmp_path, [(0, 3), (3, 2)], (1, 8, 8))


def test_every_rank_runs_the_engine_and_dtype_rank_0_picks(monkeypatch):
    """Under `auto` each rank would time the engines and might pick another (engines agree to
    ~1e-4, not in bytes), and an `auto` dtype is bf16 only on CPUs with native bf16: rank 0
    resolves both, and the others run its picks without timing or looking at their own CPU."""
    monkeypatch.setenv("FASTDDPM_AUTO_ENGINES", "torch,onnxruntime")  # two to choose between
    model = tiny_model()
    options = SamplingOptions(sampler="ddim", steps=2, device="cpu")
    assert options.backend == "auto" and options.dtype == "auto"
    picked = shards._one_engine(model, options, Distributed(), BATCH)
    assert picked.backend in ("torch", "onnxruntime")
    assert picked.dtype == dtype_name(options.torch_dtype(torch.device("cpu")))
    assert picked.replace(backend="auto", dtype="auto") == options  # nothing else changed

    def timing_on_rank_1(*args):
        raise AssertionError("rank 1 timed the engines itself")

    monkeypatch.setattr(shards.autoselect, "engine_for", timing_on_rank_1)
    rank_1 = Distributed(rank=1, world=2)
    sent = []
    monkeypatch.setattr(rank_1, "broadcast_from_main", lambda obj: sent.append(obj) or (
        "bf16" if len(sent) == 1 else picked.backend))
    assert shards._one_engine(model, options, rank_1, BATCH) == picked.replace(dtype="bf16")
    assert sent == [None, None]  # rank 1 resolved nothing itself
    # a dtype and engine named by the user are kept, on every rank, with no collective
    named = options.replace(backend="torch", dtype="fp32")
    assert shards._one_engine(model, named, rank_1, BATCH) is named
