"""Fuzzing the command line (Hypothesis): argv lists for sample, eval, export, convert and train
built from hostile values (negative, zero, huge and non-numeric counts, NaN hyper-parameters,
missing, damaged and wrong-kind files, outputs over inputs or in odd places).

The promise of every case: exit 0, or exit 2 with one line on stderr and no traceback; every byte
of the user's files unchanged. The fuzzed cases run in-process (fast, many); the issue's own cases
and a few fuzzed ones (more under --fuzz-long) run `python -m fastddpm` in a subprocess under a
2 GiB address-space limit (torch's import alone maps ~0.9 GiB) with a hang guard, and a refusal
must peak under 1 GiB resident — the issue's bound on a refusal."""
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from fuzzing import budget, digest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from tiny import TINY, save_tiny

from fastddpm.cli import main
from fastddpm.schedule import ScheduleConfig

ADDRESS_SPACE = 2 << 30
RESIDENT_BOUND = 1 << 30
HANG_GUARD_S = 300  # not a timing test: a case that runs this long is a hang
OUT_FLAG = {"export": "-o", "convert": "-o", "eval": "--grid"}  # the others: --out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The user's files every case may name (hashed before and after each case)."""
    root = tmp_path_factory.mktemp("user")
    model = save_tiny(root / "tiny.pt", TINY, ScheduleConfig("linear", 20))
    rng = np.random.default_rng(0)
    np.savez(root / "images.npz", images=rng.integers(0, 256, (8, 8, 8), dtype=np.uint8))
    (root / "broken.npz").write_bytes((root / "images.npz").read_bytes()[:100])
    (root / "broken.pt").write_bytes(model.read_bytes()[:300])
    (root / "unet.json").write_text(json.dumps(TINY.to_dict()))
    (root / "kept.png").write_bytes(b"an output someone keeps")
    (root / "folder").mkdir()
    (root / "folder" / "photo.jpg").write_bytes(b"\xff\xd8 not ours")
    (root / "cwd").mkdir()  # where each case runs: it must stay empty
    return root


def _paths(root):
    """Values for a path argument: good, missing, damaged, an input, a folder, empty."""
    return st.sampled_from([str(root / n) for n in ("tiny.pt", "images.npz", "broken.npz", "broken.pt",
                                                     "unet.json", "kept.png", "folder", "missing.pt")]
                           + ["", "default", "digits", str(root / "folder") + "/"])


def _counts(cheap):
    """Counts: the edges, junk, and `cheap` (valid values that stay fast on the tiny model)."""
    return st.sampled_from(["0", "-1", "1000000000000", "x", "", "nan", "1.5", *cheap])


@st.composite
def argv(draw, root):
    out = draw(st.sampled_from([str(root / "out" / n) for n in ("a.png", "a.npz", "d/", "sub/x.png")]
                               + [str(root / "kept.png"), str(root / "tiny.pt"), ""]))
    path = _paths(root)
    flag_values = {
        "sample": {"--model": path, "--num": _counts(["2"]), "--steps": _counts(["2", "1000000000"]),
                   "--sampler": st.sampled_from(["ddim", "ddpm", "dpm++", "x"]),
                   "--eta": st.sampled_from(["nan", "-1", "0.5", "inf", "x"]), "--seed": _counts(["3"]),
                   "--progressive": _counts(["2"]), "--from": path, "--interpolate": _counts(["2"]),
                   "--t": _counts(["10", "1000000"]), "--batch-size": _counts(["1"]),
                   "--dtype": st.sampled_from(["fp32", "fp64"]),
                   "--backend": st.sampled_from(["torch", "x"])},
        "eval": {"--model": path, "--num": _counts(["2"]), "--data": path, "--split": st.just("train"),
                 "--seed": _counts(["1"]), "--steps": _counts(["2"])},
        "export": {"--batch": _counts(["dynamic", "2"]), "--opset": _counts(["7", "99"]),
                   "--what": st.sampled_from(["eps", "step", "both", "x"]), "--steps": _counts(["2"]),
                   "--dtype": st.sampled_from(["fp32", "fp16", "x"])},
        "convert": {"--to": st.sampled_from(["diffusers", "fastddpm", "x"])},
        "train": {"--data": path, "--unet-json": path, "--steps": _counts(["1"]),
                  "--batch-size": _counts(["4"]), "--lr": _counts(["inf", "1e-3"]),
                  "--grad-clip": _counts(["inf", "1"]), "--ema-decay": _counts(["1", "0.5"]),
                  "--warmup": _counts(["1"]), "--save-every": _counts(["1"])},
    }
    command = draw(st.sampled_from(sorted(flag_values)))
    flags = draw(st.lists(st.sampled_from(sorted(flag_values[command])), max_size=4, unique=True))
    args = [command]
    if command in ("export", "convert"):
        args.append(draw(path))
    args += [OUT_FLAG.get(command, "--out"), out]
    if command == "train":  # one cheap step unless the flags drawn below say otherwise
        args += ["--device", "cpu", "--sample-every", "0", "--steps", "1", "--batch-size", "4"]
    if command == "eval":
        args += ["--bpd"] if draw(st.booleans()) else ["--num", "2", "--steps", "2", "--sampler", "ddim"]
    if command == "sample":
        args.append("--no-progress")
    for flag in flags:
        args += [flag, draw(flag_values[command][flag])]
    if draw(st.booleans()) and command == "train":
        args.append("--resume")
    return args


