"""The Triton kernels of qatcore-cuda: fake quantization with a gradient mask, and its backward.

This module imports Triton at the top and decorates its kernels with
``triton.jit`` when it is executed, so Triton's interpreter mode
(``TRITON_INTERPRET=1``) must be decided before then.
:mod:`qatcore_cuda.kernel` loads it lazily, once for compiled kernels and,
for CPU tensors, once more with the interpreter switched on.

Every step repeats one ATen op of :func:`qatcore.fake_quantize_reference`
on the same operands in the same dtype, and each of those steps is an
IEEE-754 operation rounded to nearest even: a multiply, an add, a
subtract, a compare or a cast. bfloat16 tensors arrive as their int16 bits
and are widened and rounded with integer operations, as torch converts
them, because Triton's interpreter truncates its own float32-to-bfloat16
casts. The kernels are launched with ``enable_fp_fusion=False``, so that
the compiler never contracts a multiply and an add into one fused
multiply-add, which rounds once instead of twice.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["fake_quantize_kernel", "masked_gradient_kernel"]


@triton.jit
def _round_half_to_even(value):
    """Round to the nearest integer, ties to even, as ``torch.round`` does.

    Libdevice's ``rint`` is not available in the interpreter, so this adds
    and subtracts a power of two. For ``0 <= a < 2**23`` (``2**52`` in
    float64), the sum ``a + 2**23`` lies where float spacing is exactly 1.
    The add therefore rounds ``a`` to an integer with ties to even, and the
    subtraction is exact. The input's sign bit is then copied onto the
    result, so that ``-0.3`` rounds to ``-0.0``. Larger magnitudes, inf and
    NaN pass through unchanged, because they are integers or NaN already.
    """
    if value.dtype == tl.float64:
        shift = 4503599627370496.0  # 2**52
        bits = value.to(tl.uint64, bitcast=True)
        sign = bits & 0x8000000000000000
    else:
        shift = 8388608.0  # 2**23
        bits = value.to(tl.uint32, bitcast=True)
        sign = bits & 0x80000000
    magnitude = tl.abs(value)
    small = magnitude < shift
    rounded = (magnitude + shift) - shift
    rounded_bits = rounded.to(bits.dtype, bitcast=True) | sign
    return tl.where(small, rounded_bits.to(value.dtype, bitcast=True), value)


@triton.jit
def _bfloat16_bits_to_float32(bits):
    """Widen bfloat16 values, given as their int16 bits, to float32; the widening is exact."""
    return (bits.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _float32_to_bfloat16_bits(value):
    """Round float32 values to bfloat16, to nearest even, and return the int16 bits.

    This is torch's scalar conversion: add ``0x7FFF`` plus the lowest kept
    bit, then drop the low 16 bits, which carries into the exponent and
    turns values beyond bfloat16's range into inf. NaN becomes ``0x7FC0``.
    """
    bits = value.to(tl.uint32, bitcast=True)
    rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
    rounded = tl.where(value != value, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.int16, bitcast=True)


# Triton would turn an integer argument equal to 1 into a compile-time
# constant, which has no .to(); the range bounds are cast in the kernel.
@triton.jit(do_not_specialize=["quant_min", "quant_max"])
def fake_quantize_kernel(
    x_ptr,
    out_ptr,
    mask_ptr,
    scale_ptr,
    inv_scale_ptr,
    zero_point_ptr,
    numel,
    channels,
    inner,
    quant_min,
    quant_max,
    PER_CHANNEL: tl.constexpr,
    WRITE_MASK: tl.constexpr,
    BFLOAT16: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Fake-quantize ``BLOCK`` elements of a dense tensor, in memory order.

    The tensor is seen as ``(outer, channels, inner)`` in memory, so the
    channel of flat element ``i`` is ``(i // inner) % channels``. The
    qparams are in the compute dtype: float32 for half-precision input,
    else the input's dtype. With ``BFLOAT16``, ``x_ptr`` and ``out_ptr``
    point to the int16 bits of bfloat16 tensors. ``mask_ptr`` receives
    ``clamped == code`` when ``WRITE_MASK`` is set.
    """
    if INDEX_64:
        start = tl.program_id(0).to(tl.int64) * BLOCK
    else:
        start = tl.program_id(0) * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    in_bounds = offsets < numel

    if PER_CHANNEL:
        channel = (offsets // inner) % channels
        scale = tl.load(scale_ptr + channel, mask=in_bounds, other=1.0)
        inv_scale = tl.load(inv_scale_ptr + channel, mask=in_bounds, other=1.0)
        zero_point = tl.load(zero_point_ptr + channel, mask=in_bounds, other=0.0)
    else:
        scale = tl.load(scale_ptr)
        inv_scale = tl.load(inv_scale_ptr)
        zero_point = tl.load(zero_point_ptr)

    # The cast to the compute dtype is exact: it widens or keeps the dtype.
    if BFLOAT16:
        x = _bfloat16_bits_to_float32(tl.load(x_ptr + offsets, mask=in_bounds, other=0))
    else:
        x = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0).to(scale.dtype)
    # NOTE: the interpreter keeps float32 subnormals in this product. Whether
    # the compiled multiply flushes them to zero is checked only by the CUDA
    # tests, which have not run on a GPU yet.
    code = _round_half_to_even(x * inv_scale) + zero_point
    # torch.clamp converts its integer bounds to the compute dtype the same
    # way, rounding to nearest even where the dtype cannot hold them.
    low = quant_min.to(scale.dtype)
    high = quant_max.to(scale.dtype)
    # Written as selects rather than minimum and maximum, whose NaN handling
    # differs between backends: a NaN code compares false and stays NaN, as
    # in torch.clamp.
    clamped = tl.where(code < low, low, tl.where(code > high, high, code))
    out = (clamped - zero_point) * scale
    if BFLOAT16:
        tl.store(out_ptr + offsets, _float32_to_bfloat16_bits(out), mask=in_bounds)
    else:
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=in_bounds)
    if WRITE_MASK:
        tl.store(mask_ptr + offsets, clamped == code, mask=in_bounds)


@triton.jit
def masked_gradient_kernel(
    grad_ptr,
    mask_ptr,
    out_ptr,
    numel,
    BFLOAT16: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Write ``grad * mask`` for ``BLOCK`` elements of two tensors with the same dense layout.

    It is a product rather than a select, as in the reference, so that an
    inf or NaN gradient where the mask is 0 becomes NaN and a negative one
    becomes ``-0.0``. A product with 0 or 1 is exact in every dtype. With
    ``BFLOAT16``, ``grad_ptr`` and ``out_ptr`` point to int16 bits and the
    product is taken in float32.
    """
    if INDEX_64:
        start = tl.program_id(0).to(tl.int64) * BLOCK
    else:
        start = tl.program_id(0) * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    in_bounds = offsets < numel
    inside = tl.load(mask_ptr + offsets, mask=in_bounds, other=0)
    if BFLOAT16:
        grad = _bfloat16_bits_to_float32(tl.load(grad_ptr + offsets, mask=in_bounds, other=0))
        product = _float32_to_bfloat16_bits(grad * inside.to(tl.float32))
    else:
        grad = tl.load(grad_ptr + offsets, mask=in_bounds, other=0.0)
        product = grad * inside.to(grad.dtype)
    tl.store(out_ptr + offsets, product, mask=in_bounds)
