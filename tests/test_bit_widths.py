"""Every bit width from 2 to 8, and 16: integer codes, gradient mask and power-of-two scales.

Each spec goes through ``qatcore.swap_modules`` on a small conv, so the
observers, the registered kernel and the QAT conv all take part.
"""

from __future__ import annotations

import itertools
from typing import Any

import attrs
import pytest
import torch
from torch import nn

import qatcore

pytest.importorskip("qatcore_conv")
pytest.importorskip("qatcore_observers")

BITS = (2, 3, 4, 5, 6, 7, 8, 16)
CHANNELS = 4


def _spec_id(spec: qatcore.QuantSpec) -> str:
    kind = "int" if spec.signed else "uint"
    mode = "sym" if spec.symmetric else "affine"
    narrow = "-narrow" if spec.narrow_range else ""
    granularity = "per-channel" if spec.per_channel else "per-tensor"
    return f"{kind}{spec.bits}-{mode}{narrow}-{granularity}"


SPECS = [
    qatcore.QuantSpec(
        bits=bits,
        signed=signed,
        symmetric=symmetric,
        narrow_range=narrow_range,
        axis=qatcore.OUTPUT_CHANNELS if per_channel else None,
    )
    for bits, signed, symmetric, narrow_range, per_channel in itertools.product(
        BITS, (True, False), (True, False), (False, True), (False, True)
    )
]
SPEC_IDS = [_spec_id(spec) for spec in SPECS]


def _swapped_conv(spec: qatcore.QuantSpec) -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, CHANNELS, 3))
    return qatcore.swap_modules(conv, qatcore.QConfig(weight=spec, activation=spec))


def _fake_quant_calls(
    model: nn.Module, x: torch.Tensor
) -> dict[str, tuple[qatcore.FakeQuantize, torch.Tensor]]:
    """Run ``model`` on ``x``; return each fake quantizer by role, with its output."""
    outputs: dict[str, torch.Tensor] = {}
    fake_quants = {"weight": model[0].weight_fake_quant, "output": model[0].output_fake_quant}
    handles = []
    for role, fake_quant in fake_quants.items():

        def record(module: nn.Module, args: Any, output: torch.Tensor, role: str = role) -> None:
            outputs[role] = output.detach().clone()

        handles.append(fake_quant.register_forward_hook(record))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return {role: (fake_quants[role], outputs[role]) for role in fake_quants}


