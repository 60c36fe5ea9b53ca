"""A conformance suite that checks fake-quant kernels against the reference kernels.

Every fake-quant kernel must match :func:`qatcore.fake_quantize_reference`
bit for bit, outputs and input gradients alike, and every learnable kernel
must match :func:`qatcore.fake_quantize_learnable_reference` in its output
and in the gradients of ``x``, ``scale`` and ``zero_point``. This module
provides the cases and the checks, so that a kernel plugin's test suite can
run them with pytest::

    @pytest.mark.parametrize("case", qatcore.testing.kernel_cases(), ids=str)
    def test_kernel_matches_reference(case):
        qatcore.testing.check_kernel_case(my_kernel, case)

Bit for bit means that two tensors have the same dtype, shape and device,
and the same bit pattern at every element, so ``-0.0`` differs from
``0.0``. The only exception is NaN: both tensors must have NaN at the same
places, but the NaN's sign and payload are not compared, because IEEE 754
does not fix them for the results of arithmetic and processors differ.
Where the input is non-overlapping and dense, the output must also have
the reference's strides, which are the input's.

It also provides :func:`deploy_cases`: one small float model for every
layer kind and fusion pattern that the first-party conv and linear plugins
swap, which a converter's or exporter's tests train, deploy and compare
with the QAT model.

The module depends on torch and the core only, not on pytest.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import torch
from torch import nn

from qatcore._reference import fake_quantize_learnable_reference, fake_quantize_reference
from qatcore._registry import Kernel

__all__ = [
    "DTYPES",
    "DeployCase",
    "KernelCase",
    "KernelInputs",
    "LARGE_ELEMENTS",
    "assert_identical",
    "check_kernel",
    "check_deployed_output",
    "check_kernel_case",
    "deploy_cases",
    "kernel_cases",
    "train_deploy_case",
]

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""Input dtypes the cases cover, by the name that starts each case's name."""

LARGE_ELEMENTS = 2**21
"""Elements that the large cases exceed, so that blocked code paths in fast kernels run."""

_INT8 = (-128, 127)
_UINT8 = (0, 255)
_BIT_WIDTHS = {
    "int2": (-2, 1),
    "uint2": (0, 3),
    "int4": (-8, 7),
    "uint4": (0, 15),
    "int8": _INT8,
    "uint8": _UINT8,
    "int16": (-32768, 32767),
    "uint16": (0, 65535),
}

# Integer codes x / scale at and around the edges of the range [-8, 7] with a
# scale of 0.1. The reference passes the gradient only where the rounded
# code lies inside the range: [0, 0, 1, 1, 1, 1, 1, 1, 0, 0].
_EDGE_CODES = (-9.0, -8.6, -8.4, -8.0, -1.0, 0.0, 7.0, 7.4, 7.6, 9.0)

# Float zero points that a kernel must round half to even and clamp to
# [0, 255] before use: to 3, 2, 4, 0 and 255.
_FLOAT_ZERO_POINTS = (2.7, 2.5, 3.5, -0.7, 300.0)

_RANDOM_SHAPE = (4, 6, 5, 7)
_SLICE_FILL = 12345.0


@attrs.frozen(kw_only=True)
class KernelInputs:
    """The arguments of one kernel call, and the output gradient for its backward pass.

    Attributes:
        x: Input of the case's dtype and layout. It does not require a gradient.
        scale: Scale, ``()`` per-tensor or ``(C,)`` per-channel: float32,
            float64 or float16. For learnable cases a leaf that requires a
            gradient.
        zero_point: Zero point of the same shape: int32, int64, float32 or
            float16 for plain cases. For learnable cases a float leaf that
            requires a gradient, float32 where the case's zero point is an
            integer.
        quant_min: Smallest integer code.
        quant_max: Largest integer code.
        axis: ``None`` for per-tensor, else the channel axis of ``x``.
        grad_output: Gradient of the output in ``x``'s dtype and shape,
            contiguous unless the case gives it a layout.
        grad_factor: Factor of the scale and zero-point gradients; ``None``
            for plain cases.
    """

    x: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    quant_min: int
    quant_max: int
    axis: int | None
    grad_output: torch.Tensor
    grad_factor: float | None = None

    def arguments(self, x: torch.Tensor | None = None) -> tuple[Any, ...]:
        """Return the positional arguments of the kernel call, with ``x`` replaced if given."""
        arguments = (
            self.x if x is None else x,
            self.scale,
            self.zero_point,
            self.quant_min,
            self.quant_max,
            self.axis,
        )
        if self.grad_factor is None:
            return arguments
        return (*arguments, self.grad_factor)


@attrs.frozen(kw_only=True)
class _Values:
    """A case's tensors on the CPU, before the cast to the case's dtype and the layout."""

    x: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    grad_output: torch.Tensor


_ValuesFactory = Callable[[torch.Generator], _Values]
_Layout = Callable[[torch.Tensor], torch.Tensor]


@attrs.frozen(kw_only=True)
class KernelCase:
    """One conformance case: a named input, its qparams and what the kernel must do with them.

    :meth:`build` creates the tensors, the same on every call and every
    device, from a generator seeded with the case's name. ``str(case)`` is
    the name, so ``ids=str`` gives pytest readable test ids.

    Attributes:
        name: Readable, unique name, such as ``"float16-ties-int4-per-tensor"``.
        dtype: Dtype of ``x`` and of the output gradient.
        quant_min: Smallest integer code.
        quant_max: Largest integer code.
        axis: ``None`` for per-tensor, else the channel axis of ``x``.
        learnable: Whether the case is for learnable kernels.
        grad_factor: Factor of the scale and zero-point gradients; used by
            learnable cases only.
        raises: The exception the reference raises on these inputs, and the
            kernel must raise, or ``None`` when the call must succeed.
        values: Builds the CPU tensors from a seeded generator.
        layout: Turns ``x``, on the target device, into the view or memory
            format under test; ``None`` keeps it contiguous.
        grad_layout: Turns the output gradient into the view or memory
            format under test, as ``layout`` does ``x``.
    """

    name: str
    dtype: torch.dtype
    quant_min: int
    quant_max: int
    axis: int | None
    learnable: bool = False
    grad_factor: float = 1.0
    raises: type[Exception] | None = None
    values: _ValuesFactory = attrs.field(eq=False, repr=False)
    layout: _Layout | None = attrs.field(default=None, eq=False, repr=False)
    grad_layout: _Layout | None = attrs.field(default=None, eq=False, repr=False)

    def __str__(self) -> str:
        return self.name

    def build(self, device: str | torch.device = "cpu") -> KernelInputs:
        """Create the case's tensors on ``device``, afresh on every call."""
        return self._inputs(self._values(), device)

    def _values(self) -> _Values:
        generator = torch.Generator().manual_seed(zlib.crc32(self.name.encode()))
        return self.values(generator)

    def _inputs(self, values: _Values, device: str | torch.device) -> KernelInputs:
        """Copy ``values`` to ``device`` in the case's dtypes and layouts."""
        x = values.x.to(device=device, dtype=self.dtype, copy=True)
        if self.layout is not None:
            x = self.layout(x)
        grad_output = values.grad_output.to(device=device, dtype=self.dtype, copy=True)
        if self.grad_layout is not None:
            grad_output = self.grad_layout(grad_output)
        scale = values.scale.to(device=device, copy=True)
        zero_point = values.zero_point.to(device=device, copy=True)
        if self.learnable:
            scale.requires_grad_()
            # Only a float tensor can require a gradient.
            if not zero_point.dtype.is_floating_point:
                zero_point = zero_point.to(torch.float32)
            zero_point.requires_grad_()
        return KernelInputs(
            x=x,
            scale=scale,
            zero_point=zero_point,
            quant_min=self.quant_min,
            quant_max=self.quant_max,
            axis=self.axis,
            grad_output=grad_output,
            grad_factor=self.grad_factor if self.learnable else None,
        )


