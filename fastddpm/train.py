"""`fastddpm train`: the reference trainer (Ho et al. 2020, Algorithm 1, L_simple).

Per step: x0 from the data, t ~ U{0..T−1}, ε ~ N(0, I), loss = ‖ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t)‖².
AdamW with linear LR warm-up, gradient clipping, an EMA of the weights (with warm-up: decay
min(d, (1+n)/(10+n))), autocast on the GPU, DistributedDataParallel under torchrun.

RUN_DIR holds `model.pt` (EMA weights; `fastddpm sample --model RUN_DIR/model.pt`), `state.pt`
(everything needed to resume exactly: weights, EMA, optimizer, step, every RNG state),
`log.jsonl`, `config.json` and `samples/step_N.png`. Both checkpoints are written atomically.
`log.jsonl` has the training loss at every log step and, at every save, the held-out loss: L_simple
of the EMA weights on fixed (x0, t, ε) triples from the data's held-out split.
"""
from __future__ import annotations

import copy
import gc
import json
import os
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint, data, images
from .distributed import init_distributed
from .dtypes import DTYPES
from .errors import UserError, is_integer, is_number
from .files import atomic_write, read_torch_file
from .limits import check_fits, train_bytes
from .model import DiffusionModel, SamplingDefaults
from .runtime import sample
from .schedule import Schedule, ScheduleConfig
from .unet import UNet, UNetConfig, named_config

PRECISIONS = tuple(DTYPES)  # autocast to this dtype; fp32: no autocast
# What a resumed run may change: how long it runs, where, and how often it reports and saves.
# Every other field shapes the numbers a straight run would have produced.
MAY_CHANGE_ON_RESUME = frozenset({"out", "resume", "steps", "device", "sample_every", "save_every",
                                  "log_every"})
# the U-Net's: checked against the stored config, not the stored flags
ARCHITECTURE_FIELDS = frozenset({"config", "unet_json", "dropout"})
STATE_FORMAT = "fastddpm-train-state"
HELDOUT_PAIRS = 512  # (x0, t, ε) triples of the held-out loss, drawn once per run
HELDOUT_SEED = 1234


@dataclass
class TrainConfig:
    data: str = "digits"
    out: str = "runs/digits"
    config: str | None = None  # a named U-Net config (default: digits), or:
    unet_json: str | None = None  # a JSON file with UNetConfig fields
    steps: int = 10_000
    batch_size: int = 64  # per process
    lr: float = 2e-4
    warmup: int = 500
    ema_decay: float = 0.9999
    grad_clip: float = 1.0
    dropout: float | None = None  # overrides the config's
    flip: bool = False  # random horizontal flips (not for digits)
    precision: str = "fp32"
    sample_every: int = 1000  # 0: never
    save_every: int = 1000
    log_every: int = 50
    seed: int = 0
    resume: bool = False
    schedule: dict = field(default_factory=lambda: ScheduleConfig().to_dict())
    variance: str = "fixed_large"
    device: str | None = None


def _unet_config(cfg: TrainConfig, stored: dict | None) -> UNetConfig:
    if cfg.unet_json:
        try:
            fields = json.loads(Path(cfg.unet_json).read_bytes())
        except (OSError, ValueError) as e:  # unreadable, not text (UnicodeDecodeError), not JSON
            raise UserError(f"cannot read --unet-json {cfg.unet_json}: {str(e)[:200]}") from None
        if not isinstance(fields, dict):
            raise UserError(f"--unet-json {cfg.unet_json} must hold a JSON object of U-Net config fields")
        unet = UNetConfig.from_dict(fields)
    elif cfg.config:
        unet = named_config(cfg.config)
    elif stored is not None:
        return UNetConfig.from_dict(stored)
    else:
        unet = named_config("digits")
    if cfg.dropout is not None:
        unet = UNetConfig.from_dict({**unet.to_dict(), "dropout": cfg.dropout})
    if stored is not None and UNetConfig.from_dict(stored) != unet:
        raise UserError(f"{cfg.out} was trained with another architecture "
                        f"({stored}); resume without --config/--unet-json or use a new --out")
    return unet


