"""Parameter names: ours ↔ diffusers' `UNet2DModel` ↔ the PyTorch port of the original TF code.

All three are the same network (Ho et al. 2020, Appendix B) with different module names and two
differences in form: our attention has one fused `qkv` Linear where the others hold q, k and v
apart, and the original's q/k/v/proj_out are 1×1 convolutions, (C, C, 1, 1), not Linears, (C, C).
A resampler is a conv, or (diffusers' "resnet" resampling) a ResBlock named as any other;
the original code only has the conv.
`param_map` lists, for each of our parameters, where it lives in the other layout; importing and
exporting both read that one list, so the two directions cannot drift apart.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..unet import UNet, UNetConfig


@dataclass(frozen=True)
class Param:
    ours: str  # key in our state dict
    theirs: str  # key in the other layout's state dict
    part: int | None = None  # for our fused qkv: which third this key is (q = 0, k = 1, v = 2)
    conv1x1: bool = False  # theirs is a 1×1 conv weight (C, C, 1, 1) where ours is (C, C)

    def their_shape(self, our_shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = list(our_shape)
        if self.part is not None:
            shape[0] //= 3
        if self.conv1x1 and len(shape) == 2:
            shape += [1, 1]
        return tuple(shape)


@dataclass(frozen=True)
class Layout:
    """How one foreign layout names our modules."""

    name: str
    # (pattern over our module path, their module path from the match and the number of levels)
    modules: tuple[tuple[str, Callable[[re.Match, int], str]], ...]
    resblock: dict[str, str]  # our ResBlock member → theirs (members not listed keep their name)
    attn_norm: str
    attn_qkv: tuple[str, str, str]
    attn_proj: str
    attn_conv1x1: bool


def _fixed(name: str) -> Callable[[re.Match, int], str]:
    return lambda m, levels: name


DIFFUSERS = Layout(
    name="diffusers",
    modules=(
        (r"conv_in", _fixed("conv_in")),
        (r"time_embed\.0", _fixed("time_embedding.linear_1")),
        (r"time_embed\.2", _fixed("time_embedding.linear_2")),
        (r"down\.(\d+)\.res\.(\d+)", lambda m, n: f"down_blocks.{m[1]}.resnets.{m[2]}"),
        (r"down\.(\d+)\.attn\.(\d+)", lambda m, n: f"down_blocks.{m[1]}.attentions.{m[2]}"),
        (r"down\.(\d+)\.resample", lambda m, n: f"down_blocks.{m[1]}.downsamplers.0"),
        (r"mid_res1", _fixed("mid_block.resnets.0")),
        (r"mid_attn", _fixed("mid_block.attentions.0")),
        (r"mid_res2", _fixed("mid_block.resnets.1")),
        # both count up blocks from the deepest level
        (r"up\.(\d+)\.res\.(\d+)", lambda m, n: f"up_blocks.{m[1]}.resnets.{m[2]}"),
        (r"up\.(\d+)\.attn\.(\d+)", lambda m, n: f"up_blocks.{m[1]}.attentions.{m[2]}"),
        (r"up\.(\d+)\.resample", lambda m, n: f"up_blocks.{m[1]}.upsamplers.0"),
        (r"norm_out", _fixed("conv_norm_out")),
        (r"conv_out", _fixed("conv_out")),
    ),
    resblock={"temb_proj": "time_emb_proj", "skip": "conv_shortcut"},
    attn_norm="group_norm",
    attn_qkv=("to_q", "to_k", "to_v"),
    attn_proj="to_out.0",
    attn_conv1x1=False,
)

ORIGINAL = Layout(
    name="original",
    modules=(
        (r"conv_in", _fixed("conv_in")),
        (r"time_embed\.0", _fixed("temb.dense.0")),
        (r"time_embed\.2", _fixed("temb.dense.1")),
        (r"down\.(\d+)\.res\.(\d+)", lambda m, n: f"down.{m[1]}.block.{m[2]}"),
        (r"down\.(\d+)\.attn\.(\d+)", lambda m, n: f"down.{m[1]}.attn.{m[2]}"),
        (r"down\.(\d+)\.resample", lambda m, n: f"down.{m[1]}.downsample"),
        (r"mid_res1", _fixed("mid.block_1")),
        (r"mid_attn", _fixed("mid.attn_1")),
        (r"mid_res2", _fixed("mid.block_2")),
        # the original indexes its up path by level (0 = full resolution); ours from the deepest
        (r"up\.(\d+)\.res\.(\d+)", lambda m, n: f"up.{n - 1 - int(m[1])}.block.{m[2]}"),
        (r"up\.(\d+)\.attn\.(\d+)", lambda m, n: f"up.{n - 1 - int(m[1])}.attn.{m[2]}"),
        (r"up\.(\d+)\.resample", lambda m, n: f"up.{n - 1 - int(m[1])}.upsample"),
        (r"norm_out", _fixed("norm_out")),
        (r"conv_out", _fixed("conv_out")),
    ),
    resblock={"skip": "nin_shortcut"},
    attn_norm="norm",
    attn_qkv=("q", "k", "v"),
    attn_proj="proj_out",
    attn_conv1x1=True,
)

_ATTN = re.compile(r"(?:down|up)\.\d+\.attn\.\d+|mid_attn")
# a resampler is a conv (`conv`, named alike in every layout) or a ResBlock: both named as ResBlocks
_RES = re.compile(r"(?:down|up)\.\d+\.(?:res\.\d+|resample)|mid_res[12]")


def _their_module(layout: Layout, path: str, num_levels: int) -> str:
    for pattern, name in layout.modules:
        m = re.fullmatch(pattern, path)
        if m:
            return name(m, num_levels)
    raise AssertionError(f"no {layout.name} name for our module {path!r}")


def param_map(our_keys: Iterable[str], layout: Layout, num_levels: int) -> list[Param]:
    """Where each of our parameters (in `our_keys` order) lives in `layout`."""
    out = []
    for key in our_keys:
        path, member = key.rsplit(".", 1)  # member: weight | bias
        block, _, sub = path.rpartition(".")  # e.g. "down.1.attn.0", "qkv"
        if _ATTN.fullmatch(block):
            theirs = _their_module(layout, block, num_levels)
            if sub == "qkv":
                out += [Param(key, f"{theirs}.{name}.{member}", part, layout.attn_conv1x1)
                        for part, name in enumerate(layout.attn_qkv)]
            elif sub == "proj":
                out.append(Param(key, f"{theirs}.{layout.attn_proj}.{member}",
                                 conv1x1=layout.attn_conv1x1))
            else:
                out.append(Param(key, f"{theirs}.{layout.attn_norm}.{member}"))
        elif _RES.fullmatch(block):
            theirs = _their_module(layout, block, num_levels)
            out.append(Param(key, f"{theirs}.{layout.resblock.get(sub, sub)}.{member}"))
        else:
            out.append(Param(key, f"{_their_module(layout, path, num_levels)}.{member}"))
    return out


def to_ours(state: dict[str, torch.Tensor], params: list[Param],
            our_shapes: dict[str, tuple[int, ...]], where: str) -> dict[str, torch.Tensor]:
    """Our state dict from a foreign one; one line naming the first missing, mis-shaped or
    unexpected key (in the foreign file's own names)."""
    pieces: dict[str, list[torch.Tensor]] = {}
    for p in params:
        if p.theirs not in state:
            raise UserError(f"{where}: missing weight {p.theirs!r}")
        value = state[p.theirs]
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{where}: {p.theirs!r} is not a tensor")
        want = p.their_shape(our_shapes[p.ours])
        if tuple(value.shape) != want:
            raise UserError(f"{where}: weight {p.theirs!r} has shape {tuple(value.shape)}, "
                            f"the config needs {want}")
        ours_shape = our_shapes[p.ours]
        # a third of our fused qkv, or the whole tensor; 1×1 conv weights lose their (1, 1)
        pieces.setdefault(p.ours, []).append(value.reshape(-1, *ours_shape[1:]))
    known = {p.theirs for p in params}
    for key in state:
        if key not in known:
            raise UserError(f"{where}: unexpected weight {key!r}")
    return {key: parts[0] if len(parts) == 1 else torch.cat(parts) for key, parts in pieces.items()}


def to_theirs(state: dict[str, torch.Tensor], params: list[Param]) -> dict[str, torch.Tensor]:
    """A foreign state dict from ours: split qkv, add the 1×1 conv dims; fresh contiguous tensors
    (safetensors refuses tensors that share memory)."""
    out = {}
    for p in params:
        value = state[p.ours]
        whole = tuple(value.shape)
        if p.part is not None:
            value = value.chunk(3)[p.part]
        out[p.theirs] = value.detach().cpu().reshape(p.their_shape(whole)).contiguous().clone()
    return out


def our_shapes(cfg: UNetConfig) -> dict[str, tuple[int, ...]]:
    """{state-dict key: shape} of our U-Net for `cfg`, in state-dict order, allocating nothing."""
    with torch.device("meta"):
        unet = UNet(cfg)
    return {key: tuple(value.shape) for key, value in unet.state_dict().items()}
