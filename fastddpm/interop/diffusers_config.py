"""diffusers' config.json / scheduler_config.json ↔ our UNetConfig / ScheduleConfig / defaults.

Every setting of `UNet2DModel` is read: those our U-Net computes become UNetConfig fields (a
level's resampler, a conv or a ResNet block, from its block type or, for the attention blocks,
downsample_type/upsample_type); any other value (a Fourier time embedding, class conditioning,
skip or cross-attention blocks, ...) is refused up front in one line naming the setting, never
silently dropped. Values that mean our defaults are stored as the defaults, so the paper's
networks read back as CONFIGS' entries.
"""
from __future__ import annotations

import torch

from ..errors import UserError, is_integer, is_number
from ..model import SamplingDefaults, check_clip_range, check_steps_offset
from ..prediction import PREDICTIONS
from ..samplers import VARIANCES
from ..schedule import MAX_TIMESTEPS, ScheduleConfig, make_betas, zero_terminal_snr
from ..unet import UNetConfig

# What diffusers writes for the DDPM architecture. The writers' version only gates diffusers'
# own compatibility shims; these files use nothing newer than the DDPM U-Net itself.
DIFFUSERS_VERSION = "0.30.0"

# block type → (has attention, its resampler: "conv", "resnet", or None: the model's
# downsample_type / upsample_type, which only the attention blocks read)
DOWN_BLOCKS = {"DownBlock2D": (False, "conv"), "ResnetDownsampleBlock2D": (False, "resnet"),
               "AttnDownBlock2D": (True, None)}
UP_BLOCKS = {"UpBlock2D": (False, "conv"), "ResnetUpsampleBlock2D": (False, "resnet"),
             "AttnUpBlock2D": (True, None)}
RESAMPLERS = ("conv", "resnet")

# UNet2DModel settings our network fixes: name → (the value it must have, diffusers' default).
FIXED_SETTINGS = {
    "time_embedding_type": ("positional", "positional"),
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
                 "downsample_padding", "downsample_type", "upsample_type",
                 "resnet_time_scale_shift", "add_attention",
                 "mid_block_scale_factor", "center_input_sample"}

# Schedulers whose config describes the forward process the way DDPM does, and every key each
# takes (diffusers 0.42).
_COMMON_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "prediction_type", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
                "timestep_spacing", "steps_offset", "rescale_betas_zero_snr")
SCHEDULER_KEYS = {
    "DDPMScheduler": {*_COMMON_KEYS, "variance_type", "clip_sample", "clip_sample_range"},
    "DDIMScheduler": {*_COMMON_KEYS, "clip_sample", "clip_sample_range", "set_alpha_to_one"},
    # its solver settings choose diffusers' sampling loop; fastddpm's options choose ours
    "DPMSolverMultistepScheduler": {
        *_COMMON_KEYS, "variance_type", "solver_order", "algorithm_type", "solver_type",
        "lower_order_final", "euler_at_final", "use_karras_sigmas", "use_exponential_sigmas",
        "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas", "flow_shift", "final_sigmas_type",
        "lambda_min_clipped", "use_dynamic_shifting", "time_shift_type"},
}
# keys older diffusers releases wrote: tensor_format (ignored since 0.3), predict_epsilon (< 0.10)
LEGACY_KEYS = {"tensor_format", "predict_epsilon"}
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "quadratic", "squaredcos_cap_v2": "cosine"}
# the same σ by another name: diffusers' fixed_small_log takes exp(½ log β̃)
VARIANCE_ALIASES = {"fixed_small_log": "fixed_small"}


def _unsupported(where: str, what: str) -> UserError:
    return UserError(f"{where}: {what} is not supported by fastddpm (it runs diffusers' "
                     f"UNet2DModel with {'/'.join([*DOWN_BLOCKS, *UP_BLOCKS])} blocks)")