def _check(cfg: TrainConfig) -> None:
    if not cfg.out:  # Path("") is the current folder: the run would land among the user's files
        raise UserError("--out is empty; name the run folder")
    for name in ("steps", "batch_size", "save_every", "log_every"):
        value = getattr(cfg, name)
        if not is_integer(value) or value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    for name in ("warmup", "sample_every", "seed"):
        value = getattr(cfg, name)
        if not is_integer(value) or value < 0:
            raise UserError(f"--{name.replace('_', '-')} must be an integer ≥ 0, got {value!r}")
    # `not x > 0` and the like: NaN fails every comparison, so a plain `x <= 0` lets it through
    if not is_number(cfg.lr) or not cfg.lr > 0:
        raise UserError(f"--lr must be positive, got {cfg.lr}")
    if not is_number(cfg.ema_decay) or not 0.0 <= cfg.ema_decay < 1.0:
        raise UserError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    if not is_number(cfg.grad_clip) or not cfg.grad_clip > 0:
        raise UserError(f"--grad-clip must be a positive number, got {cfg.grad_clip}")
    if cfg.dropout is not None and (not is_number(cfg.dropout) or not 0.0 <= cfg.dropout < 1.0):
        raise UserError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.precision not in PRECISIONS:
        raise UserError(f"unknown precision {cfg.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if cfg.config:
        named_config(cfg.config)  # an unknown name fails before the run folder is made


def _resumed_config(cfg: TrainConfig, state: dict, given: Collection[str] | None) -> TrainConfig:
    """The config of a resumed run: the stored run's, with the fields in `given` (all of them
    when None) as `cfg` has them. A field that shapes the numbers may not change — the run would
    no longer be the one it continues — and is refused in one line; the architecture fields are
    checked against the stored U-Net (_unet_config)."""
    try:
        stored = json.loads(state["train_config"])
        stored = {k: v for k, v in stored.items() if k in TrainConfig.__dataclass_fields__}
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{cfg.out}/state.pt holds no readable training config; start a new --out") from None
    current = json.loads(json.dumps(asdict(cfg)))  # tuples as lists, like the stored JSON
    taken = set(current) if given is None else set(given) | {"out", "resume"}
    merged = {**stored, **{k: current[k] for k in taken | ARCHITECTURE_FIELDS}}
    changed = sorted(k for k in merged if k not in MAY_CHANGE_ON_RESUME | ARCHITECTURE_FIELDS
                     and k in stored and merged[k] != stored[k])
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {stored[k]} (now {merged[k]})" for k in changed)
        raise UserError(f"{cfg.out} was trained with {flags}; a resumed run keeps its "
                        "hyper-parameters: drop the changed flags, or train into a new --out")
    return TrainConfig(**merged)


def _check_run_folder(out: Path, resume: bool) -> None:
    """Refuse to overwrite a run, or to resume nothing (reads only: nothing is written yet)."""
    if (out / "state.pt").exists() and not resume:
        raise UserError(f"{out} already holds a training run; pass --resume to continue it "
                        "or choose another --out")
    if resume and not (out / "state.pt").exists():
        raise UserError(f"nothing to resume: {out / 'state.pt'} does not exist")


def _make_run_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "samples").mkdir(exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"output folder {out} is not writable; choose another --out")
    for stale in out.glob(".*.pt.*.tmp"):  # temp files of a run killed mid-save
        stale.unlink(missing_ok=True)


def _load_state(path: Path) -> dict:
    state = read_torch_file(path)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"{path} is not a fastddpm training state")
    return state


