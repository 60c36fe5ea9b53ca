"""The CPU learnable fake-quant kernel: LSQ and LSQ+ gradients with the reference's numbers.

The forward pass runs the blocked plain kernel of :mod:`qatcore_cpu.kernel`
on the clamped scale, without its gradient mask, so it allocates only the
output. The backward pass computes the integer codes once, in place in one
buffer, where the reference computes three intermediates, and derives the
input gradient block by block. The per-element scale and zero-point
gradients use the reference's ops in its order and are summed with the
same reduction, so every result equals
:func:`qatcore.fake_quantize_learnable_reference` bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from qatcore import (
    check_qparams,
    fake_quantize_learnable_reference,
    prepare_learnable_qparams,
    quantization_error,
    reduce_to_qparams,
)
from qatcore_cpu.kernel import _fake_quantize_forward, _masked_gradient

__all__ = ["fake_quantize_learnable_cpu"]


def _codes(x: torch.Tensor, inv_scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Return ``round(x * inv_scale) + zero_point`` in the compute dtype, in one buffer."""
    code = torch.empty_like(x, dtype=inv_scale.dtype)
    if x.dtype == code.dtype:
        torch.mul(x, inv_scale, out=code)
    else:
        # The reference casts x to the compute dtype first, which is exact
        # for half-precision input, then multiplies in the compute dtype.
        code.copy_(x)
        code.mul_(inv_scale)
    code.round_()
    code.add_(zero_point)
    return code


class _CPULearnableFakeQuantize(torch.autograd.Function):
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
        clamped_scale = torch.clamp(
            scale.detach().to(torch.float32), min=torch.finfo(torch.float32).eps
        )
        out, _, _ = _fake_quantize_forward(
            x,
            clamped_scale,
            zero_point.detach(),
            quant_min,
            quant_max,
            axis,
            need_mask=False,
            check_scales=False,
        )
        ctx.save_for_backward(x, scale, zero_point)
        ctx.quant_range = (quant_min, quant_max)
        ctx.axis = axis
        ctx.grad_factor = grad_factor
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, scale, zero_point = ctx.saved_tensors
        quant_min, quant_max = ctx.quant_range
        scale_c, inv_scale, zero_point_c = prepare_learnable_qparams(
            x, scale, zero_point, quant_min, quant_max, ctx.axis
        )
        code = _codes(x, inv_scale, zero_point_c)
        below = code < quant_min
        above = code > quant_max
        outside = below | above
        # Inside the range exactly where clamped == code, as in the
        # reference: NaN is neither inside nor outside.
        inside = ~outside & ~torch.isnan(code)
        grad_input = _masked_gradient(grad_output, inside) if ctx.needs_input_grad[0] else None
        if not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            return grad_input, None, None, None, None, None, None

        grad_c = grad_output.to(scale_c.dtype)
        grad_scale = grad_zero_point = None
        if ctx.needs_input_grad[1]:
            # code is no longer needed as a code: it becomes q - z in place.
            shifted = code.clamp_(quant_min, quant_max).sub_(zero_point_c)
            error = quantization_error(shifted, scale_c, x.to(scale_c.dtype))
            per_element = torch.where(
                below,
                grad_c * (quant_min - zero_point_c),
                torch.where(
                    above,
                    grad_c * (quant_max - zero_point_c),
                    torch.where(inside, grad_c * error * inv_scale, 0.0),
                ),
            )
            per_element = per_element * ctx.grad_factor
            grad_scale = reduce_to_qparams(per_element, scale, ctx.axis)
        if ctx.needs_input_grad[2]:
            per_element = torch.where(outside, -grad_c * scale_c * ctx.grad_factor, 0.0)
            grad_zero_point = reduce_to_qparams(per_element, zero_point, ctx.axis)
        return grad_input, grad_scale, grad_zero_point, None, None, None, None


def fake_quantize_learnable_cpu(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None = None,
    grad_factor: float = 1.0,
) -> torch.Tensor:
    """Fake-quantize ``x`` as :func:`qatcore.fake_quantize_learnable_reference` does.

    Outputs and the gradients of ``x``, ``scale`` and ``zero_point`` equal
    the reference kernel's bit for bit. When grad mode is off or no argument
    requires a gradient, only the blocked forward pass runs.

    Args:
        x: Input of any floating dtype; the output has the same dtype.
        scale: One float scale, or one per channel along ``axis``; clamped
            to at least float32 eps.
        zero_point: One zero point, or one per channel; float zero points
            are rounded half to even and clamped to the range.
        quant_min: Smallest integer code.
        quant_max: Largest integer code.
        axis: ``None`` for per-tensor, else the channel axis of ``x``.
        grad_factor: Factor applied to the scale and zero-point gradients.

    Raises:
        ValueError: See :func:`qatcore.check_qparams` with ``learnable=True``.
    """
    if torch.compiler.is_compiling():
        # As for the fixed-scale kernel, a compiled graph gets the reference math.
        return fake_quantize_learnable_reference(
            x, scale, zero_point, quant_min, quant_max, axis, grad_factor
        )
    check_qparams(x, scale, zero_point, quant_min, quant_max, axis, learnable=True)
    needs_graph = x.requires_grad or scale.requires_grad or zero_point.requires_grad
    if torch.is_grad_enabled() and needs_graph:
        return _CPULearnableFakeQuantize.apply(
            x, scale, zero_point, quant_min, quant_max, axis, grad_factor
        )
    clamped_scale = torch.clamp(scale.to(torch.float32), min=torch.finfo(torch.float32).eps)
    out, _, _ = _fake_quantize_forward(
        x,
        clamped_scale,
        zero_point,
        quant_min,
        quant_max,
        axis,
        need_mask=False,
        check_scales=False,
    )
    return out
