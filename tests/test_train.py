"""The trainer: exact resume, crash-safe checkpoints, DDP on gloo, and bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastddpm import checkpoint
from fastddpm.cli import main
from fastddpm.train import TrainConfig, Trainer

TINY = {"image_size": 8, "in_channels": 1, "out_channels": 1, "base_channels": 8,
        "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4], "groups": 4,
        "dropout": 0.1, "eps": 1e-6}
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


def test_killed_during_saves_leaves_loadable_checkpoints(tmp_path, unet_json):
    """SIGKILL a run that saves every step, several times at varying moments, resuming each time:
    whatever moment the kill lands in, model.pt and state.pt stay loadable."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "fastddpm", "train", "--out", str(out), "--unet-json", unet_json,
            "--steps", "100000", "--batch-size", "4", "--save-every", "1", "--sample-every", "0",
            "--device", "cpu"]
    for attempt in range(4):
        proc = subprocess.Popen(args + (["--resume"] if attempt else []), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 60
        while not (out / "state.pt").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1.0 + 0.37 * attempt)  # land the kill at a different point of the loop
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        state = _states(out)
        assert state["step"] >= 1
        model = checkpoint.load(out / "model.pt")
        assert all(torch.isfinite(p).all() for p in model.unet.parameters())


@pytest.mark.slow
def test_distributed_training_on_gloo(tmp_path, unet_json):
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
