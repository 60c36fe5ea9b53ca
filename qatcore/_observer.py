"""The observer contract, and the range statistics that min/max observers share."""

from __future__ import annotations

import abc
import copy
from typing import Any

import torch
from torch import nn

from qatcore._config import QuantSpec
from qatcore._distributed import all_reduce_range, sync_group
from qatcore._reference import qparams_from_min_max

__all__ = ["Float32Buffers", "Observer", "RangeObserver", "finite_min_max"]


class Float32Buffers(nn.Module):
    """Module whose buffers and parameters keep their dtype when the module is cast.

    ``Module.half()`` and ``Module.to(dtype)`` would cast statistics and
    qparams. They stay float32, and integer buffers stay integer, so that a
    model cast to bf16 or fp16 keeps full-precision qparams. Parameters,
    such as learnable scales, and their gradients keep their dtype too.
    Device moves apply as usual. Child modules are cast by their own rules.
    """

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        if recurse:
            for module in self.children():
                module._apply(fn)

        def keep_dtype(tensor: torch.Tensor) -> torch.Tensor:
            # Skip the cast instead of undoing it, which would round the
            # values to the narrower dtype on the way.
            applied = fn(tensor)
            if applied.dtype != tensor.dtype:
                return tensor.to(device=applied.device)
            return applied

        return super()._apply(keep_dtype, recurse=False)


class Observer(Float32Buffers, abc.ABC):
    """Record statistics of the tensors passed through and derive qparams from them.

    Observers keep their statistics in float32 buffers, whatever the model's
    dtype, so that ``model.half()`` does not change them and one collective
    per buffer can reduce them across ranks. Non-finite values never enter
    the statistics.

    When torch.distributed is initialised with more than one rank, an
    observer reduces each batch's statistics across ranks before folding
    them in, so that every rank has the same statistics, computed from
    every rank's data. Every rank must then run each observer the same
    number of times per step, as DistributedDataParallel does. The
    attributes ``sync`` (default ``True``) and ``process_group`` (default
    group: ``None``) control it; :func:`qatcore.set_observer_sync` sets
    them for a whole model. A subclass reduces its statistics with at most
    one collective per call.

    Args:
        spec: The tensor's quantization spec.
        channels: Channel count along ``spec.axis`` for per-channel specs,
            ``None`` for per-tensor ones.
    """

    def __init__(self, spec: QuantSpec, channels: int | None = None) -> None:
        super().__init__()
        if spec.per_channel and (channels is None or channels < 1):
            raise ValueError(
                f"a per-channel observer along axis {spec.axis} needs the channel count, "
                f"got channels={channels!r}"
            )
        # Reduce the statistics across ranks when torch.distributed is
        # initialised; qatcore.set_observer_sync changes sync and
        # process_group. These plain attributes go straight into the instance
        # dict, past nn.Module's slower __setattr__.
        self.__dict__.update(
            spec=spec,
            channels=channels if spec.per_channel else None,
            sync=True,
            process_group=None,
        )

    def __getstate__(self) -> dict[str, Any]:
        # A process group belongs to its process and cannot be pickled; an
        # unpickled observer reduces over the default group.
        state = self.__dict__.copy()
        state["process_group"] = None
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> Observer:
        # A copy in the same process keeps reducing over the same group.
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        copied.process_group = self.process_group
        return copied

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> None:
        """Update the statistics with ``x``; the tensor itself is not changed."""

    @abc.abstractmethod
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the float32 scale and int32 zero point for the statistics so far."""


def _channel_rows(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return x.reshape(1, -1)
    if axis >= x.dim():
        raise ValueError(
            f"per-channel axis {axis} is out of range for a tensor of shape {tuple(x.shape)}"
        )
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def finite_min_max(
    x: torch.Tensor, axis: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the min and max of the finite values of ``x``, and whether all were finite.

    The min and max are float32, shaped ``()`` per-tensor or ``(C,)`` along
    ``axis``. Where a tensor or channel has no finite value, min is ``+inf``
    and max is ``-inf``, which marks it as not observed.
    """
    rows = _channel_rows(x.detach(), axis)
    channels = rows.shape[0]
    if rows.shape[1] == 0:
        empty_min = torch.full((channels,), float("inf"), device=x.device)
        empty_max = torch.full((channels,), float("-inf"), device=x.device)
        all_finite = torch.ones((), dtype=torch.bool, device=x.device)
        return _squeeze(empty_min, axis), _squeeze(empty_max, axis), all_finite

    # Eager CPU code takes one fast reduction and redoes it with a mask only
    # when it met a non-finite value, because the host check is cheap on the
    # CPU. Compiled graphs and other devices take the branch-free masked form.
    if not torch.compiler.is_compiling() and x.device.type == "cpu":
        batch_min, batch_max = _reduce_min_max(rows, axis)
        # NaN or inf in either makes the difference non-finite; a finite
        # range so wide that it overflows merely takes the masked path too.
        if bool(torch.isfinite(batch_min - batch_max).all()):
            all_finite = torch.ones((), dtype=torch.bool)
            return _to_float32(batch_min), _to_float32(batch_max), all_finite

    finite = torch.isfinite(rows)
    batch_min, _ = _reduce_min_max(torch.where(finite, rows, float("inf")), axis)
    _, batch_max = _reduce_min_max(torch.where(finite, rows, float("-inf")), axis)
    return _to_float32(batch_min), _to_float32(batch_max), finite.all()


