"""diffusers' config.json / scheduler_config.json ↔ our UNetConfig / ScheduleConfig / defaults.

Only what our U-Net computes is accepted: a diffusers setting that would change the network's
arithmetic (multi-head attention, symmetric downsample padding, flipped sin/cos, scale-shift
norms, ...) is refused up front in one line naming the setting, never silently dropped.
"""
from __future__ import annotations

from ..errors import UserError
from ..model import SamplingDefaults
from ..schedule import ScheduleConfig
from ..unet import UNetConfig

# What diffusers writes for the DDPM architecture. The writers' version only gates diffusers'
# own compatibility shims; these files use nothing newer than the DDPM U-Net itself.
DIFFUSERS_VERSION = "0.30.0"

DOWN_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True}  # type → has attention
UP_BLOCKS = {"UpBlock2D": False, "AttnUpBlock2D": True}

# UNet2DModel settings our network fixes: name → (the value it must have, diffusers' default).
FIXED_SETTINGS = {
    "time_embedding_type": ("positional", "positional"),
    "flip_sin_to_cos": (False, True),  # the original embedding is [sin, cos]
    "freq_shift": (1, 0),  # frequencies 10000^(−k/(half−1)), as the original code
    "center_input_sample": (False, False),
    "downsample_padding": (0, 1),  # TF "SAME": pad right/bottom only, then a stride-2 conv
    "downsample_type": ("conv", "conv"),
    "upsample_type": ("conv", "conv"),
    "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2D"),
    "mid_block_scale_factor": (1, 1),
    "resnet_time_scale_shift": ("default", "default"),
    "add_attention": (True, True),
    "class_embed_type": (None, None),
    "num_class_embeds": (None, None),
}
# Settings we read into our config, or that cannot change the network when valid.
READ_SETTINGS = {"sample_size", "in_channels", "out_channels", "block_out_channels",
                 "layers_per_block", "down_block_types", "up_block_types", "dropout", "act_fn",
                 "attention_head_dim", "norm_num_groups", "attn_norm_num_groups", "norm_eps",
                 "time_embedding_dim", "num_train_timesteps"}

# schedulers whose config describes the forward process the way DDPM does
SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler")
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "quadratic", "squaredcos_cap_v2": "cosine"}


def _unsupported(where: str, what: str) -> UserError:
    return UserError(f"{where}: {what} is not supported by fastddpm (it runs the DDPM U-Net of "
                     "Ho et al. 2020 with ε-prediction)")


