"""A histogram observer that clips the range by percentile, MSE or KL divergence."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from qatcore import Observer, QuantSpec, finite_min_max, qparams_from_min_max
from qatcore._distributed import sync_group

__all__ = ["HistogramObserver"]

METHODS = ("percentile", "mse", "entropy")

# A value less than this fraction of a bin outside the grid goes into the edge
# bin instead of widening the grid, so that float64 rounding in the grid
# arithmetic never doubles the bin width needlessly.
_GRID_TOLERANCE = 1e-6

# Tail masses that the affine MSE search clips from each side: none, then a
# geometric series from 1e-7 to 1/2 of the values.
_AFFINE_TAILS = torch.cat([torch.zeros(1), torch.logspace(-7, -0.30103, 63)]).double()


class HistogramObserver(Observer):
    """Record a histogram of the finite values seen and clip the range by a search over it.

    The histogram has ``bins`` bins of equal width on a grid that starts at
    ``histogram_min``. The first batch sets the grid to its own range. A
    later batch inside the grid adds into the existing bins. A batch that
    extends the range widens the grid. The bin width grows by a power-of-two
    factor ``k``, and the grid start moves down by a multiple of the new
    width. The observer takes the smallest such grid that covers every
    finite value seen. Each
    new bin is then the union of ``k`` whole old bins, so old counts move
    without loss of resolution beyond the coarser width. While every value
    seen so far was one constant, the grid has width 0 and the next batch
    sets the grid to the combined range, which is exact because all earlier
    mass sits at that one value.

    Counts move from one grid to another by the position of each source bin's
    center. On aligned grids that center lies inside exactly one new bin, so
    the move is exact and counts stay whole numbers. The last bin is closed,
    so a value on the old top edge stays in the new bin below that edge,
    where binning all values at once would put it in the bin above.

    When torch.distributed is active (see :class:`qatcore.Observer`), each
    rank bins its batch on the grid its own batch would need, and one
    ``all_gather_into_tensor`` (``all_gather_single`` from torch 2.13 on)
    exchanges every rank's batch min, batch max and batch histogram. Each
    rank then merges the gathered histograms in rank order into the grid
    that covers all of them. Those rank grids are aligned power-of-two
    widenings of the shared grid, so the merge is exact. On the first
    batch, and while the data so far is one constant, each rank grid spans
    that rank's own range instead, so a rank's counts can land one bin off
    in the merged grid. Ranks keep identical state as long as they start
    from the same state and keep ``sync`` on.

    :meth:`calculate_qparams` chooses a clipping range ``[lo, hi]`` inside
    the observed ``[min_val, max_val]`` and passes it to
    :func:`qatcore.qparams_from_min_max`. Symmetric specs search a threshold
    ``t`` on the histogram of ``|x|`` and clip to ``[-t, t]``.

    - ``percentile``: symmetric specs take the ``percentile``-th percentile
      of ``|x|``. Affine specs clip ``100 - percentile`` percent from each
      tail. Percentiles interpolate linearly inside a bin.
    - ``mse``: minimise the expected squared quantization error, modelled
      as ``scale**2 / 12`` per value inside the range plus the squared
      distance to the range for each value outside it, with every value at
      its bin center. Symmetric specs try every ``|x|`` bin edge as ``t``.
      Affine specs try every pair of a low and a high percentile that clips
      0 or 1e-7 to 50 percent per tail (64 each), widened to include 0 as
      the qparams will be.
    - ``entropy``: the KL-divergence calibration of TensorRT on the ``|x|``
      histogram. For each count ``i`` of kept bins from the number of
      levels up to ``bins``, the reference distribution is the first ``i``
      bins with every clipped count added to the last one, and the
      candidate is those ``i`` bins merged into as many groups as there are
      levels, each group's mass spread evenly over its non-empty bins. The
      threshold is ``i`` bin widths for the ``i`` of least divergence. A
      candidate whose last group is empty while it clips values has
      infinite divergence, so the full range is chosen when only that one
      is finite. Symmetric specs use half the codes as levels. Affine specs
      use all codes when the data has one sign, else half, and clip to
      ``[-t, t]`` intersected with the observed range.

    Every search is a handful of tensor operations over all channels at once
    and picks the first best candidate, so it is deterministic.

    Buffers:
        histogram: float64 counts, ``(bins,)`` or ``(C, bins)``. float64
            keeps counts exact up to 2**53, whereas float32 stops counting
            one by one at 2**24, which one activation tensor can reach in a
            single bin.
        histogram_min, bin_width: float64 grid, ``()`` or ``(C,)``. float64
            holds the width of ranges such as ``[0, 1e-44]`` split into
            2048 bins, which underflows float32.
        min_val, max_val: float32 range of the finite values seen, as in
            :class:`qatcore.RangeObserver`; ``+inf``/``-inf`` until one is
            seen.
        nonfinite_batches: int64 count of batches that held NaN or inf.

    Args:
        spec: The tensor's quantization spec.
        channels: Channel count along ``spec.axis``, or ``None`` per tensor.
        method: ``"percentile"``, ``"mse"`` (default) or ``"entropy"``.
        percentile: Percentile kept by the ``percentile`` method, in
            ``[50, 100]``; default 99.99. Other methods reject it.
        bins: Histogram bins per channel, at least 2; default 2048.

    Raises:
        ValueError: An option has an invalid value or type.
    """

    def __init__(
        self,
        spec: QuantSpec,
        channels: int | None = None,
        *,
        method: str = "mse",
        percentile: float | None = None,
        bins: int = 2048,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if percentile is not None and method != "percentile":
            raise ValueError(
                f"percentile applies only to method 'percentile', got it with method {method!r}"
            )
        if percentile is None:
            percentile = 99.99
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)):
            raise ValueError(
                f"percentile must be a number in [50, 100], got {percentile!r}; pass the "
                "share of values the range keeps, such as 99.99"
            )
        if not 50 <= percentile <= 100:
            raise ValueError(
                f"percentile must be in [50, 100], got {percentile}: it is the share of "
                "values the range keeps, so below 50 the range would drop most of them; "
                "pass a value such as 99.99"
            )
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            raise ValueError(f"bins must be an int >= 2, got {bins!r}")
        super().__init__(spec, channels)
        self.method = method
        self.percentile = float(percentile)
        self.bins = bins

        shape: tuple[int, ...] = () if self.channels is None else (self.channels,)
        self.register_buffer("histogram", torch.zeros((*shape, bins), dtype=torch.float64))
        self.register_buffer("histogram_min", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("bin_width", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("min_val", torch.full(shape, float("inf")))
        self.register_buffer("max_val", torch.full(shape, float("-inf")))
        self.register_buffer("nonfinite_batches", torch.zeros((), dtype=torch.int64))

    @property
    def _rows(self) -> int:
        return 1 if self.channels is None else self.channels

    def forward(self, x: torch.Tensor) -> None:
        """Fold the finite values of ``x`` into the histogram."""
        axis = self.spec.axis
        if axis is not None and axis < x.dim() and x.shape[axis] != self.channels:
            raise ValueError(
                f"per-channel observer expects {self.channels} channels along axis "
                f"{self.spec.axis}, got a tensor of shape {tuple(x.shape)}"
            )
        batch_min, batch_max, all_finite = finite_min_max(x, axis)
        self.nonfinite_batches.add_((~all_finite).to(torch.int64))

        rows = self._rows
        # NOTE: binning runs in float64 with an int64 index, so a call briefly
        # needs about 16 extra bytes per element of x.
        values = _channel_rows(x.detach(), axis, rows).double()
        batch_min = batch_min.double().reshape(rows)
        batch_max = batch_max.double().reshape(rows)
        start = self.histogram_min.reshape(rows)
        width = self.bin_width.reshape(rows)
        seen_min = self.min_val.double().reshape(rows)
        seen_max = self.max_val.double().reshape(rows)

        # Bin this rank's batch on the grid that its own batch needs.
        local_start, local_width, local_factor = _widen_grid(
            start,
            width,
            torch.minimum(seen_min, batch_min),
            torch.maximum(seen_max, batch_max),
            self.bins,
        )
        local_counts = _bin_values(values, local_start, local_width, self.bins)

        active, group = sync_group(self)
        if active:
            batch_min, batch_max, local_counts = _gather(batch_min, batch_max, local_counts, group)
            local_start, local_width, local_factor = _widen_grid(
                start,
                width,
                torch.minimum(seen_min, batch_min),
                torch.maximum(seen_max, batch_max),
                self.bins,
            )
        else:
            batch_min, batch_max = batch_min[None], batch_max[None]
            local_counts = local_counts[None]
            local_start, local_width = local_start[None], local_width[None]
            local_factor = local_factor[None]

        # Merge the state and every rank's batch, in rank order, into one grid.
        new_min = torch.minimum(seen_min, batch_min.amin(dim=0))
        new_max = torch.maximum(seen_max, batch_max.amax(dim=0))
        new_start, new_width, _ = _widen_grid(
            start, width, new_min, new_max, self.bins, local_factor.amax(dim=0)
        )
        merged = _move_counts(self.histogram.reshape(rows, -1), start, width, new_start, new_width)
        for rank in range(local_counts.shape[0]):
            merged += _move_counts(
                local_counts[rank], local_start[rank], local_width[rank], new_start, new_width
            )

        seen = new_min <= new_max
        self.histogram.copy_(merged.reshape(self.histogram.shape))
        new_start = torch.where(seen, new_start, start)
        self.histogram_min.copy_(new_start.reshape(self.histogram_min.shape))
        self.bin_width.copy_(torch.where(seen, new_width, width).reshape(self.bin_width.shape))
        self.min_val.copy_(torch.where(seen, new_min, seen_min).float().reshape(self.min_val.shape))
        self.max_val.copy_(torch.where(seen, new_max, seen_max).float().reshape(self.max_val.shape))

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return qparams for the clipping range that ``method`` chooses."""
        lo, hi = self.clipping_range()
        return qparams_from_min_max(
            lo,
            hi,
            self.spec.quant_min,
            self.spec.quant_max,
            symmetric=self.spec.symmetric,
            signed=self.spec.signed,
            power_of_two=self.spec.power_of_two,
        )

    def clipping_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the float32 range ``[lo, hi]`` that ``method`` chooses, shaped like ``min_val``.

        The range lies inside ``[min_val, max_val]``; a channel never
        observed keeps ``+inf``/``-inf``.
        """
        rows = self._rows
        counts = self.histogram.reshape(rows, -1)
        start = self.histogram_min.reshape(rows)
        width = self.bin_width.reshape(rows)
        seen_min = self.min_val.double().reshape(rows)
        seen_max = self.max_val.double().reshape(rows)
        spec = self.spec
        levels = spec.quant_max - spec.quant_min

        if self.method == "percentile" and not spec.symmetric:
            tail = 1 - self.percentile / 100
            lo = _quantile(counts, start, width, counts.new_tensor([tail]))[:, 0]
            hi = _quantile(counts, start, width, counts.new_tensor([1 - tail]))[:, 0]
        elif self.method == "mse" and not spec.symmetric:
            lo, hi = _affine_mse_range(counts, start, width, levels)
        else:
            amax = torch.maximum(seen_min.abs(), seen_max.abs())
            abs_counts, abs_width = _fold(counts, start, width, amax)
            if self.method == "percentile":
                fraction = counts.new_tensor([self.percentile / 100])
                threshold = _quantile(abs_counts, torch.zeros_like(amax), abs_width, fraction)[:, 0]
            elif self.method == "mse":
                threshold = _symmetric_mse_threshold(abs_counts, abs_width, levels / 2)
            else:
                threshold = self._entropy_threshold(abs_counts, abs_width, seen_min, seen_max)
            lo, hi = -threshold, threshold

        # Clamp in float64 so that the float32 cast stays finite at float32 max.
        seen = seen_min <= seen_max
        lo = torch.where(seen, torch.clamp(lo, seen_min, seen_max), seen_min)
        hi = torch.where(seen, torch.clamp(hi, seen_min, seen_max), seen_max)
        return lo.float().reshape(self.min_val.shape), hi.float().reshape(self.max_val.shape)

    def _entropy_threshold(
        self,
        abs_counts: torch.Tensor,
        abs_width: torch.Tensor,
        seen_min: torch.Tensor,
        seen_max: torch.Tensor,
    ) -> torch.Tensor:
        codes = self.spec.quant_max - self.spec.quant_min + 1
        if self.spec.symmetric:
            return _kl_threshold(abs_counts, abs_width, codes // 2)

        # An affine range over data of one sign spends every code on [0, t].
        one_sign = (seen_min >= 0) | (seen_max <= 0)
        full = _kl_threshold(abs_counts, abs_width, codes)
        half = _kl_threshold(abs_counts, abs_width, codes // 2)
        return torch.where(one_sign, full, half)

    def extra_repr(self) -> str:
        options = f"method={self.method!r}, bins={self.bins}"
        if self.method == "percentile":
            options += f", percentile={self.percentile}"
        return f"axis={self.spec.axis}, channels={self.channels}, {options}"


def _channel_rows(x: torch.Tensor, axis: int | None, rows: int) -> torch.Tensor:
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(rows, -1)


def _gather(
    batch_min: torch.Tensor, batch_max: torch.Tensor, counts: torch.Tensor, group: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return every rank's batch min, max and counts, stacked in rank order, with one collective."""
    world = dist.get_world_size(group)
    packed = torch.cat([batch_min[:, None], batch_max[:, None], counts], dim=1)
    gathered = packed.new_empty((world * packed.shape[0], packed.shape[1]))
    # torch 2.13 renames all_gather_into_tensor to all_gather_single.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, packed.contiguous(), group=group)
    gathered = gathered.reshape(world, *packed.shape)
    return gathered[:, :, 0], gathered[:, :, 1], gathered[:, :, 2:]


