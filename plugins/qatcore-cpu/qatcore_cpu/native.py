"""The native loops, split over threads: one pass over memory per fake-quant step.

The extension ``qatcore_cpu._native`` is built from ``_native.c`` when the
plugin is installed, where a C compiler is present. Each of its functions
walks a dense float32 or float64 tensor without the GIL, split into parts
that the calling thread and the extension's own pool of POSIX threads run,
one part per intra-op thread of torch. Where the extension is missing, :func:`status`
returns the reason, and the kernel runs its ATen path, which gives the
same bits.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import torch

__all__ = [
    "DTYPES",
    "Layout",
    "RangeParts",
    "ZERO_POINT_DTYPES",
    "available",
    "finite_range",
    "forward",
    "input_gradient",
    "masked_gradient",
    "observe",
    "status",
]

try:
    # import_module names the missing module in its error, where a
    # from-import inside this package would blame a circular import.
    _native = importlib.import_module("qatcore_cpu._native")
except ImportError as error:
    _native = None
    _MISSING = (
        f"the native loops are not built ({error}); reinstall qatcore-cpu where a C compiler "
        "is present to build them. The kernel runs its ATen path, with the same results"
    )
else:
    _MISSING = None

DTYPES = {torch.float32: 0, torch.float64: 1}
"""Input dtypes the native loops take, each with the integer the extension takes for it."""

MIN_ELEMENTS_PER_THREAD = 1 << 18
"""Below this many elements per thread a tensor runs on the calling thread alone.

