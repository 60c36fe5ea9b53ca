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
    "fake_quantize_reference",
    "prepare_qparams",
    "qparams_from_min_max",
]

FLOAT32_EPS = torch.finfo(torch.float32).eps


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
) -> None:
    """Validate a fake-quant call's arguments before a kernel runs.

    Raises:
        ValueError: The range is empty, the axis does not exist, the qparams
            do not match the channel count, or a scale is not finite and
            positive.
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
    if torch.compiler.is_compiling():
        return
    valid = torch.isfinite(scale) & (scale > 0)
    if not bool(valid.all()):
        bad = scale.detach().flatten()[~valid.flatten()][:4].tolist()
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


def qparams_from_min_max(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    quant_min: int,
    quant_max: int,
    *,
    symmetric: bool,
    signed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute float32 scales and int32 zero points from an observed range.

    The range is first widened to include zero. Symmetric scales are
    ``max(|min|, |max|) / ((quant_max - quant_min) / 2)`` with the zero
    point at 0 (signed) or the middle code (unsigned); affine scales are
    ``(max - min) / (quant_max - quant_min)`` with the zero point
    ``quant_min - round(min / scale)``, clamped to the range. Scales never go
    below float32 eps. A range never observed (min > max) gives scale 1 and
    zero point 0, as in ``torch.ao.quantization``.
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
        scale = torch.clamp(scale, min=FLOAT32_EPS)
        zero_point = torch.clamp(quant_min - torch.round(min_neg / scale), quant_min, quant_max)
    scale = torch.clamp(scale, min=FLOAT32_EPS)

    observed = min_val <= max_val
    scale = torch.where(observed, scale, torch.ones_like(scale))
    zero_point = torch.where(observed, zero_point, torch.zeros_like(zero_point))
    return scale, zero_point.to(torch.int32)
