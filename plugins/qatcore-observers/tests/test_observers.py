"""Min/max observers: parity with torch.ao, non-finite input and degenerate ranges."""

from __future__ import annotations

import pytest
import torch
import torch.ao.quantization as tq
from torch import nn

import qatcore
from qatcore_observers import MinMaxObserver, MovingAverageMinMaxObserver

INT8_PER_CHANNEL = qatcore.QuantSpec(bits=8, signed=True, symmetric=True, axis=0)
UINT8_AFFINE = qatcore.QuantSpec(bits=8, signed=False, symmetric=False)

OBSERVERS = {
    "minmax": (MinMaxObserver, "minmax"),
    "moving-average": (MovingAverageMinMaxObserver, "moving_average_minmax"),
}


def _observer(kind: str, spec: qatcore.QuantSpec, channels: int | None = None):
    observer_type, name = OBSERVERS[kind]
    return observer_type(attrs_evolve(spec, observer=name), channels)


def attrs_evolve(spec: qatcore.QuantSpec, **changes: object) -> qatcore.QuantSpec:
    import attrs

    return attrs.evolve(spec, **changes)


def _fake_quantize(observer, x: torch.Tensor) -> torch.Tensor:
    scale, zero_point = observer.calculate_qparams()
    spec = observer.spec
    return qatcore.fake_quantize_reference(
        x, scale, zero_point, spec.quant_min, spec.quant_max, spec.axis
    )


# -- parity with torch.ao's observers -----------------------------------------------

AO_PER_TENSOR = {
    "minmax": tq.MinMaxObserver,
    "moving-average": tq.MovingAverageMinMaxObserver,
}
AO_PER_CHANNEL = {
    "minmax": tq.PerChannelMinMaxObserver,
    "moving-average": tq.MovingAveragePerChannelMinMaxObserver,
}


@pytest.mark.parametrize("kind", list(OBSERVERS))
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "affine"])
def test_per_tensor_matches_torch_ao(kind: str, symmetric: bool) -> None:
    spec = qatcore.QuantSpec(bits=8, signed=symmetric, symmetric=symmetric)
    ours = _observer(kind, spec)
    theirs = AO_PER_TENSOR[kind](
        dtype=torch.qint8 if symmetric else torch.quint8,
        qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine,
        quant_min=spec.quant_min,
        quant_max=spec.quant_max,
    )
    generator = torch.Generator().manual_seed(0)

    for step in range(5):
        x = torch.randn(4, 8, 5, generator=generator) * (step + 1) + step
        ours(x)
        theirs(x)
        scale, zero_point = ours.calculate_qparams()
        expected_scale, expected_zero_point = theirs.calculate_qparams()

        assert torch.equal(scale.reshape(1), expected_scale), step
        assert torch.equal(zero_point.reshape(1), expected_zero_point.int()), step


@pytest.mark.parametrize("kind", list(OBSERVERS))
@pytest.mark.parametrize("axis", [0, 1, 3])
def test_per_channel_matches_torch_ao(kind: str, axis: int) -> None:
    spec = qatcore.QuantSpec(bits=8, signed=True, symmetric=True, axis=axis)
    shape = (6, 5, 3, 4)
    ours = _observer(kind, spec, channels=shape[axis])
    theirs = AO_PER_CHANNEL[kind](
        ch_axis=axis,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        quant_min=-128,
        quant_max=127,
    )
    generator = torch.Generator().manual_seed(0)

    for step in range(5):
        x = torch.randn(shape, generator=generator) * (step + 1)
        ours(x)
        theirs(x)
        scale, zero_point = ours.calculate_qparams()
        expected_scale, expected_zero_point = theirs.calculate_qparams()

        assert torch.equal(scale, expected_scale), step
        assert torch.equal(zero_point, expected_zero_point.int()), step


def test_observers_are_registered_by_name() -> None:
    observers = qatcore.plugin_manager().registry.observers

    assert observers["minmax"] is MinMaxObserver
    assert observers["moving_average_minmax"] is MovingAverageMinMaxObserver
    assert observers.entry("minmax").plugin == "observers"


@pytest.mark.parametrize("constant", [0, 1.5, -0.1, True, "0.1"], ids=str)
def test_averaging_constant_is_validated(constant: object) -> None:
    spec = attrs_evolve(UINT8_AFFINE, observer_options={"averaging_constant": constant})

    with pytest.raises(ValueError, match="averaging_constant must be"):
        qatcore.FakeQuantize(spec)