def _kept_promise(code, err, argv):
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == 2:
        last = err.strip().splitlines()[-1]  # a progress bar may stand above it (train)
        assert last.startswith("fastddpm") and "error" in last, (argv, err)
        assert err.strip().count("\n") == 0 or "\r" in err, (argv, err)


@contextmanager
def _user_files_kept(files, args):
    """Runs the block in an empty current folder (`--out ''` once meant "here") and asserts that
    it leaves that folder empty and every byte of the user's files as it found them — all but
    the one `args` names as its output (replacing that is the contract); then puts back a file
    that output replaced, so the next case sees the same files."""
    originals = {p: p.read_bytes() for p in files.iterdir() if p.is_file()}
    before = digest(*_inputs(files, args))
    here = Path.cwd()
    os.chdir(files / "cwd")
    try:
        yield
    finally:
        os.chdir(here)
    assert digest(*_inputs(files, args)) == before, args
    assert not any((files / "cwd").iterdir()), (args, list((files / "cwd").iterdir()))
    for path, data in originals.items():
        path.write_bytes(data)


def _inputs(files, args):
    out = args[args.index(OUT_FLAG.get(args[0], "--out")) + 1]
    return [p for p in files.iterdir() if p.name not in ("out", "cwd") and str(p) != out.rstrip("/")]


# shrinking reruns whole commands: too slow; no deadline: a valid case does real work (an export)
@settings(budget(20), phases=[Phase.generate], deadline=None)
@given(st.data())
def test_argv_in_process(files, capsys, draw):
    args = draw.draw(argv(files))
    capsys.readouterr()
    start = time.perf_counter()
    with _user_files_kept(files, args):
        try:
            code = main(args)
        except SystemExit as e:  # argparse's own refusals
            code = e.code
        err = capsys.readouterr().err
        with capsys.disabled():  # what ran, for a reader of `pytest -s`
            print(f"{time.perf_counter() - start:6.1f} s exit {code}: {' '.join(args)}", flush=True)
        _kept_promise(code, err, args)


def _limited():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_limited(args: list[str], stderr_file) -> tuple[int, str, float, int]:
    """`python -m fastddpm ARGS` under the address-space limit: (exit code, stderr, seconds,
    peak resident bytes of that child alone, from wait4)."""
    start = time.perf_counter()
    with open(stderr_file, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "fastddpm", *args], stdout=subprocess.DEVNULL,
                                stderr=err, preexec_fn=_limited, env={**os.environ, "OMP_NUM_THREADS": "1"})
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() - start > HANG_GUARD_S:
            proc.kill()
            raise AssertionError(f"{args}: still running after {HANG_GUARD_S} s")
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return proc.returncode, stderr_file.read_text(), time.perf_counter() - start, usage.ru_maxrss * 1024


def _check_limited(files, args):
    (files / "out").mkdir(exist_ok=True)
    with _user_files_kept(files, args):
        code, err, seconds, peak = run_limited(args, files / "out" / "stderr.txt")
        _kept_promise(code, err, args)
    if code == 2:
        assert peak < RESIDENT_BOUND, (args, peak)
    print(f"{args[:3]}: exit {code} in {seconds:.1f} s, peak {peak / 2**20:.0f} MiB")


@pytest.mark.parametrize("case", [
    ["sample", "--num", "1000000000000", "--out", "{out}/x.png"],
    ["train", "--grad-clip", "nan", "--out", "{out}/run"],
])
def test_the_issues_cases_in_a_limited_process(files, case):
    _check_limited(files, [a.format(out=files / "out") for a in case])


# The grammar's argv lists as real processes under the limit: what the in-process run cannot
# see (an allocation past RLIMIT_AS, a crash in native code, the interpreter's own exit path).
# A few cases by default: each process imports torch (~3 s)
@settings(budget(6), phases=[Phase.generate], deadline=None)
@given(st.data())
def test_argv_in_a_limited_process(files, draw):
    _check_limited(files, draw.draw(argv(files)))