Waking the pool's threads costs some tens of microseconds. On a 2-vCPU AMD
EPYC machine with torch 2.13, the per-tensor forward loop with a mask took
0.058 ms for 2**18 float32 elements in one part and 0.073 ms in two. For
2**19 elements it took 0.111 and 0.106 ms, and for 2**20 0.219 and
0.159 ms.
"""

ALIGNMENT = 64
"""Range boundaries fall on multiples of this many elements, so threads share no cache line."""


def available() -> bool:
    """Return whether the native loops are built and loaded."""
    return _native is not None


def status() -> str | None:
    """Return why the native loops are missing, or ``None`` when they are loaded."""
    return _MISSING


ZERO_POINT_DTYPES = {torch.float32: 0, torch.int32: 1}
"""Zero-point dtypes the native loops take, each with the integer the extension takes for it."""


class Layout(NamedTuple):
    """A dense tensor seen in memory order as ``(outer, channels, inner)``, with its qparams.

    ``scale`` is a contiguous float32 tensor of ``channels`` values (0-d
    for one channel) and ``zero_point`` a contiguous tensor of as many
    values, of a dtype in :data:`ZERO_POINT_DTYPES`.
    """

    channels: int
    inner: int
    scale: torch.Tensor
    zero_point: torch.Tensor

    def qparam_arguments(self) -> tuple[int, int, int, int, int]:
        """Return ``channels``, ``inner``, the qparams' pointers and the zero point's kind."""
        return (
            self.channels,
            self.inner,
            self.scale.data_ptr(),
            self.zero_point.data_ptr(),
            ZERO_POINT_DTYPES[self.zero_point.dtype],
        )


def _parts(numel: int) -> tuple[int, int]:
    """Return the ``step`` and the number of parts that split ``numel`` elements over threads.

    A part per intra-op thread of torch, fewer for a small tensor, each a
    multiple of :data:`ALIGNMENT` elements but the last. The extension runs
    the parts on the calling thread and its own pool of threads.
    """
    threads = min(torch.get_num_threads(), max(1, numel // MIN_ELEMENTS_PER_THREAD))
    if threads <= 1:
        return max(numel, 1), 1
    step = -(-numel // threads)
    step = -(-step // ALIGNMENT) * ALIGNMENT
    return step, -(-numel // step)


def forward(
    x: torch.Tensor,
    out: torch.Tensor,
    inside: torch.Tensor | None,
    layout: Layout,
    quant_min: int,
    quant_max: int,
) -> bool:
    """Write the fake-quantized ``x`` into ``out``, and its gradient mask into ``inside``.

    ``x``, ``out`` and ``inside`` are dense with the same memory order, and
    ``x`` has a dtype of :data:`DTYPES`. Returns ``False``, with ``out``
    incomplete, when a scale is not finite and positive.
    """
    kind = DTYPES[x.dtype]
    mask = inside.data_ptr() if inside is not None else 0
    channels, inner, *qparams = layout.qparam_arguments()
    invalid = _native.forward(
        kind,
        x.data_ptr(),
        out.data_ptr(),
        mask,
        channels,
        inner,
        x.numel(),
        *_parts(x.numel()),
        *qparams,
        quant_min,
        quant_max,
    )
    return invalid == 0


def input_gradient(
    grad: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    layout: Layout,
    quant_min: int,
    quant_max: int,
) -> None:
    """Write ``grad * inside`` into ``out``, recomputing the gradient mask from ``x``.

    ``layout`` contains the forward pass's own copy of the qparams, which that
    pass checked, so the ``RuntimeError`` below marks a bug, not bad input.
    """
    kind = DTYPES[x.dtype]
    channels, inner, *qparams = layout.qparam_arguments()
    invalid = _native.input_gradient(
        kind,
        grad.data_ptr(),
        x.data_ptr(),
        out.data_ptr(),
        channels,
        inner,
        x.numel(),
        *_parts(x.numel()),
        *qparams,
        quant_min,
        quant_max,
    )
    if invalid != 0:
        raise RuntimeError(
            "the qparams saved for the backward pass contain a scale that is not finite "
            "and positive, although the forward pass accepted them"
        )


def masked_gradient(grad: torch.Tensor, inside: torch.Tensor, out: torch.Tensor) -> None:
    """Write ``grad * inside`` into ``out``; the three share one dense memory order."""
    numel = grad.numel()
    _native.masked_gradient(
        DTYPES[grad.dtype],
        grad.data_ptr(),
        inside.data_ptr(),
        out.data_ptr(),
        numel,
        *_parts(numel),
    )


class RangeParts(NamedTuple):
    """Per-channel minimums and maximums of the finite values, one row per range of a tensor."""

    lows: torch.Tensor
    highs: torch.Tensor
    nonfinite: bool


def finite_range(x: torch.Tensor, channels: int, inner: int) -> RangeParts:
    """Return the finite range of each channel of dense float32 ``x``, one row per thread's range.

    ``x`` is seen in memory order as ``(outer, channels, inner)``. A row
    where a channel has no finite value keeps ``+inf`` and ``-inf`` there.
    """
    numel = x.numel()
    step, parts = _parts(numel)
    lows = torch.full((parts, channels), float("inf"))
    highs = torch.full((parts, channels), float("-inf"))
    nonfinite = _native.finite_range(
        x.data_ptr(), channels, inner, numel, step, parts, lows.data_ptr(), highs.data_ptr()
    )
    return RangeParts(lows, highs, nonfinite)


def observe(
    parts: RangeParts,
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    *,
    averaging_constant: float | None,
    symmetric: bool,
    signed: bool,
    power_of_two: bool,
    quant_min: int,
    quant_max: int,
) -> None:
    """Fold ``parts`` into a range observer's ``min_val`` and ``max_val``, and write the qparams.

    ``averaging_constant`` is ``None`` for a running min and max, else the
    moving average's weight of the batch. The float32 buffers ``min_val``,
    ``max_val`` and ``scale`` and the int32 ``zero_point`` are contiguous,
    with one value per channel.
    """
    rows, channels = parts.lows.shape
    _native.observe(
        parts.lows.data_ptr(),
        parts.highs.data_ptr(),
        channels,
        rows,
        min_val.data_ptr(),
        max_val.data_ptr(),
        scale.data_ptr(),
        zero_point.data_ptr(),
        int(averaging_constant is not None),
        int(symmetric),
        1.0 if averaging_constant is None else averaging_constant,
        int(signed),
        int(power_of_two),
        quant_min,
        quant_max,
    )
