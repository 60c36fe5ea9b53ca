"""The peak-memory meter of benchmarks/bench_memory.py counts storages exactly."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench_memory() -> ModuleType:
    """Import ``bench_memory`` as its script does, with the benchmarks folder on ``sys.path``.

    The scripts import their helpers ``_harness`` and ``_models`` as
    top-level modules, so the folder is on ``sys.path`` during the import
    and removed afterwards.
    """
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("bench_memory")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_meter_counts_fresh_allocations(bench_memory: ModuleType) -> None:
    with bench_memory.PeakMemoryMeter() as meter:
        first = torch.empty(1000, dtype=torch.float32)
        second = torch.empty(500, dtype=torch.float64)
        del first
        third = torch.empty(100, dtype=torch.int8)

    assert meter.baseline_bytes == 0
    assert meter.peak_bytes == 4000 + 4000
    assert meter.live_bytes == 4000 + 100
    del second, third
    assert meter.live_bytes == 0


def test_meter_counts_existing_storage_once(bench_memory: ModuleType) -> None:
    x = torch.zeros(256)
    view = x[:10]

    with bench_memory.PeakMemoryMeter([x, view, x]) as meter:
        x.add_(1)
        x.view(16, 16).mul_(2)
        after_views = meter.live_bytes
        tail = x[5:].clone()
        doubled = x * 2

    assert meter.baseline_bytes == 1024
    assert after_views == 1024
    assert meter.peak_bytes == 1024 + 1004 + 1024
    del tail
    assert meter.live_bytes == 1024 + 1024
    del doubled


def test_meter_releases_existing_storage(bench_memory: ModuleType) -> None:
    tensors = [torch.zeros(100), torch.zeros(50)]

    with bench_memory.PeakMemoryMeter(tensors) as meter:
        del tensors[0]
        replacement = torch.ones(10)

    assert meter.baseline_bytes == 600
    assert meter.peak_bytes == 600
    assert meter.live_bytes == 200 + 40
    del replacement


def test_meter_counts_resized_storage(bench_memory: ModuleType) -> None:
    with bench_memory.PeakMemoryMeter() as meter:
        grown = torch.empty(0)
        grown.resize_(300)

    assert meter.peak_bytes == 1200
    assert meter.live_bytes == 1200
    del grown


def test_meter_sees_backward_pass(bench_memory: ModuleType) -> None:
    weight = torch.zeros(1000, requires_grad=True)

    with bench_memory.PeakMemoryMeter([weight]) as meter:
        loss = (weight * 2).sum()
        loss.backward()
        del loss

    # What remains is the weight and its gradient, which backward created.
    assert meter.live_bytes == 4000 + 4000
    assert meter.peak_bytes >= 4000 + 4000


@pytest.mark.usefixtures("first_party_plugins")
@pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max:UserWarning")
def test_measured_step_repeats_exactly(bench_memory: ModuleType) -> None:
    models = bench_memory._models
    net = models.NETS["audio"]
    variants = models.build_eager_variants(net)
    inputs, targets = models.make_batch(net, 2)

    float_state, float_peak = bench_memory.measure_step(variants["float"], inputs, targets)
    qat_state, qat_peak = bench_memory.measure_step(variants["qatcore"], inputs, targets)
    again = bench_memory.measure_step(variants["qatcore"], inputs, targets)

    assert float_state < float_peak
    # The QAT model adds fake-quant buffers and the outputs and masks of its fake quants.
    assert float_state < qat_state
    assert float_peak < qat_peak
    assert again == (qat_state, qat_peak)
