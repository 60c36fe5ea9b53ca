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
    check_deployed_output,
    check_kernel,
    check_kernel_case,
    deploy_cases,
    kernel_cases,
    train_deploy_case,
)

Kernel = Callable[..., torch.Tensor]

PLAIN_CASES = kernel_cases()
LEARNABLE_CASES = kernel_cases(learnable=True)
PLAIN = {case.name: case for case in PLAIN_CASES}
LEARNABLE = {case.name: case for case in LEARNABLE_CASES}


# -- deliberately wrong kernels -----------------------------------------------------


def _round_half_away_from_zero(values: torch.Tensor) -> torch.Tensor:
    return torch.sign(values) * torch.floor(torch.abs(values) + 0.5)


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    return torch.empty(shape, device="meta").stride()


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
        if bug == "int64 zero point read as int32" and zero_point.dtype == torch.int64:
            # Reads the zero point's memory as int32, as a kernel written for
            # int32 would, which gives the low and high halves of the first values.
            zero_point = zero_point.reshape(-1).view(torch.int32)[: zero_point.numel()]
            zero_point = zero_point.reshape(scale.shape)
        scale_c, inv_scale, zero_point_c = qatcore.prepare_qparams(
            x, scale, zero_point, quant_min, quant_max, axis
        )
        if bug == "scale in the compute dtype":
            # Skips the reference's rounding of the scale to float32.
            scale_c = scale.to(scale_c.dtype).reshape(scale_c.shape)
            inv_scale = torch.reciprocal(scale_c)
        if bug == "range in float32":
            quant_min = torch.tensor(quant_min, dtype=torch.float32).item()
            quant_max = torch.tensor(quant_max, dtype=torch.float32).item()
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
        ctx.bug = bug
        if bug == "output in the compute dtype":
            return output
        if bug == "saturating float16 cast" and x.dtype == torch.float16:
            output = output.clamp(-65504.0, 65504.0)
        return output.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (inside,) = ctx.saved_tensors
        if ctx.bug == "contiguous output gradient":
            # Reads the gradient's memory in row-major order whatever its strides.
            shape = grad_output.shape
            grad_output = grad_output.as_strided(shape, _contiguous_strides(shape))
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


def contiguous_output_kernel(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None = None,
) -> torch.Tensor:
    return qatcore.fake_quantize_reference(
        x.contiguous(), scale, zero_point, quant_min, quant_max, axis
    )


def non_leaf_kernel(x: torch.Tensor, *args: Any) -> torch.Tensor:
    """Return the reference's results, but pass the gradient outside the range for a non-leaf x."""
    if x.grad_fn is None:
        return qatcore.fake_quantize_reference(x, *args)
    return wrong_kernel("gradient outside the range")(x, *args)


def float32_scale_check_kernel(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None = None,
) -> torch.Tensor:
    # Checks the scale after its cast to float32, where 1e39 is inf.
    qatcore.check_qparams(x, scale.to(torch.float32), zero_point, quant_min, quant_max, axis)
    return qatcore.fake_quantize_reference(x, scale, zero_point, quant_min, quant_max, axis)


def float32_qparams_only_kernel(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None = None,
) -> torch.Tensor:
    if scale.dtype != torch.float32:
        raise TypeError(f"expected a float32 scale, got {scale.dtype}")
    if zero_point.dtype not in (torch.int32, torch.float32):
        raise TypeError(f"expected an int32 or float32 zero point, got {zero_point.dtype}")
    return qatcore.fake_quantize_reference(x, scale, zero_point, quant_min, quant_max, axis)


