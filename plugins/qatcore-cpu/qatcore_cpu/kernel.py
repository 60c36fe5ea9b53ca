"""The CPU fake-quant kernel: native loops where they apply, the reference's ATen ops elsewhere.

Float32 and float64 tensors in any dense layout go through the plugin's C
loops (:mod:`qatcore_cpu.native`): one pass reads the input and writes the
output and, when the backward pass needs one, the bool gradient mask. A
leaf input such as a weight is kept for the backward pass instead of a
mask, and the backward loop recomputes the mask as it multiplies.

Half-precision inputs, expanded and sliced views, and installs without the
native loops take the ATen path. It allocates only what it returns: the
output, and the mask that the backward pass needs. It walks a large input
in blocks small enough to stay in cache and applies the reference's ATen
ops, in the reference's order, to each block through ``out=`` arguments and
in-place methods.

Both paths apply the same operations to every element, on the same
operands, as the reference, so outputs and gradients are identical bit for
bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from qatcore import check_qparams, fake_quantize_reference, prepare_qparams
from qatcore_cpu import native

__all__ = ["BLOCK_ELEMENTS_PER_THREAD", "fake_quantize_cpu"]

BLOCK_ELEMENTS_PER_THREAD = 1 << 19
"""Elements of a block per intra-op thread: 2 MiB of float32 per thread and buffer.

