"""Histogram observer: clipping methods, merging, per-channel, degenerate input and sync."""

from __future__ import annotations

import copy
import math
import pickle
import socket
from pathlib import Path

import attrs
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import qatcore
from qatcore_observers import HistogramObserver

METHODS = ["percentile", "mse", "entropy"]
INT8_SYMMETRIC = qatcore.QuantSpec(bits=8, signed=True, symmetric=True)
UINT8_AFFINE = qatcore.QuantSpec(bits=8, signed=False, symmetric=False)
SPECS = {"int8-symmetric": INT8_SYMMETRIC, "uint8-affine": UINT8_AFFINE}


def _observer(
    spec: qatcore.QuantSpec, channels: int | None = None, **options: object
) -> HistogramObserver:
    return HistogramObserver(attrs.evolve(spec, observer="histogram"), channels, **options)


def _threshold(observer: HistogramObserver) -> float:
    lo, hi = observer.clipping_range()
    return max(-lo.item(), hi.item())


def _fake_quantize(observer: HistogramObserver, x: torch.Tensor) -> torch.Tensor:
    scale, zero_point = observer.calculate_qparams()
    spec = observer.spec
    return qatcore.fake_quantize_reference(
        x, scale, zero_point, spec.quant_min, spec.quant_max, spec.axis
    )


def _laplace(count: int, outlier: float) -> torch.Tensor:
    """Return a Laplace(0, 1) sample of ``count`` values plus one outlier on each side."""
    generator = torch.Generator().manual_seed(0)
    uniform = torch.rand(count, generator=generator, dtype=torch.float64) - 0.5
    sample = -torch.sign(uniform) * torch.log1p(-2 * uniform.abs())
    return torch.cat([sample, torch.tensor([-outlier, outlier], dtype=torch.float64)]).float()


# -- registration and options -----------------------------------------------------------


def test_histogram_is_registered_by_name() -> None:
    observers = qatcore.plugin_manager().registry.observers

    assert observers["histogram"] is HistogramObserver
    assert observers.entry("histogram").plugin == "observers"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "kl"}, "method must be one of"),
        ({"method": "mse", "percentile": 99.0}, "percentile applies only"),
        ({"method": "percentile", "percentile": 0}, r"percentile must be in \[50, 100\], got 0"),
        ({"method": "percentile", "percentile": 40}, r"below 50 the range would drop most"),
        ({"method": "percentile", "percentile": 100.5}, r"percentile must be in \[50, 100\]"),
        ({"method": "percentile", "percentile": "99"}, "percentile must be a number"),
        ({"bins": 1}, "bins must be an int >= 2"),
        ({"bins": 2048.0}, "bins must be an int >= 2"),
        ({"bins": True}, "bins must be an int >= 2"),
    ],
    ids=[
        "method",
        "percentile-with-mse",
        "zero",
        "below-50",
        "above-100",
        "str",
        "one-bin",
        "float",
        "bool",
    ],
)
def test_invalid_options_raise(options: dict[str, object], message: str) -> None:
    spec = attrs.evolve(UINT8_AFFINE, observer="histogram", observer_options=options)

    with pytest.raises(ValueError, match=message):
        qatcore.FakeQuantize(spec)


# -- clipping methods on known distributions -------------------------------------------


def test_percentile_clips_laplace_outliers() -> None:
    # P(|x| > t) = exp(-t) for Laplace(0, 1), so 99.9 % of |x| lies below ln(1000) = 6.91.
    observer = _observer(INT8_SYMMETRIC, method="percentile", percentile=99.9)

    observer(_laplace(1_000_000, outlier=30.0))

    assert 6.6 < _threshold(observer) < 7.2


def test_affine_percentile_clips_each_tail() -> None:
    # P(x > t) = exp(-t) / 2, so 0.1 % of each tail lies beyond ln(500) = 6.21.
    observer = _observer(UINT8_AFFINE, method="percentile", percentile=99.9)

    observer(_laplace(1_000_000, outlier=30.0))
    lo, hi = observer.clipping_range()

    assert -6.5 < lo.item() < -5.9
    assert 5.9 < hi.item() < 6.5


