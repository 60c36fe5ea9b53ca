"""The reference numerics: qparams from a range, and the reference fake-quant kernel.

Every device kernel must match :func:`fake_quantize_reference` bit for bit,
outputs and gradients alike. The formulas follow the eager observers and the
per-tensor and per-channel fake-quant ops of ``torch.ao.quantization`` on
finite input, so models and numbers migrate unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "broadcast_shape",
    "check_qparams",
    "compute_dtype",
    "fake_quantize_learnable_reference",
    "fake_quantize_reference",
    "prepare_learnable_qparams",
    "prepare_qparams",
    "qparams_from_min_max",
    "quantization_error",
    "reduce_to_qparams",
]

FLOAT32_EPS = torch.finfo(torch.float32).eps
MAX_POWER_OF_TWO = 2.0**127


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype the fake-quant math runs in for an input of ``dtype``.

    Half-precision inputs are computed in float32 and cast back, as the
    quantized ops of PyTorch do; float32 and float64 keep their own dtype.
    """
    return torch.promote_types(dtype, torch.float32)


def broadcast_shape(x: torch.Tensor, axis: int | None) -> list[int]:
    """Return the shape that lays a per-channel vector along ``axis`` of ``x``."""
    if axis is None:
        return []
    shape = [1] * x.dim()
    shape[axis] = -1
    return shape