class Trainer:
    def __init__(self, cfg: TrainConfig, given: Collection[str] | None = None):
        """`given`: with `cfg.resume`, the fields the caller set (a command line's flags); the
        others are the resumed run's. None: all of `cfg` is as the caller wants it."""
        # every check that can fail runs before anything is written
        self.out = Path(cfg.out)
        _check_run_folder(self.out, cfg.resume)
        resumed = _load_state(self.out / "state.pt") if cfg.resume else None
        if resumed:
            cfg = _resumed_config(cfg, resumed, given)
        _check(cfg)
        self.cfg = cfg
        from .backends import resolve_device

        device = resolve_device(cfg.device)
        self.dist = init_distributed(device.type)
        if device.type == "cuda" and self.dist.world > 1:
            device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        if cfg.precision == "fp16" and device.type != "cuda":
            raise UserError("fp16 training needs a GPU; use --precision bf16 or fp32 on the CPU")
        unet_cfg = _unet_config(cfg, resumed["unet"] if resumed else None)
        check_fits(f"a training step at --batch-size {cfg.batch_size}",
                   cfg.batch_size * train_bytes(unet_cfg), "lower --batch-size")
        schedule_cfg = ScheduleConfig.from_dict(resumed["schedule"] if resumed else cfg.schedule)
        self.schedule = Schedule(schedule_cfg)
        self.sampling = SamplingDefaults(cfg.variance, True)

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank (so the same EMA)
        self.unet = UNet(unet_cfg).to(device)
        self.ema = copy.deepcopy(self.unet).eval().requires_grad_(False)
        torch.manual_seed(cfg.seed + self.dist.rank)  # per-rank dropout
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.gen = torch.Generator(device).manual_seed(cfg.seed * 1000 + self.dist.rank)
        self.step = 0
        if resumed:
            self._restore(resumed)

        ds = data.load(cfg.data, unet_cfg.image_size, unet_cfg.in_channels)
        if len(ds.train) < cfg.batch_size:
            raise UserError(f"{cfg.data} has {len(ds.train)} training images, fewer than one batch "
                            f"of {cfg.batch_size}; lower --batch-size")
        if self.dist.main:
            _make_run_folder(self.out)
        self.dist.barrier()  # rank 0 has created the folder
        self.train_images = ds.train.to(device)
        self.heldout = heldout_triples(ds.heldout, self.schedule, device) if self.dist.main else None
        self.model = self.unet
        if self.dist.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.unet, device_ids=[device.index] if device.type == "cuda" else None)

    # ---- checkpoints -------------------------------------------------------------------------
    def _restore(self, state: dict) -> None:
        self.unet.load_state_dict(state["unet_state"])
        self.ema.load_state_dict(state["ema_state"])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        rng = state["rng"]
        if len(rng["data"]) != self.dist.world:  # each rank continues its own random stream
            raise UserError(f"{self.out} was trained with {len(rng['data'])} process(es); resume it "
                            f"with the same number, not {self.dist.world}")
        self.gen.set_state(rng["data"][self.dist.rank])
        torch.set_rng_state(rng["torch"][self.dist.rank])
        if self.device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state(rng["cuda"][self.dist.rank], self.device)

    def _gather_rng(self) -> dict:
        own = {"data": self.gen.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        if self.dist.world == 1:
            return {k: [v] for k, v in own.items()}
        # byte tensors of one size on every rank; nccl gathers CUDA tensors only
        return {k: [None] * self.dist.world if v is None
                else [part.cpu() for part in self.dist.all_gather(v.to(self.device))]
                for k, v in own.items()}

    def save(self) -> None:
        rng = self._gather_rng()  # every rank takes part
        if not self.dist.main:
            return
        for p in self.ema.parameters():
            if not torch.isfinite(p).all():  # never replace a good checkpoint with a broken one
                raise UserError(f"weights became non-finite by step {self.step}; the last good "
                                f"checkpoint in {self.out} is kept — lower --lr")
        state = {"format": STATE_FORMAT, "version": 1, "step": self.step,
                 "unet": self.unet.config.to_dict(), "schedule": self.schedule.config.to_dict(),
                 "train_config": json.dumps(asdict(self.cfg)),
                 "unet_state": self.unet.state_dict(), "ema_state": self.ema.state_dict(),
                 "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng}
        with atomic_write(self.out / "state.pt") as tmp:
            torch.save(state, tmp)
        checkpoint.save(DiffusionModel(self.ema, self.schedule, self.sampling), self.out / "model.pt")

    # ---- the loop ----------------------------------------------------------------------------
    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, B = len(self.train_images), self.cfg.batch_size
        idx = torch.randint(0, n, (B,), generator=self.gen, device=self.device)
        x0 = self.train_images[idx]
        if self.cfg.flip:
            flip = torch.rand(B, generator=self.gen, device=self.device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = torch.randint(0, self.schedule.num_timesteps, (B,), generator=self.gen, device=self.device)
        noise = torch.randn(x0.shape, generator=self.gen, device=self.device)
        return self.schedule.q_sample(x0, t, noise), t, noise

    def train_step(self) -> torch.Tensor:
        """One step of Algorithm 1; returns the loss as a device scalar (no host sync here)."""
        cfg = self.cfg
        x_t, t, noise = self._batch()
        dtype = DTYPES[cfg.precision]
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = F.mse_loss(self.model(x_t, t).float(), noise)  # L_simple (eq. 14)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), cfg.grad_clip)
        for group in self.opt.param_groups:  # linear warm-up
            group["lr"] = cfg.lr * min(1.0, (self.step + 1) / max(1, cfg.warmup))
        self.scaler.step(self.opt)
        self.scaler.update()
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.unet.parameters(), strict=True):
                e.lerp_(p, 1.0 - decay)
        self.step += 1
        return loss.detach()

    def checked_loss(self, loss: torch.Tensor) -> float:
        """The loss as a float, or stop if it is not finite on any rank. Called only at log and
        save steps: a NaN spreads into every weight through the update, so the next check sees it,
        and the training loop needs no host sync per step."""
        finite = torch.isfinite(loss).float()
        if self.dist.world > 1:
            self.dist.all_reduce_min(finite)
        if finite.item() < 1:
            raise UserError(f"loss became {loss.item()} by step {self.step}; stopped, the last good "
                            f"checkpoint in {self.out} is kept — lower --lr")
        return loss.item()

    @torch.no_grad()
    def heldout_loss(self) -> float:
        """L_simple of the EMA weights on the run's fixed held-out triples."""
        x_t, t, noise = self.heldout
        size = self.cfg.batch_size
        squares = sum(F.mse_loss(self.ema(x_t[i:i + size], t[i:i + size]).float(), noise[i:i + size],
                                 reduction="sum").item() for i in range(0, len(t), size))
        return squares / noise.numel()

    def sample_grid(self) -> None:
        model = DiffusionModel(self.ema, self.schedule, self.sampling)
        x = sample(model, num=64, steps=min(100, self.schedule.num_timesteps), sampler="ddim",
                   seed=0, device=self.device, cuda_graph=False)
        images.save(x, self.out / "samples" / f"step_{self.step:07d}.png")

    def run(self) -> None:
        cfg = self.cfg
        if self.dist.main:
            with atomic_write(self.out / "config.json") as tmp:
                tmp.write_text(json.dumps(asdict(cfg), indent=2))
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.dist.main, unit="it",
                   desc="training")
        if self.dist.main:
            _truncate_log(self.out / "log.jsonl", self.step)
        log = open(self.out / "log.jsonl", "a") if self.dist.main else None
        start, start_step = time.perf_counter(), self.step
        try:
            while self.step < cfg.steps:
                loss = self.train_step()
                bar.update(1)
                last = self.step == cfg.steps
                log_now = self.step % cfg.log_every == 0 or last
                save_now = self.step % cfg.save_every == 0 or last
                if log_now or save_now:
                    value = self.checked_loss(loss)  # never save or log past a NaN
                if log and (log_now or save_now):
                    rate = (self.step - start_step) / (time.perf_counter() - start)
                    record = {"step": self.step, "loss": value, "it_per_s": rate,
                              "lr": self.opt.param_groups[0]["lr"]}
                    if save_now and self.heldout is not None:
                        record["heldout_loss"] = self.heldout_loss()
                    bar.set_postfix({k: f"{record[k]:.4f}" for k in ("loss", "heldout_loss") if k in record})
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if save_now:
                    self.save()
                if cfg.sample_every and self.step % cfg.sample_every == 0 and self.dist.main:
                    self.sample_grid()
        finally:
            bar.close()
            if log:
                log.close()
            if self.dist.world > 1:
                self.dist.close()
                # DDP's reducer holds the group: free both now, while self.dist still holds the
                # latest collectives' work (see Distributed), not in whatever order comes later
                self.model = self.unet
                gc.collect()


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log's records up to `step`, atomically: a run resumed from a checkpoint older
    than the log's end (killed after logging past its last save) logs those steps again, and a
    straight run has each step once; a fresh run (step 0) starts it empty."""
    kept = []
    if path.exists():
        for line in path.read_bytes().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a kill, or bytes that are not text
                continue
            if isinstance(record, dict) and is_integer(record.get("step")) and record["step"] <= step:
                kept.append(line + b"\n")
    with atomic_write(path) as tmp:
        tmp.write_bytes(b"".join(kept))


def heldout_triples(images: torch.Tensor, schedule: Schedule,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """HELDOUT_PAIRS fixed (x_t, t, ε) from the held-out images (cycled, or the first ones):
    the same at every evaluation of a run, so two checkpoints' losses differ by their weights
    alone. None without held-out images."""
    if len(images) == 0:
        return None
    gen = torch.Generator().manual_seed(HELDOUT_SEED)
    x0 = images[torch.arange(HELDOUT_PAIRS) % len(images)]
    t = torch.randint(0, schedule.num_timesteps, (HELDOUT_PAIRS,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    return schedule.q_sample(x0, t, noise).to(device), t.to(device), noise.to(device)
