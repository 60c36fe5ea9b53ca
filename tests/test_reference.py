"""The reference numerics: qparams from a range and the reference fake-quant kernel.

These tests need no plugin: they pin the numerical contract every kernel
and observer must meet, with hand-computed expected values.
"""

from __future__ import annotations

import pytest
import torch

from qatcore import QuantSpec, fake_quantize_reference, finite_min_max, qparams_from_min_max

INT4 = QuantSpec(bits=4, signed=True, symmetric=True)
INT8 = QuantSpec(bits=8, signed=True, symmetric=True)
UINT8_AFFINE = QuantSpec(bits=8, signed=False, symmetric=False)


def _qparams(values: list[float], spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor(values)
    return qparams_from_min_max(
        x.min(),
        x.max(),
        spec.quant_min,
        spec.quant_max,
        symmetric=spec.symmetric,
        signed=spec.signed,
    )


# -- gradient mask and zero-point rounding --------------------------------------


def test_gradient_mask_follows_rounded_code() -> None:
    codes = torch.tensor([-9, -8.6, -8.4, -8, -1, 0, 7, 7.4, 7.6, 9])
    x = (codes * 0.1).requires_grad_()

    fake_quantize_reference(x, torch.tensor(0.1), torch.tensor(0), -8, 7).sum().backward()

    assert x.grad.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]


@pytest.mark.parametrize(
    ("zero_point", "expected"),
    [(2.7, 3), (2.5, 2), (3.5, 4), (-0.7, 0), (300.0, 255)],
    ids=["up", "tie-down", "tie-up", "negative", "above-range"],
)
def test_float_zero_point_rounds_half_even_then_clamps(zero_point: float, expected: int) -> None:
    x = torch.linspace(-2, 14, 41)
    scale = torch.tensor(0.05)

    per_tensor = fake_quantize_reference(x, scale, torch.tensor(zero_point), 0, 255)
    as_integer = fake_quantize_reference(x, scale, torch.tensor(expected), 0, 255)
    per_channel = fake_quantize_reference(
        x.reshape(1, -1).expand(3, -1),
        scale.repeat(3),
        torch.full((3,), zero_point),
        0,
        255,
        axis=0,
    )

    assert torch.equal(per_tensor, as_integer)
    assert torch.equal(per_channel, as_integer.expand(3, -1))


def test_rounds_ties_to_even() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])

    y = fake_quantize_reference(x, torch.tensor(1.0), torch.tensor(0), -8, 7)

    assert y.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]


def test_non_finite_inputs_saturate_or_propagate() -> None:
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e30, -1e30]).requires_grad_()

    y = fake_quantize_reference(x, torch.tensor(0.1), torch.tensor(0), -128, 127)
    y.sum().backward()

    assert y[:2].tolist() == pytest.approx([12.7, -12.8])
    assert torch.isnan(y[2])
    assert y[3:].tolist() == pytest.approx([12.7, -12.8])
    assert x.grad.tolist() == [0, 0, 0, 0, 0]


@pytest.mark.parametrize(
    "scale",
    [0.0, -0.1, float("nan"), float("inf")],
    ids=["zero", "negative", "nan", "inf"],
)
def test_invalid_scale_raises(scale: float) -> None:
    with pytest.raises(ValueError, match="finite scales > 0"):
        fake_quantize_reference(torch.ones(3), torch.tensor(scale), torch.tensor(0), 0, 255)


def test_per_channel_scale_count_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="needs 3 scales and zero points, got 2 and 2"):
        fake_quantize_reference(
            torch.ones(3, 4), torch.ones(2), torch.zeros(2, dtype=torch.int32), -8, 7, axis=0
        )


def test_per_channel_axis_out_of_range_raises() -> None:
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        fake_quantize_reference(torch.ones(3, 4), torch.ones(3), torch.zeros(3), -8, 7, axis=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_input_computes_in_float32(dtype: torch.dtype) -> None:
    x = torch.randn(64).to(dtype)
    scale, zero_point = torch.tensor(0.05), torch.tensor(0)

    y = fake_quantize_reference(x, scale, zero_point, -128, 127)

    assert y.dtype == dtype
    assert torch.equal(
        y, fake_quantize_reference(x.float(), scale, zero_point, -128, 127).to(dtype)
    )


def test_float64_input_stays_float64() -> None:
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)

    y = fake_quantize_reference(x, torch.tensor(0.05), torch.tensor(0), -128, 127)

    assert y.dtype == torch.float64
    assert (y - x).abs().max().item() <= 0.025 + 1e-9