def test_averaging_constant_comes_from_observer_options() -> None:
    spec = attrs_evolve(UINT8_AFFINE, observer_options={"averaging_constant": 0.5})
    fake_quant = qatcore.FakeQuantize(spec)

    fake_quant(torch.tensor([0.0, 2.0]))
    fake_quant(torch.tensor([0.0, 4.0]))

    assert fake_quant.observer.max_val.item() == 3.0


# -- NaN and inf never enter the statistics -------------------------------------------


@pytest.mark.parametrize("kind", list(OBSERVERS))
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_non_finite_batch_does_not_move_statistics(
    kind: str, per_channel: bool, poison: float
) -> None:
    spec = INT8_PER_CHANNEL if per_channel else UINT8_AFFINE
    observer = _observer(kind, spec, channels=3 if per_channel else None)
    clean = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    clean[1, 4] = 0.0  # neither the min nor the max of its channel
    poisoned = clean.clone()
    poisoned[1, 4] = poison

    observer(clean)
    after_clean = (observer.min_val.clone(), observer.max_val.clone())
    observer(poisoned)

    assert torch.equal(observer.min_val, after_clean[0])
    assert torch.equal(observer.max_val, after_clean[1])
    assert observer.nonfinite_batches.item() == 1
    observer(clean)
    assert torch.isfinite(observer.min_val).all()
    assert torch.isfinite(observer.max_val).all()
    scale, _ = observer.calculate_qparams()
    assert torch.isfinite(scale).all()
    assert torch.isfinite(_fake_quantize(observer, clean)).all()


def test_non_finite_values_are_excluded_not_the_batch() -> None:
    observer = _observer("minmax", UINT8_AFFINE)

    observer(torch.tensor([0.0, 1.0, float("inf"), float("nan"), -2.0]))

    assert observer.min_val.item() == -2.0
    assert observer.max_val.item() == 1.0


def test_nonfinite_counts_name_the_module() -> None:
    pytest.importorskip("qatcore_conv")
    qconfig = qatcore.QConfig(
        weight=INT8_PER_CHANNEL, activation=attrs_evolve(UINT8_AFFINE, observer="minmax")
    )
    model = qatcore.swap_modules(nn.Sequential(nn.Conv2d(1, 2, 1), nn.Conv2d(2, 2, 1)), qconfig)
    x = torch.rand(1, 1, 4, 4)

    model(x)
    x[0, 0, 1, 1] = float("nan")
    model(x)
    model(torch.rand(1, 1, 4, 4))

    # The first conv quantizes the model's input, where the NaN enters. The
    # second conv's input is the first conv's output, so it has no input quantizer.
    assert model[0].input_quantizer() is not None
    assert model[1].input_quantizer() is None
    assert qatcore.nonfinite_counts(model) == {
        "0.input_fake_quant": 1,
        "0.output_fake_quant": 1,
        "1.output_fake_quant": 1,
    }
    scales = [model[0].input_fake_quant.scale]
    scales += [model[index].output_fake_quant.scale for index in range(2)]
    assert all(torch.isfinite(scale) for scale in scales)


# -- degenerate ranges ------------------------------------------------------------------

DEGENERATE = {
    "zeros": [0.0, 0.0, 0.0],
    "constant": [2.0, 2.0],
    "one-element": [3.0],
    "denormal": [0.0, 1e-44],
    "with-inf": [0.0, 1.0, float("inf")],
    "float32-max": [torch.finfo(torch.float32).max],
}


@pytest.mark.parametrize("kind", list(OBSERVERS))
@pytest.mark.parametrize("values", list(DEGENERATE.values()), ids=list(DEGENERATE))
@pytest.mark.parametrize("spec", [UINT8_AFFINE, INT8_PER_CHANNEL], ids=["uint8", "int8"])
def test_degenerate_batch_gives_valid_scale(
    kind: str, values: list[float], spec: qatcore.QuantSpec
) -> None:
    spec = attrs_evolve(spec, axis=None)
    observer = _observer(kind, spec)
    x = torch.tensor(values)

    observer(x)
    scale, zero_point = observer.calculate_qparams()

    assert torch.isfinite(scale)
    assert scale.item() > 0
    assert spec.quant_min <= zero_point.item() <= spec.quant_max
    assert torch.isfinite(_fake_quantize(observer, x[torch.isfinite(x)])).all()


@pytest.mark.parametrize("constant", [2.0, 0.01, 1e6])
def test_constant_batch_quantizes_close_to_itself(constant: float) -> None:
    observer = _observer("moving-average", UINT8_AFFINE)
    x = torch.full((8,), constant)

    observer(x)
    scale, zero_point = observer.calculate_qparams()

    assert scale.item() == pytest.approx(constant / 255, rel=1e-6)
    assert zero_point.item() == 0
    assert (_fake_quantize(observer, x) - x).abs().max().item() <= scale.item() / 2


