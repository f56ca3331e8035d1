"""diffusers' config.json / scheduler_config.json ↔ our UNetConfig / ScheduleConfig / defaults.

Every setting of `UNet2DModel` is read: those our U-Net computes become UNetConfig fields; any
other value (a Fourier time embedding, class conditioning, resnet down/upsampling blocks, ...)
is refused up front in one line naming the setting, never silently dropped. Values that mean
our defaults are stored as the defaults, so the paper's networks read back as CONFIGS' entries.
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
    "downsample_type": ("conv", "conv"),
    "upsample_type": ("conv", "conv"),
    "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2D"),
    "class_embed_type": (None, None),
    "num_class_embeds": (None, None),
}
TIME_SCALE_SHIFT = {"default": False, "scale_shift": True}  # resnet_time_scale_shift → ours
# Settings read into our config, or that cannot change the network when valid.
READ_SETTINGS = {"sample_size", "in_channels", "out_channels", "block_out_channels",
                 "layers_per_block", "down_block_types", "up_block_types", "dropout", "act_fn",
                 "attention_head_dim", "norm_num_groups", "attn_norm_num_groups", "norm_eps",
                 "time_embedding_dim", "num_train_timesteps", "flip_sin_to_cos", "freq_shift",
                 "downsample_padding", "resnet_time_scale_shift", "add_attention",
                 "mid_block_scale_factor", "center_input_sample"}

# schedulers whose config describes the forward process the way DDPM does
SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler")
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "quadratic", "squaredcos_cap_v2": "cosine"}


def _unsupported(where: str, what: str) -> UserError:
    return UserError(f"{where}: {what} is not supported by fastddpm (it runs diffusers' "
                     "UNet2DModel with DownBlock2D/AttnDownBlock2D/UpBlock2D/AttnUpBlock2D blocks)")


def _choice(cfg: dict, key: str, default, allowed: tuple, where: str):
    value = cfg.get(key, default)
    if value not in allowed or type(value) is not type(allowed[0]):
        raise _unsupported(where, f"{key}={value!r} (fastddpm takes {' or '.join(map(repr, allowed))})")
    return value


def unet_config_from_diffusers(cfg: dict, where: str) -> UNetConfig:
    """Our UNetConfig from a diffusers UNet2DModel config.json dict (diffusers' defaults for
    missing keys)."""
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
    down = list(cfg.get("down_block_types", ("DownBlock2D",) + ("AttnDownBlock2D",) * 3))
    up = list(cfg.get("up_block_types", ("AttnUpBlock2D",) * 3 + ("UpBlock2D",)))
    for kind in down:
        if kind not in DOWN_BLOCKS:
            raise _unsupported(where, f"down block type {kind!r} (only {', '.join(DOWN_BLOCKS)})")
    for kind in up:
        if kind not in UP_BLOCKS:
            raise _unsupported(where, f"up block type {kind!r} (only {', '.join(UP_BLOCKS)})")
    if not len(widths) == len(down) == len(up) or not widths:
        raise UserError(f"{where}: block_out_channels, down_block_types and up_block_types "
                        "must have one entry per level")
    attn_levels = [i for i, kind in enumerate(down) if DOWN_BLOCKS[kind]]
    if [UP_BLOCKS[kind] for kind in up] != [DOWN_BLOCKS[kind] for kind in reversed(down)]:
        raise _unsupported(where, "attention in up blocks that does not mirror the down blocks")

    base = widths[0]
    if any(not isinstance(w, int) or w <= 0 or w % base for w in widths):
        raise _unsupported(where, f"block_out_channels {widths} that are not multiples of the first")
    in_ch, out_ch = cfg.get("in_channels", 3), cfg.get("out_channels", 3)
    if out_ch not in (in_ch, 2 * in_ch):
        raise _unsupported(where, f"out_channels {out_ch} (fastddpm needs in_channels {in_ch}, or "
                                  f"2 × {in_ch} with a learned variance)")
    groups = cfg.get("norm_num_groups", 32)
    if groups is None:
        raise _unsupported(where, "norm_num_groups=None")
    scale_shift = TIME_SCALE_SHIFT.get(cfg.get("resnet_time_scale_shift", "default"))
    if scale_shift is None:
        raise _unsupported(where, f"resnet_time_scale_shift={cfg['resnet_time_scale_shift']!r} "
                                  f"(only {' or '.join(TIME_SCALE_SHIFT)})")
    mid_attention = _choice(cfg, "add_attention", True, (True, False), where)
    size = cfg.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise _unsupported(where, f"a non-square sample_size {size}")
        size = size[0]
    if not isinstance(size, int):
        raise UserError(f"{where}: config.json needs an integer sample_size (the image size)")

    # values that say what our defaults say are stored as the defaults (see the module docstring)
    attended = {widths[i] for i in attn_levels} | ({widths[-1]} if mid_attention else set())
    head_dim = cfg.get("attention_head_dim", 8)
    if head_dim is not None and attended <= {head_dim}:
        head_dim = None  # one head everywhere
    temb = cfg.get("time_embedding_dim")
    mid_groups = cfg.get("attn_norm_num_groups")
    if mid_groups == groups and not scale_shift:
        mid_groups = None
    out = UNetConfig(
        image_size=size, in_channels=in_ch, out_channels=out_ch, base_channels=base,
        channel_mult=tuple(w // base for w in widths),
        num_res_blocks=cfg.get("layers_per_block", 2),
        attn_resolutions=tuple(size // 2**i for i in attn_levels),
        dropout=float(cfg.get("dropout", 0.0)), groups=groups, eps=float(cfg.get("norm_eps", 1e-5)),
        flip_sin_to_cos=_choice(cfg, "flip_sin_to_cos", True, (True, False), where),
        freq_shift=cfg.get("freq_shift", 0),
        downsample_padding=_choice(cfg, "downsample_padding", 1, (0, 1), where),
        attention_head_dim=head_dim, time_scale_shift=scale_shift, mid_attention=mid_attention,
        mid_attn_groups=mid_groups, mid_scale=float(cfg.get("mid_block_scale_factor", 1.0)),
        temb_channels=None if temb == 4 * base else temb,
        center_input=_choice(cfg, "center_input_sample", False, (False, True), where))
    try:
        out.validate()
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return out


def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    """A UNet2DModel config.json dict that builds our network."""
    widths = [cfg.base_channels * m for m in cfg.channel_mult]
    has_attn = [cfg.image_size // 2**i in cfg.attn_resolutions for i in range(len(widths))]
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
        "attention_head_dim": cfg.attention_head_dim,  # None: each block's width, one head
        "norm_num_groups": cfg.groups,
        "attn_norm_num_groups": cfg.mid_attn_groups,
        "norm_eps": cfg.eps,
        "time_embedding_dim": cfg.temb_channels,
        "num_train_timesteps": None,
        "flip_sin_to_cos": cfg.flip_sin_to_cos,
        "freq_shift": cfg.freq_shift,
        "downsample_padding": cfg.downsample_padding,
        "resnet_time_scale_shift": "scale_shift" if cfg.time_scale_shift else "default",
        "add_attention": cfg.mid_attention,
        "mid_block_scale_factor": cfg.mid_scale,
        "center_input_sample": cfg.center_input,
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