# -- comparison ---------------------------------------------------------------------

_BIT_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _mismatch(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Return where two CPU tensors of one dtype and shape differ, NaN matching any NaN."""
    if not expected.dtype.is_floating_point:
        return actual != expected
    bits = _BIT_DTYPES[expected.element_size()]
    actual_bits, expected_bits = actual.view(bits), expected.view(bits)
    if torch.equal(actual_bits, expected_bits):
        return torch.zeros_like(expected, dtype=torch.bool)
    both_nan = torch.isnan(actual) & torch.isnan(expected)
    return (actual_bits != expected_bits) & ~both_nan


def _describe(value: torch.Tensor) -> str:
    """Format a 0-dim CPU tensor as its value and, for floats, its bit pattern."""
    if not value.dtype.is_floating_point:
        return repr(value.item())
    size = value.element_size()
    bits = value.view(_BIT_DTYPES[size]).item() & ((1 << (8 * size)) - 1)
    return f"{value.item()!r} (bits 0x{bits:0{2 * size}x})"


def assert_identical(actual: object, expected: torch.Tensor, name: str = "tensor") -> None:
    """Assert that ``actual`` equals ``expected`` bit for bit, NaN matching any NaN.

    Args:
        actual: The tensor under test.
        expected: The tensor it must equal.
        name: Name of the result, which starts the message.

    Raises:
        AssertionError: ``actual`` is no tensor, or differs in dtype, shape,
            device or the bits of an element. The message names the first
            differing index, both values and the count of differing elements.
    """
    if not isinstance(actual, torch.Tensor):
        raise AssertionError(f"{name}: expected a tensor, got {type(actual).__name__}")
    for attribute in ("dtype", "shape", "device"):
        got, want = getattr(actual, attribute), getattr(expected, attribute)
        if got != want:
            raise AssertionError(f"{name}: {attribute} differs: got {got}, expected {want}")

    actual_cpu = actual.detach().cpu()
    expected_cpu = expected.detach().cpu()
    mismatch = _mismatch(actual_cpu, expected_cpu)
    if not bool(mismatch.any()):
        return
    index = tuple(mismatch.nonzero()[0].tolist())
    raise AssertionError(
        f"{name} differs at index {index}: got {_describe(actual_cpu[index])}, expected "
        f"{_describe(expected_cpu[index])}; {int(mismatch.sum())} of {mismatch.numel()} "
        "elements differ"
    )


# -- checks -------------------------------------------------------------------------


@attrs.frozen
class _Pass:
    """One way to call a kernel on a case.

    Attributes:
        description: Words that name the pass in a failure message.
        grad_enabled: Whether grad mode is on.
        x_requires_grad: Whether the leaf ``x`` requires a gradient.
        non_leaf: Whether the kernel receives a copy of the leaf that has a
            ``grad_fn``, as a layer's output has, in place of the leaf.
    """

    description: str
    grad_enabled: bool
    x_requires_grad: bool
    non_leaf: bool = False


_PASSES = (
    _Pass("with gradients", grad_enabled=True, x_requires_grad=True),
    _Pass("with grad mode off", grad_enabled=False, x_requires_grad=True),
    _Pass("with an input that does not require grad", grad_enabled=True, x_requires_grad=False),
    _Pass("with a non-leaf input", grad_enabled=True, x_requires_grad=True, non_leaf=True),
)


def _is_dense(tensor: torch.Tensor) -> bool:
    """Return whether ``tensor`` has elements and is non-overlapping and dense.

    Such a tensor's elements fill one block of memory, each element once, in
    some order of its dimensions. Dimensions of size 1 do not change that
    order, so their strides are ignored.
    """
    if tensor.numel() == 0:
        return False
    next_stride = 1
    for stride, size in sorted(zip(tensor.stride(), tensor.shape)):
        if size == 1:
            continue
        if stride != next_stride:
            return False
        next_stride *= size
    return True


def _layout_strides(tensor: torch.Tensor) -> tuple[int | None, ...]:
    """Return ``tensor``'s strides with ``None`` for dimensions of size 1, which set no order."""
    return tuple(
        stride if size != 1 else None for stride, size in zip(tensor.stride(), tensor.shape)
    )


def _run(kernel: Kernel, inputs: KernelInputs, mode: _Pass) -> dict[str, Any]:
    """Call ``kernel`` on ``inputs`` in ``mode`` and return its results by name.

    The results are the output, whether it requires a gradient, the output's
    strides where ``x`` is dense, and the gradients that a backward pass
    gives, where the output has a graph. The input gradient is the leaf's,
    also when the kernel receives a non-leaf copy of it.
    """
    # detach() keeps x's strides, so the kernel receives the layout under test.
    leaf = inputs.x.detach().requires_grad_(mode.x_requires_grad)
    x = leaf
    if mode.non_leaf:
        # A dense leaf's copy has the leaf's strides. A sliced or expanded
        # leaf's copy is contiguous, so the leaf passes test those views.
        x = leaf.clone(memory_format=torch.preserve_format)
    with torch.set_grad_enabled(mode.grad_enabled):
        output = kernel(*inputs.arguments(x))
    results: dict[str, Any] = {"output": output}
    if not isinstance(output, torch.Tensor):
        return results
    results["output requires_grad"] = output.requires_grad
    # The reference keeps a dense input's layout in its output, so a kernel
    # must too. For other inputs the output's layout is free.
    if _is_dense(x):
        results["output strides"] = _layout_strides(output)

    # An output without a graph gets no backward pass; the comparison then
    # reports that it does not require a gradient where the reference's does.
    learnable = inputs.grad_factor is not None
    if output.requires_grad and (mode.x_requires_grad or learnable):
        output.backward(inputs.grad_output)
        if mode.x_requires_grad:
            results["input gradient"] = leaf.grad
        if learnable:
            results["scale gradient"] = inputs.scale.grad
            results["zero-point gradient"] = inputs.zero_point.grad
    return results


def _compare(case: KernelCase, mode: _Pass, result: str, actual: Any, expected: Any) -> None:
    prefix = f"case {case.name!r} {mode.description}"
    if isinstance(expected, tuple):
        if actual != expected:
            raise AssertionError(
                f"{prefix}: {result} differ: got {actual}, expected {expected} (None marks a "
                "dimension of size 1, whose stride is not compared)"
            )
        return
    if isinstance(expected, bool):
        if actual != expected:
            raise AssertionError(f"{prefix}: {result} is {actual}, expected {expected}")
        return
    if expected is None or actual is None:
        if actual is not expected:
            state = "missing" if actual is None else "present, but the reference gives none"
            raise AssertionError(f"{prefix}: {result} is {state}")
        return
    try:
        assert_identical(actual, expected, result)
    except AssertionError as error:
        raise AssertionError(f"{prefix}: {error}") from None


_Builder = Callable[[], KernelInputs]


def _check_inputs_unchanged(
    case: KernelCase, mode: _Pass, used: KernelInputs, build: _Builder
) -> None:
    fresh = build()
    for name in ("x", "scale", "zero_point", "grad_output"):
        _compare(case, mode, f"{name} after the kernel", getattr(used, name), getattr(fresh, name))


def _check_raises(
    kernel: Kernel,
    case: KernelCase,
    reference: Kernel,
    build: _Builder,
    expected: type[Exception],
) -> None:
    for mode in _PASSES[:2]:
        inputs = build()
        x = inputs.x.detach().requires_grad_(mode.x_requires_grad)
        with torch.set_grad_enabled(mode.grad_enabled):
            try:
                reference(*inputs.arguments(x))
            except expected as error:
                reference_error = error
            else:
                raise RuntimeError(f"the reference kernel raised no error on case {case.name!r}")
            try:
                kernel(*inputs.arguments(x))
            except expected:
                continue
            except Exception as error:
                raise AssertionError(
                    f"case {case.name!r} {mode.description}: expected {expected.__name__}, as "
                    f"the reference raises ({reference_error}), got {type(error).__name__}: "
                    f"{error}"
                ) from error
        raise AssertionError(
            f"case {case.name!r} {mode.description}: expected {expected.__name__}, as the "
            f"reference raises ({reference_error}), but the kernel returned"
        )


def check_kernel_case(
    kernel: Kernel,
    case: KernelCase,
    *,
    device: str | torch.device = "cpu",
    learnable: bool = False,
) -> None:
    """Check that ``kernel`` matches the reference kernel on ``case``, bit for bit.

    The case runs on ``device`` four times. The first run has grad mode on
    and ``x`` requiring a gradient, and a backward pass with the case's
    output gradient follows it. The second has grad mode off. The third has
    grad mode on and ``x`` not requiring a gradient. The fourth repeats the
    first with a non-leaf ``x``, a copy of the leaf made by
    ``clone(memory_format=torch.preserve_format)``, and takes the input
    gradient from the leaf. The copy of a non-overlapping and dense leaf has
    the leaf's strides, and the copy of a sliced or expanded view is dense.
    Each time the kernel's output, whether it requires a gradient, and the
    gradient of ``x`` must equal those of the reference kernel on the same
    device. For learnable kernels the gradients of ``scale`` and
    ``zero_point`` must equal too. Where the kernel's ``x`` is
    non-overlapping and dense, the output must have the reference's
    strides, which are ``x``'s, except in dimensions of size 1, whose
    strides do not change the memory order. The kernel must leave its
    inputs and the output gradient unchanged. Where the case expects an
    error, the kernel must raise it in the first two runs, as the
    reference does.

    Args:
        kernel: A plain kernel, called as ``kernel(x, scale, zero_point,
            quant_min, quant_max, axis)``, or a learnable one, called with
            ``grad_factor`` as well.
        case: One of :func:`kernel_cases`' cases of the same kind.
        device: Device the tensors are built on.
        learnable: Whether ``kernel`` is a learnable kernel, compared with
            :func:`qatcore.fake_quantize_learnable_reference`.

    Raises:
        AssertionError: The kernel differs from the reference. The message
            names the case, the pass, the result (output, input gradient,
            scale gradient, zero-point gradient), what differs (dtype,
            shape, device, strides, values), the first differing index and
            both values.
        ValueError: ``case.learnable`` is not ``learnable``.
        RuntimeError: The reference kernel does not raise the error that the
            case expects, so the case itself is wrong.
    """
    if case.learnable != learnable:
        kind = "learnable" if case.learnable else "plain"
        raise ValueError(
            f"case {case.name!r} is for {kind} kernels, but learnable={learnable}; take the "
            f"cases from kernel_cases(learnable={learnable})"
        )
    reference = fake_quantize_learnable_reference if learnable else fake_quantize_reference
    # The random values are generated once; each run gets its own copy on the device.
    values = case._values()

    def build() -> KernelInputs:
        return case._inputs(values, device)

    if case.raises is not None:
        _check_raises(kernel, case, reference, build, case.raises)
        return

    for mode in _PASSES:
        expected = _run(reference, build(), mode)
        inputs = build()
        try:
            actual = _run(kernel, inputs, mode)
        except Exception as error:
            raise AssertionError(
                f"case {case.name!r} {mode.description}: the kernel raised "
                f"{type(error).__name__}: {error}"
            ) from error
        for result, value in expected.items():
            _compare(case, mode, result, actual.get(result), value)
        _check_inputs_unchanged(case, mode, inputs, build)


def check_kernel(
    kernel: Kernel, *, device: str | torch.device = "cpu", learnable: bool = False
) -> None:
    """Check ``kernel`` on every case of :func:`kernel_cases` and report every failing case.

    Args:
        kernel: The kernel under test; see :func:`check_kernel_case`.
        device: Device the tensors are built on.
        learnable: Whether ``kernel`` is a learnable kernel.

    Raises:
        AssertionError: The kernel differs from the reference on at least one
            case. The message counts the failing cases and gives each one's
            message from :func:`check_kernel_case`.
    """
    cases = kernel_cases(device=device, learnable=learnable)
    failures = []
    for case in cases:
        try:
            check_kernel_case(kernel, case, device=device, learnable=learnable)
        except AssertionError as error:
            failures.append(str(error))
    if failures:
        raise AssertionError(
            f"{len(failures)} of {len(cases)} kernel cases failed:\n" + "\n".join(failures)
        )


# -- values -------------------------------------------------------------------------


def _qparams(
    scales: list[float],
    zero_points: list[float],
    axis: int | None,
    *,
    float_zero_point: bool,
    scale_dtype: torch.dtype = torch.float32,
    zero_point_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return a scale and a zero point, ``()`` when ``axis`` is None.

    The zero point is of ``zero_point_dtype``, or float32 or int32 by
    ``float_zero_point`` where that is ``None``.
    """
    scale = torch.tensor(scales, dtype=scale_dtype)
    if zero_point_dtype is None:
        zero_point_dtype = torch.float32 if float_zero_point else torch.int32
    zero_point = torch.tensor(zero_points, dtype=zero_point_dtype)
    if axis is None:
        return scale.reshape(()), zero_point.reshape(())
    return scale, zero_point


def _random_values(
    shape: tuple[int, ...],
    axis: int | None,
    quant_range: tuple[int, int],
    *,
    float_zero_point: bool = False,
    scale_dtype: torch.dtype = torch.float32,
    zero_point_dtype: torch.dtype | None = None,
) -> _ValuesFactory:
    """Return normal values of standard deviation 3 with random qparams per channel.

    The qparams' dtypes are those of :func:`_qparams`.
    """
    quant_min, quant_max = quant_range

    def make(generator: torch.Generator) -> _Values:
        x = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
        channels = 1 if axis is None else shape[axis]
        # Each range spans about 4 standard deviations, so that about 5% of
        # the values lie past its ends.
        spread = torch.rand(channels, generator=generator, dtype=torch.float64) * 0.4 + 0.8
        scale = spread * 12 / (quant_max - quant_min)
        middle = (quant_min + quant_max + 1) // 2
        offset = max((quant_max - quant_min) // 16, 1)
        zero_point = torch.randint(
            middle - offset, middle + offset + 1, (channels,), generator=generator
        ).to(torch.float64)
        if float_zero_point:
            zero_point = zero_point + torch.rand(channels, generator=generator) - 0.5
        scale_tensor, zero_point_tensor = _qparams(
            scale.tolist(),
            zero_point.tolist(),
            axis,
            float_zero_point=float_zero_point,
            scale_dtype=scale_dtype,
            zero_point_dtype=zero_point_dtype,
        )
        grad_output = torch.randn(shape, generator=generator, dtype=torch.float64)
        return _Values(
            x=x, scale=scale_tensor, zero_point=zero_point_tensor, grad_output=grad_output
        )

    return make


def _fixed_values(
    x: torch.Tensor,
    scales: list[float],
    zero_points: list[float],
    axis: int | None,
    *,
    float_zero_point: bool = False,
    scale_dtype: torch.dtype = torch.float32,
    grad_output: torch.Tensor | None = None,
) -> _ValuesFactory:
    """Return the given values and qparams, with a random output gradient unless one is given."""
    scale, zero_point = _qparams(
        scales, zero_points, axis, float_zero_point=float_zero_point, scale_dtype=scale_dtype
    )

    def make(generator: torch.Generator) -> _Values:
        gradient = grad_output
        if gradient is None:
            gradient = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        return _Values(
            x=x.clone(), scale=scale.clone(), zero_point=zero_point.clone(), grad_output=gradient
        )

    return make


def _tie_values(channels: list[tuple[float, int]], quant_range: tuple[int, int]) -> _ValuesFactory:
    """Return rows of values exactly halfway between codes, one row per ``(scale, zero point)``.

    Each row runs from two codes below the range to two codes above it.
    Its scale is a power of two, so ``x * (1 / scale)`` is exact and
    rounding meets the tie. The values ``k + 0.5`` stay within +-127.5,
    because bfloat16 has 8 significant bits and cannot represent a larger
    one exactly, so rows with a zero point far from the range's middle stop
    short of an end.
    """
    quant_min, quant_max = quant_range
    rows = []
    for scale, zero_point in channels:
        low = max(quant_min - zero_point - 2, -128)
        high = min(quant_max - zero_point + 2, 127)
        codes = torch.arange(low, high + 1, dtype=torch.float64) + 0.5
        rows.append(codes * scale)
    width = max(row.numel() for row in rows)
    # Rows of different lengths are padded with their first value.
    x = torch.stack([torch.cat([row, row[:1].repeat(width - row.numel())]) for row in rows])
    scales = [scale for scale, _ in channels]
    zero_points = [float(zero_point) for _, zero_point in channels]
    if len(channels) == 1:
        return _fixed_values(x[0], scales, zero_points, None)
    return _fixed_values(x, scales, zero_points, 0)


def _edge_values(scale: float, zero_point: int, quant_range: tuple[int, int]) -> torch.Tensor:
    """Return values at, just inside and just past the range's ends, and extreme floats."""
    quant_min, quant_max = quant_range
    low = (quant_min - zero_point) * scale
    high = (quant_max - zero_point) * scale
    values = [low, high, low - 0.4999 * scale, high + 0.4999 * scale]
    values += [low - 0.5001 * scale, high + 0.5001 * scale, low - scale, high + scale]
    values += [low * (1 + 2**-20), high * (1 + 2**-20), 0.4 * scale, -0.4 * scale, 0.0, -0.0]
    values += [1e30, -1e30, 3.0e38, -3.0e38, 1e300, -1e300]
    values += [1.2e-38, -1.2e-38, 1e-45, -1e-45, 6e-8, -6e-8, 1e-310, -1e-310]
    # float16's largest value, its smallest normal value and its smallest subnormal value.
    values += [65504.0, -65504.0, 6.103515625e-05, -5.960464477539063e-08]
    return torch.tensor(values, dtype=torch.float64)


def _non_finite_x(shape: tuple[int, int]) -> Callable[[torch.Generator], torch.Tensor]:
    def make(generator: torch.Generator) -> torch.Tensor:
        x = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
        flat = x.view(-1)
        flat[::5] = math.inf
        flat[1::5] = -math.inf
        flat[2::7] = math.nan
        return x

    return make


def _with_x(
    make_x: Callable[[torch.Generator], torch.Tensor], factory: _ValuesFactory
) -> _ValuesFactory:
    def make(generator: torch.Generator) -> _Values:
        values = factory(generator)
        return attrs.evolve(values, x=make_x(generator))

    return make


# -- layouts ------------------------------------------------------------------------


def _transposed(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, -1).contiguous().transpose(0, -1)


def _sliced(x: torch.Tensor) -> torch.Tensor:
    # Every other element along the last dimension of a wider tensor filled
    # with another value: a view with no flat memory order.
    wide = torch.full((*x.shape[:-1], 2 * x.shape[-1]), _SLICE_FILL, dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    return wide[..., ::2]


def _expanded(x: torch.Tensor) -> torch.Tensor:
    return x.expand(5, -1)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _channels_last_3d(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last_3d)


# -- case list ----------------------------------------------------------------------


def _axis_label(axis: int | None) -> str:
    return "per-tensor" if axis is None else f"axis-{axis}"


@attrs.frozen(kw_only=True)
class _Recipe:
    """A case without its dtype: the part of the case list that repeats for every dtype."""

    name: str
    quant_range: tuple[int, int]
    axis: int | None
    values: _ValuesFactory
    layout: _Layout | None = None
    grad_layout: _Layout | None = None
    plain: bool = True
    learnable: bool = True
    raises: type[Exception] | None = None
    grad_factor: float = 0.03


def _random_recipes(float_zero_point: bool) -> Iterator[_Recipe]:
    for axis in (None, 0, 1, len(_RANDOM_SHAPE) - 1):
        values = _random_values(_RANDOM_SHAPE, axis, _INT8, float_zero_point=float_zero_point)
        yield _Recipe(
            name=f"random-{_axis_label(axis)}", quant_range=_INT8, axis=axis, values=values
        )


def _bit_width_recipes(float_zero_point: bool) -> Iterator[_Recipe]:
    for name, quant_range in _BIT_WIDTHS.items():
        axis = None if name.startswith("int") else 0
        values = _random_values((6, 40), axis, quant_range, float_zero_point=float_zero_point)
        yield _Recipe(
            name=f"{name}-{_axis_label(axis)}", quant_range=quant_range, axis=axis, values=values
        )


def _rounding_recipes() -> Iterator[_Recipe]:
    yield _Recipe(
        name="ties-int4-per-tensor",
        quant_range=(-8, 7),
        axis=None,
        values=_tie_values([(2.0**-4, 0)], (-8, 7)),
    )
    yield _Recipe(
        name="ties-uint8-axis-0",
        quant_range=_UINT8,
        axis=0,
        values=_tie_values([(2.0**-4, 128), (2.0**-7, 100), (1.0, 0), (0.5, 255)], _UINT8),
    )
    edge_x = torch.tensor(_EDGE_CODES, dtype=torch.float32) * 0.1
    yield _Recipe(
        name="range-edges-int4-per-tensor",
        quant_range=(-8, 7),
        axis=None,
        values=_fixed_values(edge_x.to(torch.float64), [0.1], [0], None),
    )
    for quant_range, scale, zero_point in ((_INT8, 0.1, 0), (_UINT8, 0.0371, 3)):
        name = "int8" if quant_range == _INT8 else "uint8"
        edges = _edge_values(scale, zero_point, quant_range)
        yield _Recipe(
            name=f"range-edges-{name}-per-tensor",
            quant_range=quant_range,
            axis=None,
            values=_fixed_values(edges, [scale], [zero_point], None),
        )
    rows = torch.linspace(-2, 14, 41, dtype=torch.float64).repeat(len(_FLOAT_ZERO_POINTS), 1)
    yield _Recipe(
        name="float-zero-point-axis-0",
        quant_range=_UINT8,
        axis=0,
        values=_fixed_values(
            rows,
            [0.05] * len(_FLOAT_ZERO_POINTS),
            list(_FLOAT_ZERO_POINTS),
            0,
            float_zero_point=True,
        ),
    )


def _non_finite_recipes() -> Iterator[_Recipe]:
    for axis in (None, 1):
        yield _Recipe(
            name=f"non-finite-x-{_axis_label(axis)}",
            quant_range=_INT8,
            axis=axis,
            values=_with_x(_non_finite_x((3, 8)), _random_values((3, 8), axis, _INT8)),
        )
    x = torch.tensor([-20.0, -1.0, 0.0, 1.0, 20.0, 0.5, -20.0, 20.0, 3.0], dtype=torch.float64)
    grad_output = torch.tensor(
        [math.inf, math.inf, -math.inf, math.nan, math.nan, -1.0, -2.0, -math.inf, 1e30],
        dtype=torch.float64,
    )
    yield _Recipe(
        name="non-finite-grad-output-per-tensor",
        quant_range=_INT8,
        axis=None,
        values=_fixed_values(x.repeat(5), [0.1], [0], None, grad_output=grad_output.repeat(5)),
    )


def _shape_recipes(float_zero_point: bool) -> Iterator[_Recipe]:
    def random(shape: tuple[int, ...], axis: int | None) -> _ValuesFactory:
        return _random_values(shape, axis, _INT8, float_zero_point=float_zero_point)

    yield _Recipe(name="empty-per-tensor", quant_range=_INT8, axis=None, values=random((0,), None))
    yield _Recipe(name="empty-axis-0", quant_range=_INT8, axis=0, values=random((3, 0, 4), 0))
    yield _Recipe(
        name="empty-zero-channels-axis-1", quant_range=_INT8, axis=1, values=random((3, 0, 4), 1)
    )
    yield _Recipe(name="scalar-per-tensor", quant_range=_INT8, axis=None, values=random((), None))

    for axis in (None, 0):
        yield _Recipe(
            name=f"sliced-{_axis_label(axis)}",
            quant_range=_INT8,
            axis=axis,
            values=random((4, 6, 10), axis),
            layout=_sliced,
        )
        yield _Recipe(
            name=f"transposed-{_axis_label(axis)}",
            quant_range=_INT8,
            axis=axis,
            values=random((33, 17), axis),
            layout=_transposed,
        )
    for axis in (None, 0, 1):
        row = random((1, 37), None)
        full = random((5, 37), axis)

        def expanded_values(
            generator: torch.Generator, row: _ValuesFactory = row, full: _ValuesFactory = full
        ) -> _Values:
            return attrs.evolve(full(generator), x=row(generator).x)

        yield _Recipe(
            name=f"expanded-{_axis_label(axis)}",
            quant_range=_INT8,
            axis=axis,
            values=expanded_values,
            layout=_expanded,
        )
    for axis in (None, 1, 3):
        yield _Recipe(
            name=f"channels-last-{_axis_label(axis)}",
            quant_range=_UINT8,
            axis=axis,
            values=_random_values((2, 6, 5, 7), axis, _UINT8, float_zero_point=float_zero_point),
            layout=_channels_last,
        )
    for axis in (None, 1):
        yield _Recipe(
            name=f"channels-last-3d-{_axis_label(axis)}",
            quant_range=_UINT8,
            axis=axis,
            values=_random_values((2, 4, 3, 5, 6), axis, _UINT8, float_zero_point=float_zero_point),
            layout=_channels_last_3d,
        )


def _grad_layout_recipes(float_zero_point: bool) -> Iterator[_Recipe]:
    def random(shape: tuple[int, ...], axis: int | None) -> _ValuesFactory:
        return _random_values(shape, axis, _INT8, float_zero_point=float_zero_point)

    # A contiguous x with an output gradient in another layout.
    yield _Recipe(
        name="transposed-grad-output-axis-0",
        quant_range=_INT8,
        axis=0,
        values=random((33, 17), 0),
        grad_layout=_transposed,
    )
    yield _Recipe(
        name="channels-last-grad-output-axis-1",
        quant_range=_INT8,
        axis=1,
        values=random((2, 6, 5, 7), 1),
        grad_layout=_channels_last,
    )
    for axis in (None, 1):
        row = random((1, 37), None)
        full = random((5, 37), axis)

        def expanded_values(
            generator: torch.Generator, row: _ValuesFactory = row, full: _ValuesFactory = full
        ) -> _Values:
            return attrs.evolve(full(generator), grad_output=row(generator).grad_output)

        yield _Recipe(
            name=f"expanded-grad-output-{_axis_label(axis)}",
            quant_range=_INT8,
            axis=axis,
            values=expanded_values,
            grad_layout=_expanded,
        )


def _qparam_dtype_recipes(learnable: bool) -> Iterator[_Recipe]:
    dtypes: list[tuple[str, torch.dtype | None, torch.dtype | None]] = [
        ("float64-scale", torch.float64, None),
        ("float16-scale", torch.float16, None),
        ("int64-zero-point", None, torch.int64),
        ("float16-zero-point", None, torch.float16),
    ]
    for label, scale_dtype, zero_point_dtype in dtypes:
        for axis in (None, 0):
            values = _random_values(
                (6, 40),
                axis,
                _INT8,
                float_zero_point=learnable,
                scale_dtype=scale_dtype or torch.float32,
                zero_point_dtype=zero_point_dtype,
            )
            yield _Recipe(
                name=f"{label}-{_axis_label(axis)}",
                quant_range=_INT8,
                axis=axis,
                values=values,
                # A learnable case turns an integer zero point into float32.
                learnable=zero_point_dtype != torch.int64,
            )

    # The reference checks these scales in float64, where they are finite
    # and positive, and then computes with them in float32, where 1e39 is
    # inf and 1e-50 is 0.
    x = torch.tensor([1e-7, -3e-7, 2e-5, 0.0, 0.5, -0.5, 100.0, -3.0], dtype=torch.float64)
    for label, value in (("1e39", 1e39), ("1e-50", 1e-50)):
        yield _Recipe(
            name=f"float64-scale-{label}-per-tensor",
            quant_range=_INT8,
            axis=None,
            values=_fixed_values(x, [value], [0], None, scale_dtype=torch.float64),
        )
    yield _Recipe(
        name="float64-scales-1e39-1e-50-axis-0",
        quant_range=_INT8,
        axis=0,
        values=_fixed_values(
            x.repeat(3, 1), [0.1, 1e39, 1e-50], [0, 0, 0], 0, scale_dtype=torch.float64
        ),
    )


def _float16_overflow_recipes() -> Iterator[_Recipe]:
    # Several codes times the scale of 1000 or 3000 exceed float16's largest
    # value, 65504. The reference computes them in float32, and its cast to
    # float16 turns them into inf.
    x = torch.tensor(
        [65504.0, -65504.0, 65000.0, -65000.0, 64000.0, 60000.0, 1000.0, 0.0, math.inf, -math.inf],
        dtype=torch.float64,
    )
    yield _Recipe(
        name="overflow-per-tensor",
        quant_range=_INT8,
        axis=None,
        values=_fixed_values(x, [1000.0], [0], None),
    )
    yield _Recipe(
        name="overflow-axis-0",
        quant_range=_INT8,
        axis=0,
        values=_fixed_values(x.repeat(2, 1), [1000.0, 3000.0], [0, 100], 0),
    )


def _float64_wide_range_recipes() -> Iterator[_Recipe]:
    # float32 cannot represent these ranges' ends 2**31 - 1 and 2**24 + 1,
    # and rounds them to 2**31 and 2**24.
    int32_range = (-(2**31), 2**31 - 1)
    high = 2.0**31
    int32_x = torch.tensor(
        [
            high,
            high - 1,
            high - 0.5,
            high - 1.5,
            high + 1,
            1e10,
            12345.5,
            0.0,
            -high,
            -high - 0.5,
            -high - 1,
            -high + 1,
            -1e10,
        ],
        dtype=torch.float64,
    )
    yield _Recipe(
        name="range-int32-per-tensor",
        quant_range=int32_range,
        axis=None,
        values=_fixed_values(int32_x, [1.0], [0], None),
    )
    yield _Recipe(
        name="range-int32-axis-0",
        quant_range=int32_range,
        axis=0,
        values=_fixed_values(torch.stack([int32_x, int32_x * 0.5]), [1.0, 0.5], [0, 0], 0),
    )
    top = 2.0**24 + 1
    yield _Recipe(
        name="range-0-to-16777217-per-tensor",
        quant_range=(0, 2**24 + 1),
        axis=None,
        values=_fixed_values(
            torch.tensor(
                [top, top - 1, top + 1, top - 2, top - 0.5, top + 0.5, 0.0, -1.0, 2.0**23 + 0.5],
                dtype=torch.float64,
            ),
            [1.0],
            [0],
            None,
        ),
    )


def _scale_recipes() -> Iterator[_Recipe]:
    x = torch.tensor([1e-7, -3e-7, 2e-5, 0.0, 0.5, -0.5], dtype=torch.float64)
    for label, value in (("zero", 0.0), ("negative", -0.1), ("nan", math.nan), ("inf", math.inf)):
        valid_when_learnable = math.isfinite(value)
        for axis in (None, 0):
            if axis is None:
                values = _fixed_values(x, [value], [0], None)
            else:
                values = _fixed_values(x.repeat(3, 1), [0.1, value, 0.1], [0, 0, 0], 0)
            yield _Recipe(
                name=f"invalid-scale-{label}-{_axis_label(axis)}",
                quant_range=_INT8,
                axis=axis,
                values=values,
                learnable=False,
                raises=ValueError,
            )
            # A learnable kernel clamps a scale of 0 or below to float32 eps.
            prefix = "scale" if valid_when_learnable else "invalid-scale"
            yield _Recipe(
                name=f"{prefix}-{label}-{_axis_label(axis)}",
                quant_range=_INT8,
                axis=axis,
                values=values,
                plain=False,
                raises=None if valid_when_learnable else ValueError,
                grad_factor=1.0,
            )


def _float_zero_point_recipes() -> Iterator[_Recipe]:
    x = torch.linspace(-2, 14, 41, dtype=torch.float64)
    for zero_point in _FLOAT_ZERO_POINTS:
        label = f"{zero_point:g}".replace("-", "minus")
        yield _Recipe(
            name=f"float-zero-point-{label}-per-tensor",
            quant_range=_UINT8,
            axis=None,
            values=_fixed_values(x, [0.05], [zero_point], None, float_zero_point=True),
        )


def _recipes(learnable: bool) -> Iterator[_Recipe]:
    yield from _random_recipes(float_zero_point=learnable)
    yield from _rounding_recipes()
    yield from _non_finite_recipes()
    yield from _shape_recipes(float_zero_point=learnable)
    yield from _grad_layout_recipes(float_zero_point=learnable)
    yield from _bit_width_recipes(float_zero_point=learnable)
    yield from _qparam_dtype_recipes(learnable)


def _large_cases(learnable: bool) -> list[KernelCase]:
    """Return the few cases above :data:`LARGE_ELEMENTS` elements: two plain, one learnable."""
    per_channel = (2, 17, 256, 256)
    per_tensor = (2, 16, 256, 260)
    cases = [
        KernelCase(
            name="float32-large-axis-1",
            dtype=torch.float32,
            quant_min=0,
            quant_max=255,
            axis=1,
            learnable=learnable,
            grad_factor=1 / math.sqrt(math.prod(per_channel) / per_channel[1] * 255),
            values=_random_values(per_channel, 1, _UINT8, float_zero_point=learnable),
        )
    ]
    if not learnable:
        cases.append(
            KernelCase(
                name="float16-large-channels-last-per-tensor",
                dtype=torch.float16,
                quant_min=-128,
                quant_max=127,
                axis=None,
                values=_random_values(per_tensor, None, _INT8),
                layout=_channels_last,
            )
        )
    return cases


def _dtypes(device: str | torch.device) -> dict[str, torch.dtype]:
    # NOTE: PyTorch's MPS backend rejects float64 tensors. No other device
    # drops a dtype here, so a device that lacks another dtype fails its cases.
    if torch.device(device).type == "mps":
        return {name: dtype for name, dtype in DTYPES.items() if dtype != torch.float64}
    return dict(DTYPES)


def kernel_cases(
    *, device: str | torch.device = "cpu", learnable: bool = False
) -> list[KernelCase]:
    """Return every conformance case for plain kernels, or for learnable ones.

    Each of float32, float64, float16 and bfloat16 gets the same cases:

    - random values per-tensor and per-channel along the first, second and
      last axis;
    - values exactly halfway between codes, and values at and just past
      the range's ends, with extreme floats;
    - float zero points that must be rounded half to even and clamped;
    - inf and NaN in ``x`` and in the output gradient;
    - empty tensors and a 0-dim tensor;
    - a view sliced with a step, a transposed view and an expanded view;
    - channels_last 4-d and channels_last_3d 5-d tensors;
    - output gradients in a transposed, channels_last or expanded layout,
      with a contiguous ``x``;
    - 2, 4, 8 and 16-bit ranges, signed and unsigned;
    - float64 and float16 scales, and float16 zero points; plain cases add
      int64 zero points;
    - float64 scales of 1e39 and 1e-50, which the reference accepts because
      it checks the scale in float64, and then computes with in float32,
      where they are inf and 0.

    float16 adds cases whose dequantized values exceed 65504, which the
    reference's cast to float16 turns into inf. float64 adds the int32 range
    and the range ``[0, 2**24 + 1]``, whose ends float32 cannot represent.
    Plain cases add scales of 0, below 0, NaN and inf, which must
    raise ``ValueError``. Learnable cases have float zero points, and
    expect ``ValueError`` only for NaN and inf scales, because a learnable
    kernel clamps the scale to float32 eps. Their ``grad_factor`` is 1 in
    the scale cases, LSQ's ``1 / sqrt(numel_per_scale * quant_max)`` in the
    large case and 0.03 elsewhere. A few float32 and float16 cases have
    more than :data:`LARGE_ELEMENTS` elements.

    Creating the list builds no tensor, so it is cheap at pytest's
    collection time, even for a device that is missing.

    Args:
        device: Device the cases will run on. Dtypes the device lacks are
            left out: float64 on ``"mps"``.
        learnable: Whether to return the cases for learnable kernels.

    Returns:
        The cases, with unique names.
    """
    dtypes = _dtypes(device)
    cases = []
    for dtype_name, dtype in dtypes.items():
        for recipe in _recipes(learnable):
            if recipe.learnable if learnable else recipe.plain:
                cases.append(_case(recipe, dtype_name, dtype, learnable))
    # Only float16 overflows below float32's range, and only float64 input
    # is computed in a dtype that represents every int32 code.
    for dtype_name, recipes in (
        ("float16", _float16_overflow_recipes()),
        ("float64", _float64_wide_range_recipes()),
    ):
        if dtype_name in dtypes:
            cases.extend(
                _case(recipe, dtype_name, dtypes[dtype_name], learnable) for recipe in recipes
            )
    # Cases of argument checking depend on the scale alone, so float32 is enough.
    for recipe in _scale_recipes():
        for_this_kind = recipe.learnable if learnable else recipe.plain
        if for_this_kind:
            cases.append(_case(recipe, "float32", torch.float32, learnable))
    for recipe in _float_zero_point_recipes():
        cases.append(_case(recipe, "float32", torch.float32, learnable))
    cases.extend(case for case in _large_cases(learnable) if case.dtype in dtypes.values())
    return cases


def _case(recipe: _Recipe, dtype_name: str, dtype: torch.dtype, learnable: bool) -> KernelCase:
    quant_min, quant_max = recipe.quant_range
    return KernelCase(
        name=f"{dtype_name}-{recipe.name}",
        dtype=dtype,
        quant_min=quant_min,
        quant_max=quant_max,
        axis=recipe.axis,
        learnable=learnable,
        grad_factor=recipe.grad_factor if learnable else 1.0,
        raises=recipe.raises,
        values=recipe.values,
        layout=recipe.layout,
        grad_layout=recipe.grad_layout,
    )


# -- deployment cases ----------------------------------------------------------------------

_CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED_TYPES = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BATCH_NORM_TYPES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}

# Pattern name -> (transposed, with BatchNorm, with ReLU, QAT class name without "Nd").
_CONV_PATTERNS = {
    "conv": (False, False, False, "Conv"),
    "conv-relu": (False, False, True, "ConvReLU"),
    "conv-bn": (False, True, False, "ConvBn"),
    "conv-bn-relu": (False, True, True, "ConvBnReLU"),
    "conv-transpose": (True, False, False, "ConvTranspose"),
    "conv-transpose-relu": (True, False, True, "ConvTransposeReLU"),
    "conv-transpose-bn": (True, True, False, "ConvTransposeBn"),
    "conv-transpose-bn-relu": (True, True, True, "ConvTransposeBnReLU"),
}
# Pattern name -> (with BatchNorm, with ReLU, QAT class name).
_LINEAR_PATTERNS = {
    "linear": (False, False, "Linear"),
    "linear-relu": (False, True, "LinearReLU"),
    "linear-bn": (True, False, "LinearBn1d"),
    "linear-bn-relu": (True, True, "LinearBnReLU1d"),
}


@attrs.frozen
class DeployCase:
    """A small float model of one layer kind and fusion pattern, for deployment tests.

    The model is an ``nn.Sequential`` of the pattern (such as conv, BatchNorm,
    ReLU) followed by one more layer of the same kind, so that the second
    layer reads the first one's quantized output.

    Attributes:
        name: The case's name, such as ``"conv-bn-relu2d"`` or ``"linear-no-bias"``.
        build: Builds a fresh float model.
        input_shape: The shape of one batch of input.
        qat_type_name: The class name of the QAT module the pattern becomes.
        transposed: Whether the pattern's layer is a transposed conv.
        dims: The spatial dimensions of a conv pattern, or ``None`` for linear.
    """

    name: str
    build: Callable[[], nn.Sequential]
    input_shape: tuple[int, ...]
    qat_type_name: str
    transposed: bool = False
    dims: int | None = None

    def __str__(self) -> str:
        return self.name


def _conv_case(pattern: str, dims: int, bias: bool) -> DeployCase:
    transposed, batch_norm, relu, class_name = _CONV_PATTERNS[pattern]

    def build() -> nn.Sequential:
        if transposed:
            first = _TRANSPOSED_TYPES[dims](2, 3, 2, stride=2, bias=bias)
        else:
            first = _CONV_TYPES[dims](2, 3, 3, padding=1, bias=bias)
        layers = [first]
        if batch_norm:
            layers.append(_BATCH_NORM_TYPES[dims](3))
        if relu:
            layers.append(nn.ReLU())
        layers.append(_CONV_TYPES[dims](3, 2, 3, padding=1))
        return nn.Sequential(*layers)

    return DeployCase(
        name=f"{pattern}{dims}d{'' if bias else '-no-bias'}",
        build=build,
        input_shape=(2, 2) + (4,) * dims,
        qat_type_name=f"{class_name}{dims}d",
        transposed=transposed,
        dims=dims,
    )


def _linear_case(pattern: str, bias: bool) -> DeployCase:
    batch_norm, relu, class_name = _LINEAR_PATTERNS[pattern]

    def build() -> nn.Sequential:
        layers: list[nn.Module] = [nn.Linear(5, 6, bias=bias)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(6))
        if relu:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(6, 3))
        return nn.Sequential(*layers)

    return DeployCase(
        name=f"{pattern}{'' if bias else '-no-bias'}",
        build=build,
        input_shape=(4, 5),
        qat_type_name=class_name,
    )


def deploy_cases() -> list[DeployCase]:
    """Return a case for every conv and linear pattern, in 1d, 2d and 3d for convs.

    The patterns are the layer alone and fused with ReLU, BatchNorm, and
    BatchNorm and ReLU, for conv, transposed conv and linear layers. The
    unfused layers come with and without bias. The fused ones keep it,
    because BatchNorm folding absorbs a bias into its shift.
    """
    unfused = ("conv", "conv-transpose", "linear")
    cases = [
        _conv_case(pattern, dims, bias)
        for pattern in _CONV_PATTERNS
        for dims in (1, 2, 3)
        for bias in ((True, False) if pattern in unfused else (True,))
    ]
    cases += [
        _linear_case(pattern, bias)
        for pattern in _LINEAR_PATTERNS
        for bias in ((True, False) if pattern in unfused else (True,))
    ]
    return cases


def train_deploy_case(
    case: DeployCase, qconfig: Any, *, steps: int = 3, seed: int = 0
) -> nn.Sequential:
    """Swap ``case``'s model with ``qconfig``, train a few SGD steps, and return it in eval mode.

    The steps move the observers and the BatchNorm statistics away from
    their initial values, as training does.
    """
    import qatcore

    torch.manual_seed(seed)
    qat = qatcore.swap_modules(case.build(), qconfig)
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.05)
    for _ in range(steps):
        loss = (qat(torch.randn(case.input_shape)) - 1).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return qat.eval()