A block touches the input, the output, one float32 scratch buffer and the
bool mask, about 6.5 MiB per thread. Every op on a block is one OpenMP
parallel region, so smaller blocks mean more regions. The measurements
below are from an AMD EPYC virtual machine with 2 threads, 1 MiB of L2 per
core and 32 MiB of L3. The forward pass on a 64x64x56x56 float32 tensor
took 29, 27, 27 and 26 ms with blocks of 0.5, 1, 2 and 4 MiB per thread,
and 42 ms as one block. In one run with another busy process on the same
two cores, blocks of 0.25 MiB per thread took 756 ms and blocks of 4 MiB
took 52 ms, because the threads of each region wait for each other.
"""


class _Qparams(NamedTuple):
    """Scale, reciprocal scale and zero point in the compute dtype."""

    scale: torch.Tensor
    inv_scale: torch.Tensor
    zero_point: torch.Tensor

    def reshape(self, *shape: int) -> _Qparams:
        return _Qparams(
            self.scale.reshape(shape), self.inv_scale.reshape(shape), self.zero_point.reshape(shape)
        )

    def select(self, index: int | slice) -> _Qparams:
        return _Qparams(self.scale[index], self.inv_scale[index], self.zero_point[index])


def _fake_quantize_block(
    x: torch.Tensor,
    out: torch.Tensor,
    mask: torch.Tensor | None,
    scratch: Sequence[torch.Tensor],
    qparams: _Qparams,
    quant_min: int,
    quant_max: int,
) -> None:
    """Write the fake-quantized ``x`` into ``out`` and the gradient mask into ``mask``.

    ``scratch`` contains :func:`_scratch_buffers` compute-dtype buffers of
    ``x``'s shape. The ops are the reference kernel's, in its order:
    ``round(x * inv_scale) + zero_point``, clamp, ``clamped == code``,
    ``(clamped - zero_point) * scale``, cast to ``out``'s dtype.
    """
    if out.dtype == qparams.scale.dtype:
        code = out if mask is None else scratch[0]
        clamped = out
    else:
        code = scratch[0]
        clamped = code if mask is None else scratch[1]

    if x.dtype == code.dtype:
        torch.mul(x, qparams.inv_scale, out=code)
    else:
        # The reference casts x to the compute dtype first, which is exact
        # for half-precision input, then multiplies in the compute dtype.
        code.copy_(x)
        code.mul_(qparams.inv_scale)
    code.round_()
    code.add_(qparams.zero_point)

    if clamped is code:
        code.clamp_(quant_min, quant_max)
    else:
        torch.clamp(code, quant_min, quant_max, out=clamped)
        if mask is not None:
            torch.eq(clamped, code, out=mask)

    clamped.sub_(qparams.zero_point)
    clamped.mul_(qparams.scale)
    if clamped is not out:
        out.copy_(clamped)


def _block_elements() -> int:
    return BLOCK_ELEMENTS_PER_THREAD * max(1, torch.get_num_threads())


def _scratch_buffers(out_dtype: torch.dtype, compute_dtype: torch.dtype, mask: bool) -> int:
    """Count the scratch buffers :func:`_fake_quantize_block` needs: 0, 1 or 2."""
    return int(out_dtype != compute_dtype) + int(mask)


def memory_order(*tensors: torch.Tensor) -> list[int] | None:
    """Return the permutation that makes every tensor a contiguous view, if there is one.

    The permutation sorts the first tensor's dimensions by decreasing
    stride. A dense tensor in any layout (contiguous, channels_last,
    transposed) has one, but an expanded or sliced view does not.
    """
    first = tensors[0]
    order = sorted(range(first.dim()), key=first.stride, reverse=True)
    if all(tensor.permute(order).is_contiguous() for tensor in tensors):
        return order
    return None


class _BlockRunner:
    """Run :func:`_fake_quantize_block` over dense tensors, one cache-sized block at a time.

    The tensors are viewed in memory order as ``(outer, channels, inner)``
    with the per-channel axis in the middle (one channel for per-tensor
    quantization). A block is a contiguous slice of that view: whole
    ``(channels, inner)`` planes when one fits, else a run of channels of
    one plane, else a run of one channel's elements.
    """

    def __init__(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        mask: torch.Tensor | None,
        order: list[int],
        qparams: _Qparams,
        axis: int | None,
        quant_range: tuple[int, int],
        block: int,
    ) -> None:
        if axis is None:
            outer, channels, inner = 1, 1, x.numel()
        else:
            shape = [x.shape[dim] for dim in order]
            position = order.index(axis)
            outer = math.prod(shape[:position])
            channels = shape[position]
            inner = math.prod(shape[position + 1 :])
        view = (outer, channels, inner)

        self.x = x.permute(order).view(view)
        self.out = out.permute(order).view(view)
        self.mask = mask.permute(order).view(view) if mask is not None else None
        self.qparams = qparams.reshape(channels)
        self.quant_range = quant_range
        self.block = block
        buffers = _scratch_buffers(out.dtype, qparams.scale.dtype, mask is not None)
        self.scratch = [
            torch.empty(min(block, x.numel()), dtype=qparams.scale.dtype, device=x.device)
            for _ in range(buffers)
        ]

    def run(self) -> None:
        outer, channels, inner = self.x.shape
        block = self.block
        if channels * inner <= block:
            planes = block // (channels * inner)
            qparams = self.qparams.reshape(1, channels, 1)
            for start in range(0, outer, planes):
                self._run_block((slice(start, start + planes),), qparams)
        elif inner <= block:
            rows = block // inner
            for plane in range(outer):
                for start in range(0, channels, rows):
                    run = slice(start, start + rows)
                    qparams = self.qparams.select(run).reshape(-1, 1)
                    self._run_block((plane, run), qparams)
        else:
            for plane in range(outer):
                for channel in range(channels):
                    qparams = self.qparams.select(channel)
                    for start in range(0, inner, block):
                        self._run_block((plane, channel, slice(start, start + block)), qparams)

    def _run_block(self, index: tuple[int | slice, ...], qparams: _Qparams) -> None:
        x = self.x[index]
        mask = self.mask[index] if self.mask is not None else None
        scratch = [buffer[: x.numel()].view(x.shape) for buffer in self.scratch]
        _fake_quantize_block(x, self.out[index], mask, scratch, qparams, *self.quant_range)


def _dense_order(x: torch.Tensor) -> list[int] | None:
    """Return :func:`memory_order` of ``x``, checking the common layouts first."""
    if x.is_contiguous():
        return list(range(x.dim()))
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return [0, 2, 3, 1]
    return memory_order(x)


def channel_view(x: torch.Tensor, axis: int | None) -> tuple[int, int] | None:
    """Return ``channels`` and ``inner`` of dense ``x``, seen as ``(outer, channels, inner)``.

    The view follows ``x``'s memory order, and per-tensor quantization has
    one channel. Returns ``None`` for a tensor
    without a dense memory order, such as an expanded or sliced view.
    """
    order = _dense_order(x)
    if order is None:
        return None
    if axis is None:
        return 1, x.numel()
    inner = math.prod(x.shape[dim] for dim in order[order.index(axis) + 1 :])
    return x.shape[axis], inner


def _native_layout(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int | None,
    *,
    snapshot: bool = False,
) -> native.Layout | None:
    """Return the native loops' view of ``x`` and its qparams, or ``None`` where they cannot run.

    They run on non-empty dense float32 and float64 tensors. Half-precision
    inputs, expanded and sliced views, and a plugin built without its
    extension take the ATen path. The output and the mask, made by
    ``torch.empty_like(x)``, have ``x``'s strides then. With ``snapshot``
    the layout contains copies of the qparams, so that a backward pass uses
    the qparams of its forward pass even after an observer updated them.
    """
    if not native.available() or x.dtype not in native.DTYPES or x.numel() == 0:
        return None
    view = channel_view(x, axis)
    if view is None:
        return None
    # The same conversion as prepare_qparams: the scale to float32, and a
    # zero point of another dtype to float32 before it is rounded.
    scale = scale.detach().to(torch.float32)
    zero_point = zero_point.detach()
    if zero_point.dtype not in native.ZERO_POINT_DTYPES:
        zero_point = zero_point.to(torch.float32)
    if snapshot:
        scale, zero_point = scale.clone(), zero_point.clone()
    return native.Layout(*view, scale.contiguous(), zero_point.contiguous())


def _native_takes(x: torch.Tensor) -> bool:
    """Return whether the native loops take ``x``: a non-empty dense float32 or float64 tensor."""
    return (
        native.available()
        and x.dtype in native.DTYPES
        and x.numel() > 0
        and _dense_order(x) is not None
    )


def _fake_quantize_forward(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None,
    *,
    need_mask: bool,
    snapshot: bool = False,
    check_scales: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, native.Layout | None]:
    """Return the output, the gradient mask when ``need_mask``, and the native layout used.

    The caller has checked the range, axis and shapes. With
    ``check_scales`` this function checks the scale values, and raises
    :func:`qatcore.check_qparams`'s error. The learnable kernel checks its
    own scales first and passes False.
    """
    out = torch.empty_like(x)
    mask = torch.empty_like(x, dtype=torch.bool) if need_mask else None

    layout = _native_layout(x, scale, zero_point, axis, snapshot=snapshot)
    if layout is not None and native.forward(x, out, mask, layout, quant_min, quant_max):
        return out, mask, layout

    # The native loops found a scale that is not finite and positive in
    # float32, or did not run. check_qparams raises for an invalid scale. A
    # float64 scale that is valid but leaves float32's range passes it, and
    # the ATen path computes what the reference computes for it.
    if check_scales:
        check_qparams(x, scale, zero_point, quant_min, quant_max, axis)
    if x.numel() == 0:
        return out, mask, None
    qparams = _Qparams(*prepare_qparams(x, scale, zero_point, quant_min, quant_max, axis))
    dense = (x, out) if mask is None else (x, out, mask)
    block = _block_elements()
    if x.numel() > block:
        order = memory_order(*dense)
        if order is not None:
            runner = _BlockRunner(x, out, mask, order, qparams, axis, (quant_min, quant_max), block)
            runner.run()
            return out, mask, None

    # A tensor that fits one block, or an expanded or sliced view without a
    # flat memory order, is one block. Its qparams broadcast as the reference
    # lays them out.
    buffers = _scratch_buffers(out.dtype, qparams.scale.dtype, need_mask)
    scratch = [torch.empty_like(x, dtype=qparams.scale.dtype) for _ in range(buffers)]
    _fake_quantize_block(x, out, mask, scratch, qparams, quant_min, quant_max)
    return out, mask, None


class _CPUFakeQuantize(torch.autograd.Function):
    """Fake quantization with the clipped straight-through gradient for ``x``.

    The backward pass needs to know where the code lay inside the range.
    An input that needs no gradient keeps nothing. A leaf input, such as a
    weight, outlives the backward pass anyway, so the kernel keeps it
    instead of a mask, which saves the mask's memory and its write. The
    backward loop then recomputes the mask as it multiplies. Like a float
    conv, which keeps its weight too, the backward pass then raises if
    that input was changed in place after the forward pass. Every other
    input keeps a bool mask.
    """

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
        needs_gradient = ctx.needs_input_grad[0]
        keep_input = needs_gradient and x.grad_fn is None and _native_takes(x)
        out, inside, layout = _fake_quantize_forward(
            x,
            scale,
            zero_point,
            quant_min,
            quant_max,
            axis,
            need_mask=needs_gradient and not keep_input,
            snapshot=keep_input,
        )
        ctx.recompute = None
        if keep_input and layout is None:
            # The native loops declined a scale (a float64 one beyond
            # float32's range) and the ATen path ran without a mask.
            out, inside, _ = _fake_quantize_forward(
                x, scale, zero_point, quant_min, quant_max, axis, need_mask=True
            )
        if inside is not None:
            ctx.save_for_backward(inside)
        elif keep_input:
            ctx.save_for_backward(x)
            ctx.recompute = (layout, quant_min, quant_max)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        (saved,) = ctx.saved_tensors
        if ctx.recompute is None:
            grad_input = _masked_gradient(grad_output, saved)
        else:
            grad_input = _input_gradient(grad_output, saved, *ctx.recompute)
        return grad_input, None, None, None, None, None


def _input_gradient(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    layout: native.Layout,
    quant_min: int,
    quant_max: int,
) -> torch.Tensor:
    """Return ``grad_output * inside`` with the mask recomputed from the input ``x``."""
    # Autograd hands in a gradient of the output's dtype, which is x's, but
    # not always in x's layout; the loop needs both alike.
    if grad_output.dtype != x.dtype or grad_output.stride() != x.stride():
        grad_output = torch.empty_like(x).copy_(grad_output)
    grad_input = torch.empty_like(x)
    native.input_gradient(grad_output, x, grad_input, layout, quant_min, quant_max)
    return grad_input


def _masked_gradient(grad_output: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Return ``grad_output * inside``, in one native pass or by blocks when large and dense.

    It is the reference's product rather than a select, so that an inf or
    NaN gradient outside the range turns into NaN as it does there. On a
    64x64x56x56 float32 tensor, one ATen product over the whole tensor
    measured about 1.5x slower than the same product written block by block
    into one output.
    """
    if grad_output.shape == inside.shape and grad_output.numel() > 0:
        grad_input = torch.empty_like(grad_output)
        order = memory_order(grad_output, inside, grad_input)
        if order is not None:
            if native.available() and grad_output.dtype in native.DTYPES:
                native.masked_gradient(grad_output, inside, grad_input)
                return grad_input
            block = _block_elements()
            if grad_output.numel() > block:
                grad, mask, result = (
                    tensor.permute(order).view(-1) for tensor in (grad_output, inside, grad_input)
                )
                for start in range(0, grad.numel(), block):
                    part = slice(start, start + block)
                    torch.mul(grad[part], mask[part], out=result[part])
                return grad_input
    return grad_output * inside


