"""The kernel conformance suite: its cases, its comparison, and kernels that must fail it.

The reference kernels pass every case. Deliberately wrong kernels, each
with one bug a real kernel could have, fail with a message that names the
case and the result that differs, which shows that the suite can fail.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

import qatcore
from qatcore.testing import (
    LARGE_ELEMENTS,
    KernelCase,
    assert_identical,
    check_kernel,
    check_kernel_case,
    kernel_cases,
)

Kernel = Callable[..., torch.Tensor]

PLAIN_CASES = kernel_cases()
LEARNABLE_CASES = kernel_cases(learnable=True)
PLAIN = {case.name: case for case in PLAIN_CASES}
LEARNABLE = {case.name: case for case in LEARNABLE_CASES}


# -- deliberately wrong kernels -----------------------------------------------------


def _round_half_away_from_zero(values: torch.Tensor) -> torch.Tensor:
    return torch.sign(values) * torch.floor(torch.abs(values) + 0.5)


class _WrongFakeQuantize(torch.autograd.Function):
    """The reference kernel's math with one bug, chosen by ``bug``."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        quant_min: int,
        quant_max: int,
        axis: int | None,
        bug: str,
    ) -> torch.Tensor:
        scale_c, inv_scale, zero_point_c = qatcore.prepare_qparams(
            x, scale, zero_point, quant_min, quant_max, axis
        )
        if bug == "unrounded zero point":
            zero_point_c = zero_point.to(scale_c.dtype).clamp(quant_min, quant_max)
            zero_point_c = zero_point_c.reshape(scale_c.shape)

        scaled = x.to(scale_c.dtype) * inv_scale
        if bug == "round half away from zero":
            code = _round_half_away_from_zero(scaled) + zero_point_c
        else:
            code = torch.round(scaled) + zero_point_c

        if bug == "zero point in the clamp bounds":
            # Clamping round(x / s) to the range shifted by -z skips adding and
            # subtracting z. At z = 0 that keeps the -0.0 of round(-0.4), which
            # the reference's addition of z turns into 0.0.
            shifted = torch.clamp(
                torch.round(scaled), quant_min - zero_point_c, quant_max - zero_point_c
            )
            output = shifted * scale_c
        else:
            clamped = torch.clamp(code, quant_min, quant_max)
            output = (clamped - zero_point_c) * scale_c

        if bug == "gradient at NaN":
            inside = ~((code < quant_min) | (code > quant_max))
        elif bug == "gradient outside the range":
            inside = torch.ones_like(code, dtype=torch.bool)
        else:
            inside = (code >= quant_min) & (code <= quant_max)
        ctx.save_for_backward(inside)
        if bug == "output in the compute dtype":
            return output
        return output.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (inside,) = ctx.saved_tensors
        return grad_output * inside, None, None, None, None, None, None


def wrong_kernel(bug: str) -> Kernel:
    def kernel(
        x: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        quant_min: int,
        quant_max: int,
        axis: int | None = None,
    ) -> torch.Tensor:
        if bug != "no argument check":
            qatcore.check_qparams(x, scale, zero_point, quant_min, quant_max, axis)
        return _WrongFakeQuantize.apply(x, scale, zero_point, quant_min, quant_max, axis, bug)

    return kernel


def correct_kernel() -> Kernel:
    """Return a kernel with the reference's math written out again, which must pass."""
    return wrong_kernel("none")


def in_place_kernel(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None = None,
) -> torch.Tensor:
    output = qatcore.fake_quantize_reference(x, scale, zero_point, quant_min, quant_max, axis)
    with torch.no_grad():
        x.mul_(2)
    return output


def detached_kernel(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None = None,
) -> torch.Tensor:
    return qatcore.fake_quantize_reference(
        x.detach(), scale, zero_point, quant_min, quant_max, axis
    )