def check_deployed_output(qat: nn.Module, expected: torch.Tensor, actual: torch.Tensor) -> None:
    """Check a deployed model's output against the QAT model's, in the last layer's codes.

    ``expected`` is the QAT model's output in eval mode and ``actual`` the
    deployed model's on the same input. Each code may differ by one step,
    the rounding an engine's requantization can add, and the largest and
    smallest codes must be equal, so that both saturate alike.

    Raises:
        AssertionError: A code differs by more than one step, or the two
            outputs saturate at different codes.
    """
    import qatcore

    output = qatcore.quantized_layers(qat)[-1].output
    scale, zero_point = float(output.scale), int(output.zero_point)
    # Not QuantParams.codes, which clamps: a code outside the range must show.
    expected_codes = torch.round(expected.detach() / scale).int() + zero_point
    actual_codes = torch.round(actual.detach() / scale).int() + zero_point
    difference = int((expected_codes - actual_codes).abs().max())
    if difference > 1:
        raise AssertionError(f"the deployed output differs by {difference} codes, more than 1")
    for name, reduce in (("largest", torch.max), ("smallest", torch.min)):
        want, got = int(reduce(expected_codes)), int(reduce(actual_codes))
        if want != got:
            raise AssertionError(f"the {name} code is {got} deployed, {want} in QAT")