def _along_axis(values: torch.Tensor, like: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return values
    shape = [1] * like.dim()
    shape[axis] = -1
    return values.reshape(shape)


def _codes(fake_quant: qatcore.FakeQuantize, output: torch.Tensor) -> torch.Tensor:
    """Return ``output / scale + zero_point`` in float64: the integer codes, before rounding."""
    axis = fake_quant.spec.axis
    scale = _along_axis(fake_quant.scale.double(), output, axis)
    zero_point = _along_axis(fake_quant.zero_point.double(), output, axis)
    return output.double() / scale + zero_point


def _channels(output: torch.Tensor, axis: int | None) -> list[torch.Tensor]:
    if axis is None:
        return [output.flatten()]
    return list(output.movedim(axis, 0).reshape(output.shape[axis], -1))


def _inputs() -> list[torch.Tensor]:
    """Return a training batch, then an eval batch four times as wide as the observed range."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 16, 16, generator=generator)
    return [x, 4 * x]


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_bit_width_distinct_values_fit_range(spec: qatcore.QuantSpec) -> None:
    levels = 2**spec.bits - int(spec.narrow_range)
    assert spec.quant_max - spec.quant_min + 1 == levels
    model = _swapped_conv(spec)

    for training, x in zip((True, False), _inputs()):
        model.train(training)
        for role, (fake_quant, output) in _fake_quant_calls(model, x).items():
            for index, values in enumerate(_channels(output, fake_quant.spec.axis)):
                distinct = values.unique().numel()
                assert 1 < distinct <= levels, (
                    f"{role} channel {index} (training={training}): {distinct} distinct values"
                )


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_bit_width_codes_inside_range(spec: qatcore.QuantSpec) -> None:
    model = _swapped_conv(spec)

    for training, x in zip((True, False), _inputs()):
        model.train(training)
        for role, (fake_quant, output) in _fake_quant_calls(model, x).items():
            codes = _codes(fake_quant, output)
            rounded = codes.round()
            where = f"{role} (training={training})"
            # float32 outputs carry about 1e-7 relative error, and 16-bit codes reach 65535.
            assert (codes - rounded).abs().max() < 0.05, f"{where}: output is off the grid"
            assert rounded.min() >= spec.quant_min, where
            assert rounded.max() <= spec.quant_max, where
            if role == "output" and not training:
                # Outputs four times as wide as the observed range saturate at both ends.
                assert rounded.min() == spec.quant_min, where
                assert rounded.max() == spec.quant_max, where


# Code offsets from quant_min and quant_max, and whether the gradient passes.
# round(x / scale) + zero_point decides, as for codes -9, -8.6, -8.4, -8 and
# 7, 7.4, 7.6, 9 in [-8, 7]: round half to even never meets a tie here.
EDGE_OFFSETS = (
    ("min", -1.0, 0.0),
    ("min", -0.6, 0.0),
    ("min", -0.4, 1.0),
    ("min", 0.0, 1.0),
    ("min", 0.4, 1.0),
    ("max", -0.4, 1.0),
    ("max", 0.0, 1.0),
    ("max", 0.4, 1.0),
    ("max", 0.6, 0.0),
    ("max", 1.0, 0.0),
)
PER_CHANNEL_SCALES = (0.1, 0.05, 0.2, 0.025)


def _edge_qparams(spec: qatcore.QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Return hand-set qparams: scale 0.1 per tensor, four scales and zero points per channel."""
    if spec.symmetric:
        middle = 0 if spec.signed else (spec.quant_min + spec.quant_max + 1) // 2
        zero_points = [middle] * CHANNELS
    else:
        span = spec.quant_max - spec.quant_min
        zero_points = [spec.quant_min + span * index // (CHANNELS - 1) for index in range(CHANNELS)]
    if not spec.per_channel:
        return torch.tensor(0.1), torch.tensor(zero_points[1], dtype=torch.int32)
    return torch.tensor(PER_CHANNEL_SCALES), torch.tensor(zero_points, dtype=torch.int32)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_bit_width_gradient_mask_at_edges(spec: qatcore.QuantSpec) -> None:
    fake_quant = _swapped_conv(spec)[0].output_fake_quant.eval()
    scale, zero_point = _edge_qparams(spec)
    fake_quant.scale.copy_(scale)
    fake_quant.zero_point.copy_(zero_point)
    axis = fake_quant.spec.axis

    edges = {"min": spec.quant_min, "max": spec.quant_max}
    codes = torch.tensor(
        [edges[edge] + offset for edge, offset, _ in EDGE_OFFSETS], dtype=torch.float64
    )
    expected = torch.tensor([passes for _, _, passes in EDGE_OFFSETS])
    # Shape (1, channels, codes): every channel gets every edge code.
    channels = scale.numel() if axis is not None else 1
    codes = codes.expand(1, channels, -1)
    scales = scale.double().reshape(1, -1, 1)
    zero_points = zero_point.double().reshape(1, -1, 1)
    values = ((codes - zero_points) * scales).float()

    kernels = {
        "registered": fake_quant,
        "reference": lambda x: qatcore.fake_quantize_reference(
            x, scale, zero_point, spec.quant_min, spec.quant_max, axis
        ),
    }
    for kernel_name, kernel in kernels.items():
        x = values.clone().requires_grad_()
        kernel(x).sum().backward()

        assert x.grad is not None
        for channel in range(channels):
            assert x.grad[0, channel].tolist() == expected.tolist(), (
                f"{kernel_name} kernel, channel {channel}"
            )


# -- power-of-two scales ----------------------------------------------------------

POWER_OF_TWO_SPECS = [attrs.evolve(spec, power_of_two=True) for spec in SPECS]


def _is_power_of_two(scale: torch.Tensor) -> torch.Tensor:
    mantissa, _ = torch.frexp(scale)
    return mantissa == 0.5


@pytest.mark.parametrize("spec", POWER_OF_TWO_SPECS, ids=SPEC_IDS)
def test_power_of_two_scales_cover_range(spec: qatcore.QuantSpec) -> None:
    model = _swapped_conv(spec)

    calls = _fake_quant_calls(model, _inputs()[0])

    for role, (fake_quant, output) in calls.items():
        observer = fake_quant.observer
        scale = fake_quant.scale
        zero_point = fake_quant.zero_point.float()
        assert _is_power_of_two(scale).all(), f"{role}: scales {scale.tolist()}"
        assert torch.equal(torch.log2(scale), torch.log2(scale).round()), role

        # The scale is the smallest power of two at or above the plain scale.
        plain_scale, _ = qatcore.qparams_from_min_max(
            observer.min_val,
            observer.max_val,
            spec.quant_min,
            spec.quant_max,
            symmetric=spec.symmetric,
            signed=spec.signed,
        )
        assert (scale >= plain_scale).all(), role
        assert (scale < 2 * plain_scale).all(), role

        # The codes reach the observed extremes to within half a step.
        min_neg = torch.clamp(observer.min_val, max=0)
        max_pos = torch.clamp(observer.max_val, min=0)
        lowest = (spec.quant_min - zero_point) * scale
        highest = (spec.quant_max - zero_point) * scale
        assert (lowest <= min_neg + scale / 2).all(), role
        assert (highest >= max_pos - scale / 2).all(), role

        if spec.symmetric:
            middle = 0 if spec.signed else (spec.quant_min + spec.quant_max + 1) // 2
            assert (fake_quant.zero_point == middle).all(), role
        else:
            recomputed = torch.clamp(
                spec.quant_min - torch.round(min_neg / scale), spec.quant_min, spec.quant_max
            )
            assert torch.equal(zero_point, recomputed), role

        codes = _codes(fake_quant, output)
        assert (codes - codes.round()).abs().max() < 0.05, role


def _hand_qparams(min_val: float, max_val: float, spec: qatcore.QuantSpec) -> tuple[float, int]:
    scale, zero_point = qatcore.qparams_from_min_max(
        torch.tensor(min_val),
        torch.tensor(max_val),
        spec.quant_min,
        spec.quant_max,
        symmetric=spec.symmetric,
        signed=spec.signed,
        power_of_two=spec.power_of_two,
    )
    return scale.item(), zero_point.item()


INT8_SYMMETRIC_P2 = qatcore.QuantSpec(bits=8, signed=True, symmetric=True, power_of_two=True)
UINT8_AFFINE_P2 = qatcore.QuantSpec(bits=8, signed=False, symmetric=False, power_of_two=True)
UINT8_AFFINE = attrs.evolve(UINT8_AFFINE_P2, power_of_two=False)


def test_power_of_two_hand_computed() -> None:
    # int8 symmetric: 3 / 127.5 = 0.0235 rounds up to 2**-5.
    assert _hand_qparams(-1, 3, INT8_SYMMETRIC_P2) == (2**-5, 0)
    # uint8 affine: 4 / 255 = 0.0157 rounds up to 2**-5, and the zero point
    # follows that scale: 0 - round(-1 / 2**-5) = 32.
    assert _hand_qparams(-1, 3, UINT8_AFFINE_P2) == (2**-5, 32)


def test_power_of_two_zero_point_follows_scale() -> None:
    # Without rounding the scale is 4 / 255 and the zero point round(63.75) = 64.
    plain_scale, plain_zero_point = _hand_qparams(-1, 3, UINT8_AFFINE)

    assert plain_scale == pytest.approx(4 / 255)
    assert plain_zero_point == 64
    assert _hand_qparams(-1, 3, UINT8_AFFINE_P2)[1] == 32


@pytest.mark.parametrize(
    ("min_val", "max_val", "spec", "expected"),
    [
        (-1.0, 255 * 2**-4 - 1, UINT8_AFFINE_P2, (2**-4, 16)),
        (-127.5 * 2**-5, 1.0, INT8_SYMMETRIC_P2, (2**-5, 0)),
        (0.0, 0.0, INT8_SYMMETRIC_P2, (2**-23, 0)),
    ],
    ids=["affine-exact", "symmetric-exact", "empty-range-eps"],
)
def test_power_of_two_keeps_exact_power(
    min_val: float, max_val: float, spec: qatcore.QuantSpec, expected: tuple[float, int]
) -> None:
    assert _hand_qparams(min_val, max_val, spec) == expected


def test_power_of_two_per_channel_unobserved() -> None:
    min_val = torch.tensor([-1.0, 0.5, float("inf")])
    max_val = torch.tensor([3.0, 6.0, float("-inf")])

    scale, zero_point = qatcore.qparams_from_min_max(
        min_val, max_val, 0, 255, symmetric=False, signed=False, power_of_two=True
    )

    # 6 / 255 = 0.0235 rounds up to 2**-5 too. A channel never observed keeps scale 1.
    assert scale.tolist() == [2**-5, 2**-5, 1.0]
    assert zero_point.tolist() == [32, 0, 0]


@pytest.mark.parametrize("exponent", [-20, -5, 0, 10])
def test_power_of_two_rounds_up_just_above(exponent: int) -> None:
    # Scales a few float32 ulps above a power of two, where float32 log2
    # already returns the integer exponent.
    scale = torch.tensor(2.0**exponent)
    infinity = torch.tensor(float("inf"))
    for ulps in range(1, 9):
        scale = torch.nextafter(scale, infinity)
        max_val = scale * 255
        plain_scale, _ = _hand_qparams(0, max_val.item(), UINT8_AFFINE)
        rounded_scale, _ = _hand_qparams(0, max_val.item(), UINT8_AFFINE_P2)

        assert rounded_scale >= plain_scale, f"{ulps} ulps above 2**{exponent}"
        assert rounded_scale == 2.0 ** (exponent + 1), f"{ulps} ulps above 2**{exponent}"


def test_power_of_two_huge_range_stays_finite() -> None:
    # 2-bit codes over +-3e38 need a scale of 2e38, above 2**127, the largest
    # float32 power of two.
    spec = qatcore.QuantSpec(bits=2, signed=False, symmetric=False, power_of_two=True)

    scale, zero_point = _hand_qparams(-3e38, 3e38, spec)

    assert scale == 2.0**127
    assert zero_point == 2