def test_mse_clips_laplace_outliers() -> None:
    # For n Laplace(0, 1) values and one outlier at +-30, the modelled error
    # 2 n exp(-t) + 2 (30 - t)**2 + n t**2 / (12 * 127.5**2) has its minimum
    # near t = 10.9; its derivative is -68 at t = 10 and +4 at t = 11.
    observer = _observer(INT8_SYMMETRIC, method="mse")

    observer(_laplace(1_000_000, outlier=30.0))

    assert 9.5 < _threshold(observer) < 12.5


def test_affine_mse_clips_laplace_outliers() -> None:
    observer = _observer(UINT8_AFFINE, method="mse")

    observer(_laplace(1_000_000, outlier=30.0))
    lo, hi = observer.clipping_range()

    assert -14.0 < lo.item() < -8.0
    assert 8.0 < hi.item() < 14.0


def test_entropy_clips_laplace_outliers() -> None:
    # The search keeps at least 128 of 2048 |x| bins of width 30 / 2048, so t >= 1.875.
    observer = _observer(INT8_SYMMETRIC, method="entropy")

    observer(_laplace(1_000_000, outlier=30.0))

    assert 1.875 <= _threshold(observer) < 15.0


def test_minmax_keeps_laplace_outliers() -> None:
    fake_quant = qatcore.FakeQuantize(attrs.evolve(INT8_SYMMETRIC, observer="minmax"))

    fake_quant(_laplace(1_000, outlier=30.0))

    assert fake_quant.scale.item() == pytest.approx(30.0 / 127.5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_uniform_keeps_nearly_full_range(method: str, spec: qatcore.QuantSpec) -> None:
    generator = torch.Generator().manual_seed(0)
    observer = _observer(spec, method=method)

    observer(torch.rand(100_000, generator=generator) * 2 - 1)
    lo, hi = observer.clipping_range()

    assert -1.0 <= lo.item() < -0.99
    assert 0.99 < hi.item() <= 1.0


def test_entropy_matches_loop_reference() -> None:
    # A direct loop over the kept-bin counts, as TensorRT's calibration describes it.
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(400, generator=generator) ** 3 * 8
    observer = _observer(INT8_SYMMETRIC, method="entropy", bins=64)
    observer(torch.cat([x, torch.tensor([0.0, 40.0])]))
    abs_counts = observer.histogram.clone()  # the data spans [0, 40], so |x| has the same bins
    levels, bins = 8, 64
    observer.spec = attrs.evolve(observer.spec, bits=4)  # 16 codes, 8 per side

    best_kl, best_kept = math.inf, 0
    total = abs_counts.sum()
    for kept in range(levels, bins + 1):
        reference = abs_counts[:kept].clone()
        reference[-1] += abs_counts[kept:].sum()
        candidate = torch.zeros(kept, dtype=torch.float64)
        size = kept // levels
        for group in range(levels):
            stop = kept if group == levels - 1 else (group + 1) * size
            nonempty = reference[group * size : stop] > 0
            if nonempty.any():
                mass = abs_counts[group * size : stop].sum()
                candidate[group * size : stop][nonempty] = mass / nonempty.sum()
        p, q = reference / total, candidate / candidate.sum()
        used = p > 0
        kl = math.inf
        if (q[used] > 0).all():
            kl = (p[used] * torch.log(p[used] / q[used])).sum().item()
        if kl < best_kl - 1e-12:
            best_kl, best_kept = kl, kept

    assert best_kept < bins
    assert _threshold(observer) == pytest.approx(best_kept * 40.0 / bins, rel=1e-6)


# -- merging batches -------------------------------------------------------------------

# Bin centers of an 8-bin grid on [0, 1], so that no value sits on an edge.
CENTERS = [0.0625, 0.3125, 0.3125, 0.5625, 0.9375]


def test_batch_inside_range_adds_into_bins() -> None:
    observer = _observer(UINT8_AFFINE, bins=8)
    observer(torch.tensor([0.0, 1.0]))

    observer(torch.tensor(CENTERS))

    assert observer.histogram_min.item() == 0.0
    assert observer.bin_width.item() == 0.125
    assert observer.histogram.tolist() == [2, 0, 2, 0, 1, 0, 0, 2]


@pytest.mark.parametrize(
    "extension",
    [[-3.0, -2.5, -0.75], [-1.0, 3.0, 2.25, -0.75]],
    ids=["downward", "both-ways"],
)
def test_widening_merge_matches_single_batch(extension: list[float]) -> None:
    # [0, 1] in 8 bins widens to [-3, 1] or [-1, 3] in bins of width 0.5, so
    # each new bin covers 4 whole old bins.
    first = torch.tensor([0.0, *CENTERS])
    second = torch.tensor(extension)
    merged = _observer(UINT8_AFFINE, bins=8)
    single = _observer(UINT8_AFFINE, bins=8)

    merged(torch.cat([first, torch.tensor([1.0])]))
    merged(second)
    single(torch.cat([first, torch.tensor([1.0]), second]))

    assert merged.bin_width.item() == single.bin_width.item() == 0.5
    assert merged.histogram_min.item() == single.histogram_min.item()
    if extension[1] > 1.0:
        # 1.0 sat on the top edge of the old grid, in its last bin; after the
        # merge it stays below that edge, one bin lower than direct binning.
        expected = single.histogram.clone()
        expected[3] += 1
        expected[4] -= 1
    else:
        expected = single.histogram
    assert torch.equal(merged.histogram, expected)
    assert merged.histogram.sum().item() == first.numel() + 1 + second.numel()


def test_widening_factor_is_power_of_two() -> None:
    observer = _observer(UINT8_AFFINE, bins=8)
    observer(torch.tensor([0.0, 1.0]))

    observer(torch.tensor([2.5]))  # needs width 2.5 / 8; the next power of two is 4 / 8

    assert observer.bin_width.item() == 0.5
    assert observer.histogram_min.item() == 0.0
    # 1.0 was in the old last bin [0.875, 1], which now lies in [0.5, 1).
    assert observer.histogram.tolist() == [1, 1, 0, 0, 0, 1, 0, 0]
    assert observer.max_val.item() == 2.5


def test_constant_then_wider_batch_keeps_point_mass() -> None:
    observer = _observer(UINT8_AFFINE, bins=8)
    observer(torch.full((3,), 2.0))

    observer(torch.tensor([0.0, 4.0]))

    assert observer.bin_width.item() == 0.5
    assert observer.histogram.tolist() == [1, 0, 0, 0, 3, 0, 0, 1]


# -- per channel ---------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_per_channel_equals_per_tensor(method: str, spec: qatcore.QuantSpec) -> None:
    generator = torch.Generator().manual_seed(0)
    spread = torch.tensor([0.5, 2.0, 10.0]).reshape(1, 3, 1)
    batches = [torch.randn(4, 3, 50, generator=generator) * spread * step for step in (1, 2, 3)]
    batches[1][0, 2, 0] = float("nan")
    per_channel = _observer(attrs.evolve(spec, axis=1), channels=3, method=method)
    per_tensor = [_observer(spec, method=method) for _ in range(3)]

    for batch in batches:
        per_channel(batch)
        for channel, observer in enumerate(per_tensor):
            observer(batch[:, channel])
    scale, zero_point = per_channel.calculate_qparams()

    for channel, observer in enumerate(per_tensor):
        assert torch.equal(per_channel.histogram[channel], observer.histogram), channel
        expected_scale, expected_zero_point = observer.calculate_qparams()
        assert scale[channel].item() == expected_scale.item(), channel
        assert zero_point[channel].item() == expected_zero_point.item(), channel


def test_per_channel_rejects_wrong_channel_count() -> None:
    observer = _observer(attrs.evolve(INT8_SYMMETRIC, axis=0), channels=3)

    with pytest.raises(ValueError, match="expects 3 channels along axis 0"):
        observer(torch.zeros(4, 2))


# -- degenerate input ----------------------------------------------------------------

DEGENERATE = {
    "zeros": [0.0, 0.0, 0.0],
    "constant": [2.0, 2.0],
    "one-element": [3.0],
    "denormal": [0.0, 1e-44],
    "with-inf": [0.0, 1.0, float("inf")],
    "float32-max": [torch.finfo(torch.float32).max],
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("values", list(DEGENERATE.values()), ids=list(DEGENERATE))
@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_degenerate_batch_gives_valid_scale(
    method: str, values: list[float], spec: qatcore.QuantSpec
) -> None:
    observer = _observer(spec, method=method)
    x = torch.tensor(values)

    observer(x)
    scale, zero_point = observer.calculate_qparams()
    output = _fake_quantize(observer, torch.cat([x[torch.isfinite(x)], torch.zeros(1)]))

    assert torch.isfinite(scale)
    assert scale.item() > 0
    assert spec.quant_min <= zero_point.item() <= spec.quant_max
    assert torch.isfinite(output).all()
    assert output[-1].item() == 0.0
    assert torch.isfinite(observer.histogram).all()
    assert observer.histogram.sum().item() == torch.isfinite(x).sum().item()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_full_float32_range_gives_finite_scale(method: str, spec: qatcore.QuantSpec) -> None:
    largest = torch.finfo(torch.float32).max
    observer = _observer(spec, method=method)

    observer(torch.tensor([-largest, 0.0, largest]))
    lo, hi = observer.clipping_range()
    scale, _ = observer.calculate_qparams()

    assert -largest <= lo.item() < 0
    assert 0 < hi.item() <= largest
    assert torch.isfinite(scale)
    assert scale.item() > 0
    assert torch.isfinite(observer.bin_width)
    assert observer.histogram.sum().item() == 3


@pytest.mark.parametrize("method", METHODS)
def test_constant_quantizes_close_to_itself(method: str) -> None:
    observer = _observer(UINT8_AFFINE, method=method)
    x = torch.full((8,), 2.0)

    observer(x)
    scale, zero_point = observer.calculate_qparams()

    assert scale.item() == pytest.approx(2.0 / 255, rel=1e-6)
    assert zero_point.item() == 0
    assert (_fake_quantize(observer, x) - x).abs().max().item() <= scale.item() / 2


@pytest.mark.parametrize("method", METHODS)
def test_inf_is_excluded_and_counted(method: str) -> None:
    observer = _observer(UINT8_AFFINE, method=method)

    observer(torch.tensor([0.0, 1.0, float("inf"), float("nan")]))

    assert observer.max_val.item() == 1.0
    assert observer.histogram.sum().item() == 2
    assert observer.nonfinite_batches.item() == 1
    assert observer.clipping_range()[1].item() <= 1.0


@pytest.mark.parametrize("method", METHODS)
def test_empty_batch_changes_nothing(method: str) -> None:
    observer = _observer(UINT8_AFFINE, method=method)

    observer(torch.empty(0))
    assert observer.calculate_qparams()[0].item() == 1.0
    assert observer.histogram.sum().item() == 0
    observer(torch.tensor([0.0, 4.0]))
    state = copy.deepcopy(observer.state_dict())
    observer(torch.empty(0, 3))

    for name, value in state.items():
        assert torch.equal(observer.state_dict()[name], value), name
    assert observer.clipping_range()[1].item() <= 4.0
    assert observer.nonfinite_batches.item() == 0


# -- state -----------------------------------------------------------------------------


def _fed_observer() -> HistogramObserver:
    observer = _observer(attrs.evolve(INT8_SYMMETRIC, axis=0), channels=2, method="entropy")
    generator = torch.Generator().manual_seed(0)
    observer(torch.randn(2, 100, generator=generator))
    observer(torch.randn(2, 100, generator=generator) * 5)
    return observer


def _assert_same_state(left: nn.Module, right: nn.Module) -> None:
    left_state, right_state = left.state_dict(), right.state_dict()
    assert left_state.keys() == right_state.keys()
    for name in left_state:
        assert left_state[name].dtype == right_state[name].dtype, name
        assert torch.equal(left_state[name], right_state[name]), name


def test_state_dict_loads_into_fresh_observer() -> None:
    source = _fed_observer()
    target = _observer(attrs.evolve(INT8_SYMMETRIC, axis=0), channels=2, method="entropy")
    target(torch.full((2, 3), 1000.0))  # a different range, to be overwritten

    target.load_state_dict(source.state_dict(), strict=True)

    _assert_same_state(source, target)
    assert torch.equal(source.calculate_qparams()[0], target.calculate_qparams()[0])
    batch = torch.linspace(-20, 20, 50).repeat(2, 1)
    source(batch)
    target(batch)
    _assert_same_state(source, target)


@pytest.mark.parametrize(
    "round_trip", [copy.deepcopy, lambda module: pickle.loads(pickle.dumps(module))]
)
def test_copies_keep_state(round_trip) -> None:
    source = _fed_observer()

    copied = round_trip(source)

    _assert_same_state(source, copied)
    assert copied.method == "entropy"
    assert torch.equal(source.calculate_qparams()[0], copied.calculate_qparams()[0])


def test_buffers_keep_dtype_after_half() -> None:
    fake_quant = qatcore.FakeQuantize(
        attrs.evolve(INT8_SYMMETRIC, observer="histogram", axis=0), channels=2
    )

    fake_quant.half()
    fake_quant(torch.randn(2, 5).half())

    observer = fake_quant.observer
    assert observer.histogram.dtype == torch.float64
    assert observer.bin_width.dtype == torch.float64
    assert observer.min_val.dtype == torch.float32
    assert observer.nonfinite_batches.dtype == torch.int64
    assert fake_quant.scale.dtype == torch.float32


# -- through FakeQuantize and swap_modules ----------------------------------------------


def test_fake_quantize_uses_observer_options() -> None:
    spec = attrs.evolve(
        INT8_SYMMETRIC,
        observer="histogram",
        observer_options={"method": "percentile", "percentile": 99.9, "bins": 1024},
    )
    fake_quant = qatcore.FakeQuantize(spec)

    output = fake_quant(_laplace(100_000, outlier=30.0))

    assert isinstance(fake_quant.observer, HistogramObserver)
    assert fake_quant.observer.bins == 1024
    assert 6.4 / 127.5 < fake_quant.scale.item() < 7.4 / 127.5
    assert output.abs().max().item() <= 128 * fake_quant.scale.item()


def test_swap_modules_on_conv_model() -> None:
    pytest.importorskip("qatcore_conv")
    qconfig = qatcore.QConfig(
        weight=attrs.evolve(
            INT8_SYMMETRIC,
            axis=qatcore.OUTPUT_CHANNELS,
            observer="histogram",
            observer_options={"method": "mse"},
        ),
        activation=attrs.evolve(
            UINT8_AFFINE, observer="histogram", observer_options={"method": "entropy"}
        ),
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    reference = copy.deepcopy(model)
    qat_model = qatcore.swap_modules(model, qconfig)
    x = torch.randn(2, 3, 8, 8)

    for _ in range(3):
        output = qat_model(x)

    observers = [module for module in qat_model.modules() if isinstance(module, HistogramObserver)]
    assert len(observers) >= 4
    assert any(observer.channels == 4 for observer in observers)
    assert all(observer.histogram.sum() > 0 for observer in observers)
    assert torch.isfinite(output).all()
    error = (output - reference(x)).abs().max().item()
    assert 0 < error < 0.1 * reference(x).abs().max().item()


# -- cross-rank sync -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_sync_gives_identical_state_on_every_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    # The spawned ranks import the worker by name, with this folder on sys.path.
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "sync_fixtures"))
    import histogram_ranks

    with mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(histogram_ranks.run_rank, args=(2, _free_port(), shared), nprocs=2, join=True)
        results = dict(shared)
    synced = [results[(True, rank)] for rank in range(2)]
    unsynced = [results[(False, rank)] for rank in range(2)]

    for name, value in synced[0].items():
        assert torch.equal(value, synced[1][name]), name
    assert synced[0]["min_val"].item() == 0.0
    assert synced[0]["max_val"].item() == 8.0
    assert synced[0]["histogram"].sum().item() == 2 * 3 * 101
    assert unsynced[0]["max_val"].item() == 1.0
    assert unsynced[1]["max_val"].item() == 8.0
    assert unsynced[0]["bin_width"].item() != unsynced[1]["bin_width"].item()