# -- qparams ---------------------------------------------------------------------


def test_symmetric_scale_is_the_conversion_scale() -> None:
    scale, zero_point = _qparams([-1.149422, 0.3, 2.533506], INT4)

    assert scale.item() == pytest.approx(2.533506 / 7.5, rel=1e-7)
    assert scale.item() == pytest.approx(0.337801, abs=1e-6)
    assert zero_point.item() == 0


def test_symmetric_int8_scale_divides_by_half_range() -> None:
    scale, zero_point = _qparams([-3.0, 1.0], INT8)

    assert scale.item() == pytest.approx(3.0 / 127.5)
    assert zero_point.item() == 0


def test_symmetric_unsigned_zero_point_is_middle_code() -> None:
    spec = QuantSpec(bits=8, signed=False, symmetric=True)

    scale, zero_point = _qparams([-1.0, 2.0], spec)

    assert scale.item() == pytest.approx(2.0 / 127.5)
    assert zero_point.item() == 128


def test_affine_range_always_includes_zero() -> None:
    scale, zero_point = _qparams(torch.linspace(100, 101, 11).tolist(), UINT8_AFFINE)

    assert scale.item() == pytest.approx(101 / 255, rel=1e-7)
    assert zero_point.item() == 0
    zero = fake_quantize_reference(torch.tensor([0.0]), scale, zero_point, 0, 255)
    assert zero.item() == 0.0


def test_four_bit_unsigned_has_sixteen_levels() -> None:
    spec = QuantSpec(bits=4, signed=False, symmetric=False)
    x = torch.linspace(0, 3, 1000)

    scale, zero_point = _qparams(x.tolist(), spec)
    y = fake_quantize_reference(x, scale, zero_point, spec.quant_min, spec.quant_max)

    assert scale.item() == pytest.approx(0.2)
    assert zero_point.item() == 0
    assert torch.unique(y).numel() <= 16


@pytest.mark.parametrize("spec", [INT8, UINT8_AFFINE], ids=["int8-symmetric", "uint8-affine"])
def test_all_zero_range_gives_eps_scale(spec: QuantSpec) -> None:
    scale, zero_point = _qparams([0.0, 0.0], spec)

    assert scale.item() == torch.finfo(torch.float32).eps
    y = fake_quantize_reference(torch.zeros(4), scale, zero_point, spec.quant_min, spec.quant_max)
    assert torch.equal(y, torch.zeros(4))


def test_unobserved_range_gives_unit_scale() -> None:
    scale, zero_point = qparams_from_min_max(
        torch.tensor(float("inf")),
        torch.tensor(float("-inf")),
        0,
        255,
        symmetric=False,
        signed=False,
    )

    assert scale.item() == 1.0
    assert zero_point.item() == 0


def test_full_float32_range_keeps_scale_finite() -> None:
    big = torch.finfo(torch.float32).max

    scale, zero_point = _qparams([-big, big], UINT8_AFFINE)

    assert torch.isfinite(scale)
    assert scale.item() == pytest.approx(2 * big / 255, rel=1e-6)
    assert 0 <= zero_point.item() <= 255


def test_qparams_dtypes_are_float32_and_int32() -> None:
    scale, zero_point = qparams_from_min_max(
        torch.tensor([-1.0, -2.0], dtype=torch.float16),
        torch.tensor([1.0, 3.0], dtype=torch.float16),
        -128,
        127,
        symmetric=True,
        signed=True,
    )

    assert scale.dtype == torch.float32
    assert zero_point.dtype == torch.int32
    assert scale.shape == (2,)


def test_float64_range_beyond_float32_is_clamped() -> None:
    x = torch.tensor([[1e39, -5.0], [0.5, -1e40]], dtype=torch.float64)
    limit = torch.finfo(torch.float32).max

    per_tensor = finite_min_max(x, None)
    per_channel = finite_min_max(x, 0)

    assert per_tensor[0].item() == -limit
    assert per_tensor[1].item() == limit
    assert per_channel[0].tolist() == [-5.0, -limit]
    assert per_channel[1].tolist() == [limit, 0.5]