def double_grad_factor_kernel(*args: Any) -> torch.Tensor:
    *arguments, grad_factor = args
    return qatcore.fake_quantize_learnable_reference(*arguments, 2 * grad_factor)


def detached_zero_point_kernel(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None,
    grad_factor: float,
) -> torch.Tensor:
    return qatcore.fake_quantize_learnable_reference(
        x, scale, zero_point.detach(), quant_min, quant_max, axis, grad_factor
    )


def unclamped_scale_kernel(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None,
    grad_factor: float,
) -> torch.Tensor:
    # The plain kernels' argument check, which rejects a scale of 0.
    qatcore.check_qparams(x, scale, zero_point, quant_min, quant_max, axis)
    return qatcore.fake_quantize_learnable_reference(
        x, scale, zero_point, quant_min, quant_max, axis, grad_factor
    )


# -- the reference passes -----------------------------------------------------------


@pytest.mark.parametrize("case", PLAIN_CASES, ids=str)
def test_reference_passes_case(case: KernelCase) -> None:
    check_kernel_case(qatcore.fake_quantize_reference, case)


@pytest.mark.parametrize("case", LEARNABLE_CASES, ids=str)
def test_learnable_reference_passes_case(case: KernelCase) -> None:
    check_kernel_case(qatcore.fake_quantize_learnable_reference, case, learnable=True)


def test_rewritten_reference_passes_small_cases() -> None:
    kernel = correct_kernel()

    for case in PLAIN_CASES:
        if "-large-" not in case.name:
            check_kernel_case(kernel, case)


# -- wrong kernels fail -------------------------------------------------------------

WRONG_KERNELS = {
    "round-half-away": (
        wrong_kernel("round half away from zero"),
        "float32-ties-int4-per-tensor",
        r"output differs at index \(\d+,\): got ",
    ),
    "gradient-at-nan": (
        wrong_kernel("gradient at NaN"),
        "float32-non-finite-x-per-tensor",
        r"with gradients: input gradient differs at index \(\d+, \d+\): got .*, expected -?0\.0 ",
    ),
    "gradient-outside-range": (
        wrong_kernel("gradient outside the range"),
        "float32-range-edges-int4-per-tensor",
        r"with gradients: input gradient differs at index \(0,\): got .*, expected -?0\.0 ",
    ),
    "output-dtype": (
        wrong_kernel("output in the compute dtype"),
        "float16-random-per-tensor",
        r"output: dtype differs: got torch\.float32, expected torch\.float16",
    ),
    "unrounded-zero-point": (
        wrong_kernel("unrounded zero point"),
        "float32-float-zero-point-axis-0",
        r"output differs at index \(0, \d+\)",
    ),
    "negative-zero": (
        wrong_kernel("zero point in the clamp bounds"),
        "float32-range-edges-int8-per-tensor",
        r"output differs at index \(\d+,\): got -0\.0 \(bits 0x80000000\), "
        r"expected 0\.0 \(bits 0x00000000\)",
    ),
    "no-argument-check": (
        wrong_kernel("no argument check"),
        "float32-invalid-scale-zero-per-tensor",
        r"expected ValueError, as the reference raises \(.*finite scales > 0.*\), "
        "but the kernel returned",
    ),
    "modifies-input": (
        in_place_kernel,
        "float32-random-axis-1",
        r"x after the kernel differs at index",
    ),
    "detached-output": (
        detached_kernel,
        "float32-random-per-tensor",
        r"with gradients: output requires_grad is False, expected True",
    ),
}


@pytest.mark.parametrize(
    ("kernel", "case_name", "message"), WRONG_KERNELS.values(), ids=list(WRONG_KERNELS)
)
def test_wrong_kernel_fails_case(kernel: Kernel, case_name: str, message: str) -> None:
    with pytest.raises(AssertionError, match=rf"^case '{case_name}' .*{message}"):
        check_kernel_case(kernel, PLAIN[case_name])