def test_all_zero_batch_quantizes_zero_exactly() -> None:
    observer = _observer("minmax", UINT8_AFFINE)

    observer(torch.zeros(5))

    assert torch.equal(_fake_quantize(observer, torch.zeros(5)), torch.zeros(5))


def test_inf_is_excluded_from_range() -> None:
    observer = _observer("minmax", UINT8_AFFINE)

    observer(torch.tensor([0.0, 1.0, float("inf")]))

    assert observer.max_val.item() == 1.0
    assert observer.calculate_qparams()[0].item() == pytest.approx(1 / 255)


@pytest.mark.parametrize("kind", list(OBSERVERS))
def test_empty_batch_changes_nothing(kind: str) -> None:
    observer = _observer(kind, UINT8_AFFINE)

    observer(torch.empty(0))
    assert observer.calculate_qparams()[0].item() == 1.0
    observer(torch.tensor([0.0, 4.0]))
    observer(torch.empty(0, 3))

    assert observer.min_val.item() == 0.0
    assert observer.max_val.item() == 4.0
    assert observer.nonfinite_batches.item() == 0


def test_empty_per_channel_batch_changes_nothing() -> None:
    observer = _observer("moving-average", INT8_PER_CHANNEL, channels=3)
    observer(torch.ones(3, 2))

    observer(torch.empty(3, 0))

    assert torch.equal(observer.max_val, torch.ones(3))


# -- per-channel weights with all-zero and tiny channels ------------------------------


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
def test_zero_and_tiny_channels_quantize_safely(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.stack(
        [
            torch.zeros(4, 3, 3),
            1e-7 * torch.rand(4, 3, 3, generator=generator),
            torch.randn(4, 3, 3),
        ]
    ).to(dtype)
    fake_quant = qatcore.FakeQuantize(INT8_PER_CHANNEL, channels=3)

    output = fake_quant(weight)

    scale = fake_quant.scale
    assert torch.isfinite(scale).all()
    assert (scale > 0).all()
    assert output.dtype == dtype
    assert torch.equal(output[0], torch.zeros_like(output[0]))
    error = (output.float() - weight.float()).abs().flatten(1).amax(dim=1)
    rounding = weight.float().abs().flatten(1).amax(dim=1) * 2**-8  # half-precision output rounding
    assert (error[1:] <= scale[1:] / 2 + rounding[1:]).all()


def test_statistics_stay_float32_after_half() -> None:
    fake_quant = qatcore.FakeQuantize(INT8_PER_CHANNEL, channels=2)

    fake_quant.half()
    fake_quant(torch.randn(2, 5).half())

    assert fake_quant.scale.dtype == torch.float32
    assert fake_quant.zero_point.dtype == torch.int32
    assert fake_quant.observer.min_val.dtype == torch.float32
    assert fake_quant.observer.nonfinite_batches.dtype == torch.int64


# -- the training scale is the conversion scale ---------------------------------------

TRAINING_SCALE_CASES = {
    "int4": (qatcore.QuantSpec(bits=4, axis=0), [[-1.149422, 0.3, 2.533506]], [2.533506 / 7.5]),
    "int8": (qatcore.QuantSpec(bits=8, axis=0), [[-1.149422, 0.3, 2.533506]], [2.533506 / 127.5]),
    "zero-channel": (
        qatcore.QuantSpec(bits=8, axis=0),
        [[0.0, 0.0, 0.0], [1e-7, -3e-7, 2e-7]],
        [torch.finfo(torch.float32).eps, torch.finfo(torch.float32).eps],
    ),
}


@pytest.mark.parametrize(
    ("spec", "rows", "expected"),
    list(TRAINING_SCALE_CASES.values()),
    ids=list(TRAINING_SCALE_CASES),
)
def test_training_scale_is_conversion_scale(
    spec: qatcore.QuantSpec, rows: list[list[float]], expected: list[float]
) -> None:
    weight = torch.tensor(rows)
    fake_quant = qatcore.FakeQuantize(spec, channels=len(rows))

    output = fake_quant(weight)
    scale, zero_point = fake_quant.qparams()

    assert scale.tolist() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(zero_point, torch.zeros(len(rows), dtype=torch.int32))
    assert torch.equal(scale, fake_quant.observer.calculate_qparams()[0])
    codes = output / scale.reshape(-1, 1)
    assert (codes - torch.round(codes)).abs().max().item() < 1e-5
