"""The denoising network: the U-Net of Ho et al. 2020 (Appendix B), after the original TF code,
and the variations of it that diffusers' `UNet2DModel` expresses.

A Wide-ResNet/PixelCNN++ style U-Net: per level `num_res_blocks` residual blocks (self-attention
after each at `attn_resolutions`), a stride-2 conv down; a middle of res → attn → res; the mirror
path up with skip concatenation and one extra block per level; sinusoidal timestep embedding
through a 2-layer MLP added inside every residual block. Every GroupNorm (→ SiLU) goes through
`kernels.group_norm_silu`, which also folds in the time-embedding bias of a block's second norm
(or, with `time_scale_shift`, the per-channel scale and shift the embedding gives it).

The defaults are the paper's network. The other settings are diffusers' (its names in brackets):
`flip_sin_to_cos` and `freq_shift` of the embedding, `downsample_padding` (0: TF "SAME", pad
right/bottom; 1: symmetric), `resnet_down_resolutions` / `resnet_up_resolutions` [a resampler
that is a ResNet block: downsample_type/upsample_type="resnet", ResnetDownsampleBlock2D,
ResnetUpsampleBlock2D], `attention_head_dim` (None: one head), `time_scale_shift`
[resnet_time_scale_shift="scale_shift"], `mid_attention` [add_attention], `mid_attn_groups`
[attn_norm_num_groups], `mid_scale` [mid_block_scale_factor], `temb_channels`
[time_embedding_dim], `center_input` [center_input_sample].
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .errors import UserError, is_integer, is_number
from .kernels.dispatch import check_mode

# Bounds on what a config may ask for, far past every published DDPM model (the 256² one has
# 113.7M parameters, 512 channels, 6 levels): a file that asks for more is refused before any
# memory is taken.
MAX_IMAGE_SIZE = 2048
MAX_CHANNELS = 8192
MAX_LEVELS = 10
MAX_PARAMETERS = 4_000_000_000
# the config's tuple fields, lists in JSON
LIST_FIELDS = ("channel_mult", "attn_resolutions", "resnet_down_resolutions", "resnet_up_resolutions")


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    groups: int = 32  # GroupNorm groups
    eps: float = 1e-6  # GroupNorm epsilon (the original TF code's)
    flip_sin_to_cos: bool = False  # embedding [cos, sin] instead of the original [sin, cos]
    freq_shift: int = 1  # frequencies 10000^(−k/(half − freq_shift)), k = 0..half−1
    downsample_padding: int = 0  # 0: pad right/bottom by 1 (TF "SAME"); 1: pad 1 on every side
    # resolutions whose level halves (on the up path: doubles) through a ResBlock that average-pools
    # (nearest-upsamples) its input and norm1's output, not through a strided conv (upsample + conv)
    resnet_down_resolutions: tuple[int, ...] = ()
    resnet_up_resolutions: tuple[int, ...] = ()
    attention_head_dim: int | None = None  # channels per head; None: one head over all channels
    time_scale_shift: bool = False  # norm2 → ·(1 + scale) + shift from the embedding, not + bias
    mid_attention: bool = True  # attention in the middle block
    # the middle attention's GroupNorm groups; None: `groups` (with time_scale_shift: no norm at
    # all, as diffusers builds it)
    mid_attn_groups: int | None = None
    mid_scale: float = 1.0  # the middle block's residual sums are divided by this
    temb_channels: int | None = None  # time-embedding width; None: 4 × base_channels
    center_input: bool = False  # the network sees 2·x − 1 (a model trained on [0, 1] inputs)

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in LIST_FIELDS:
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown U-Net config field(s) {sorted(unknown)}")
        d = dict(d)
        for key in LIST_FIELDS:
            if isinstance(d.get(key), list | tuple):  # anything else: validate() says what it is
                d[key] = tuple(d[key])
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Types, ranges and the sizes they imply, checked before anything is allocated: a
        model file may ask for anything, and building it first could take the machine's memory."""
        ints = {"image_size": (1, MAX_IMAGE_SIZE), "in_channels": (1, 64), "out_channels": (1, 64),
                "base_channels": (1, MAX_CHANNELS), "num_res_blocks": (1, 16), "groups": (1, MAX_CHANNELS)}
        for name, (low, high) in ints.items():
            value = getattr(self, name)
            if not is_integer(value) or not low <= value <= high:
                raise UserError(f"U-Net {name} must be an integer in {low}..{high}, got {value!r}")
        for name in LIST_FIELDS:
            low, high = (1, 64) if name == "channel_mult" else (1, MAX_IMAGE_SIZE)
            values = getattr(self, name)
            if (not isinstance(values, tuple) or not all(map(is_integer, values))
                    or any(not low <= v <= high for v in values)):
                raise UserError(f"U-Net {name} must be a list of integers in {low}..{high}, "
                                f"got {values!r}")
        if not 1 <= len(self.channel_mult) <= MAX_LEVELS:
            raise UserError(f"U-Net channel_mult must have 1..{MAX_LEVELS} levels, "
                            f"got {len(self.channel_mult)}")
        for name, low, high in (("dropout", 0.0, 1.0), ("eps", 1e-12, 1.0), ("mid_scale", 1e-6, 1e6)):
            value = getattr(self, name)
            if not is_number(value) or not low <= value < high:
                raise UserError(f"U-Net {name} must be a number in [{low}, {high}), got {value!r}")
        for name in ("flip_sin_to_cos", "time_scale_shift", "mid_attention", "center_input"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"U-Net {name} must be true or false, got {getattr(self, name)!r}")
        half = self.base_channels // 2
        if not is_integer(self.freq_shift) or not 0 <= self.freq_shift < half:
            raise UserError(f"U-Net freq_shift must be an integer in 0..{half - 1} (below half the "
                            f"embedding width {self.base_channels}), got {self.freq_shift!r}")
        if self.downsample_padding not in (0, 1) or not is_integer(self.downsample_padding):
            raise UserError(f"U-Net downsample_padding must be 0 or 1, got {self.downsample_padding!r}")
        for name, high in (("attention_head_dim", MAX_CHANNELS), ("mid_attn_groups", MAX_CHANNELS),
                           ("temb_channels", 4 * MAX_CHANNELS)):
            value = getattr(self, name)
            if value is not None and (not is_integer(value) or not 1 <= value <= high):
                raise UserError(f"U-Net {name} must be null or an integer in 1..{high}, got {value!r}")
        widths = [self.base_channels * m for m in self.channel_mult]
        if max(widths) > MAX_CHANNELS:
            raise UserError(f"U-Net level widths {widths} exceed {MAX_CHANNELS} channels")
        if any(w % self.groups for w in widths):
            raise UserError(f"every level width {widths} must be divisible by groups={self.groups}")
        if self.mid_attn_groups is not None and widths[-1] % self.mid_attn_groups:
            raise UserError(f"the middle width {widths[-1]} must be divisible by "
                            f"mid_attn_groups={self.mid_attn_groups}")
        if self.attention_head_dim is not None:
            attended = {widths[-1]} if self.mid_attention else set()
            attended |= {w for i, w in enumerate(widths)
                         if self.image_size // 2**i in self.attn_resolutions}
            if any(w % self.attention_head_dim for w in attended):
                raise UserError(f"every attended width {sorted(attended)} must be divisible by "
                                f"attention_head_dim={self.attention_head_dim}")
        if self.image_size % 2 ** (len(self.channel_mult) - 1):
            raise UserError(f"image_size {self.image_size} must be divisible by "
                            f"2^{len(self.channel_mult) - 1} for {len(self.channel_mult)} levels")
        sides = [self.image_size >> i for i in range(len(self.channel_mult))]
        for name, resampled in (("resnet_down_resolutions", sides[:-1]),
                                ("resnet_up_resolutions", sides[1:])):
            if not set(getattr(self, name)) <= set(resampled):
                raise UserError(f"U-Net {name} {list(getattr(self, name))} must name levels that "
                                f"resample, of {resampled}")
        # the widest 3×3 convolution dominates: bound the weights before building them
        params = 9 * max(widths) ** 2 * (2 * self.num_res_blocks + 1) * len(widths)
        if params > MAX_PARAMETERS:
            raise UserError(f"this U-Net config asks for roughly {params:.1e} parameters, more "
                            f"than the {MAX_PARAMETERS:.0e} fastddpm builds; the file is damaged "
                            "or not a model of this kind")


# Named configurations. cifar10: the paper's 35.7M model (35,746,307 parameters);
# ddpm-256: CelebA-HQ / LSUN 256² (113,673,219 parameters); digits: the bundled model.
CONFIGS: dict[str, UNetConfig] = {
    "cifar10": UNetConfig(),
    "ddpm-256": UNetConfig(image_size=256, channel_mult=(1, 1, 2, 2, 4, 4), dropout=0.0),
    # 649k parameters: 1,000 samples × 1000 DDPM steps take ~22 min on one CPU core (measured)
    "digits": UNetConfig(image_size=16, in_channels=1, out_channels=1, base_channels=16,
                         channel_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(8,),
                         dropout=0.0, groups=8),
}


def named_config(name: str) -> UNetConfig:
    if name not in CONFIGS:
        raise UserError(f"unknown model config {name!r}; choose one of {', '.join(CONFIGS)}")
    return CONFIGS[name]


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = False,
                       freq_shift: int = 1) -> torch.Tensor:
    """Sinusoidal embedding (B,) → (B, dim): [sin(t·f_k), cos(t·f_k)] ([cos, sin] flipped),
    f_k = 10000^(−k/(dim/2 − freq_shift)); an odd dim ends in a zero column."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32)
                      * (-math.log(10000.0) / (half - freq_shift)))
    args = t.to(torch.float32)[:, None] * freqs[None]
    parts = [torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)]
    if dim % 2:
        parts.append(torch.zeros_like(args[:, :1]))
    return torch.cat(parts, dim=1)


class NormAct(nn.GroupNorm):
    """GroupNorm (+ a per-sample channel bias) (→ SiLU): the one place a norm runs, so the fused
    kernel replaces them all. `kernels` is its dispatch mode (kernels.dispatch); the weights
    are nn.GroupNorm's, so checkpoints do not see the difference."""

    def __init__(self, groups: int, channels: int, eps: float, silu: bool = True):
        super().__init__(groups, channels, eps)
        self.silu = silu
        self.kernels = "auto"

    def forward(self, x: torch.Tensor, bias_nc: torch.Tensor | None = None,
                scale_shift: torch.Tensor | None = None) -> torch.Tensor:
        return kernels.group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps,
                                       bias_nc, self.silu, mode=self.kernels, scale_shift=scale_shift)