def prepare_qparams(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(scale, 1 / scale, zero_point)`` in the compute dtype, shaped to broadcast.

    A float zero point is rounded half to even and clamped to the integer
    range, so kernels agree whatever dtype the zero point arrives in.
    """
    dtype = compute_dtype(x.dtype)
    shape = broadcast_shape(x, axis)
    scale = scale.to(torch.float32).reshape(shape)
    inv_scale = torch.reciprocal(scale)
    zero_point = zero_point.to(torch.float32).round().clamp(quant_min, quant_max).reshape(shape)
    return scale.to(dtype), inv_scale.to(dtype), zero_point.to(dtype)


def check_qparams(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None,
    *,
    learnable: bool = False,
    scales: bool = True,
) -> None:
    """Validate a fake-quant call's arguments before a kernel runs.

    With ``learnable=True``, as the learnable kernels call it, a scale of 0
    or below passes, because those kernels clamp it to float32 eps. With
    ``scales=False`` only the range, axis and shapes are checked. A kernel
    that checks the scale values in its own pass over them passes False,
    and calls this function again with ``scales=True`` when it finds an
    invalid scale, to raise the error below.

    Raises:
        ValueError: The range is empty, the axis does not exist, the qparams
            do not match the channel count, or a scale is not finite, or
            not positive unless ``learnable`` is true.
    """
    if quant_min >= quant_max:
        raise ValueError(
            f"quant_min must be below quant_max, got quant_min={quant_min}, quant_max={quant_max}"
        )
    if axis is None:
        if scale.numel() != 1 or zero_point.numel() != 1:
            raise ValueError(
                "per-tensor fake quantization takes one scale and one zero point, got "
                f"{scale.numel()} scales and {zero_point.numel()} zero points"
            )
    else:
        if not 0 <= axis < x.dim():
            raise ValueError(
                f"per-channel axis {axis} is out of range for a tensor of shape {tuple(x.shape)}"
            )
        channels = x.shape[axis]
        if scale.numel() != channels or zero_point.numel() != channels:
            raise ValueError(
                f"per-channel fake quantization along axis {axis} of shape {tuple(x.shape)} "
                f"needs {channels} scales and zero points, got {scale.numel()} and "
                f"{zero_point.numel()}"
            )

    # The check reads the scale on the host, so it is skipped while tracing a
    # graph. Observers never produce such a scale; only a hand-set one can.
    if not scales or torch.compiler.is_compiling():
        return
    valid = torch.isfinite(scale)
    if not learnable:
        valid = valid & (scale > 0)
    if not bool(valid.all()):
        bad = scale.detach().flatten()[~valid.flatten()][:4].tolist()
        if learnable:
            raise ValueError(
                f"learnable fake quantization needs finite scales, got {bad}; the scale "
                "diverged in training. Lower the learning rate of the qparams, or load "
                "them from a checkpoint taken before"
            )
        raise ValueError(
            f"fake quantization needs finite scales > 0, got {bad}; a scale of 0 would "
            "turn every value into zero or NaN. Recompute the qparams with an observer, "
            "or clamp the scale to at least float32 eps"
        )


class _ReferenceFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        quant_min: int,
        quant_max: int,
        axis: int | None,
    ) -> torch.Tensor:
        scale, inv_scale, zero_point = prepare_qparams(
            x, scale, zero_point, quant_min, quant_max, axis
        )
        code = torch.round(x.to(scale.dtype) * inv_scale) + zero_point
        clamped = torch.clamp(code, quant_min, quant_max)
        # NOTE: with a range near float32's limit (|x| above about 2.5e38 at
        # 2 bits), the extreme code times the scale exceeds float32 and comes
        # back as inf, as in torch.ao's kernels.
        # Clipped straight-through estimator: the gradient passes where the
        # code lies inside the range. NaN compares false, so it gets none.
        ctx.save_for_backward(clamped == code)
        return ((clamped - zero_point) * scale).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (inside,) = ctx.saved_tensors
        return grad_output * inside, None, None, None, None, None


def fake_quantize_reference(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x``: quantize to integer codes and dequantize again.

    ``x * (1 / scale)`` is rounded half to even, shifted by the zero point,
    clamped to ``[quant_min, quant_max]`` and mapped back with the same scale.
    The gradient is the clipped straight-through estimator: ``grad`` where
    the code lies inside the range, 0 outside and at NaN.

    Args:
        x: Input of any floating dtype; the output has the same dtype.
        scale: One float scale, or one per channel along ``axis``.
        zero_point: One zero point, or one per channel; float zero points
            are rounded half to even and clamped to the range.
        quant_min: Smallest integer code.
        quant_max: Largest integer code.
        axis: ``None`` for per-tensor, else the channel axis of ``x``.

    Raises:
        ValueError: See :func:`check_qparams`.
    """
    check_qparams(x, scale, zero_point, quant_min, quant_max, axis)
    return _ReferenceFakeQuantize.apply(x, scale, zero_point, quant_min, quant_max, axis)


def prepare_learnable_qparams(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return :func:`prepare_qparams` of the scale clamped to at least float32 eps.

    A learned scale can step to zero or below. The clamp keeps the fake
    quantization defined, and the learnable kernels pass the scale gradient
    through it unchanged, so that the optimizer can move the scale back up.
    """
    scale = torch.clamp(scale.detach().to(torch.float32), min=FLOAT32_EPS)
    return prepare_qparams(x, scale, zero_point.detach(), quant_min, quant_max, axis)


def reduce_to_qparams(grad: torch.Tensor, qparam: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Sum a per-element gradient over each channel (or the whole tensor) into ``qparam``'s shape.

    The sum runs in ``grad``'s dtype and the result has ``qparam``'s dtype.
    """
    dims = [dim for dim in range(grad.dim()) if dim != axis]
    if axis is None:
        total = grad.sum()
    elif dims:
        total = grad.sum(dims)
    else:
        # sum() over an empty list of dims would reduce every dim.
        total = grad
    return total.to(qparam.dtype).reshape(qparam.shape)


def quantization_error(
    shifted_code: torch.Tensor, scale: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """Return ``shifted_code * scale - x``, rounded once as a fused multiply-add rounds it.

    torch.ao's CPU learnable ops compute this term with a fused
    multiply-add (measured with torch 2.13 on x86-64). For float32 the
    product and the difference are exact in float64 wherever the code lies
    inside the range, because ``shifted_code`` is an integer below 2**17
    and ``x`` lies within one scale of the product, so one cast to float32
    is the only rounding. Float64 input has no wider dtype to use, and
    there the product is rounded before the subtraction.
    """
    if scale.dtype != torch.float32:
        return shifted_code * scale - x
    exact = shifted_code.to(torch.float64) * scale.to(torch.float64) - x.to(torch.float64)
    return exact.to(torch.float32)


class _LearnableReferenceFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        quant_min: int,
        quant_max: int,
        axis: int | None,
        grad_factor: float,
    ) -> torch.Tensor:
        scale_c, inv_scale, zero_point_c = prepare_learnable_qparams(
            x, scale, zero_point, quant_min, quant_max, axis
        )
        code = torch.round(x.to(scale_c.dtype) * inv_scale) + zero_point_c
        clamped = torch.clamp(code, quant_min, quant_max)
        ctx.save_for_backward(x, scale, zero_point, scale_c, inv_scale, zero_point_c)
        ctx.quant_range = (quant_min, quant_max)
        ctx.axis = axis
        ctx.grad_factor = grad_factor
        return ((clamped - zero_point_c) * scale_c).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, scale, zero_point, scale_c, inv_scale, zero_point_c = ctx.saved_tensors
        quant_min, quant_max = ctx.quant_range
        x_c = x.to(scale_c.dtype)
        code = torch.round(x_c * inv_scale) + zero_point_c
        clamped = torch.clamp(code, quant_min, quant_max)
        inside = clamped == code
        below = code < quant_min
        above = code > quant_max
        # Clipped straight-through estimator, as in the reference kernel.
        grad_input = grad_output * inside

        grad_c = grad_output.to(scale_c.dtype)
        error = quantization_error(clamped - zero_point_c, scale_c, x_c)
        # d output / d scale: round(x / s) - x / s inside the range (the
        # straight-through estimator for round), quant_min - z below it,
        # quant_max - z above it, and 0 at NaN, which lies in no region.
        # The inside term is computed as grad * ((q - z) * s - x) * (1 / s),
        # in torch.ao's order.
        grad_scale = torch.where(
            below,
            grad_c * (quant_min - zero_point_c),
            torch.where(
                above,
                grad_c * (quant_max - zero_point_c),
                torch.where(inside, grad_c * error * inv_scale, 0.0),
            ),
        )
        grad_scale = grad_scale * ctx.grad_factor
        # d output / d zero point: 0 inside the range, where it cancels, and
        # -s outside, where the clamped code no longer moves with it.
        grad_zero_point = torch.where(below | above, -grad_c * scale_c * ctx.grad_factor, 0.0)

        return (
            grad_input if ctx.needs_input_grad[0] else None,
            reduce_to_qparams(grad_scale, scale, ctx.axis) if ctx.needs_input_grad[1] else None,
            reduce_to_qparams(grad_zero_point, zero_point, ctx.axis)
            if ctx.needs_input_grad[2]
            else None,
            None,
            None,
            None,
            None,
        )


def fake_quantize_learnable_reference(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None = None,
    grad_factor: float = 1.0,
) -> torch.Tensor:
    """Fake-quantize ``x`` with gradients for the scale and zero point (LSQ and LSQ+).

    The output equals :func:`fake_quantize_reference`'s with the scale
    clamped to at least float32 eps. Besides the clipped straight-through
    gradient of ``x``, it gives a gradient to ``scale`` and to a float
    ``zero_point``, as ``torch._fake_quantize_learnable_per_tensor_affine``
    and ``torch._fake_quantize_learnable_per_channel_affine`` define them.
    Per element, with ``q = round(x / s) + z`` and ``grad`` the output
    gradient:

    - scale: ``grad * (round(x / s) - x / s)`` where ``q`` lies in
      ``[quant_min, quant_max]``, ``grad * (quant_min - z)`` below it,
      ``grad * (quant_max - z)`` above it;
    - zero point: 0 inside the range and ``-grad * s`` outside;
    - both are 0 where ``x`` is NaN.

    Each is multiplied by ``grad_factor`` and summed over each channel, or
    over the whole tensor per-tensor. The scale gradient is the gradient at
    the clamped scale, passed to ``scale`` unchanged. The zero point is
    rounded half to even and clamped to the range in the forward pass and
    in the backward pass alike.

    Args:
        x: Input of any floating dtype; the output has the same dtype.
        scale: One float scale, or one per channel along ``axis``.
        zero_point: One zero point, or one per channel; float zero points
            are rounded half to even and clamped to the range.
        quant_min: Smallest integer code.
        quant_max: Largest integer code.
        axis: ``None`` for per-tensor, else the channel axis of ``x``.
        grad_factor: Factor applied to the scale and zero-point gradients,
            such as LSQ's ``1 / sqrt(numel_per_scale * quant_max)``.

    Raises:
        ValueError: See :func:`check_qparams` with ``learnable=True``.
    """
    check_qparams(x, scale, zero_point, quant_min, quant_max, axis, learnable=True)
    return _LearnableReferenceFakeQuantize.apply(
        x, scale, zero_point, quant_min, quant_max, axis, grad_factor
    )


def qparams_from_min_max(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    quant_min: int,
    quant_max: int,
    *,
    symmetric: bool,
    signed: bool,
    power_of_two: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute float32 scales and int32 zero points from an observed range.

    The range is first widened to include zero. Symmetric scales are
    ``max(|min|, |max|) / ((quant_max - quant_min) / 2)`` with the zero
    point at 0 (signed) or the middle code (unsigned); affine scales are
    ``(max - min) / (quant_max - quant_min)`` with the zero point
    ``quant_min - round(min / scale)``, clamped to the range. Scales never go
    below float32 eps. With ``power_of_two`` each scale is rounded up to the
    next power of two, so the range still fits, and an affine zero point is
    computed from that scale. Scales above 2**127 become 2**127, which clips
    the range. A range never observed (min > max) gives
    scale 1 and zero point 0, as in ``torch.ao.quantization``.
    """
    min_val = min_val.to(torch.float32)
    max_val = max_val.to(torch.float32)
    zeros = torch.zeros_like(min_val)
    min_neg = torch.minimum(min_val, zeros)
    max_pos = torch.maximum(max_val, zeros)
    levels = float(quant_max - quant_min)

    if symmetric:
        amax = torch.maximum(-min_neg, max_pos)
        scale = amax / (levels / 2)
        middle = 0 if signed else (quant_min + quant_max + 1) // 2
        zero_point = torch.full_like(scale, middle)
    else:
        scale = (max_pos - min_neg) / levels
        # max - min overflows float32 only for ranges near +-3.4e38; dividing
        # first keeps such a scale finite.
        scale = torch.where(torch.isfinite(scale), scale, max_pos / levels - min_neg / levels)
        scale = _power_of_two(torch.clamp(scale, min=FLOAT32_EPS), power_of_two)
        zero_point = torch.clamp(quant_min - torch.round(min_neg / scale), quant_min, quant_max)
    scale = _power_of_two(torch.clamp(scale, min=FLOAT32_EPS), power_of_two)

    observed = min_val <= max_val
    scale = torch.where(observed, scale, torch.ones_like(scale))
    zero_point = torch.where(observed, zero_point, torch.zeros_like(zero_point))
    return scale, zero_point.to(torch.int32)


def _power_of_two(scale: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Return ``scale`` rounded up to a power of two when ``enabled``, else unchanged.

    ``frexp`` splits a scale exactly, whereas float32 ``log2`` rounds a scale a
    few ulps above a power of two onto that power, which would round it down.
    """
    if not enabled:
        return scale
    mantissa, exponent = torch.frexp(scale)
    rounded = torch.where(mantissa == 0.5, scale, torch.exp2(exponent.to(scale.dtype)))
    # NOTE: a scale above 2**127, the largest float32 power of two, cannot
    # round up, so it becomes 2**127 and the range is clipped. Only 2-bit
    # specs on values beyond about 2.5e38 get there.
    return torch.clamp(rounded, max=MAX_POWER_OF_TWO)
