"""How much a request may ask for: the counts a user gives (images, snapshots, interpolation
weights, a sampling, exported or training batch, the arrays of a data file) are checked against
the memory this machine has before any work starts, so a typo like `--num 1000000000000` ends
in one line, not in an hour of sampling or an allocation traceback.

What a request holds at its peak is estimated from the U-Net config: the images it keeps until
they are written (float32, plus their uint8 copy) and one ε forward over its largest batch (the
skip tensors the U-Net keeps, a few working tensors at the widest level, the attention scores)
or, for training, what autograd keeps of a forward for its backward. The estimate errs high;
the bound is the machine's physical memory, or a smaller limit the process runs under
(RLIMIT_AS, a cgroup). Sharded sampling under torchrun writes its batches as it goes and
joins them as uint8 (shards.join_bytes): it draws a few times more images than one process.
"""
from __future__ import annotations

import os
import resource
from pathlib import Path

from .errors import UserError
from .unet import UNetConfig

FLOAT32 = 4
# live tensors of the widest level inside a ResBlock (input, norm, conv, the concatenated skip)
WORKING_TENSORS = 8
# what the ops allocate on the side (workspaces, temporaries, the allocator's slack). Measured
# peak of one CPU forward, per image: digits 0.42–0.46 MB at batch 256 (estimate 0.44 MB),
# cifar10 10.6–12.3 MB at batch 16 (estimate 14.6 MB)
SIDE_ALLOCATIONS = 2
# what autograd keeps of a ResBlock for the backward, in tensors of its input plus output width
# (GroupNorm's input and statistics, SiLU's, each convolution's input, the dropout mask), and of
# an attention block in tensors of its width (the norm, q, k, v, the output, the projection's
# input). Counted so, a forward keeps 1.1–1.3× what saved-tensor hooks see of it (digits,
# cifar10, a config attending at 16²; tests/test_limits.py checks that it is not less)
SAVED_PER_RESBLOCK = 5
SAVED_PER_ATTENTION = 8


def available_memory() -> int:
    """Bytes this process may hold: physical memory, or less where a limit says so."""
    limits = [os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft)
    try:  # cgroup v2: a container's own limit ("max" when there is none)
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if text.isdigit():
            limits.append(int(text))
    except OSError:
        pass
    return min(limits)


def image_bytes(config: UNetConfig) -> int:
    """One kept image (C, S, S): float32 as drawn, once more concatenated with the others, a
    float32 working copy on the way to uint8, and the uint8 itself."""
    return (3 * FLOAT32 + 1) * config.in_channels * config.image_size ** 2


def _levels(config: UNetConfig) -> tuple[list[int], list[int], list[int]]:
    """Per level of the U-Net: its width (channels), its side (pixels), their tensor's elements."""
    widths = [config.base_channels * m for m in config.channel_mult]
    sides = [config.image_size >> level for level in range(len(widths))]
    return widths, sides, [w * s * s for w, s in zip(widths, sides, strict=True)]


def forward_bytes(config: UNetConfig) -> int:
    """An estimate, per image, of what one ε forward holds at its peak (float32): the skip
    tensors of every level, a few working tensors of the largest one, the attention scores (the
    middle block attends at the lowest resolution whatever the config says)."""
    widths, sides, areas = _levels(config)
    attended = [s for s in sides if s in config.attn_resolutions] + [sides[-1]]
    scores = max(s ** 4 for s in attended)
    counted = (config.num_res_blocks + 1) * sum(areas) + WORKING_TENSORS * max(areas) + 2 * scores
    return SIDE_ALLOCATIONS * FLOAT32 * counted


def train_bytes(config: UNetConfig) -> int:
    """An estimate, per image, of what one training step holds at its peak (float32): what
    autograd keeps of every block for the backward — a down ResBlock reads and writes its level's
    width, an up one reads it beside a skip (about twice the width), the middle's two the lowest
    level's — and the attention maps; the backward's gradients come and go block by block
    (SIDE_ALLOCATIONS). Measured peak of a CPU step (AdamW), per image: digits 1.8 MB (estimate
    3.0 MB), cifar10 76 MB (estimate 137 MB)."""
    widths, sides, areas = _levels(config)
    blocks = config.num_res_blocks
    resblocks = sum((2 * blocks + 3 * (blocks + 1)) * a for a in areas) + 2 * 2 * areas[-1]
    # a resampling ResBlock reads its level and writes a quarter of it (down) or four times it (up)
    resblocks += sum(2 * a for a, s in zip(areas, sides, strict=True) if s in config.resnet_down_resolutions)
    resblocks += sum(5 * a for a, s in zip(areas, sides, strict=True) if s in config.resnet_up_resolutions)
    attended = [(2 * blocks + 1, level) for level, s in enumerate(sides) if s in config.attn_resolutions]
    if config.mid_attention:
        attended.append((1, len(widths) - 1))
    attention = sum(n * (SAVED_PER_ATTENTION * areas[level]
                         + widths[level] // (config.attention_head_dim or widths[level]) * sides[level] ** 4)
                    for n, level in attended)
    return SIDE_ALLOCATIONS * FLOAT32 * (SAVED_PER_RESBLOCK * resblocks + attention)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def check_fits(what: str, need: int, fix: str) -> None:
    """A one-line UserError when `need` bytes exceed what this machine can hold."""
    have = available_memory()
    if need > have:
        raise UserError(f"{what} would take about {_size(need)} of memory, more than the "
                        f"{_size(have)} this machine has; {fix}")


def request_bytes(config: UNetConfig, kept: int, batch: int) -> int:
    """`kept` images held until written and one ε forward over `batch` images (with the step's
    x, x̂0 and ε beside it)."""
    per_image = image_bytes(config)
    return kept * per_image + batch * (forward_bytes(config) + 3 * per_image)


def check_request_fits(config: UNetConfig, kept: int, batch: int, what: str,
                       fix: str = "ask for fewer") -> None:
    """A one-line UserError, before any work, when `request_bytes` exceeds what this machine
    can hold. `what` names the request in the message ('--num 1000000000000')."""
    check_fits(what, request_bytes(config, kept, batch), fix)