def fake_quantize_cpu(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` as :func:`qatcore.fake_quantize_reference` does, with fewer allocations.

    Outputs and input gradients equal the reference kernel's bit for bit
    for every floating dtype, layout and value, inf and NaN included. The
    output has the input's strides when the input is dense (channels_last
    stays channels_last). When grad mode is off or no argument requires a
    gradient, no gradient mask is computed.

    Args:
        x: Input of any floating dtype; the output has the same dtype.
        scale: One float scale, or one per channel along ``axis``.
        zero_point: One zero point, or one per channel; float zero points
            are rounded half to even and clamped to the range.
        quant_min: Smallest integer code.
        quant_max: Largest integer code.
        axis: ``None`` for per-tensor, else the channel axis of ``x``.

    Raises:
        ValueError: The range is empty, the axis does not exist, the qparams
            do not match the channel count, or a scale is not finite and
            positive (see :func:`qatcore.check_qparams`).
    """
    if torch.compiler.is_compiling():
        # The blocked loops are eager-mode code; a compiled graph gets the
        # reference math, which the compiler fuses into one pass itself.
        return fake_quantize_reference(x, scale, zero_point, quant_min, quant_max, axis)
    check_qparams(x, scale, zero_point, quant_min, quant_max, axis, scales=False)
    needs_graph = x.requires_grad or scale.requires_grad or zero_point.requires_grad
    if torch.is_grad_enabled() and needs_graph:
        return _CPUFakeQuantize.apply(x, scale, zero_point, quant_min, quant_max, axis)
    out, _, _ = _fake_quantize_forward(
        x, scale, zero_point, quant_min, quant_max, axis, need_mask=False
    )
    return out
