"""The trainer: exact resume, crash-safe checkpoints, DDP on gloo, and bad input."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_config

from fastddpm import checkpoint, data, images
from fastddpm.cli import main
from fastddpm.runtime import sample
from fastddpm.train import TrainConfig, Trainer, heldout_triples

# with attention, and dropout: an exact resume must replay the dropout masks too
TINY = tiny_config(attention=True, dropout=0.1).to_dict()
SHORT_SCHEDULE = {"kind": "linear", "num_timesteps": 100, "beta_start": 1e-4, "beta_end": 0.02}


@pytest.fixture
def unet_json(tmp_path):
    path = tmp_path / "unet.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def _config(out, unet_json, **kw):
    base = dict(data="digits", out=str(out), unet_json=unet_json, steps=6, batch_size=8, lr=1e-3,
                warmup=2, ema_decay=0.9, save_every=3, sample_every=0, log_every=1, seed=3,
                schedule=SHORT_SCHEDULE, device="cpu")
    return TrainConfig(**{**base, **kw})


def _states(out):
    return torch.load(out / "state.pt", weights_only=True)


def test_resume_continues_exactly(tmp_path, unet_json):
    Trainer(_config(tmp_path / "straight", unet_json)).run()
    Trainer(_config(tmp_path / "split", unet_json, steps=3)).run()
    Trainer(_config(tmp_path / "split", None, steps=6, resume=True)).run()
    a, b = _states(tmp_path / "straight"), _states(tmp_path / "split")
    assert a["step"] == b["step"] == 6
    for part in ("unet_state", "ema_state"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key}"
    # the weights moved, and the EMA lags behind them
    first = _states(tmp_path / "split")["unet_state"]["conv_in.weight"]
    assert not torch.equal(first, a["ema_state"]["conv_in.weight"])
    model = checkpoint.load(tmp_path / "split" / "model.pt")  # EMA weights, readable by `sample`
    assert torch.equal(model.unet.state_dict()["conv_out.weight"], a["ema_state"]["conv_out.weight"])
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    # at each save, the EMA weights' L_simple on the run's fixed held-out triples
    assert [r["step"] for r in log if "heldout_loss" in r] == [3, 6]
    x_t, t, noise = heldout_triples(data.digits(8).heldout, model.schedule, torch.device("cpu"))
    with torch.no_grad():
        want = torch.nn.functional.mse_loss(model.unet(x_t, t), noise).item()
    assert log[-1]["heldout_loss"] == pytest.approx(want, rel=1e-5)
    straight = (tmp_path / "straight" / "log.jsonl").read_text().splitlines()
    assert json.loads(straight[-1])["heldout_loss"] == log[-1]["heldout_loss"]  # resumed: same weights


# Runs `fastddpm train` with torch.save wrapped: at the n-th write of `target`'s temp file the
# process truncates what it wrote to half and SIGKILLs itself, i.e. dies in the middle of a save.
DIE_DURING_SAVE = """
import os, signal, sys, torch
from fastddpm.cli import main
target, nth = sys.argv[1], int(sys.argv[2])
real_save, writes = torch.save, []
def save_then_die(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    if os.path.basename(str(f)).startswith("." + target + "."):
        writes.append(f)
        if len(writes) == nth:
            os.truncate(f, os.path.getsize(f) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_then_die
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("target", ["state.pt", "model.pt"])
def test_killed_during_a_save_keeps_the_last_checkpoint_and_resumes_exactly(tmp_path, unet_json, target):
    """Killed while writing the 2nd checkpoint (step 6): the files from step 3 are intact and
    loadable, and a resume from them ends with the same weights as an uninterrupted run."""
    out = tmp_path / "run"
    argv = ["train", "--data", "digits", "--out", str(out), "--unet-json", unet_json,
            "--steps", "9", "--batch-size", "8", "--lr", "1e-3", "--warmup", "2",
            "--ema-decay", "0.9", "--save-every", "3", "--sample-every", "0", "--seed", "3",
            "--device", "cpu"]
    # the same thread count as this process: CPU kernels sum in a thread-dependent order, and the
    # comparison below is bit-exact
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-c", DIE_DURING_SAVE, target, "2", *argv],
                          capture_output=True, env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert list(out.glob(".*.tmp")), "the kill should have left a half-written temp file"
    state = _states(out)
    assert state["step"] == (6 if target == "model.pt" else 3)  # state.pt is written first
    model = checkpoint.load(out / "model.pt")  # step 3's EMA either way
    assert all(torch.isfinite(p).all() for p in model.unet.parameters())

    assert main(argv + ["--resume"]) == 0
    assert not list(out.glob(".*.tmp"))  # the stale temp file is cleared on resume
    straight = [a if a != str(out) else str(tmp_path / "straight") for a in argv]
    assert main(straight) == 0
    a, b = _states(tmp_path / "straight"), _states(out)
    assert a["step"] == b["step"] == 9
    for key, value in a["ema_state"].items():
        assert torch.equal(value, b["ema_state"][key]), key
    # the log as the straight run's: step 6 was logged before the kill, and once only after it
    assert _log(out, "step", "loss", "heldout_loss") == _log(tmp_path / "straight", "step", "loss",
                                                             "heldout_loss")


def _log(out, *keys):
    return [{k: r.get(k) for k in keys}
            for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]


@pytest.mark.slow
def test_distributed_training_on_gloo(tmp_path, unet_json, capsys):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", "-m", "fastddpm", "train", "--out", str(out),
                           "--unet-json", unet_json, "--steps", "4", "--batch-size", "4",
                           "--save-every", "2", "--sample-every", "0", "--log-every", "1",
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = _states(out)
    assert state["step"] == 4
    assert len(state["rng"]["data"]) == 2  # both ranks' streams, for an exact resume
    assert not torch.equal(state["rng"]["data"][0], state["rng"]["data"][1])  # per-rank seeds
    log = (out / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4]  # rank 0 alone logs
    model = checkpoint.load(out / "model.pt")
    assert all(torch.isfinite(p).all() for p in model.unet.parameters())
    code, err = _cli(capsys, "--out", str(out), "--steps", "6", "--resume", "--device", "cpu")
    assert code == 2 and "with the same number" in err  # one process cannot continue two streams


def _assert_grid_of(png, model, device, max_levels=0):
    """`png` is the grid of what the trainer samples from `model` (64 DDIM images, seed 0), to
    `max_levels` grey levels (a GPU's convolutions may round differently from run to run)."""
    want = sample(model, num=64, steps=min(100, model.schedule.num_timesteps), sampler="ddim",
                  seed=0, device=device, cuda_graph=False)
    got = np.asarray(Image.open(png)).astype(int)
    diff = np.abs(got - np.asarray(images.grid(want)).astype(int))
    assert diff.max() <= max_levels, f"{int((diff > max_levels).sum())} pixels differ"
    assert got.std() > 0


def _cli(capsys, *argv):
    code = main(["train", *argv])
    return code, capsys.readouterr().err


def test_bad_input(tmp_path, unet_json, capsys):
    base = ["--unet-json", unet_json, "--steps", "2", "--batch-size", "4", "--sample-every", "0",
            "--device", "cpu"]
    cases = [
        (["--out", str(tmp_path / "a"), "--lr", "0"], "--lr must be positive"),
        (["--out", str(tmp_path / "b"), "--lr=-1e-3"], "--lr must be positive"),
        (["--out", str(tmp_path / "c"), "--config", "nope", "--steps", "2"], "unknown model config"),
        (["--out", str(tmp_path / "d"), "--resume"], "nothing to resume"),
        (["--out", str(tmp_path / "e"), "--batch-size", "5000"], "fewer than one batch"),
    ]
    (tmp_path / "file").write_text("x")
    cases.append((["--out", str(tmp_path / "file" / "run")], "cannot create output folder"))
    for args, message in cases:
        argv = [a for a in base if not (a in ("--unet-json", unet_json) and "--config" in args)] + args
        code, err = _cli(capsys, *argv)
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)
        out = args[args.index("--out") + 1]
        assert not os.path.exists(out), f"{args}: refused input must write nothing"


def test_an_empty_out_is_refused_not_the_current_folder(tmp_path, unet_json, capsys, monkeypatch):
    """`--out ''` trained into the current folder (Path("") is "."): an argv the CLI fuzz grammar
    draws, unseen while no case checked its current folder (each now runs in an empty one)."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    code, err = _cli(capsys, "--out", "", "--unet-json", unet_json, "--steps", "1", "--batch-size", "4",
                     "--sample-every", "0", "--device", "cpu")
    assert code == 2 and "--out is empty" in err and err.count("\n") == 1, err
    assert list((tmp_path / "cwd").iterdir()) == []


def test_existing_run_and_other_architecture_are_refused(tmp_path, unet_json, capsys):
    out = tmp_path / "run"
    Trainer(_config(out, unet_json, steps=2, save_every=2)).run()
    before = (out / "model.pt").read_bytes()
    code, err = _cli(capsys, "--out", str(out), "--unet-json", unet_json, "--steps", "4", "--device", "cpu")
    assert code == 2 and "already holds a training run" in err
    code, err = _cli(capsys, "--out", str(out), "--config", "digits", "--steps", "4", "--resume",
                     "--device", "cpu")
    assert code == 2 and "another architecture" in err and err.count("\n") == 1
    assert (out / "model.pt").read_bytes() == before


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, unet_json, capsys):
    out = tmp_path / "nan"
    code, err = _cli(capsys, "--out", str(out), "--unet-json", unet_json, "--steps", "50",
                     "--batch-size", "4", "--lr", "1e12", "--warmup", "0", "--save-every", "1",
                     "--sample-every", "0", "--device", "cpu")
    last = err.strip().splitlines()[-1]  # above it: the progress bar
    assert code == 2 and "Traceback" not in err and last.startswith("fastddpm train: error:")
    assert ("loss became" in last or "non-finite" in last) and "step" in last
    model = checkpoint.load(out / "model.pt")
    assert all(torch.isfinite(p).all() for p in model.unet.parameters())
    assert _states(out)["step"] < 50


def test_bf16_autocast_trains_samples_and_fp16_needs_a_gpu(tmp_path, unet_json, capsys):
    Trainer(_config(tmp_path / "bf16", unet_json, steps=2, save_every=2, sample_every=2,
                    precision="bf16")).run()
    model = checkpoint.load(tmp_path / "bf16" / "model.pt")
    # the periodic grid: 64 DDIM samples of the EMA weights saved at that step, seed 0
    _assert_grid_of(tmp_path / "bf16" / "samples" / "step_0000002.png", model, "cpu")
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.unet.parameters())
    code, err = _cli(capsys, "--out", str(tmp_path / "fp16"), "--unet-json", unet_json,
                     "--precision", "fp16", "--device", "cpu")
    assert code == 2 and "needs a GPU" in err and not (tmp_path / "fp16").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_trains_on_cuda_in_every_precision(tmp_path, unet_json, precision):
    """Autocast (fp16 with the gradient scaler) on the GPU: finite losses every step, fp32
    weights in the checkpoint, and its sample grid drawn through the GPU sampler."""
    out = tmp_path / precision
    Trainer(_config(out, unet_json, steps=4, save_every=4, sample_every=4, device="cuda",
                    precision=precision)).run()
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(0 < loss < 10 for loss in losses), losses
    model = checkpoint.load(out / "model.pt")
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.unet.parameters())
    assert _states(out)["step"] == 4
    _assert_grid_of(out / "samples" / "step_0000004.png", model, "cuda", max_levels=1)


@pytest.mark.parametrize("flag, value", [
    ("--grad-clip", "nan"), ("--grad-clip", "inf"), ("--grad-clip", "-1"), ("--grad-clip", "0"),
    ("--lr", "nan"), ("--lr", "inf"), ("--ema-decay", "nan"), ("--ema-decay", "1"),
    ("--dropout", "nan"), ("--dropout", "-0.1"), ("--warmup", "-1"), ("--seed", "-3"),
    ("--log-every", "0"), ("--sample-every", "-1"),
])
def test_non_finite_or_negative_hyper_parameters_are_refused_before_the_run_folder(
        tmp_path, unet_json, capsys, flag, value):
    out = tmp_path / "run"
    code, err = _cli(capsys, "--out", str(out), "--unet-json", unet_json, "--steps", "2",
                     "--device", "cpu", f"{flag}={value}")
    assert code == 2 and flag in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_resume_takes_the_runs_values_and_refuses_changed_ones(tmp_path, unet_json, capsys):
    out = tmp_path / "run"
    first = ["--out", str(out), "--unet-json", unet_json, "--steps", "2", "--batch-size", "4",
             "--lr", "3e-3", "--grad-clip", "0.5", "--save-every", "2", "--sample-every", "0",
             "--seed", "5", "--device", "cpu"]
    assert _cli(capsys, *first)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for flag, changed in (("--lr", ["--lr", "1e-3"]), ("--grad-clip", ["--grad-clip", "1"]),
                          ("--seed", ["--seed", "6"]), ("--batch-size", ["--batch-size", "8"]),
                          ("--flip", ["--flip"]),
                          ("--ema-decay", ["--data", "digits", "--ema-decay", "0.5"])):
        code, err = _cli(capsys, "--out", str(out), "--resume", "--steps", "4", *changed)
        assert code == 2 and err.count("\n") == 1 and "keeps its hyper-parameters" in err, (changed, err)
        assert flag in err and "--data" not in err  # the flag that changed is named, alone
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # flags left out are the run's own (a default lr, grad clip, seed would change the run)
    code, err = _cli(capsys, "--out", str(out), "--resume", "--steps", "4", "--log-every", "1")
    assert code == 0, err
    stored = json.loads(_states(out)["train_config"])
    assert (stored["lr"], stored["grad_clip"], stored["seed"], stored["steps"]) == (3e-3, 0.5, 5, 4)
    # and it is the run a straight one would be
    straight = tmp_path / "straight"
    assert _cli(capsys, "--out", str(straight), *first[2:4], "--steps", "4", *first[6:])[0] == 0
    for key, value in _states(straight)["ema_state"].items():
        assert torch.equal(value, _states(out)["ema_state"][key]), key


def test_resume_from_a_checkpoint_older_than_the_log_logs_each_step_once(tmp_path, unet_json):
    """Killed after logging past its last save: the resumed run's log is the straight run's."""
    Trainer(_config(tmp_path / "straight", unet_json)).run()
    out = tmp_path / "split"
    Trainer(_config(out, unet_json, steps=3)).run()
    saved_at_3 = (out / "state.pt").read_bytes()
    Trainer(_config(out, None, steps=5, resume=True)).run()  # logs 4 and 5, saves at 5 ...
    (out / "state.pt").write_bytes(saved_at_3)  # ... which the kill lost
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.1')  # and a line the kill cut short
    Trainer(_config(out, None, steps=6, resume=True)).run()
    assert _log(out, "step", "loss", "heldout_loss") == _log(tmp_path / "straight", "step", "loss",
                                                             "heldout_loss")
    assert [r["step"] for r in _log(out, "step")] == [1, 2, 3, 4, 5, 6]


def test_a_fresh_run_starts_its_log_empty(tmp_path, unet_json):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # a run killed before its first save
    Trainer(_config(out, unet_json, steps=2)).run()
    assert [r["step"] for r in _log(out, "step")] == [1, 2]
    assert _log(out, "loss")[0]["loss"] != 9.0


@pytest.mark.parametrize("content", [b"\x80\x04 a pickle", b"[1, 2]", b"{not json"])
def test_a_unet_json_that_is_no_json_object_is_one_line(tmp_path, capsys, content):
    """Found by the fuzz suite: a binary --unet-json raised UnicodeDecodeError."""
    (tmp_path / "u.json").write_bytes(content)
    code, err = _cli(capsys, "--out", str(tmp_path / "run"), "--unet-json", str(tmp_path / "u.json"),
                     "--device", "cpu")
    assert code == 2 and "--unet-json" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