def downsample(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2)


def upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class ResBlock(nn.Module):
    """`resample` (downsample or upsample): a resampling block (diffusers' ResnetBlock2D with
    down/up=True), which resamples both its input, for the skip, and norm1's output."""

    def __init__(self, cin: int, cout: int, temb_channels: int, cfg: UNetConfig,
                 output_scale: float = 1.0, resample: Callable | None = None):
        super().__init__()
        self.norm1 = NormAct(cfg.groups, cin, cfg.eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.scale_shift = cfg.time_scale_shift
        self.temb_proj = nn.Linear(temb_channels, 2 * cout if self.scale_shift else cout)
        self.norm2 = NormAct(cfg.groups, cout, cfg.eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.output_scale = output_scale
        self.resample = resample

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        """x: (B, cin, H, W); temb_act: SiLU of the time embedding, (B, temb_channels)."""
        h = self.norm1(x)
        if self.resample is not None:
            x, h = self.resample(x), self.resample(h)
        h = self.conv1(h)
        if self.scale_shift:  # norm2 → ·(1 + scale) + shift, [scale | shift] = the projection
            h = self.norm2(h, scale_shift=self.temb_proj(temb_act))
        else:  # the paper adds the projected embedding right before norm2: fold it into the norm
            h = self.norm2(h, bias_nc=self.temb_proj(temb_act))
        h = self.conv2(self.dropout(h))
        out = self.skip(x) + h
        return out if self.output_scale == 1.0 else out / self.output_scale


class AttnBlock(nn.Module):
    """Self-attention over the H·W positions (one head, or heads of `head_dim` channels), residual;
    `groups=None`: no norm before it."""

    def __init__(self, channels: int, cfg: UNetConfig, groups: int | None,
                 output_scale: float = 1.0):
        super().__init__()
        self.norm = NormAct(groups, channels, cfg.eps, silu=False) if groups is not None else None
        self.qkv = nn.Linear(channels, 3 * channels)  # the paper's q, k, v NIN layers, fused
        self.proj = nn.Linear(channels, channels)
        self.heads = channels // (cfg.attention_head_dim or channels)
        self.output_scale = output_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = (x if self.norm is None else self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        if self.heads == 1:
            out = F.scaled_dot_product_attention(q, k, v)  # scale 1/√C
        else:  # (B, heads, HW, C/heads), scale 1/√(C/heads)
            q, k, v = (u.unflatten(-1, (self.heads, -1)).transpose(1, 2) for u in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        out = x + self.proj(out).transpose(1, 2).reshape(b, c, h, w)
        return out if self.output_scale == 1.0 else out / self.output_scale


class Downsample(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)
        self.pad_right = padding == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_right:  # TF "SAME" padding of the original code
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(upsample(x))


class Level(nn.Module):
    """One resolution of the down or up path: res blocks, optional attention, optional resample
    (a conv, or a resampling ResBlock)."""

    def __init__(self, blocks: list[ResBlock], attns: list[AttnBlock], resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        self.resample = resample

    def resampled(self, h: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        if isinstance(self.resample, ResBlock):
            return self.resample(h, temb_act)
        return self.resample(h)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        ch, temb_ch = cfg.base_channels, cfg.temb_channels or 4 * cfg.base_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.time_embed = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))

        skip_channels, res, cur = [ch], cfg.image_size, ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.channel_mult):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(cur, ch * mult, temb_ch, cfg))
                cur = ch * mult
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(cur, cfg, cfg.groups))
                skip_channels.append(cur)
            last = i == len(cfg.channel_mult) - 1
            if last:
                resample = None
            elif res in cfg.resnet_down_resolutions:
                resample = ResBlock(cur, cur, temb_ch, cfg, resample=downsample)
            else:
                resample = Downsample(cur, cfg.downsample_padding)
            self.down.append(Level(blocks, attns, resample))
            if not last:
                skip_channels.append(cur)
                res //= 2

        self.mid_res1 = ResBlock(cur, cur, temb_ch, cfg, cfg.mid_scale)
        mid_groups = cfg.mid_attn_groups
        if mid_groups is None and not cfg.time_scale_shift:
            mid_groups = cfg.groups
        self.mid_attn = (AttnBlock(cur, cfg, mid_groups, cfg.mid_scale) if cfg.mid_attention
                         else nn.Identity())
        self.mid_res2 = ResBlock(cur, cur, temb_ch, cfg, cfg.mid_scale)

        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.channel_mult))):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(cur + skip_channels.pop(), ch * mult, temb_ch, cfg))
                cur = ch * mult
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(cur, cfg, cfg.groups))
            if i == 0:
                resample = None
            elif res in cfg.resnet_up_resolutions:
                resample = ResBlock(cur, cur, temb_ch, cfg, resample=upsample)
            else:
                resample = Upsample(cur)
            self.up.append(Level(blocks, attns, resample))
            if i > 0:
                res *= 2

        self.norm_out = NormAct(cfg.groups, cur, cfg.eps)
        self.conv_out = nn.Conv2d(cur, cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, S, S) in [−1, 1]-ish; t: (B,) timesteps 0..T−1 → the model's
        prediction (B, out_channels, S, S): ε, x0 or v (see fastddpm.prediction)."""
        cfg = self.config
        temb = self.time_embed(timestep_embedding(t, cfg.base_channels, cfg.flip_sin_to_cos,
                                                  cfg.freq_shift).to(x.dtype))
        temb_act = F.silu(temb)  # every block applies SiLU before its projection: do it once
        if cfg.center_input:
            x = 2 * x - 1.0
        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for i, block in enumerate(level.res):
                h = block(h, temb_act)
                if level.attn:
                    h = level.attn[i](h)
                skips.append(h)
            if level.resample is not None:
                h = level.resampled(h, temb_act)
                skips.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, temb_act)), temb_act)
        for level in self.up:
            for i, block in enumerate(level.res):
                h = block(torch.cat([h, skips.pop()], dim=1), temb_act)
                if level.attn:
                    h = level.attn[i](h)
            if level.resample is not None:
                h = level.resampled(h, temb_act)
        return self.conv_out(self.norm_out(h))

    def set_kernels(self, mode: str) -> UNet:
        """Dispatch mode of every norm (kernels.dispatch): 'reference' for a graph of standard
        ops (ONNX export), 'auto' for the fused kernels where they apply."""
        check_mode(mode)
        for module in self.modules():
            if isinstance(module, NormAct):
                module.kernels = mode
        return self