def _widen_grid(
    start: torch.Tensor,
    width: torch.Tensor,
    data_min: torch.Tensor,
    data_max: torch.Tensor,
    bins: int,
    min_factor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the grid ``(start, width, factor)`` that covers ``[data_min, data_max]``.

    Where the current grid has a positive width, the new width is
    ``factor * width`` with ``factor`` the smallest power of two (at least
    ``min_factor``) for which a start ``start - j * factor * width``, with
    ``j`` a whole number, covers the data; its edges are then old edges.
    Elsewhere the grid is the data range split into ``bins``, factor 1. A
    channel without data keeps its grid.
    """
    regular = width > 0
    safe_width = torch.where(regular, width, torch.ones_like(width))
    span = data_max - data_min
    needed = span / (bins * safe_width) - _GRID_TOLERANCE
    factor = torch.exp2(torch.ceil(torch.log2(torch.clamp(needed, min=1.0))))
    if min_factor is not None:
        factor = torch.maximum(factor, min_factor)

    new_start = _aligned_start(start, safe_width, data_min, factor)
    # Aligning the start down can cost up to one coarse bin at the top; one
    # doubling always recovers it, because bins >= 2.
    top = new_start + bins * factor * safe_width
    short = top < data_max - _GRID_TOLERANCE * factor * safe_width
    factor = torch.where(short, 2 * factor, factor)
    new_start = _aligned_start(start, safe_width, data_min, factor)

    seen = data_min <= data_max
    fresh_start = torch.where(seen, data_min, start)
    fresh_width = torch.where(seen, span / bins, width)
    new_start = torch.where(regular, new_start, fresh_start)
    new_width = torch.where(regular, factor * safe_width, fresh_width)
    factor = torch.where(regular, factor, torch.ones_like(factor))
    return new_start, new_width, factor


def _aligned_start(
    start: torch.Tensor, width: torch.Tensor, data_min: torch.Tensor, factor: torch.Tensor
) -> torch.Tensor:
    coarse = factor * width
    steps = torch.ceil(torch.clamp((start - data_min) / coarse - _GRID_TOLERANCE, min=0.0))
    # A channel without data has data_min = +inf; its steps are 0 rather than NaN.
    steps = torch.where(torch.isfinite(steps), steps, torch.zeros_like(steps))
    return start - steps * coarse


def _bin_index(
    values: torch.Tensor, start: torch.Tensor, width: torch.Tensor, bins: int
) -> torch.Tensor:
    """Return the float64 bin of each value, clamped to the grid; 0 where the width is 0."""
    positive = width > 0
    safe_width = torch.where(positive, width, torch.ones_like(width))
    index = torch.floor((values - start[..., None]) / safe_width[..., None])
    index = torch.where(positive[..., None], index, torch.zeros_like(index))
    return torch.clamp(index, 0, bins - 1)


def _bin_values(
    values: torch.Tensor, start: torch.Tensor, width: torch.Tensor, bins: int
) -> torch.Tensor:
    finite = torch.isfinite(values)
    index = _bin_index(values, start, width, bins)
    index = torch.where(finite, index, torch.zeros_like(index)).long()
    counts = values.new_zeros((values.shape[0], bins))
    return counts.scatter_add_(1, index, finite.to(values.dtype))


def _bin_centers(start: torch.Tensor, width: torch.Tensor, bins: int) -> torch.Tensor:
    steps = torch.arange(bins, dtype=start.dtype, device=start.device) + 0.5
    return start[:, None] + steps * width[:, None]


def _move_counts(
    counts: torch.Tensor,
    start: torch.Tensor,
    width: torch.Tensor,
    new_start: torch.Tensor,
    new_width: torch.Tensor,
) -> torch.Tensor:
    """Return ``counts`` moved to the grid ``(new_start, new_width)`` by bin center."""
    bins = counts.shape[-1]
    centers = _bin_centers(start, width, bins)
    index = _bin_index(centers, new_start, new_width, bins)
    # A grid never set has start 0 and width 0, so its centers are finite.
    index = torch.where(torch.isfinite(index), index, torch.zeros_like(index)).long()
    return torch.zeros_like(counts).scatter_add_(1, index, counts)


def _fold(
    counts: torch.Tensor, start: torch.Tensor, width: torch.Tensor, amax: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the histogram of ``|x|`` on ``[0, amax]`` and its bin width.

    Each bin's count moves to the ``|x|`` bin that contains the magnitude of its
    center, so a count can land one ``|x|`` bin off.
    """
    seen = torch.isfinite(amax)
    abs_width = torch.where(seen, amax / counts.shape[-1], torch.zeros_like(amax))
    bins = counts.shape[-1]
    centers = _bin_centers(start, width, bins)
    index = _bin_index(centers.abs(), torch.zeros_like(amax), abs_width, bins)
    index = torch.where(torch.isfinite(index), index, torch.zeros_like(index)).long()
    return torch.zeros_like(counts).scatter_add_(1, index, counts), abs_width


def _quantile(
    counts: torch.Tensor, start: torch.Tensor, width: torch.Tensor, fractions: torch.Tensor
) -> torch.Tensor:
    """Return the values below which ``fractions`` of the counts lie, shape ``(C, F)``.

    The cumulative distribution rises linearly inside each bin.
    """
    bins = counts.shape[-1]
    cumulative = counts.cumsum(dim=1)
    total = cumulative[:, -1:]
    target = fractions[None, :] * total
    index = torch.searchsorted(cumulative, target).clamp(max=bins - 1)
    before = torch.gather(cumulative, 1, index) - torch.gather(counts, 1, index)
    in_bin = torch.gather(counts, 1, index)
    fraction = torch.where(in_bin > 0, (target - before) / in_bin, torch.zeros_like(target))
    position = index.to(counts.dtype) + fraction.clamp(0, 1)
    return start[:, None] + position * width[:, None]


def _prefix_moments(counts: torch.Tensor, centers: torch.Tensor) -> list[torch.Tensor]:
    """Return prefix sums of ``counts * centers**p`` for p = 0, 1, 2, each with a leading 0."""
    zero = counts.new_zeros((counts.shape[0], 1))
    return [torch.cat([zero, (counts * centers**power).cumsum(dim=1)], dim=1) for power in range(3)]


def _symmetric_mse_threshold(
    abs_counts: torch.Tensor, abs_width: torch.Tensor, half_levels: float
) -> torch.Tensor:
    """Return the ``|x|`` bin edge ``t`` of least modelled error for a range ``[-t, t]``."""
    bins = abs_counts.shape[-1]
    steps = torch.arange(bins, dtype=abs_counts.dtype, device=abs_counts.device)
    centers = (steps + 0.5) * abs_width[:, None]
    thresholds = (steps + 1) * abs_width[:, None]
    moment0, moment1, moment2 = _prefix_moments(abs_counts, centers)

    # Threshold m keeps bins 0..m; the bins above it clip to t.
    inside = moment0[:, 1:]
    outside0 = moment0[:, -1:] - inside
    outside1 = moment1[:, -1:] - moment1[:, 1:]
    outside2 = moment2[:, -1:] - moment2[:, 1:]
    clipping = outside2 - 2 * thresholds * outside1 + thresholds**2 * outside0
    scale = thresholds / half_levels
    error = clipping.clamp(min=0) + inside * scale**2 / 12
    best = error.argmin(dim=1, keepdim=True)
    return torch.gather(thresholds, 1, best)[:, 0]


def _affine_mse_range(
    counts: torch.Tensor, start: torch.Tensor, width: torch.Tensor, levels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the percentile pair ``(lo, hi)`` of least modelled error for an affine range."""
    bins = counts.shape[-1]
    centers = _bin_centers(start, width, bins)
    moment0, moment1, moment2 = _prefix_moments(counts, centers)
    tails = _AFFINE_TAILS.to(counts.device)
    lows = _quantile(counts, start, width, tails)
    highs = _quantile(counts, start, width, 1 - tails)
    # qparams_from_min_max widens every range to include 0.
    lows = torch.clamp(lows, max=0.0)
    highs = torch.clamp(highs, min=0.0)

    below = torch.searchsorted(centers, lows)  # centers < lo, per candidate
    above = torch.searchsorted(centers, highs, right=True)  # centers <= hi

    def sums(moment: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.gather(moment, 1, index)

    low_error = (
        lows**2 * sums(moment0, below) - 2 * lows * sums(moment1, below) + sums(moment2, below)
    ).clamp(min=0)
    high0 = moment0[:, -1:] - sums(moment0, above)
    high1 = moment1[:, -1:] - sums(moment1, above)
    high2 = moment2[:, -1:] - sums(moment2, above)
    high_error = (high2 - 2 * highs * high1 + highs**2 * high0).clamp(min=0)
    inside = sums(moment0, above)[:, None, :] - sums(moment0, below)[:, :, None]

    scale = (highs[:, None, :] - lows[:, :, None]) / levels
    error = low_error[:, :, None] + high_error[:, None, :] + inside.clamp(min=0) * scale**2 / 12
    best = error.flatten(1).argmin(dim=1)
    count = tails.numel()
    lo = torch.gather(lows, 1, (best // count)[:, None])[:, 0]
    hi = torch.gather(highs, 1, (best % count)[:, None])[:, 0]
    return lo, hi


def _kl_threshold(abs_counts: torch.Tensor, abs_width: torch.Tensor, levels: int) -> torch.Tensor:
    """Return the threshold of least KL divergence on the ``|x|`` histogram."""
    bins = abs_counts.shape[-1]
    if levels >= bins:
        return bins * abs_width
    return _kl_kept_bins(abs_counts, levels) * abs_width


def _kl_kept_bins(counts: torch.Tensor, levels: int) -> torch.Tensor:
    """Return, per channel, the count of kept bins ``i`` whose quantized copy diverges least.

    With ``P`` the kept bins plus the clipped counts in the last one, ``S_g``
    and ``S'_g`` each group's mass with and without the clipped counts,
    ``n_g`` its bins where ``P > 0``, ``N`` all counts and ``H`` the kept
    counts, ``KL = sum(P log P) / N - log N - sum_g(S_g log(S'_g / n_g)) / N
    + log H``. Only the last group contains clipped counts, and the others
    depend on ``i`` only through the group size ``i // levels``, so their
    terms are computed once per group size.
    """
    channels, bins = counts.shape
    device = counts.device
    kept = torch.arange(levels, bins + 1, device=device)
    group_size = kept // levels
    sizes = torch.arange(1, bins // levels + 1, device=device)

    zero = counts.new_zeros((channels, 1))
    cumulative = torch.cat([zero, counts.cumsum(dim=1)], dim=1)
    nonempty = torch.cat([zero, (counts > 0).to(counts.dtype).cumsum(dim=1)], dim=1)
    cumulative_plogp = torch.cat([zero, torch.xlogy(counts, counts).cumsum(dim=1)], dim=1)

    def at(prefix: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        flat = torch.gather(prefix, 1, index.reshape(1, -1).expand(channels, -1))
        return flat.reshape(channels, *index.shape)

    # Groups 0 .. levels - 2 for every group size: [g * size, (g + 1) * size).
    edges = torch.arange(levels, device=device)[None, :] * sizes[:, None]
    head_mass = at(cumulative, edges[:, 1:]) - at(cumulative, edges[:, :-1])
    head_nonempty = at(nonempty, edges[:, 1:]) - at(nonempty, edges[:, :-1])
    head = torch.xlogy(head_mass, head_mass / head_nonempty.clamp(min=1)).sum(dim=2)
    head = head[:, group_size - 1]

    # The last group runs from (levels - 1) * size to the last kept bin.
    last_start = (levels - 1) * group_size
    total = cumulative[:, -1:]
    kept_mass = at(cumulative, kept)
    clipped = total - kept_mass
    last_bin = kept_mass - at(cumulative, kept - 1)
    last_mass = kept_mass - at(cumulative, last_start)
    last_nonempty = at(nonempty, kept) - at(nonempty, last_start)
    last_nonempty = last_nonempty + ((last_bin == 0) & (clipped > 0)).to(counts.dtype)
    # An empty last group that must hold clipped counts gives log(0): infinite divergence.
    tail = torch.xlogy(last_mass + clipped, last_mass / last_nonempty.clamp(min=1))

    reference_plogp = at(cumulative_plogp, kept - 1) + torch.xlogy(
        last_bin + clipped, last_bin + clipped
    )
    divergence = (reference_plogp - head - tail) / total - torch.log(total) + torch.log(kept_mass)
    divergence = torch.where(torch.isnan(divergence), torch.inf, divergence)
    best = divergence.argmin(dim=1)
    return kept[best].to(counts.dtype)