WRONG_LEARNABLE_KERNELS = {
    "double-grad-factor": (
        double_grad_factor_kernel,
        "float32-random-per-tensor",
        r"with gradients: scale gradient differs at index \(\): got ",
    ),
    "detached-zero-point": (
        detached_zero_point_kernel,
        "float32-random-axis-0",
        r"with gradients: zero-point gradient is missing",
    ),
    "rejects-zero-scale": (
        unclamped_scale_kernel,
        "float32-scale-zero-per-tensor",
        r"with gradients: the kernel raised ValueError: fake quantization needs finite scales",
    ),
    "round-half-away": (
        lambda *args: wrong_kernel("round half away from zero")(*args[:-1]),
        "float64-ties-uint8-axis-0",
        r"with gradients: output differs at index \(\d+, \d+\)",
    ),
}


@pytest.mark.parametrize(
    ("kernel", "case_name", "message"),
    WRONG_LEARNABLE_KERNELS.values(),
    ids=list(WRONG_LEARNABLE_KERNELS),
)
def test_wrong_learnable_kernel_fails_case(kernel: Kernel, case_name: str, message: str) -> None:
    with pytest.raises(AssertionError, match=rf"^case '{case_name}' .*{message}"):
        check_kernel_case(kernel, LEARNABLE[case_name], learnable=True)


def test_check_kernel_reports_every_failing_case() -> None:
    with pytest.raises(AssertionError) as error:
        check_kernel(wrong_kernel("unrounded zero point"))

    # Clamping alone gives the right zero point for -0.7 and 300, so those
    # per-tensor cases pass, and 2.7, 2.5 and 3.5 fail.
    message = str(error.value)
    assert message.startswith(f"7 of {len(PLAIN_CASES)} kernel cases failed:\n")
    for dtype in ("float32", "float64", "float16", "bfloat16"):
        assert f"case '{dtype}-float-zero-point-axis-0'" in message
    for zero_point in ("2.7", "2.5", "3.5"):
        assert f"case 'float32-float-zero-point-{zero_point}-per-tensor'" in message
    assert "float-zero-point-minus0.7-per-tensor" not in message
    assert "float-zero-point-300-per-tensor" not in message


def test_check_kernel_passes_reference() -> None:
    check_kernel(qatcore.fake_quantize_learnable_reference, learnable=True)


def test_case_of_other_kind_raises() -> None:
    with pytest.raises(ValueError, match="is for learnable kernels, but learnable=False"):
        check_kernel_case(qatcore.fake_quantize_reference, LEARNABLE_CASES[0])


# -- comparison ---------------------------------------------------------------------


def test_identical_accepts_nan_of_any_payload() -> None:
    expected = torch.tensor([1.0, math.nan, -0.0])
    other_payload = expected.clone()
    other_payload.view(torch.int32)[1] = 0x7FC00001
    other_sign = expected.clone()
    other_sign.view(torch.int32)[1] = -0x400000  # 0xFFC00000, a NaN with the sign bit set

    assert_identical(other_payload, expected, "output")
    assert_identical(other_sign, expected, "output")


def test_identical_rejects_zero_of_other_sign() -> None:
    with pytest.raises(AssertionError, match=r"^output differs at index \(1, 0\): got 0\.0"):
        assert_identical(torch.zeros(2, 2), torch.tensor([[0.0, 0.0], [-0.0, 0.0]]), "output")


def test_identical_rejects_nan_for_number() -> None:
    with pytest.raises(AssertionError, match=r"got nan .*expected 2\.0 .*; 1 of 3 elements differ"):
        assert_identical(torch.tensor([1.0, math.nan, 3.0]), torch.tensor([1.0, 2.0, 3.0]))


def test_identical_rejects_other_shape() -> None:
    with pytest.raises(AssertionError, match=r"shape differs: got torch.Size\(\[3\]\)"):
        assert_identical(torch.zeros(3), torch.zeros(1, 3), "input gradient")


