"""Sampling spread over the processes of a torchrun job, written as shards a re-run resumes.

The job's sample indices 0..num−1 are cut into the batches one process would draw
(`SamplingOptions.batches`); batch k is shard k, and rank r draws shards r, r+W, r+2W, ... of a
world of W. Noise is counter-based (seed, sample index, step), and each shard is exactly one of
the single process's batches, so the images are the same bytes as `fastddpm sample` gives in
one process, at any number of ranks, and every rank runs one ε engine: under `backend="auto"`
rank 0 picks it (autoselect.engine_for) for all.

Shards are uint8 arrays written atomically into a work folder beside the output,
`.<name>.shards/`, with a manifest of the job's identity (model hash, sampling options, seed,
num, world layout). A re-run of the same command skips the shards already there; a re-run
whose identity differs is refused (one line) rather than mixing two jobs' images. When every
shard is in, rank 0 joins them into the output — an .npz, a PNG grid, or a folder of PNGs built
beside and swapped in whole (fastddpm.images) — and deletes the work folder.

Every rank must see the output's folder: across nodes it lies on a shared filesystem.
"""
from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from . import autoselect, images
from .backends import resolve_device
from .digest import state_digest
from .distributed import Distributed
from .dtypes import dtype_name
from .errors import UserError
from .files import atomic_write
from .limits import check_fits
from .model import DiffusionModel
from .options import SamplingOptions
from .progress import progress_bar
from .runtime import Sampler

MANIFEST = "manifest.json"
LAYOUT_VERSION = 1


def work_folder(out: str | Path) -> Path:
    """Where a sharded run to `out` keeps its shards until they are joined."""
    target = Path(str(out).rstrip("/") or "/")
    return target.parent / f".{target.name}.shards"


def model_hash(model: DiffusionModel) -> str:
    """sha256 of the model's configuration and weights (names, dtypes, shapes, bytes): what the
    images depend on, whatever file or folder the model was read from."""
    config = json.dumps([model.config.to_dict(), model.schedule.config.to_dict(),
                         model.sampling.to_dict()], sort_keys=True)
    return state_digest(model.unet.state_dict(), config.encode())


def job_identity(model: DiffusionModel, num: int, seed: int, options: SamplingOptions,
                 world: int) -> dict:
    """Everything a shard's bytes depend on, and how the job is cut (JSON-ready)."""
    chosen = asdict(options)
    # the rank's own GPU is chosen per rank; only the kind of device changes the numbers
    chosen["device"] = torch.device(options.device or "cpu").type
    return {"version": LAYOUT_VERSION, "model": model_hash(model), "options": chosen,
            "seed": seed, "num": num, "world": world, "shard_images": options.batches(num)[0][1]}


def _shard_path(folder: Path, k: int) -> Path:
    return folder / f"shard-{k:06d}.npy"


def _describe_difference(old: dict, new: dict) -> str:
    """What changed between two job identities, e.g. "seed 5 → 6, world 2 → 1"."""
    if not isinstance(old.get("options"), dict):
        old = {**old, "options": {}}
    changes = [f"{k} {old['options'].get(k)!r} → {v!r}" for k, v in new["options"].items()
               if old["options"].get(k) != v]
    changes += ["model weights" if k == "model" else f"{k} {old.get(k)!r} → {new[k]!r}"
                for k in new if k != "options" and old.get(k) != new[k]]
    return ", ".join(changes)


def _prepare(folder: Path, identity: dict) -> str | None:
    """Rank 0: open or start the work folder. None when ready, else the one-line refusal."""
    manifest = folder / MANIFEST
    if folder.exists():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError):
            return (f"{folder} is not an unfinished fastddpm run (no readable {MANIFEST}); "
                    "delete it or choose another output path")
        if old != identity:
            return (f"{folder} holds an unfinished run of another job "
                    f"({_describe_difference(old, identity)}); re-run the command that started it "
                    "(same options and torchrun layout), "
                    f"or delete {folder} to start over")
        for stale in folder.glob(".*.tmp"):  # a killed rank's half-written shard
            stale.unlink()
        return None
    folder.mkdir()
    with atomic_write(manifest) as tmp:
        tmp.write_text(json.dumps(identity, indent=1))
    return None


def refuse_unfinished(out: str | Path) -> None:
    """A one-process run must not write beside the shards of an unfinished torchrun job to the
    same output: they belong to another layout."""
    folder = work_folder(out)
    if folder.exists():
        raise UserError(f"{folder} holds an unfinished sharded run to {out}; re-run its torchrun "
                        f"command to finish it, or delete {folder} to start over")


def my_shards(num: int, options: SamplingOptions, ctx: Distributed) -> list[tuple[int, int, int]]:
    """(shard number, first sample index, images) of this rank's shards: every W-th batch."""
    return [(k, first, n) for k, (first, n) in enumerate(options.batches(num))
            if k % ctx.world == ctx.rank]