def _choice(cfg: dict, key: str, default, allowed: tuple, where: str):
    value = cfg.get(key, default)
    if value not in allowed or type(value) is not type(allowed[0]):
        raise _unsupported(where, f"{key}={value!r} (fastddpm takes {' or '.join(map(repr, allowed))})")
    return value


def _listed(cfg: dict, key: str, default: tuple, kind: type, where: str) -> list:
    """A list setting whose every entry is a `kind` (JSON may hold anything there)."""
    value = cfg.get(key, default)
    entries_fit = isinstance(value, (list, tuple)) and all(
        isinstance(v, kind) and not isinstance(v, bool) for v in value)
    if not entries_fit:
        raise UserError(f"{where}: {key} must be a list of {kind.__name__}s, got {value!r}")
    return list(value)


def _number(cfg: dict, key: str, default: float, where: str) -> float:
    value = cfg.get(key, default)
    if not is_number(value):
        raise UserError(f"{where}: {key} must be a number, got {value!r}")
    return float(value)


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

    widths = _listed(cfg, "block_out_channels", (224, 448, 672, 896), int, where)
    down = _listed(cfg, "down_block_types", ("DownBlock2D",) + ("AttnDownBlock2D",) * 3, str, where)
    up = _listed(cfg, "up_block_types", ("AttnUpBlock2D",) * 3 + ("UpBlock2D",), str, where)
    for kind in down:
        if kind not in DOWN_BLOCKS:
            raise _unsupported(where, f"down block type {kind!r} (only {', '.join(DOWN_BLOCKS)})")
    for kind in up:
        if kind not in UP_BLOCKS:
            raise _unsupported(where, f"up block type {kind!r} (only {', '.join(UP_BLOCKS)})")
    if not len(widths) == len(down) == len(up) or not widths:
        raise UserError(f"{where}: block_out_channels, down_block_types and up_block_types "
                        "must have one entry per level")
    attn_levels = [i for i, kind in enumerate(down) if DOWN_BLOCKS[kind][0]]
    if [UP_BLOCKS[kind][0] for kind in up] != [DOWN_BLOCKS[kind][0] for kind in reversed(down)]:
        raise _unsupported(where, "attention in up blocks that does not mirror the down blocks")
    down_type = _choice(cfg, "downsample_type", "conv", RESAMPLERS, where)
    up_type = _choice(cfg, "upsample_type", "conv", RESAMPLERS, where)

    base = widths[0]
    if any(w <= 0 or w % base for w in widths):
        raise _unsupported(where, f"block_out_channels {widths} that are not multiples of the first")
    in_ch, out_ch = cfg.get("in_channels", 3), cfg.get("out_channels", 3)
    if not is_integer(in_ch) or not is_integer(out_ch):
        raise UserError(f"{where}: in_channels and out_channels must be integers, got {in_ch!r}, {out_ch!r}")
    if out_ch not in (in_ch, 2 * in_ch):
        raise _unsupported(where, f"out_channels {out_ch} (fastddpm needs in_channels {in_ch}, or "
                                  f"2 × {in_ch} with a learned variance)")
    groups = cfg.get("norm_num_groups", 32)
    if groups is None:
        raise _unsupported(where, "norm_num_groups=None")
    time_norm = cfg.get("resnet_time_scale_shift", "default")
    scale_shift = TIME_SCALE_SHIFT.get(time_norm) if isinstance(time_norm, str) else None
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
    # every block but the last resamples: the down ones level i, the up ones (deepest first) n−1−j
    resnet_down = [size // 2**i for i, kind in enumerate(down[:-1])
                   if (DOWN_BLOCKS[kind][1] or down_type) == "resnet"]
    resnet_up = [size // 2**(len(up) - 1 - j) for j, kind in enumerate(up[:-1])
                 if (UP_BLOCKS[kind][1] or up_type) == "resnet"]

    # values that say what our defaults say are stored as the defaults (see the module docstring)
    attended = {widths[i] for i in attn_levels} | ({widths[-1]} if mid_attention else set())
    head_dim = cfg.get("attention_head_dim", 8)
    if is_integer(head_dim) and attended <= {head_dim}:
        head_dim = None  # one head everywhere (anything but an integer: validate() names it)
    temb = cfg.get("time_embedding_dim")
    mid_groups = cfg.get("attn_norm_num_groups")
    if mid_groups == groups and not scale_shift:
        mid_groups = None
    out = UNetConfig(
        image_size=size, in_channels=in_ch, out_channels=out_ch, base_channels=base,
        channel_mult=tuple(w // base for w in widths),
        num_res_blocks=cfg.get("layers_per_block", 2),
        attn_resolutions=tuple(size // 2**i for i in attn_levels),
        dropout=_number(cfg, "dropout", 0.0, where), groups=groups,
        eps=_number(cfg, "norm_eps", 1e-5, where),
        flip_sin_to_cos=_choice(cfg, "flip_sin_to_cos", True, (True, False), where),
        freq_shift=cfg.get("freq_shift", 0),
        downsample_padding=_choice(cfg, "downsample_padding", 1, (0, 1), where),
        resnet_down_resolutions=tuple(resnet_down), resnet_up_resolutions=tuple(resnet_up),
        attention_head_dim=head_dim, time_scale_shift=scale_shift, mid_attention=mid_attention,
        mid_attn_groups=mid_groups, mid_scale=_number(cfg, "mid_block_scale_factor", 1.0, where),
        temb_channels=None if temb == 4 * base else temb,
        center_input=_choice(cfg, "center_input_sample", False, (False, True), where))
    try:
        out.validate()
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return out


def _block_types(blocks: dict, attention: list[bool], resamplers: list[str | None],
                 setting: str) -> tuple[list[str], str]:
    """Each level's block type, and the `setting` (downsample_type / upsample_type) its attention
    blocks read, for levels with these attention flags and resamplers (None: the last level's)."""
    attended = {r for a, r in zip(attention, resamplers, strict=True) if a and r}
    if len(attended) > 1:
        raise UserError(f"this U-Net's attention levels resample both by conv and by ResBlock, "
                        f"which diffusers' UNet2DModel cannot express (one {setting} for them all)")
    name = {spec: kind for kind, spec in blocks.items()}
    types = [name[(True, None)] if a else name[(False, r or "conv")]
             for a, r in zip(attention, resamplers, strict=True)]
    return types, attended.pop() if attended else "conv"


def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    """A UNet2DModel config.json dict that builds our network."""
    widths = [cfg.base_channels * m for m in cfg.channel_mult]
    sides = [cfg.image_size // 2**i for i in range(len(widths))]
    has_attn = [side in cfg.attn_resolutions for side in sides]
    # down levels resample but the last, up levels (deepest first) but the full-resolution one
    down_resamplers = ["resnet" if s in cfg.resnet_down_resolutions else "conv" for s in sides[:-1]]
    up_resamplers = ["resnet" if s in cfg.resnet_up_resolutions else "conv" for s in sides[:0:-1]]
    down, down_type = _block_types(DOWN_BLOCKS, has_attn, [*down_resamplers, None], "downsample_type")
    up, up_type = _block_types(UP_BLOCKS, has_attn[::-1], [*up_resamplers, None], "upsample_type")
    out = {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": widths,
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": down,
        "up_block_types": up,
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
        "downsample_type": down_type,
        "upsample_type": up_type,
        "resnet_time_scale_shift": "scale_shift" if cfg.time_scale_shift else "default",
        "add_attention": cfg.mid_attention,
        "mid_block_scale_factor": cfg.mid_scale,
        "center_input_sample": cfg.center_input,
    }
    out.update({key: required for key, (required, _) in FIXED_SETTINGS.items()})
    return out


def _sigmoid_betas(steps: int, start: float, end: float) -> list[float]:
    """diffusers' "sigmoid" schedule (GeoDiff): sigmoid over linspace(−6, 6), scaled to
    [start, end], here in float64."""
    x = torch.linspace(-6.0, 6.0, steps, dtype=torch.float64)
    return (torch.sigmoid(x) * (end - start) + start).tolist()


def _scheduler_setting(cfg: dict, key: str, default, allowed: tuple, where: str, why: str):
    value = cfg.get(key, default)
    if value not in allowed:
        raise _unsupported_scheduler(where, f"{key}={value!r} ({why})")
    return value


def _flag(cfg: dict, key: str, default: bool, where: str) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise UserError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _unsupported_scheduler(where: str, what: str) -> UserError:
    return UserError(f"{where}: {what} is not supported by fastddpm")


def schedule_from_diffusers(cfg: dict | None, where: str) -> tuple[ScheduleConfig, SamplingDefaults]:
    """Our schedule and sampling defaults from a scheduler_config.json dict. Missing fields take
    diffusers' defaults; no scheduler config at all gives the paper's (our defaults). Every key
    is read: what describes the model (β, prediction type, variance, clipping, DDIM's
    set_alpha_to_one, the leading grid's steps_offset) is kept, a zero-terminal-SNR rescale as
    the rescaled betas (float64); a
    sampling choice of diffusers' own loop (solver order, spacing, ...) is accepted and left to
    fastddpm's sampling options; anything fastddpm cannot run is refused in one line."""
    if cfg is None:
        return ScheduleConfig(), SamplingDefaults()
    cls = cfg.get("_class_name")
    if not isinstance(cls, str) or cls not in SCHEDULER_KEYS:  # a list is no key (unhashable)
        raise _unsupported_scheduler(where, f"scheduler {cls!r} (only {', '.join(SCHEDULER_KEYS)})")
    for key in cfg:
        if not key.startswith("_") and key not in SCHEDULER_KEYS[cls] and key not in LEGACY_KEYS:
            raise _unsupported_scheduler(where, f"{cls} setting {key!r}")
    for key in ("use_flow_sigmas", "use_dynamic_shifting"):
        _scheduler_setting(cfg, key, False, (False, None), where, "flow-matching models")
    _scheduler_setting(cfg, "thresholding", False, (False,), where,
                       "dynamic thresholding takes a per-sample quantile of x̂0 in the loop")
    rescale = _flag(cfg, "rescale_betas_zero_snr", False, where)
    alpha_to_one = _flag(cfg, "set_alpha_to_one", True, where)
    _scheduler_setting(cfg, "timestep_spacing", "leading", ("leading", "trailing", "linspace"),
                       where, "fastddpm spaces leading, trailing or linspace")
    # kept whatever the spacing: diffusers adds it to leading timesteps, and so do we
    offset = cfg.get("steps_offset", 0)
    try:
        check_steps_offset(offset)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    prediction = cfg.get("prediction_type")
    if prediction is None:  # diffusers < 0.10 said predict_epsilon instead
        prediction = "epsilon" if cfg.get("predict_epsilon", True) else "sample"
    _scheduler_setting(cfg | {"prediction_type": prediction}, "prediction_type", "epsilon",
                       PREDICTIONS, where, f"fastddpm runs {', '.join(PREDICTIONS)}")
    clip = _flag(cfg, "clip_sample", cls != "DPMSolverMultistepScheduler", where)
    # kept also where clip_sample is off (diffusers then ignores it): --clip turns it on
    clip_range = cfg.get("clip_sample_range", 1.0)
    try:
        check_clip_range(clip_range, "clip_sample_range")
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    variance = cfg.get("variance_type") or "fixed_small"  # DDPMScheduler's default
    if not isinstance(variance, str):
        raise _unsupported_scheduler(where, f"variance_type={variance!r} ({' or '.join(VARIANCES)})")
    variance = VARIANCE_ALIASES.get(variance, variance)
    if variance not in VARIANCES:
        raise _unsupported_scheduler(where, f"variance_type={variance!r} ({' or '.join(VARIANCES)})")

    steps = cfg.get("num_train_timesteps", 1000)
    start, end = cfg.get("beta_start", 0.0001), cfg.get("beta_end", 0.02)
    for key, value in (("num_train_timesteps", steps), ("beta_start", start), ("beta_end", end)):
        if not is_number(value) or (key == "num_train_timesteps" and not is_integer(value)):
            raise UserError(f"{where}: {key} must be a number, got {value!r}")
    start, end = float(start), float(end)
    trained = cfg.get("trained_betas")
    name = cfg.get("beta_schedule", "linear")
    if trained is not None:  # diffusers ignores beta_schedule then, so do we
        if not isinstance(trained, list) or not all(map(is_number, trained)):
            raise UserError(f"{where}: trained_betas must be a list of numbers")
        if len(trained) != steps:
            raise UserError(f"{where}: trained_betas has {len(trained)} values, "
                            f"num_train_timesteps is {steps}")
        schedule = ScheduleConfig("custom", steps, start, end, [float(b) for b in trained])
    elif name == "sigmoid":
        if not 2 <= steps <= MAX_TIMESTEPS:  # before a table of that length is built
            raise UserError(f"{where}: num_train_timesteps must be in 2..{MAX_TIMESTEPS}, got {steps}")
        schedule = ScheduleConfig("custom", steps, start, end, _sigmoid_betas(steps, start, end))
    elif isinstance(name, str) and name in BETA_SCHEDULES:  # a list is no key (unhashable)
        schedule = ScheduleConfig(BETA_SCHEDULES[name], steps, start, end)
    else:
        raise _unsupported_scheduler(where, f"beta_schedule={name!r} (only "
                                            f"{', '.join([*BETA_SCHEDULES, 'sigmoid'])})")
    try:
        schedule.validate()
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    if rescale:  # kept as its rescaled betas (float64), a custom schedule
        betas = zero_terminal_snr(make_betas(schedule.kind, steps, start, end, schedule.betas))
        schedule = ScheduleConfig("custom", steps, start, end, betas.tolist())
    return schedule, SamplingDefaults(variance, clip, prediction=prediction,
                                      set_alpha_to_one=alpha_to_one, steps_offset=int(offset),
                                      clip_range=float(clip_range))


def schedule_to_diffusers(schedule: ScheduleConfig, sampling: SamplingDefaults) -> dict:
    """A scheduler_config.json dict for our schedule and sampling defaults: a DDPMScheduler, or
    a DDIMScheduler where set_alpha_to_one is False (only DDIM has that key, and no
    variance_type: read back, it means fixed_small, so another variance is refused). A
    zero-terminal-SNR schedule (β_T = 1) is written as its betas with rescale_betas_zero_snr,
    which leaves them as they are and gives diffusers' multistep schedulers their ᾱ_T = 2^-24."""
    names = {ours: theirs for theirs, ours in BETA_SCHEDULES.items()}
    if schedule.kind not in names and schedule.kind != "custom":
        raise AssertionError(f"no diffusers name for schedule {schedule.kind!r}")
    custom = schedule.kind == "custom"
    out = {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": schedule.num_timesteps,
        "beta_schedule": "linear" if custom else names[schedule.kind],
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
        "trained_betas": list(schedule.betas) if custom else None,
        "variance_type": sampling.variance,
        "clip_sample": sampling.clip,
        "clip_sample_range": sampling.clip_range,
        "prediction_type": sampling.prediction,
        "thresholding": False,
        "timestep_spacing": "leading",
        "steps_offset": sampling.steps_offset,
        "rescale_betas_zero_snr": custom and schedule.betas[-1] == 1.0,
    }
    if sampling.set_alpha_to_one:
        return out
    if sampling.variance != "fixed_small":
        raise UserError(f"set_alpha_to_one=False is a DDIMScheduler setting and DDIMScheduler has "
                        f"no variance_type: this model's {sampling.variance} variance cannot be "
                        "written beside it")
    del out["variance_type"]
    return out | {"_class_name": "DDIMScheduler", "set_alpha_to_one": False}