def learnable_float32_scale_check_kernel(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None,
    grad_factor: float,
) -> torch.Tensor:
    # Checks the scale after its cast to float32, where 1e39 is inf.
    qatcore.check_qparams(
        x, scale.detach().to(torch.float32), zero_point, quant_min, quant_max, axis, learnable=True
    )
    return qatcore.fake_quantize_learnable_reference(
        x, scale, zero_point, quant_min, quant_max, axis, grad_factor
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
    "contiguous-output": (
        contiguous_output_kernel,
        "float32-channels-last-axis-1",
        r"with gradients: output strides differ: got \(210, 35, 7, 1\), "
        r"expected \(210, 1, 42, 6\)",
    ),
    "contiguous-output-3d": (
        contiguous_output_kernel,
        "bfloat16-channels-last-3d-per-tensor",
        r"with gradients: output strides differ: got \(360, 90, 30, 6, 1\), "
        r"expected \(360, 1, 120, 24, 4\)",
    ),
    "non-leaf-gradient": (
        non_leaf_kernel,
        "float32-range-edges-int4-per-tensor",
        r"with a non-leaf input: input gradient differs at index \(0,\): got .*, expected -?0\.0 ",
    ),
    "transposed-grad-output": (
        wrong_kernel("contiguous output gradient"),
        "float32-transposed-grad-output-axis-0",
        r"with gradients: input gradient differs at index \(\d+, \d+\)",
    ),
    "channels-last-grad-output": (
        wrong_kernel("contiguous output gradient"),
        "float16-channels-last-grad-output-axis-1",
        r"with gradients: input gradient differs at index \(\d+, \d+, \d+, \d+\)",
    ),
    "expanded-grad-output": (
        wrong_kernel("contiguous output gradient"),
        "float32-expanded-grad-output-axis-1",
        r"with gradients: the kernel raised RuntimeError: .*out of bounds",
    ),
    "float64-scale-unrounded": (
        wrong_kernel("scale in the compute dtype"),
        "float64-float64-scale-axis-0",
        r"with gradients: output differs at index \(\d+, \d+\)",
    ),
    "float64-scale-checked-in-float32": (
        float32_scale_check_kernel,
        "float32-float64-scale-1e39-per-tensor",
        r"with gradients: the kernel raised ValueError: .*got \[inf\]",
    ),
    "float64-tiny-scale-checked-in-float32": (
        float32_scale_check_kernel,
        "float16-float64-scale-1e-50-per-tensor",
        r"with gradients: the kernel raised ValueError: .*got \[0\.0\]",
    ),
    "float16-scale-rejected": (
        float32_qparams_only_kernel,
        "float32-float16-scale-axis-0",
        r"with gradients: the kernel raised TypeError: "
        r"expected a float32 scale, got torch\.float16",
    ),
    "float16-zero-point-rejected": (
        float32_qparams_only_kernel,
        "bfloat16-float16-zero-point-per-tensor",
        r"the kernel raised TypeError: expected an int32 or float32 zero point, got torch\.float16",
    ),
    "int64-zero-point-as-int32": (
        wrong_kernel("int64 zero point read as int32"),
        "float32-int64-zero-point-axis-0",
        r"with gradients: output differs at index \(1, \d+\)",
    ),
    "float16-saturating-cast": (
        wrong_kernel("saturating float16 cast"),
        "float16-overflow-per-tensor",
        r"with gradients: output differs at index \(0,\): got 65504\.0 \(bits 0x7bff\), "
        r"expected inf \(bits 0x7c00\)",
    ),
    "float64-int32-range-in-float32": (
        wrong_kernel("range in float32"),
        "float64-range-int32-per-tensor",
        r"with gradients: output differs at index \(0,\): got 2147483648\.0 .*, "
        r"expected 2147483647\.0 ",
    ),
    "float64-wide-range-in-float32": (
        wrong_kernel("range in float32"),
        "float64-range-0-to-16777217-per-tensor",
        r"with gradients: output differs at index \(0,\): got 16777216\.0 .*, "
        r"expected 16777217\.0 ",
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
    "float64-scale-checked-in-float32": (
        learnable_float32_scale_check_kernel,
        "float32-float64-scale-1e39-per-tensor",
        r"with gradients: the kernel raised ValueError: .*got \[inf\]",
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
        "transposed-grad-output-axis-0",
        "channels-last-grad-output-axis-1",
        "expanded-grad-output-per-tensor",
        "expanded-grad-output-axis-1",
        *(f"{bits}-per-tensor" for bits in ("int2", "int4", "int8", "int16")),
        *(f"{bits}-axis-0" for bits in ("uint2", "uint4", "uint8", "uint16")),
        "float64-scale-per-tensor",
        "float64-scale-axis-0",
        "float16-scale-per-tensor",
        "float16-scale-axis-0",
        "float16-zero-point-per-tensor",
        "float16-zero-point-axis-0",
        "float64-scale-1e39-per-tensor",
        "float64-scale-1e-50-per-tensor",
        "float64-scales-1e39-1e-50-axis-0",
    ]

    for dtype in ("float32", "float64", "float16", "bfloat16"):
        for feature in features:
            assert f"{dtype}-{feature}" in names
    assert "float32-large-axis-1" in names
    assert "float32-invalid-scale-nan-axis-0" in names
    assert "float16-overflow-per-tensor" in names
    assert "float16-overflow-axis-0" in names
    assert "float64-range-int32-per-tensor" in names
    assert "float64-range-int32-axis-0" in names
    assert "float64-range-0-to-16777217-per-tensor" in names


def test_int64_zero_point_cases_plain_only() -> None:
    for dtype in ("float32", "float64", "float16", "bfloat16"):
        for axis in ("per-tensor", "axis-0"):
            name = f"{dtype}-int64-zero-point-{axis}"
            assert name in PLAIN
            assert name not in LEARNABLE


def test_invalid_scale_cases_expect_value_error() -> None:
    prefixes = ("float32-scale-", "float32-invalid-scale-")
    plain = {name: case.raises for name, case in PLAIN.items() if name.startswith(prefixes)}
    learnable = {name: case.raises for name, case in LEARNABLE.items() if name.startswith(prefixes)}

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


def test_grad_output_cases_have_their_layout() -> None:
    transposed = PLAIN["float32-transposed-grad-output-axis-0"].build()
    channels_last = LEARNABLE["float16-channels-last-grad-output-axis-1"].build()
    expanded = PLAIN["bfloat16-expanded-grad-output-axis-1"].build()

    assert transposed.x.is_contiguous()
    assert transposed.grad_output.stride() == (1, 33)
    assert channels_last.x.is_contiguous()
    assert channels_last.grad_output.is_contiguous(memory_format=torch.channels_last)
    assert not channels_last.grad_output.is_contiguous()
    assert expanded.x.is_contiguous()
    assert expanded.grad_output.shape == expanded.x.shape
    assert expanded.grad_output.stride() == (0, 1)


@pytest.mark.parametrize("cases", [PLAIN, LEARNABLE], ids=["plain", "learnable"])
def test_qparam_dtype_cases_have_their_dtypes(cases: dict[str, KernelCase]) -> None:
    float64_scale = cases["float32-float64-scale-axis-0"].build()
    float16_scale = cases["float64-float16-scale-per-tensor"].build()
    float16_zero_point = cases["float16-float16-zero-point-axis-0"].build()

    assert float64_scale.scale.dtype == torch.float64
    # Scales that float32 cannot represent, so that the cast to float32 matters.
    assert not torch.equal(float64_scale.scale.float().double(), float64_scale.scale)
    assert float16_scale.scale.dtype == torch.float16
    assert float16_zero_point.zero_point.dtype == torch.float16
    assert float16_zero_point.scale.dtype == torch.float32


def test_int64_zero_point_case_dtype() -> None:
    inputs = PLAIN["float32-int64-zero-point-axis-0"].build()

    assert inputs.zero_point.dtype == torch.int64
    assert inputs.scale.dtype == torch.float32


def test_learnable_float16_zero_point_requires_grad() -> None:
    inputs = LEARNABLE["float32-float16-zero-point-per-tensor"].build()

    assert inputs.zero_point.dtype == torch.float16
    assert inputs.zero_point.requires_grad


@pytest.mark.parametrize(
    ("case_name", "scale_in_float32"),
    [
        ("float32-float64-scale-1e39-per-tensor", [math.inf]),
        ("float64-float64-scale-1e-50-per-tensor", [0.0]),
        ("float16-float64-scales-1e39-1e-50-axis-0", [0.1, math.inf, 0.0]),
    ],
)
def test_extreme_float64_scales_accepted(case_name: str, scale_in_float32: list[float]) -> None:
    case = PLAIN[case_name]
    inputs = case.build()

    output = qatcore.fake_quantize_reference(*inputs.arguments())

    assert case.raises is None
    assert LEARNABLE[case_name].raises is None
    assert inputs.scale.dtype == torch.float64
    assert inputs.scale.reshape(-1).float().tolist() == pytest.approx(scale_in_float32)
    assert output.shape == inputs.x.shape


def test_float16_overflow_case_gives_inf() -> None:
    inputs = PLAIN["float16-overflow-per-tensor"].build()

    output = qatcore.fake_quantize_reference(*inputs.arguments())

    assert inputs.x[0].item() == 65504.0
    assert output[0].item() == math.inf
    assert output[1].item() == -math.inf
    assert inputs.x.dtype == torch.float16


@pytest.mark.parametrize(
    ("case_name", "quant_range", "expected"),
    [
        ("float64-range-int32-per-tensor", (-(2**31), 2**31 - 1), 2**31 - 1),
        ("float64-range-0-to-16777217-per-tensor", (0, 2**24 + 1), 2**24 + 1),
    ],
)
def test_wide_range_case_needs_float64(
    case_name: str, quant_range: tuple[int, int], expected: int
) -> None:
    inputs = PLAIN[case_name].build()

    output = qatcore.fake_quantize_reference(*inputs.arguments())

    assert inputs.x.dtype == torch.float64
    assert (inputs.quant_min, inputs.quant_max) == quant_range
    # The first value clamps to, or equals, the range's top, which float32 cannot represent.
    assert output[0].item() == expected
    assert float(torch.tensor(expected, dtype=torch.float32)) != expected


def test_non_leaf_pass_keeps_dense_layout() -> None:
    calls: list[tuple[bool, tuple[int, ...]]] = []

    def recording_kernel(x: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append((x.grad_fn is not None, x.stride()))
        return qatcore.fake_quantize_reference(x, *args)

    for name in (
        "float32-random-axis-1",
        "float32-transposed-per-tensor",
        "float16-channels-last-axis-3",
        "bfloat16-channels-last-3d-axis-1",
        "float64-scalar-per-tensor",
    ):
        calls.clear()
        check_kernel_case(recording_kernel, PLAIN[name])

        non_leaf = [strides for has_grad_fn, strides in calls if has_grad_fn]
        assert non_leaf == [PLAIN[name].build().x.stride()]
        assert len(calls) == 4


def test_non_leaf_pass_catches_detached_output() -> None:
    # The kernel detaches x only where x has a grad_fn, so the leaf passes succeed.
    with pytest.raises(
        AssertionError,
        match=r"^case 'float32-random-per-tensor' with a non-leaf input: output requires_grad",
    ):
        check_kernel_case(
            lambda x, *args: (
                detached_kernel(x, *args)
                if x.grad_fn is not None
                else qatcore.fake_quantize_reference(x, *args)
            ),
            PLAIN["float32-random-per-tensor"],
        )


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(
    "case_name",
    [
        "random-axis-1",
        "transposed-axis-0",
        "channels-last-axis-3",
        "channels-last-3d-per-tensor",
        "scalar-per-tensor",
    ],
)
def test_reference_output_keeps_dense_layout(dtype: str, case_name: str) -> None:
    inputs = PLAIN[f"{dtype}-{case_name}"].build()

    output = qatcore.fake_quantize_reference(*inputs.arguments())

    assert output.stride() == inputs.x.stride()


def test_output_strides_not_compared_for_views() -> None:
    # The rule covers non-overlapping and dense inputs only, so a kernel may
    # return any layout for a sliced or expanded view.
    def transposed_output_kernel(x: torch.Tensor, *args: Any) -> torch.Tensor:
        output = qatcore.fake_quantize_reference(x, *args)
        if x.is_contiguous():
            return output
        return output.transpose(0, -1).contiguous().transpose(0, -1)

    for name in ("float32-sliced-axis-0", "float32-expanded-axis-1"):
        inputs = PLAIN[name].build()
        output = transposed_output_kernel(*inputs.arguments())
        expected = qatcore.fake_quantize_reference(*inputs.arguments())

        assert output.stride() != expected.stride()
        check_kernel_case(transposed_output_kernel, PLAIN[name])


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


def test_deploy_cases_cover_every_pattern() -> None:
    names = [case.name for case in deploy_cases()]

    assert len(names) == len(set(names))
    for pattern in ("conv", "conv-relu", "conv-bn", "conv-bn-relu"):
        for prefix in (pattern, pattern.replace("conv", "conv-transpose", 1)):
            assert [f"{prefix}{dims}d" in names for dims in (1, 2, 3)] == [True, True, True]
    for name in ("linear", "linear-relu", "linear-bn", "linear-bn-relu", "conv2d-no-bias"):
        assert name in names


def _deployed_qat_model() -> torch.nn.Module:
    pytest.importorskip("qatcore_conv")
    pytest.importorskip("qatcore_observers")
    pytest.importorskip("qatcore_x86")
    case = next(case for case in deploy_cases() if case.name == "conv2d")
    return train_deploy_case(case, qatcore.get_qconfig("x86"), steps=1)


def test_check_deployed_output_allows_one_step() -> None:
    qat = _deployed_qat_model()
    scale = float(qat[-1].output_fake_quant.scale)
    expected = qat(torch.randn(2, 2, 4, 4)).detach()
    shifted = expected.clone()
    shifted.view(-1)[0] += scale

    check_deployed_output(qat, expected, shifted)


def test_check_deployed_output_rejects_two_steps() -> None:
    qat = _deployed_qat_model()
    scale = float(qat[-1].output_fake_quant.scale)
    expected = qat(torch.randn(2, 2, 4, 4)).detach()
    shifted = expected.clone()
    shifted.view(-1)[0] += 2 * scale

    with pytest.raises(AssertionError, match="differs by 2 codes"):
        check_deployed_output(qat, expected, shifted)


def test_check_deployed_output_rejects_other_saturation() -> None:
    qat = _deployed_qat_model()
    scale = float(qat[-1].output_fake_quant.scale)
    expected = qat(torch.randn(2, 2, 4, 4)).detach()
    lower = expected - scale * (expected == expected.max())

    with pytest.raises(AssertionError, match="largest code"):
        check_deployed_output(qat, expected, lower)
