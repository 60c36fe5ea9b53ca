"""The CPU observing kernel: a FakeQuantize's training step in two native calls.

A ``FakeQuantize`` in training mode observes its input, computes qparams
from the range so far and fake-quantizes the input. Done with ATen ops, the
observer's update and the qparams take about forty small tensor ops, which
on a tensor of a few hundred thousand elements cost more than the two
passes over the data. Here one native pass finds each channel's finite
range, one native call folds it into the observer and writes the qparams,
and :func:`qatcore_cpu.fake_quantize_cpu` makes the fake-quant pass.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from qatcore import FakeQuantize
from qatcore._distributed import sync_group
from qatcore_cpu import native
from qatcore_cpu.kernel import channel_view, fake_quantize_cpu

__all__ = ["observe_and_fake_quantize_cpu"]

try:
    from qatcore_observers.minmax import MinMaxObserver, MovingAverageMinMaxObserver
except ImportError:  # qatcore-observers is not installed: no observer to run natively
    MinMaxObserver = MovingAverageMinMaxObserver = None  # type: ignore[assignment, misc]


def _averaging_constant(fake_quantize: FakeQuantize) -> tuple[bool, float | None]:
    """Return whether the native step can run this module's observer, and its batch weight.

    It runs the exact classes ``MinMaxObserver`` (weight ``None``: a running
    min and max) and ``MovingAverageMinMaxObserver`` of qatcore-observers.
    A subclass may change the update, so it takes the ATen steps, as does
    an observer that reduces its range across ranks first.
    """
    observer = fake_quantize.observer
    kind = type(observer)
    if kind is MovingAverageMinMaxObserver:
        weight: float | None = observer.averaging_constant
    elif kind is MinMaxObserver:
        weight = None
    else:
        return False, None
    if sync_group(observer)[0]:
        return False, None
    return True, weight


def _has_hooks(module: nn.Module) -> bool:
    """Return whether a forward hook would see ``module`` run: its own or a global one."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or _global_forward_hooks
        or _global_forward_pre_hooks
    )


def _buffers_fit(fake_quantize: FakeQuantize) -> bool:
    """Return whether the buffers that the native call writes have its dtypes and layout."""
    observer = fake_quantize.observer
    float32 = (observer.min_val, observer.max_val, fake_quantize.scale)
    return (
        all(buffer.dtype == torch.float32 and buffer.is_contiguous() for buffer in float32)
        and fake_quantize.zero_point.dtype == torch.int32
        and fake_quantize.zero_point.is_contiguous()
    )


def observe_and_fake_quantize_cpu(
    x: torch.Tensor, fake_quantize: FakeQuantize
) -> torch.Tensor | None:
    """Run ``fake_quantize``'s training step on CPU tensor ``x`` with the native loops.

    The observer's ``min_val``, ``max_val`` and ``nonfinite_batches``, the
    module's ``scale`` and ``zero_point``, and the output and its gradient
    are bit for bit those of the ATen steps. Returns ``None``, and the
    module takes the ATen steps, where the native loops are not built, for
    input other than dense float32 with the observer's channel count, and
    for observers other than the two above. An observer with forward hooks
    takes the ATen steps too, so that its hooks run.
    """
    supported, averaging_constant = _averaging_constant(fake_quantize)
    if not supported or not native.available() or x.dtype != torch.float32 or x.numel() == 0:
        return None
    spec, observer = fake_quantize.spec, fake_quantize.observer
    axis = spec.axis
    if axis is not None and (axis >= x.dim() or x.shape[axis] != observer.channels):
        return None  # the observer raises its own error on the ATen path
    if not _buffers_fit(fake_quantize) or _has_hooks(observer):
        # The native step does not call the observer module, so a hook on it
        # would not run.
        return None
    view = channel_view(x, axis)
    if view is None:
        return None

    parts = native.finite_range(x.detach(), *view)
    if parts.nonfinite:
        observer.nonfinite_batches.add_(1)
    native.observe(
        parts,
        observer.min_val,
        observer.max_val,
        fake_quantize.scale,
        fake_quantize.zero_point,
        averaging_constant=averaging_constant,
        symmetric=spec.symmetric,
        signed=spec.signed,
        power_of_two=spec.power_of_two,
        quant_min=spec.quant_min,
        quant_max=spec.quant_max,
    )
    return fake_quantize_cpu(
        x, fake_quantize.scale, fake_quantize.zero_point, spec.quant_min, spec.quant_max, axis
    )
