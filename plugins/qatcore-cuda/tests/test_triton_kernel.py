"""The Triton kernels in Triton's interpreter, on CPU tensors, match the reference bit for bit.

``fake_quantize_triton`` runs CPU tensors in Triton's interpreter, which
executes the kernels' Python source with NumPy, so these tests need Triton
but no GPU. The interpreter checks the kernels' arithmetic, rounding,
indexing and masking, not the code that Triton compiles for a GPU; the
tests marked for CUDA in ``test_cuda_fallback.py`` run on a GPU machine.

Every comparison uses ``qatcore.testing.assert_identical``: same dtype,
shape and bits at every element, NaN matching any NaN. Tests that take the
``block_size`` fixture run twice, with the default block and with blocks of
16 elements, so that small tensors span several programs and a ragged tail.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import qatcore
import qatcore.testing
import qatcore_cuda.kernel
from qatcore.testing import assert_identical
from qatcore_cuda import fake_quantize_triton

pytest.importorskip("triton", reason="the interpreter tests need Triton installed")

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

SHAPE = (3, 4, 5, 6)

AXES = {"per-tensor": None, "axis-0": 0, "axis-1": 1, "axis-last": 3}


def _sliced(x: torch.Tensor) -> torch.Tensor:
    # Every other element along the last dimension of a wider tensor: a view
    # with no flat memory order, which the kernel copies first.
    wide = torch.full((*x.shape[:-1], 2 * x.shape[-1]), 12345.0, dtype=x.dtype)
    wide[..., ::2] = x
    return wide[..., ::2]


LAYOUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "contiguous": lambda x: x.contiguous(),
    "channels-last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "permuted": lambda x: x.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2),
    "transposed": lambda x: x.transpose(1, 2),
    "sliced": _sliced,
}


@pytest.fixture(params=[None, 16], ids=["default-block", "blocks-of-16"])
def block_size(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.param is not None:
        monkeypatch.setattr(qatcore_cuda.kernel, "BLOCK_SIZE", request.param)


def run_with_grad(
    kernel: Callable[..., torch.Tensor],
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_range: tuple[int, int],
    axis: int | None,
    grad_output: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    # detach() keeps x's strides, so each kernel gets the layout under test.
    leaf = x.detach().requires_grad_()
    out = kernel(leaf, scale, zero_point, *quant_range, axis)
    out.backward(grad_output)
    assert leaf.grad is not None
    return out.detach(), leaf.grad


def assert_matches_reference(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_range: tuple[int, int],
    axis: int | None,
    grad_output: torch.Tensor,
) -> None:
    """Assert equal outputs and gradients with grad on, and equal outputs with grad off."""
    args = (x, scale, zero_point, quant_range, axis, grad_output)
    out, grad = run_with_grad(fake_quantize_triton, *args)
    expected_out, expected_grad = run_with_grad(qatcore.fake_quantize_reference, *args)
    assert_identical(out, expected_out, "output")
    assert_identical(grad, expected_grad, "input gradient")

    with torch.no_grad():
        out_no_grad = fake_quantize_triton(x, scale, zero_point, *quant_range, axis)
    assert_identical(out_no_grad, expected_out, "output without grad")


def qparams_for(
    x: torch.Tensor, axis: int | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    channels = 1 if axis is None else x.shape[axis]
    scale = torch.rand(channels, generator=generator) * 0.04 + 0.01
    zero_point = torch.randint(-10, 10, (channels,), generator=generator, dtype=torch.int32)
    if axis is None:
        return scale.reshape(()), zero_point.reshape(())
    return scale, zero_point


def adversarial_x(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Return random values with inf, -inf, NaN, huge, tiny and signed zeros mixed in."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    flat = x.view(-1)
    specials = [math.inf, -math.inf, math.nan, 1e30, -1e30, 1e-30, -1e-30, 0.0, -0.0]
    positions = torch.randperm(flat.numel(), generator=generator)[: len(specials)]
    flat[positions] = torch.tensor(specials, dtype=torch.float64)
    return x.to(dtype)


# -- random and adversarial values in every dtype, axis and layout ------------------


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
@pytest.mark.parametrize("axis", list(AXES.values()), ids=list(AXES))
def test_adversarial_input_matches_reference(
    dtype: torch.dtype, layout: str, axis: int | None
) -> None:
    generator = torch.Generator().manual_seed(7)
    x = LAYOUTS[layout](adversarial_x(SHAPE, dtype, seed=1))
    scale, zero_point = qparams_for(x, axis, generator)
    grad_output = torch.randn(x.shape, generator=generator).to(dtype)

    assert_matches_reference(x, scale, zero_point, (-128, 127), axis, grad_output)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("axis", list(AXES.values()), ids=list(AXES))
def test_small_blocks_match_reference(
    dtype: torch.dtype, axis: int | None, block_size: None
) -> None:
    generator = torch.Generator().manual_seed(8)
    x = adversarial_x((2, 5, 3, 7), dtype, seed=2).contiguous(memory_format=torch.channels_last)
    scale, zero_point = qparams_for(x, axis, generator)
    grad_output = torch.randn(x.shape, generator=generator).to(dtype)

    assert_matches_reference(x, scale, zero_point, (0, 255), axis, grad_output)


@pytest.mark.parametrize("axis", [None, 0, 1], ids=["per-tensor", "axis-0", "axis-1"])
def test_expanded_input_matches_reference(axis: int | None) -> None:
    generator = torch.Generator().manual_seed(3)
    x = (torch.randn(1, 37, generator=generator) * 4).expand(5, 37)  # stride 0 along dim 0
    scale, zero_point = qparams_for(x, axis, generator)
    grad_output = torch.randn(x.shape, generator=generator)

    assert_matches_reference(x, scale, zero_point, (-8, 7), axis, grad_output)


def test_64_bit_offsets_match_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tensors of 2**31 elements do not fit a test; a lower threshold makes the
    # kernels take their 64-bit offset branch on a small one.
    monkeypatch.setattr(qatcore_cuda.kernel, "_INT32_MAX", 100)
    monkeypatch.setattr(qatcore_cuda.kernel, "BLOCK_SIZE", 32)
    generator = torch.Generator().manual_seed(4)
    x = adversarial_x((4, 9, 6), torch.float32, seed=3)
    scale, zero_point = qparams_for(x, 1, generator)

    assert_matches_reference(x, scale, zero_point, (-128, 127), 1, torch.randn(x.shape))


# -- hand-computed numerics ---------------------------------------------------------


def test_gradient_mask_follows_rounded_code(block_size: None) -> None:
    codes = torch.tensor([-9, -8.6, -8.4, -8, -1, 0, 7, 7.4, 7.6, 9])
    x = (codes * 0.1).requires_grad_()

    y = fake_quantize_triton(x, torch.tensor(0.1), torch.tensor(0), -8, 7)
    y.sum().backward()

    assert x.grad is not None
    assert x.grad.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]
    expected = qatcore.fake_quantize_reference(x, torch.tensor(0.1), torch.tensor(0), -8, 7)
    assert_identical(y, expected, "output")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_ties_round_half_to_even(dtype: torch.dtype) -> None:
    # A scale of 2**-4 makes x * (1 / scale) exact, so every value is a tie.
    halves = torch.arange(-12, 12, dtype=torch.float64) + 0.5
    x = (halves * 2.0**-4).to(dtype)

    y = fake_quantize_triton(x, torch.tensor(2.0**-4), torch.tensor(0), -128, 127)

    # Python's round() rounds half to even, as torch.round does.
    expected_codes = [float(round(value)) for value in halves.tolist()]
    assert (y.double() * 16).tolist() == expected_codes
    expected = qatcore.fake_quantize_reference(x, torch.tensor(2.0**-4), torch.tensor(0), -128, 127)
    assert_identical(y, expected, "output")


@pytest.mark.parametrize(
    ("zero_point", "expected"),
    [(2.7, 3), (2.5, 2), (3.5, 4), (-0.7, 0), (300.0, 255)],
    ids=["up", "tie-down", "tie-up", "negative", "above-range"],
)
def test_float_zero_point_acts_as_rounded_clamped_integer(zero_point: float, expected: int) -> None:
    x = torch.linspace(-2, 14, 41)
    scale = torch.tensor(0.05)

    per_tensor = fake_quantize_triton(x, scale, torch.tensor(zero_point), 0, 255)
    as_integer = fake_quantize_triton(x, scale, torch.tensor(expected, dtype=torch.int32), 0, 255)
    per_channel = fake_quantize_triton(
        x.reshape(1, -1).expand(3, -1).contiguous(),
        scale.repeat(3),
        torch.full((3,), zero_point),
        0,
        255,
        axis=0,
    )

    assert_identical(per_tensor, as_integer, "per-tensor output")
    for channel in range(3):
        assert_identical(per_channel[channel], as_integer, f"channel {channel} output")
    reference = qatcore.fake_quantize_reference(x, scale, torch.tensor(zero_point), 0, 255)
    assert_identical(per_tensor, reference, "reference output")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_non_finite_input_clamps_or_stays_nan(dtype: torch.dtype) -> None:
    x = torch.tensor([math.inf, -math.inf, math.nan, 0.25], dtype=dtype, requires_grad=True)

    y = fake_quantize_triton(x, torch.tensor(0.1), torch.tensor(0), -8, 7)
    y.backward(torch.ones(4, dtype=dtype))

    assert y[0].item() == pytest.approx(0.7, rel=1e-2)
    assert y[1].item() == pytest.approx(-0.8, rel=1e-2)
    assert math.isnan(y[2].item())
    assert x.grad is not None
    assert x.grad.tolist() == [0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_non_finite_gradient_matches_reference(dtype: torch.dtype, block_size: None) -> None:
    x = torch.tensor([-20.0, -1.0, 0.0, 1.0, 20.0, 0.5, -20.0, 20.0, 3.0], dtype=dtype)
    grad_output = torch.tensor(
        [math.inf, math.inf, -math.inf, math.nan, math.nan, -1.0, -2.0, -math.inf, 1e30],
        dtype=dtype,
    )
    # Outside the range an inf gradient becomes NaN and -2.0 becomes -0.0.
    x, grad_output = x.repeat(5), grad_output.repeat(5)

    assert_matches_reference(x, torch.tensor(0.1), torch.tensor(0), (-128, 127), None, grad_output)


SHAPES = {
    "empty": ((0,), None),
    "empty-axis-0": ((3, 0, 4), 0),
    "zero-channels": ((3, 0, 4), 1),
    "scalar": ((), None),
    "vector": ((7,), 0),
    "five-d": ((2, 3, 2, 3, 2), 2),
}


@pytest.mark.parametrize(("shape", "axis"), list(SHAPES.values()), ids=list(SHAPES))
def test_shapes_match_reference(shape: tuple[int, ...], axis: int | None) -> None:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=generator) * 3
    scale, zero_point = qparams_for(x, axis, generator)

    assert_matches_reference(x, scale, zero_point, (-128, 127), axis, torch.randn(shape))


def test_output_keeps_channels_last_layout() -> None:
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)

    y = fake_quantize_triton(x, torch.tensor(0.05), torch.tensor(0), -128, 127)

    assert y.is_contiguous(memory_format=torch.channels_last)
    assert y.stride() == x.stride()


def test_no_grad_call_builds_no_graph() -> None:
    x = torch.randn(10, requires_grad=True)

    with torch.no_grad():
        y = fake_quantize_triton(x, torch.tensor(0.05), torch.tensor(0), -128, 127)

    assert y.grad_fn is None
    assert not y.requires_grad


def test_scale_requiring_grad_builds_graph_like_reference() -> None:
    x = torch.randn(10)
    scale = torch.tensor(0.05, requires_grad=True)

    y = fake_quantize_triton(x, scale, torch.tensor(0), -128, 127)
    expected = qatcore.fake_quantize_reference(x, scale, torch.tensor(0), -128, 127)
    y.sum().backward()

    assert y.requires_grad == expected.requires_grad
    assert scale.grad is None


# -- argument checks ----------------------------------------------------------------

INVALID_ARGUMENTS = {
    "zero-scale": (torch.tensor(0.0), torch.tensor(0), -8, 7, None),
    "nan-scale": (torch.tensor(math.nan), torch.tensor(0), -8, 7, None),
    "empty-range": (torch.tensor(0.1), torch.tensor(0), 5, 5, None),
    "two-scales-per-tensor": (torch.tensor([0.1, 0.2]), torch.tensor(0), -8, 7, None),
    "axis-out-of-range": (torch.ones(3), torch.zeros(3), -8, 7, 2),
    "channel-count-mismatch": (torch.ones(4), torch.zeros(4), -8, 7, 0),
}


@pytest.mark.parametrize("arguments", list(INVALID_ARGUMENTS.values()), ids=list(INVALID_ARGUMENTS))
def test_invalid_arguments_raise_like_reference(arguments: tuple[object, ...]) -> None:
    x = torch.randn(3, 4)

    with pytest.raises(ValueError) as reference_error:
        qatcore.fake_quantize_reference(x, *arguments)
    with pytest.raises(ValueError) as triton_error:
        fake_quantize_triton(x, *arguments)

    assert str(triton_error.value) == str(reference_error.value)


def test_unsupported_dtype_raises() -> None:
    x = torch.randn(4).to(torch.float8_e4m3fn)

    with pytest.raises(TypeError, match=r"got torch\.float8_e4m3fn; call fake_quantize_cuda"):
        fake_quantize_triton(x, torch.tensor(0.1), torch.tensor(0), -8, 7)


def test_unsupported_device_raises() -> None:
    x = torch.empty(4, device="meta")

    with pytest.raises(ValueError, match="got a tensor on meta"):
        fake_quantize_triton(x, torch.tensor(0.1), torch.tensor(0), -8, 7)


# -- the interpreter stays contained --------------------------------------------------


def test_interpreter_leaves_environment_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    fake_quantize_triton(torch.randn(5), torch.tensor(0.1), torch.tensor(0), -8, 7)

    assert "TRITON_INTERPRET" not in os.environ


def test_compiled_kernels_stay_compiled() -> None:
    import triton

    fake_quantize_triton(torch.randn(5), torch.tensor(0.1), torch.tensor(0), -8, 7)
    compiled = qatcore_cuda.kernel._kernels("cuda")
    interpreted = qatcore_cuda.kernel._kernels("cpu")

    if os.environ.get("TRITON_INTERPRET") != "1":
        assert isinstance(compiled.fake_quantize_kernel, triton.JITFunction)
        assert isinstance(compiled.masked_gradient_kernel, triton.JITFunction)
    assert type(interpreted.fake_quantize_kernel).__name__ == "InterpretedFunction"
    assert interpreted is not compiled


# Run in a child Python, where Triton is not imported yet when the
# interpreted kernels are loaded.
FIRST_IMPORT_IN_LOADER = """\
import os