def test_identical_rejects_non_tensor() -> None:
    with pytest.raises(AssertionError, match="output: expected a tensor, got tuple"):
        assert_identical((torch.zeros(3),), torch.zeros(3), "output")


def test_identical_describes_scalar_difference() -> None:
    with pytest.raises(AssertionError, match=r"at index \(\): got 1\.0 \(bits 0x3c00\)"):
        assert_identical(torch.tensor(1.0).half(), torch.tensor(2.0).half())


# -- the cases hold what their names claim ------------------------------------------


@pytest.mark.parametrize("cases", [PLAIN_CASES, LEARNABLE_CASES], ids=["plain", "learnable"])
def test_case_names_unique(cases: list[KernelCase]) -> None:
    names = [str(case) for case in cases]

    assert len(set(names)) == len(names)
    assert names == [case.name for case in cases]


@pytest.mark.parametrize("cases", [PLAIN_CASES, LEARNABLE_CASES], ids=["plain", "learnable"])
def test_cases_cover_every_feature(cases: list[KernelCase]) -> None:
    names = {case.name for case in cases}
    features = [
        "random-per-tensor",
        "random-axis-0",
        "random-axis-1",
        "random-axis-3",
        "ties-int4-per-tensor",
        "ties-uint8-axis-0",
        "range-edges-int4-per-tensor",
        "range-edges-int8-per-tensor",
        "range-edges-uint8-per-tensor",
        "float-zero-point-axis-0",
        "non-finite-x-per-tensor",
        "non-finite-x-axis-1",
        "non-finite-grad-output-per-tensor",
        "empty-per-tensor",
        "empty-axis-0",
        "empty-zero-channels-axis-1",
        "scalar-per-tensor",
        "sliced-axis-0",
        "transposed-axis-0",
        "expanded-axis-1",
        "channels-last-axis-1",
        "channels-last-3d-axis-1",
        *(f"{bits}-per-tensor" for bits in ("int2", "int4", "int8", "int16")),
        *(f"{bits}-axis-0" for bits in ("uint2", "uint4", "uint8", "uint16")),
    ]

    for dtype in ("float32", "float64", "float16", "bfloat16"):
        for feature in features:
            assert f"{dtype}-{feature}" in names
    assert "float32-large-axis-1" in names
    assert "float32-invalid-scale-nan-axis-0" in names


def test_invalid_scale_cases_expect_value_error() -> None:
    plain = {name: case.raises for name, case in PLAIN.items() if "scale-" in name}
    learnable = {name: case.raises for name, case in LEARNABLE.items() if "scale-" in name}

    assert len(plain) == 8
    assert set(plain.values()) == {ValueError}
    assert learnable["float32-scale-zero-per-tensor"] is None
    assert learnable["float32-scale-negative-axis-0"] is None
    assert learnable["float32-invalid-scale-nan-axis-0"] is ValueError
    assert learnable["float32-invalid-scale-inf-per-tensor"] is ValueError


def test_large_cases_few_and_above_threshold() -> None:
    large = [
        case for case in PLAIN_CASES + LEARNABLE_CASES if case.build().x.numel() > LARGE_ELEMENTS
    ]

    assert [case.name for case in large] == [
        "float32-large-axis-1",
        "float16-large-channels-last-per-tensor",
        "float32-large-axis-1",
    ]
    assert LARGE_ELEMENTS == 2**21


def test_edge_case_gradient_mask() -> None:
    inputs = PLAIN["float32-range-edges-int4-per-tensor"].build()
    x = inputs.x.requires_grad_()

    output = qatcore.fake_quantize_reference(*inputs.arguments(x))
    output.backward(torch.ones_like(output))

    assert (inputs.quant_min, inputs.quant_max) == (-8, 7)
    assert inputs.scale.item() == pytest.approx(0.1)
    assert x.grad is not None
    assert x.grad.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("case_name", ["ties-int4-per-tensor", "ties-uint8-axis-0"])