def draw(runner: Sampler, seed: int, first: int, n: int) -> np.ndarray:
    """Samples first..first+n−1 as (n, H, W, C) uint8: the same bytes `fastddpm sample` writes."""
    return images.to_uint8(runner.run(seed, first, n).float().clamp(-1.0, 1.0).cpu())


def _one_engine(model: DiffusionModel, options: SamplingOptions, ctx: Distributed,
                batch: int) -> SamplingOptions:
    """`options` with an `auto` dtype replaced by rank 0's (ranks on CPUs with and without native
    bf16 would otherwise differ) and an `auto` backend by the engine rank 0 picks for the job's
    batches: left to itself each rank would time and pick its own, and engines agree only to
    ~1e-4, not in bytes. Both go into the job's identity, so a re-run never mixes two engines' or
    two dtypes' shards."""
    if options.dtype == "auto":
        name = dtype_name(options.torch_dtype(resolve_device(options.device))) if ctx.main else None
        options = options.replace(dtype=ctx.broadcast_from_main(name))
    if options.backend != "auto":
        return options
    name = autoselect.engine_for(model, options, batch) if ctx.main else None
    return options.replace(backend=ctx.broadcast_from_main(name))


def in_rounds(todo: list, ctx: Distributed, work: Callable[[object], int],
              on_round: Callable[[int], None]) -> int:
    """Run `work(item)` for each of this rank's `todo` in lock-step rounds (ranks with fewer
    items idle through the last ones) and tell `on_round` how much all ranks did in each:
    what lets rank 0 show the whole job's progress. Returns what all ranks did in all."""
    rounds = int(ctx.all_reduce_max(torch.tensor([len(todo)], dtype=torch.int64)).item())
    total = 0
    for i in range(rounds):
        done = work(todo[i]) if i < len(todo) else 0
        done = int(ctx.all_reduce_sum(torch.tensor([done], dtype=torch.int64)).item())
        on_round(done)
        total += done
    return total


def sample_to(out: str | Path, model: DiffusionModel, num: int, seed: int,
              options: SamplingOptions, ctx: Distributed, progress: bool = True) -> int:
    """Draw `num` images of `seed` across the job's ranks into `out` (.npz, .png or DIR/),
    resuming from the shards a previous run of the same job left. Returns the number of
    images this run drew, all ranks together (the job's missing ones, each once)."""
    cfg = model.config
    check_fits(f"joining {num} images", join_bytes(num, cfg.out_channels, cfg.image_size),
               "ask for fewer (-n), or draw them as several jobs")
    folder = work_folder(out)
    options = _one_engine(model, options, ctx, options.batches(num)[0][1])
    identity = job_identity(model, num, seed, options, ctx.world)
    refusal = ctx.broadcast_from_main(_prepare(folder, identity) if ctx.main else None)
    if refusal is not None:
        raise UserError(refusal)
    ctx.barrier()  # the folder exists and holds no stale temp file before any rank writes
    shards = options.batches(num)
    finished = sum(n for k, (_, n) in enumerate(shards) if _shard_path(folder, k).is_file())
    todo = [s for s in my_shards(num, options, ctx) if not _shard_path(folder, s[0]).is_file()]
    if progress and ctx.main and finished:
        print(f"resuming: {finished} of {num} images already drawn in {folder}", file=sys.stderr)
    runner = Sampler(model, options)

    def draw_shard(shard: tuple[int, int, int]) -> int:
        k, first, n = shard
        arr = draw(runner, seed, first, n)
        with atomic_write(_shard_path(folder, k)) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arr, allow_pickle=False)
        return n

    with progress_bar(progress and ctx.main, total=num, initial=finished, unit="img",
                      desc=f"sampling on {ctx.world} ranks") as update:
        drawn = in_rounds(todo, ctx, draw_shard, update)
    ctx.barrier()  # every shard is on disk
    if ctx.main:
        images.save_uint8(_join(folder, shards, runner.image_shape), out)
        shutil.rmtree(folder)
    ctx.barrier()  # no rank returns before the output is in place
    return drawn


def join_bytes(num: int, channels: int, size: int) -> int:
    """What rank 0 holds to write a job's output (uint8): every shard read back and their
    concatenation, and for a PNG grid its canvas (2 px padding around each image) and PIL's copy
    of that. The batches the ranks draw are bounded where they are drawn (Sampler.run)."""
    return num * channels * (2 * size ** 2 + 2 * (size + 2) ** 2)


def _join(folder: Path, shards: list[tuple[int, int]], image_shape: tuple[int, ...]) -> np.ndarray:
    c, h, w = image_shape
    parts = []
    for k, (_, n) in enumerate(shards):
        path = _shard_path(folder, k)
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"shard {path} is unreadable ({e}); delete it and re-run to draw it "
                            "again") from None
        if arr.shape != (n, h, w, c) or arr.dtype != np.uint8:
            raise UserError(f"shard {path} holds {arr.dtype} {arr.shape}, not ({n}, {h}, {w}, {c}) "
                            "uint8; delete it and re-run to draw it again")
        parts.append(arr)
    return np.concatenate(parts)