import qatcore_cuda.kernel

qatcore_cuda.kernel._kernels("cpu")

import triton
import triton.language.standard

assert "TRITON_INTERPRET" not in os.environ, "TRITON_INTERPRET is still set"
assert isinstance(triton.language.standard.cdiv, triton.JITFunction), "tl.cdiv is interpreted"
"""


def test_interpreter_load_keeps_triton_compiled(tmp_path: Path) -> None:
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}

    completed = subprocess.run(
        [sys.executable, "-c", FIRST_IMPORT_IN_LOADER],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr


# -- the conformance suite ------------------------------------------------------------

# The interpreter's cost grows with the number of programs, so the few
# cases above LARGE_ELEMENTS elements run with blocks of 2**16 elements,
# 33 programs each, instead of about 2,000.
LARGE_CASE_BLOCK = 2**16


@pytest.mark.parametrize("case", qatcore.testing.kernel_cases(), ids=str)
def test_conformance_case(
    case: qatcore.testing.KernelCase, monkeypatch: pytest.MonkeyPatch
) -> None:
    if case.build().x.numel() > qatcore.testing.LARGE_ELEMENTS:
        monkeypatch.setattr(qatcore_cuda.kernel, "BLOCK_SIZE", LARGE_CASE_BLOCK)

    qatcore.testing.check_kernel_case(fake_quantize_triton, case)