def _to_float32(values: torch.Tensor) -> torch.Tensor:
    """Cast to float32, clamping finite float64 values beyond float32's range to its limits.

    The infinities that mark an unobserved channel stay infinite.
    """
    if values.dtype != torch.float64:
        return values.float()
    limit = torch.finfo(torch.float32).max
    clamped = torch.where(torch.isfinite(values), values.clamp(-limit, limit), values)
    return clamped.float()


def _reduce_min_max(rows: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    # torch.aminmax over the whole tensor is far faster than with dim=, and
    # amin plus amax along dim 1 beat aminmax(dim=1) (torch 2.13 on the CPU).
    if axis is None:
        return torch.aminmax(rows)
    return rows.amin(dim=1), rows.amax(dim=1)


def _squeeze(values: torch.Tensor, axis: int | None) -> torch.Tensor:
    return values.reshape(()) if axis is None else values


class RangeObserver(Observer):
    """Base for observers that track a running min and max.

    Buffers:
        min_val, max_val: float32 range, ``()`` or ``(C,)``; ``+inf``/``-inf``
            until a finite value is seen. Each batch's range is reduced
            across ranks with one all-reduce before :meth:`update` receives it.
        nonfinite_batches: int64 count of batches that held NaN or inf.
    """

    def __init__(self, spec: QuantSpec, channels: int | None = None) -> None:
        super().__init__(spec, channels)
        shape = () if self.channels is None else (self.channels,)
        self.register_buffer("min_val", torch.full(shape, float("inf")))
        self.register_buffer("max_val", torch.full(shape, float("-inf")))
        self.register_buffer("nonfinite_batches", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> None:
        """Fold the finite range of ``x`` into the statistics."""
        axis = self.spec.axis
        if axis is not None and axis < x.dim() and x.shape[axis] != self.channels:
            raise ValueError(
                f"per-channel observer expects {self.channels} channels along axis "
                f"{self.spec.axis}, got a tensor of shape {tuple(x.shape)}"
            )
        batch_min, batch_max, all_finite = finite_min_max(x, self.spec.axis)
        self.nonfinite_batches.add_((~all_finite).to(torch.int64))
        active, group = sync_group(self)
        if active:
            batch_min, batch_max = all_reduce_range(batch_min, batch_max, group)
        seen = batch_min <= batch_max
        new_min, new_max = self.update(batch_min, batch_max)
        self.min_val.copy_(torch.where(seen, new_min, self.min_val))
        self.max_val.copy_(torch.where(seen, new_max, self.max_val))

    @abc.abstractmethod
    def update(
        self, batch_min: torch.Tensor, batch_max: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the new range from the current one and a batch's finite range.

        Only channels where the batch held a finite value take the result;
        the others keep their range.
        """

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return qparams for the range so far, as :func:`qparams_from_min_max` defines them."""
        return qparams_from_min_max(
            self.min_val,
            self.max_val,
            self.spec.quant_min,
            self.spec.quant_max,
            symmetric=self.spec.symmetric,
            signed=self.spec.signed,
            power_of_two=self.spec.power_of_two,
        )

    def extra_repr(self) -> str:
        return f"axis={self.spec.axis}, channels={self.channels}"