def test_tie_case_values_halfway(dtype: str, case_name: str) -> None:
    inputs = PLAIN[f"{dtype}-{case_name}"].build()
    scale = inputs.scale.reshape(-1, *[1] * (inputs.x.dim() - 1))

    codes = inputs.x.double() / scale.double()

    assert torch.equal(codes - torch.floor(codes), torch.full_like(codes, 0.5))


def test_float_zero_points_act_as_rounded_integers() -> None:
    inputs = PLAIN["float32-float-zero-point-axis-0"].build()
    integer = torch.tensor([3, 2, 4, 0, 255], dtype=torch.int32)

    output = qatcore.fake_quantize_reference(*inputs.arguments())
    expected = qatcore.fake_quantize_reference(
        inputs.x, inputs.scale, integer, inputs.quant_min, inputs.quant_max, 0
    )

    assert inputs.zero_point.tolist() == pytest.approx([2.7, 2.5, 3.5, -0.7, 300.0])
    assert (inputs.quant_min, inputs.quant_max) == (0, 255)
    assert_identical(output, expected, "output")


def test_non_finite_cases_contain_inf_and_nan() -> None:
    x = PLAIN["bfloat16-non-finite-x-axis-1"].build().x
    grad_output = PLAIN["float16-non-finite-grad-output-per-tensor"].build().grad_output

    for values in (x, grad_output):
        assert bool(torch.isnan(values).any())
        assert bool((values == math.inf).any())
        assert bool((values == -math.inf).any())


def test_layout_cases_have_their_layout() -> None:
    sliced = PLAIN["float32-sliced-axis-0"].build().x
    transposed = PLAIN["float32-transposed-per-tensor"].build().x
    expanded = PLAIN["float32-expanded-axis-0"].build().x
    channels_last = PLAIN["float16-channels-last-axis-1"].build().x
    channels_last_3d = PLAIN["bfloat16-channels-last-3d-axis-1"].build().x

    assert sliced.stride()[-1] == 2
    assert transposed.stride() == (1, 33)
    assert expanded.stride()[0] == 0
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert not channels_last.is_contiguous()
    assert channels_last_3d.is_contiguous(memory_format=torch.channels_last_3d)
    assert not channels_last_3d.is_contiguous()


def test_shape_cases_have_their_shape() -> None:
    assert PLAIN["float64-scalar-per-tensor"].build().x.dim() == 0
    assert PLAIN["float32-empty-per-tensor"].build().x.numel() == 0
    empty_channels = PLAIN["float32-empty-zero-channels-axis-1"].build()
    assert empty_channels.x.shape == (3, 0, 4)
    assert empty_channels.scale.shape == (0,)


def test_build_deterministic() -> None:
    first = PLAIN["float32-random-axis-1"].build()
    second = PLAIN["float32-random-axis-1"].build()

    for name in ("x", "scale", "zero_point", "grad_output"):
        assert_identical(getattr(first, name), getattr(second, name), name)


def test_learnable_case_qparams_require_grad() -> None:
    inputs = LEARNABLE["float16-random-axis-0"].build()

    assert inputs.scale.requires_grad
    assert inputs.zero_point.requires_grad
    assert inputs.zero_point.dtype == torch.float32
    assert not inputs.x.requires_grad
    assert inputs.grad_factor == pytest.approx(0.03)
    assert len(inputs.arguments()) == 7


def test_plain_case_arguments_omit_grad_factor() -> None:
    inputs = PLAIN["float16-random-axis-0"].build()

    assert inputs.grad_factor is None
    assert len(inputs.arguments()) == 6
    assert inputs.zero_point.dtype == torch.int32


def test_mps_cases_leave_out_float64() -> None:
    dtypes = {case.dtype for case in kernel_cases(device="mps")}

    assert torch.float64 not in dtypes
    assert torch.bfloat16 in dtypes
