"""Measure the peak tensor memory of one QAT training step against the float step and torch.ao's.

The nets and eager variants are those of ``bench_training_step.py``: float,
qatcore with ``fuse=False`` on the convs, torch.ao on the whole model and on
the convs only, and the BN-folded variants of both libraries.

The CPU has no allocator statistics like CUDA's, and the process's RSS
depends on the allocator's caching and on the pages the OS hands back, so
the peak is counted, not sampled. ``PeakMemoryMeter`` is a
``TorchDispatchMode``: it sees every ATen op of the step, the backward
pass's included, and records the storage of every tensor an op returns. A
storage counts its ``nbytes()`` from the first op that returns it until a
``weakref.finalize`` on it fires, which happens when its last tensor is
freed. Views and in-place ops return known storages and add nothing, and a
storage that an op resizes counts its new size. The peak is the largest
live total after any op. With the same torch build and settings, every run
gives the same number, however busy the machine is.

What counts, for every variant alike:

- the state that exists before the step: the parameters, the buffers (BN
  running statistics, observer ranges, scales and zero points), the SGD
  momentum buffers and the batch. One warm-up step creates the momentum
  buffers and initialises the observers before the measured step;
- everything the step allocates: activations saved for backward, fake-quant
  outputs and masks, the gradients (set to None before the step, so they
  are created within it), and temporaries while they are alive.

NOTE: scratch memory that one op allocates and frees inside its own kernel,
such as a convolution's workspace, never reaches the dispatcher and is not
counted, so the process's real peak can be higher by one op's scratch.

Run from the repository root after the Quick start install::

    python benchmarks/bench_memory.py

This is a measurement, not a test: it asserts nothing about the numbers.
"""

from __future__ import annotations

import argparse
import gc
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import _harness
import _models
import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

MIB = 1024 * 1024

COUNTERPARTS = {
    "qatcore": "torch.ao convs",
    "qatcore BN folded": "torch.ao BN folded, stable",
}
"""qatcore variant -> the torch.ao variant that fake-quantizes the same tensors the same way."""


class PeakMemoryMeter(TorchDispatchMode):
    """Count the bytes of live tensor storages, op by op, and record their peak.

    Use it as a context manager around the code to measure. Storages that
    exist before it starts are counted only if their tensors are passed as
    ``existing``. The meter holds no reference to any tensor or storage, so
    it never keeps memory alive.

    Args:
        existing: Tensors whose storages are live before the measured code
            runs; each storage counts once, however many tensors view it.

    Attributes:
        baseline_bytes: The bytes of the storages of ``existing``.
        live_bytes: The bytes of the counted storages that are alive now.
        peak_bytes: The largest ``live_bytes`` after any op, and at least
            ``baseline_bytes``.
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._sizes: dict[int, int] = {}
        self.live_bytes = 0
        for tensor in existing:
            self._track(tensor)
        self.baseline_bytes = self.live_bytes
        self.peak_bytes = self.live_bytes

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        # The address of the C++ storage; the finalizer removes it before the
        # address can be reused by a new storage.
        key = storage._cdata
        previous = self._sizes.get(key)
        if previous is None:
            previous = 0
            weakref.finalize(storage, self._release, key)
        self._sizes[key] = storage.nbytes()
        self.live_bytes += self._sizes[key] - previous

    def _release(self, key: int) -> None:
        self.live_bytes -= self._sizes.pop(key)


def step_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: Iterable[torch.Tensor]
) -> Iterator[torch.Tensor]:
    """Yield the tensors that live across steps: parameters, buffers, optimizer state, batch."""
    yield from model.parameters()
    yield from model.buffers()
    for state in optimizer.state.values():
        yield from (value for value in state.values() if isinstance(value, torch.Tensor))
    yield from batch


def measure_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """Return the bytes of the state and the peak bytes of one training step of ``model``.

    One untimed step first creates the momentum buffers and initialises the
    observers, then the gradients are set to None, so that every variant
    enters the measured step in the same state.
    """
    optimizer = _models.make_optimizer(model)
    _models.training_step(model, optimizer, inputs, targets)
    optimizer.zero_grad(set_to_none=True)
    gc.collect()

    # With the cycle collector off, storages are freed by reference counting
    # alone, at the same point of every run.
    gc.disable()
    try:
        with PeakMemoryMeter(step_state(model, optimizer, (inputs, targets))) as meter:
            _models.training_step(model, optimizer, inputs, targets)
    finally:
        gc.enable()
    return meter.baseline_bytes, meter.peak_bytes


def bench_net(net_name: str, args: argparse.Namespace) -> dict[str, int]:
    """Measure every eager variant of one net, print its table and return the peaks in bytes."""
    net = _models.NETS[net_name]
    batch = args.batch or net.batch
    models = _models.build_eager_variants(net)
    inputs, targets = _models.make_batch(net, batch)

    state: dict[str, int] = {}
    peaks: dict[str, int] = {}
    for name, model in models.items():
        state[name], peaks[name] = measure_step(model, inputs, targets)

    rows = []
    for name in models:
        counterpart = COUNTERPARTS.get(name)
        rows.append(
            [
                f"`{name}`",
                _models.count_fake_quants(models[name]),
                f"{state[name] / MIB:.2f}",
                f"{peaks[name] / MIB:.2f}",
                f"{(peaks[name] - state[name]) / MIB:.2f}",
                _harness.format_ratio(peaks[name], peaks["float"]),
                _harness.format_ratio(peaks[name], peaks[counterpart]) if counterpart else "",
            ]
        )
    header = [
        "variant",
        "fake quants",
        "state MiB",
        "peak MiB",
        "peak above state MiB",
        "vs float",
        "vs torch.ao",
    ]
    note = (
        f"{net.description}; batch {batch}. `state` is the parameters, buffers, momentum "
        "buffers and batch before the step; `peak` is the most bytes of live tensor storages "
        "during the step, state included. `vs float` and `vs torch.ao` divide peaks, the "
        "latter by `torch.ao convs` or `torch.ao BN folded, stable`."
    )
    _harness.print_section(
        f"Peak memory, `{net_name}`", _harness.markdown_table(header, rows), note
    )
    return peaks


def print_summary(results: dict[str, dict[str, int]]) -> None:
    """Print the peak ratios of every net in one table."""
    columns = {
        "qatcore / float": ("qatcore", "float"),
        "qatcore BN folded / float": ("qatcore BN folded", "float"),
        "torch.ao convs / float": ("torch.ao convs", "float"),
        "torch.ao BN folded / float": ("torch.ao BN folded", "float"),
        "qatcore / torch.ao convs": ("qatcore", "torch.ao convs"),
    }
    rows = []
    for net_name, peaks in results.items():
        row: list[object] = [f"`{net_name}`", f"{peaks['float'] / MIB:.2f}"]
        for numerator, denominator in columns.values():
            row.append(_harness.format_ratio(peaks[numerator], peaks[denominator]))
        rows.append(row)
    table = _harness.markdown_table(["net", "float peak MiB", *columns], rows)
    _harness.print_section("Peak memory, summary", table, "Ratios of peaks.")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--nets",
        nargs="+",
        choices=list(_models.NETS),
        default=list(_models.NETS),
        help="nets to measure, in this order (default: all)",
    )
    _harness.add_thread_option(parser)
    parser.add_argument(
        "--batch",
        type=int,
        help="inputs per step for every net (default: 16 for video, 32 for the others)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    _harness.start(args)
    results = {net_name: bench_net(net_name, args) for net_name in args.nets}
    print_summary(results)


if __name__ == "__main__":
    main()
