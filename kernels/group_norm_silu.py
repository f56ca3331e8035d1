"""GroupNorm with an optional per-(sample, channel) bias added first, an optional per-(sample,
channel) scale and shift after, and an optional SiLU last.

    h = x + bias_nc[:, :, None, None]                         (if bias_nc is given)
    y = (h − mean_g) / √(var_g + eps) · weight_c + bias_c     (statistics per sample and group)
    y = y · (1 + scale_nc) + shift_nc                         (if scale_shift = [scale | shift])
    y = y · sigmoid(y)                                        (if silu)

bias_nc is the DDPM U-Net's time embedding (added before norm2); scale_shift is diffusers'
`resnet_time_scale_shift="scale_shift"` conditioning, the (N, 2C) output of the block's time
projection as it stands. The kernel folds scale and shift into γ and β per (sample, channel):
γ' = γ (1 + scale), β' = β (1 + scale) + shift, so the per-element work does not grow.

mean_g and var_g (biased) are over the C/G channels × H·W pixels of group g of one sample.
Statistics in float32 (float64 in the reference when given float64), I/O in the input dtype.

The kernel runs one program per (sample, group). Where the group fits in registers (every
CIFAR-10 shape: at most 12 channels × 32² = 12,288 elements) it reads x once, takes the mean and
then the centred sum of squares from registers (exact two-pass statistics for one read), and
writes y: bytes moved = read x + write y, the floor. Larger groups (256² models: up to 16 × 256²)
loop twice over memory: chunk statistics merged with Chan's parallel formula (stable, no
E[x²] − mean² cancellation), then normalise. No atomics, so results are bit-reproducible.
NCHW and channels_last take the same kernel with the channel and pixel strides swapped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import HAS_TRITON, LazyOp, dense_layout, kernel_applies, use_fused

REGISTER_LIMIT = 16384  # largest padded group (channels × pixels) held in registers
LOOP_TILE = 4096  # elements per chunk in the looped variant


def group_norm_silu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              groups: int, eps: float, bias_nc: torch.Tensor | None = None,
                              silu: bool = True, scale_shift: torch.Tensor | None = None
                              ) -> torch.Tensor:
    """Plain torch. x: (N, C, *spatial); weight, bias: (C,); bias_nc: (N, C) or None;
    scale_shift: (N, 2C) = [scale | shift] or None."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    per_nc = (*x.shape[:2], *([1] * (x.ndim - 2)))
    h = x.to(dtype)
    if bias_nc is not None:
        h = h + bias_nc.to(dtype).view(per_nc)
    y = F.group_norm(h, groups, weight.to(dtype), bias.to(dtype), eps)
    if scale_shift is not None:
        scale, shift = scale_shift.to(dtype).chunk(2, dim=1)
        y = y * (1.0 + scale.reshape(per_nc)) + shift.reshape(per_nc)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op

    from .launch import Launch

    @triton.jit
    def _group_params(weight_ptr, bias_ptr, bias_nc_ptr, scale_shift_ptr, channels, pixels,
                      channels_per_group, groups, stride_c, HAS_BIAS_NC: tl.constexpr,
                      HAS_SCALE_SHIFT: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's (sample n, group g): the offset of its first element in x, its channel
        lanes and their mask, γ and β (with the sample's scale and shift folded in) and the
        sample's bias_nc for the group's channels, fp32 (BLOCK_C,) each."""
        pid = tl.program_id(0)
        n, g = pid // groups, pid % groups
        base = n.to(tl.int64) * channels * pixels + g * channels_per_group * stride_c
        c = tl.arange(0, BLOCK_C)
        c_mask = c < channels_per_group
        ch = g * channels_per_group + c
        gamma = tl.load(weight_ptr + ch, mask=c_mask, other=0.0).to(tl.float32)
        beta = tl.load(bias_ptr + ch, mask=c_mask, other=0.0).to(tl.float32)
        pre_bias = tl.zeros((BLOCK_C,), tl.float32)
        if HAS_BIAS_NC:
            pre_bias = tl.load(bias_nc_ptr + n * channels + ch, mask=c_mask, other=0.0).to(tl.float32)
        if HAS_SCALE_SHIFT:  # row n of (N, 2C): scale at ch, shift at C + ch
            row = scale_shift_ptr + n * 2 * channels + ch
            scale = 1.0 + tl.load(row, mask=c_mask, other=0.0).to(tl.float32)
            shift = tl.load(row + channels, mask=c_mask, other=0.0).to(tl.float32)
            gamma = gamma * scale
            beta = beta * scale + shift
        return base, c, c_mask, gamma, beta, pre_bias

    @triton.jit
    def _normalize(h, mean, rstd, gamma, beta, SILU: tl.constexpr):
        y = (h - mean) * rstd * gamma[None, :] + beta[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        return y

    @triton.jit
    def _group_norm_registers_kernel(
        x_ptr,  # (N, C, *spatial) fp32/fp16/bf16, dense NCHW or NHWC
        weight_ptr,  # (C,) γ
        bias_ptr,  # (C,) β
        bias_nc_ptr,  # (N, C) contiguous: added to x before the statistics (if HAS_BIAS_NC)
        scale_shift_ptr,  # (N, 2C) contiguous: [scale | shift] after the norm (if HAS_SCALE_SHIFT)
        out_ptr,  # like x, same strides
        channels,  # C
        pixels,  # H·W
        channels_per_group,  # C / G
        groups,  # G
        stride_c,  # element stride between channels: H·W (NCHW) or 1 (NHWC)
        stride_p,  # element stride between pixels: 1 (NCHW) or C (NHWC)
        eps,
        HAS_BIAS_NC: tl.constexpr,
        HAS_SCALE_SHIFT: tl.constexpr,
        SILU: tl.constexpr,
        BLOCK_C: tl.constexpr,  # next_pow2(C / G)
        BLOCK_P: tl.constexpr,  # next_pow2(H·W): the whole group in one tile
    ):
        base, c, c_mask, gamma, beta, pre_bias = _group_params(
            weight_ptr, bias_ptr, bias_nc_ptr, scale_shift_ptr, channels, pixels, channels_per_group,
            groups, stride_c, HAS_BIAS_NC, HAS_SCALE_SHIFT, BLOCK_C)
        p = tl.arange(0, BLOCK_P)
        mask = (p < pixels)[:, None] & c_mask[None, :]
        offs = base + p[:, None] * stride_p + c[None, :] * stride_c
        h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + pre_bias[None, :]
        count = pixels * channels_per_group * 1.0  # not .to(): both may be constexpr 1 when compiled
        mean = tl.sum(tl.sum(tl.where(mask, h, 0.0), axis=1), axis=0) / count
        centred = tl.where(mask, h - mean, 0.0)
        var = tl.sum(tl.sum(centred * centred, axis=1), axis=0) / count
        y = _normalize(h, mean, 1.0 / tl.sqrt(var + eps), gamma, beta, SILU)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _group_norm_looped_kernel(
        x_ptr,  # (N, C, *spatial) fp32/fp16/bf16, dense NCHW or NHWC
        weight_ptr,  # (C,) γ
        bias_ptr,  # (C,) β
        bias_nc_ptr,  # (N, C) contiguous (if HAS_BIAS_NC)
        scale_shift_ptr,  # (N, 2C) contiguous (if HAS_SCALE_SHIFT)
        out_ptr,  # like x, same strides
        channels, pixels, channels_per_group, groups,  # C, H·W, C / G, G
        stride_c, stride_p,  # as in the registers kernel
        eps,
        HAS_BIAS_NC: tl.constexpr,
        HAS_SCALE_SHIFT: tl.constexpr,
        SILU: tl.constexpr,
        BLOCK_C: tl.constexpr,  # next_pow2(C / G)
        BLOCK_P: tl.constexpr,  # pixels per chunk
    ):
        base, c, c_mask, gamma, beta, pre_bias = _group_params(
            weight_ptr, bias_ptr, bias_nc_ptr, scale_shift_ptr, channels, pixels, channels_per_group,
            groups, stride_c, HAS_BIAS_NC, HAS_SCALE_SHIFT, BLOCK_C)
        p = tl.arange(0, BLOCK_P)
        # pass 1: per-chunk mean and centred sum of squares, merged (Chan et al. 1979)
        mean = 0.0
        m2 = 0.0
        count = 0.0
        for start in range(0, pixels, BLOCK_P):
            mask = (start + p < pixels)[:, None] & c_mask[None, :]
            offs = base + (start + p)[:, None] * stride_p + c[None, :] * stride_c
            h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + pre_bias[None, :]
            n_chunk = (tl.minimum(pixels - start, BLOCK_P) * channels_per_group).to(tl.float32)
            mean_chunk = tl.sum(tl.sum(tl.where(mask, h, 0.0), axis=1), axis=0) / n_chunk
            centred = tl.where(mask, h - mean_chunk, 0.0)
            m2_chunk = tl.sum(tl.sum(centred * centred, axis=1), axis=0)
            total = count + n_chunk
            delta = mean_chunk - mean
            mean += delta * (n_chunk / total)
            m2 += m2_chunk + delta * delta * (count * n_chunk / total)
            count = total
        rstd = 1.0 / tl.sqrt(m2 / count + eps)
        # pass 2: normalise
        for start in range(0, pixels, BLOCK_P):
            mask = (start + p < pixels)[:, None] & c_mask[None, :]
            offs = base + (start + p)[:, None] * stride_p + c[None, :] * stride_c
            h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + pre_bias[None, :]
            y = _normalize(h, mean, rstd, gamma, beta, SILU)
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    def group_norm_silu_launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                               groups: int, eps: float, bias_nc: torch.Tensor | None, silu: bool,
                               out: torch.Tensor, register_limit: int = REGISTER_LIMIT,
                               loop_tile: int = LOOP_TILE, scale_shift: torch.Tensor | None = None
                               ) -> Launch:
        """The launch on dense x (NCHW-contiguous, or 4-D channels_last) into `out` (x's
        strides); weight, bias (C,), bias_nc (N, C) and scale_shift (N, 2C) contiguous. Tests
        run it directly under TRITON_INTERPRET=1, with small limits to reach the looped variant
        on small shapes."""
        batch, channels = x.shape[0], x.shape[1]
        pixels = x[0, 0].numel()
        if dense_layout(x) == torch.channels_last:
            stride_c, stride_p = 1, channels
        else:
            stride_c, stride_p = pixels, 1
        channels_per_group = channels // groups
        block_c = triton.next_power_of_2(channels_per_group)
        block_p = triton.next_power_of_2(pixels)
        if block_c * block_p <= register_limit:
            kernel = _group_norm_registers_kernel
        else:
            kernel, block_p = _group_norm_looped_kernel, max(1, loop_tile // block_c)
        num_warps = 4 if block_c * block_p <= 2048 else 8 if block_c * block_p <= 8192 else 16
        return Launch(
            kernel, (batch * groups,),
            (x, weight, bias, bias_nc if bias_nc is not None else weight,
             scale_shift if scale_shift is not None else weight, out,
             channels, pixels, channels_per_group, groups, stride_c, stride_p, eps),
            dict(HAS_BIAS_NC=bias_nc is not None, HAS_SCALE_SHIFT=scale_shift is not None,
                 SILU=silu, BLOCK_C=block_c, BLOCK_P=block_p),
            num_warps)

    def _register_op() -> None:
        @triton_op("fastddpm::group_norm_silu", mutates_args=())
        def _group_norm_silu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                groups: int, eps: float, bias_nc: torch.Tensor | None,
                                silu: bool, scale_shift: torch.Tensor | None) -> torch.Tensor:
            """Operands prepared by `group_norm_silu`: x dense, the rest contiguous."""
            if not kernel_applies(x):  # reached under torch.compile tracing of CPU/float64 tensors
                return group_norm_silu_reference(x, weight, bias, groups, eps, bias_nc, silu, scale_shift)
            out = torch.empty_like(x)
            group_norm_silu_launch(x, weight, bias, groups, eps, bias_nc, silu, out,
                                   scale_shift=scale_shift).run()
            return out

        @_group_norm_silu_op.register_kernel("cpu")
        def _group_norm_silu_cpu(x, weight, bias, groups, eps, bias_nc, silu, scale_shift):
            return group_norm_silu_reference(x, weight, bias, groups, eps, bias_nc, silu, scale_shift)

    GROUP_NORM_SILU_OP = LazyOp("group_norm_silu", _register_op)


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                    eps: float, bias_nc: torch.Tensor | None = None,
                    silu: bool = True, mode: str = "auto",
                    scale_shift: torch.Tensor | None = None) -> torch.Tensor:
    """The fused op the U-Net calls for every GroupNorm (→ scale-shift) (→ SiLU).

    x: (N, C, *spatial), NCHW or channels_last; weight, bias: (C,); bias_nc: (N, C) or None;
    scale_shift: (N, 2C) = [scale | shift] or None. mode: see kernels.dispatch.
    Differentiable: with autograd recording through any input it runs the reference."""
    if not use_fused(mode, x, weight, bias, bias_nc, scale_shift):
        return group_norm_silu_reference(x, weight, bias, groups, eps, bias_nc, silu, scale_shift)
    x = x.contiguous(memory_format=dense_layout(x))  # no copy for NCHW or channels_last input
    bias_nc = None if bias_nc is None else bias_nc.contiguous()
    scale_shift = None if scale_shift is None else scale_shift.contiguous()
    return GROUP_NORM_SILU_OP()(x, weight.contiguous(), bias.contiguous(), groups, float(eps),
                                bias_nc, silu, scale_shift)