def unet_config_from_diffusers(cfg: dict, where: str) -> UNetConfig:
    """Our UNetConfig from a diffusers UNet2DModel config.json dict."""
    cls = cfg.get("_class_name")
    if cls != "UNet2DModel":
        raise _unsupported(where, f"model class {cls!r}" if cls else "a config without _class_name")
    for key in cfg:
        if not key.startswith("_") and key not in FIXED_SETTINGS and key not in READ_SETTINGS:
            raise _unsupported(where, f"UNet2DModel setting {key!r}")
    for key, (required, default) in FIXED_SETTINGS.items():
        value = cfg.get(key, default)
        if value != required:
            raise _unsupported(where, f"{key}={value!r} (fastddpm needs {required!r})")
    if cfg.get("act_fn", "silu") not in ("silu", "swish"):
        raise _unsupported(where, f"act_fn={cfg['act_fn']!r}")

    widths = list(cfg.get("block_out_channels", (224, 448, 672, 896)))
    down = list(cfg.get("down_block_types", ()))
    up = list(cfg.get("up_block_types", ()))
    for kind in down:
        if kind not in DOWN_BLOCKS:
            raise _unsupported(where, f"down block type {kind!r} (only {', '.join(DOWN_BLOCKS)})")
    for kind in up:
        if kind not in UP_BLOCKS:
            raise _unsupported(where, f"up block type {kind!r} (only {', '.join(UP_BLOCKS)})")
    if not len(widths) == len(down) == len(up):
        raise UserError(f"{where}: block_out_channels, down_block_types and up_block_types "
                        "must have one entry per level")
    attn_levels = [i for i, kind in enumerate(down) if DOWN_BLOCKS[kind]]
    if [UP_BLOCKS[kind] for kind in up] != [DOWN_BLOCKS[kind] for kind in reversed(down)]:
        raise _unsupported(where, "attention in up blocks that does not mirror the down blocks")

    base = widths[0]
    if any(w % base for w in widths):
        raise _unsupported(where, f"block_out_channels {widths} that are not multiples of the first")
    in_ch, out_ch = cfg.get("in_channels", 3), cfg.get("out_channels", 3)
    if out_ch == 2 * in_ch:
        raise _unsupported(where, f"a learned variance (out_channels {out_ch} = 2 × in_channels)")
    if out_ch != in_ch:
        raise _unsupported(where, f"out_channels {out_ch} ≠ in_channels {in_ch}")
    if cfg.get("time_embedding_dim") not in (None, 4 * base):
        raise _unsupported(where, f"time_embedding_dim={cfg['time_embedding_dim']} "
                                  f"(fastddpm uses 4 × {base})")
    groups = cfg.get("norm_num_groups", 32)
    if cfg.get("attn_norm_num_groups") not in (None, groups):
        raise _unsupported(where, f"attn_norm_num_groups={cfg['attn_norm_num_groups']} "
                                  f"≠ norm_num_groups={groups}")
    head_dim = cfg.get("attention_head_dim", 8)
    attn_widths = {widths[i] for i in attn_levels} | {widths[-1]}  # + the middle block's
    if head_dim is not None and attn_widths != {head_dim}:
        raise _unsupported(where, f"multi-head attention (attention_head_dim={head_dim} at widths "
                                  f"{sorted(attn_widths)}; fastddpm has one head)")
    size = cfg.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise _unsupported(where, f"a non-square sample_size {size}")
        size = size[0]
    if not isinstance(size, int):
        raise UserError(f"{where}: config.json needs an integer sample_size (the image size)")
    return UNetConfig(
        image_size=size, in_channels=in_ch, out_channels=out_ch, base_channels=base,
        channel_mult=tuple(w // base for w in widths),
        num_res_blocks=cfg.get("layers_per_block", 2),
        attn_resolutions=tuple(size // 2**i for i in attn_levels),
        dropout=float(cfg.get("dropout", 0.0)), groups=groups, eps=float(cfg.get("norm_eps", 1e-5)))


def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    """A UNet2DModel config.json dict that builds our network."""
    widths = [cfg.base_channels * m for m in cfg.channel_mult]
    has_attn = [cfg.image_size // 2**i in cfg.attn_resolutions for i in range(len(widths))]
    attn_widths = {w for w, a in zip(widths, has_attn, strict=True) if a} | {widths[-1]}
    out = {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": widths,
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        "dropout": cfg.dropout,
        "act_fn": "silu",
        # one head: head dim = width. A single number only when every attention has one width.
        "attention_head_dim": attn_widths.pop() if len(attn_widths) == 1 else None,
        "norm_num_groups": cfg.groups,
        "attn_norm_num_groups": None,
        "norm_eps": cfg.eps,
        "time_embedding_dim": None,
        "num_train_timesteps": None,
    }
    out.update({key: required for key, (required, _) in FIXED_SETTINGS.items()})
    return out


def schedule_from_diffusers(cfg: dict | None, where: str) -> tuple[ScheduleConfig, SamplingDefaults]:
    """Our schedule and sampling defaults from a scheduler_config.json dict. Missing fields take
    diffusers' defaults; no scheduler config at all gives the paper's (our defaults)."""
    if cfg is None:
        return ScheduleConfig(), SamplingDefaults()
    cls = cfg.get("_class_name")
    if cls not in SCHEDULER_CLASSES:
        raise _unsupported(where, f"scheduler {cls!r} (only {', '.join(SCHEDULER_CLASSES)})")
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        raise _unsupported(where, f"prediction_type={cfg['prediction_type']!r}")
    for key, allowed in (("thresholding", False), ("rescale_betas_zero_snr", False),
                         ("set_alpha_to_one", True), ("steps_offset", 0)):
        if cfg.get(key, allowed) != allowed:
            raise _unsupported(where, f"{key}={cfg[key]!r}")
    clip = bool(cfg.get("clip_sample", True))
    if clip and cfg.get("clip_sample_range", 1.0) != 1.0:
        raise _unsupported(where, f"clip_sample_range={cfg['clip_sample_range']} (x̂0 clips to [−1, 1])")
    variance = cfg.get("variance_type") or "fixed_small"  # DDPMScheduler's default
    if variance not in ("fixed_small", "fixed_large"):
        raise _unsupported(where, f"variance_type={variance!r} (fixed_small or fixed_large)")
    steps = int(cfg.get("num_train_timesteps", 1000))
    start, end = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
    if cfg.get("trained_betas") is not None:  # diffusers ignores beta_schedule then, so do we
        betas = [float(b) for b in cfg["trained_betas"]]
        if len(betas) != steps:
            raise UserError(f"{where}: trained_betas has {len(betas)} values, "
                            f"num_train_timesteps is {steps}")
        schedule = ScheduleConfig("custom", steps, start, end, betas)
    else:
        name = cfg.get("beta_schedule", "linear")
        if name not in BETA_SCHEDULES:
            raise _unsupported(where, f"beta_schedule={name!r} (only {', '.join(BETA_SCHEDULES)})")
        schedule = ScheduleConfig(BETA_SCHEDULES[name], steps, start, end)
    return schedule, SamplingDefaults(variance, clip)


def schedule_to_diffusers(schedule: ScheduleConfig, sampling: SamplingDefaults) -> dict:
    """A DDPMScheduler scheduler_config.json dict for our schedule and sampling defaults."""
    names = {ours: theirs for theirs, ours in BETA_SCHEDULES.items()}
    if schedule.kind not in names and schedule.kind != "custom":
        raise AssertionError(f"no diffusers name for schedule {schedule.kind!r}")
    custom = schedule.kind == "custom"
    return {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": schedule.num_timesteps,
        "beta_schedule": "linear" if custom else names[schedule.kind],
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
        "trained_betas": list(schedule.betas) if custom else None,
        "variance_type": sampling.variance,
        "clip_sample": sampling.clip,
        "clip_sample_range": 1.0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
