"""The CPU fake-quant kernels: bit-for-bit identity with the reference kernels, and discovery.

Every identity test runs both kernels on the same input and compares
outputs and input gradients with ``torch.equal`` after matching NaN
positions, and also compares the sign bits, so that ``-0.0`` against
``0.0`` counts as a difference. Block-size variants shrink the kernel's
blocks so that small tensors cross every block boundary the kernel has.
"""

from __future__ import annotations

import importlib.metadata
import math
from collections.abc import Callable, Iterator

import pytest
import torch

import qatcore
import qatcore_cpu.kernel
import qatcore_cpu.native
from qatcore_cpu import fake_quantize_cpu, fake_quantize_learnable_cpu

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

QUANT_RANGES = {"int8": (-128, 127), "uint8": (0, 255)}

# Float zero points per range, cycled over the channels. Each rounds half to
# even and clamps to an integer zero point: -2.5 to -2, 127.5 to 128, 255.4
# to 255, and -0.7 to 0 for uint8.
FLOAT_ZERO_POINTS = {
    "int8": [-0.4, 1.5, -2.5, 0.5, 127.6],
    "uint8": [127.5, 2.7, 255.4, -0.7, 3.5],
}

# Scales cycled over the channels. Powers of two make x * (1 / scale) exact,
# so that the inputs built as (k + 0.5) * scale are exact ties. In bfloat16,
# with 8 significant bits, that holds only for codes below 128.
SCALES = [2.0**-4, 0.1, 2.0**-7, 0.0371, 1.0]

# The kernel's paths. "native" runs the C loops with their default ranges;
# "native-ranges-of-8" splits every tensor over three threads at multiples of
# 8 elements, so that range edges fall inside channels. The ATen paths run
# without the native loops, with blocks of the given size: the default block
# takes every small test tensor whole, blocks of 10 elements put block edges
# everywhere and leave ragged tails, and blocks of 256 run the vectorized
# loops over several blocks.
PATHS = {
    "native": None,
    "native-ranges-of-8": 8,
    "aten-one-block": None,
    "aten-blocks-of-10": 10,
    "aten-blocks-of-256": 256,
}


def _integer_zero_point(value: float, quant_min: int, quant_max: int) -> int:
    # Python's round() rounds half to even, like torch.round.
    return min(max(round(value), quant_min), quant_max)


# -- comparison helpers ------------------------------------------------------------


def assert_identical(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Assert equal dtype, shape, NaN positions, values and sign bits."""
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), f"{name}: NaN positions differ"

    actual_values = actual[~nan]
    expected_values = expected[~nan]
    if not torch.equal(actual_values, expected_values):
        index = int((actual_values != expected_values).nonzero()[0])
        raise AssertionError(
            f"{name}: values differ, first at non-NaN element {index}: "
            f"{actual_values[index].item()!r} != {expected_values[index].item()!r}"
        )
    assert torch.equal(torch.signbit(actual_values), torch.signbit(expected_values)), (
        f"{name}: signs of zeros differ"
    )


def run_with_grad(
    kernel: Callable[..., torch.Tensor],
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None,
    grad_output: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    # detach() keeps x's strides, so each kernel gets the layout under test.
    leaf = x.detach().requires_grad_()
    out = kernel(leaf, scale, zero_point, quant_min, quant_max, axis)
    out.backward(grad_output)
    assert leaf.grad is not None
    return out.detach(), leaf.grad


def assert_matches_reference(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None,
    grad_output: torch.Tensor,
) -> None:
    """Assert that outputs and gradients match with grad on, and outputs with grad off."""
    before = x.clone()
    args = (x, scale, zero_point, quant_min, quant_max, axis, grad_output)
    out, grad = run_with_grad(fake_quantize_cpu, *args)
    expected_out, expected_grad = run_with_grad(qatcore.fake_quantize_reference, *args)
    assert_identical(out, expected_out, "output")
    assert_identical(grad, expected_grad, "input gradient")

    with torch.no_grad():
        out_no_grad = fake_quantize_cpu(x, scale, zero_point, quant_min, quant_max, axis)
    assert_identical(out_no_grad, expected_out, "output without grad")
    assert_identical(x, before, "input after the kernel")


@pytest.fixture(params=list(PATHS), ids=list(PATHS))
def block_size(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Select one of :data:`PATHS` for the test."""
    size = PATHS[request.param]
    if request.param.startswith("native"):
        if not qatcore_cpu.native.available():
            pytest.skip(qatcore_cpu.native.status() or "the native loops are not loaded")
        if size is not None:
            monkeypatch.setattr(qatcore_cpu.native, "MIN_ELEMENTS_PER_THREAD", 1)
            monkeypatch.setattr(qatcore_cpu.native, "ALIGNMENT", size)
            threads = torch.get_num_threads()
            torch.set_num_threads(3)
            yield
            torch.set_num_threads(threads)
            return
    else:
        monkeypatch.setattr(qatcore_cpu.native, "_native", None)
        if size is not None:
            per_thread = max(1, size // torch.get_num_threads())
            monkeypatch.setattr(qatcore_cpu.kernel, "BLOCK_ELEMENTS_PER_THREAD", per_thread)
    yield


# -- adversarial inputs -------------------------------------------------------------


def adversarial_values(
    scale: float, zero_point: int, quant_min: int, quant_max: int, dtype: torch.dtype
) -> torch.Tensor:
    """Return a 1-D tensor of the values a fake-quant kernel is most likely to get wrong."""
    low = (quant_min - zero_point) * scale
    high = (quant_max - zero_point) * scale
    finfo = torch.finfo(dtype)
    tie_codes = [quant_min - zero_point - 2, quant_min - zero_point - 1, quant_min - zero_point]
    tie_codes += [-2, -1, 0, 1, quant_max - zero_point - 1, quant_max - zero_point]
    tie_codes += [quant_max - zero_point + 1]

    values = [(code + 0.5) * scale for code in tie_codes]
    values += [low, high, low - 0.4999 * scale, high + 0.4999 * scale]
    values += [low - 0.5001 * scale, high + 0.5001 * scale, low - scale, high + scale]
    values += [low * (1 + finfo.eps), high * (1 + finfo.eps)]
    values += [math.inf, -math.inf, math.nan, 1e30, -1e30, finfo.max, -finfo.max]
    values += [torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max]
    values += [finfo.tiny, -finfo.tiny, finfo.tiny / 2, -finfo.tiny / 8, 0.0, -0.0]
    return torch.tensor(values, dtype=torch.float64).to(dtype)


def _strided_view(x: torch.Tensor) -> torch.Tensor:
    # Every other element along the last dimension of a larger tensor filled
    # with 12345.0, which is a view with no flat memory order.
    wide = torch.full((*x.shape[:-1], 2 * x.shape[-1]), 12345.0, dtype=x.dtype)
    wide[..., ::2] = x
    return wide[..., ::2]


LAYOUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "contiguous": lambda x: x.contiguous(),
    "channels-last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "transposed": lambda x: x.transpose(1, 3).contiguous().transpose(1, 3),
    "permuted": lambda x: x.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2),
    "sliced": _strided_view,
}

AXES = {"per-tensor": None, "axis-0": 0, "axis-1": 1, "axis-2": 2, "axis-3": 3}

ADVERSARIAL_SHAPE = (4, 3, 6, 10)


def adversarial_input(
    quant_range: str, axis: int | None, float_zero_point: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build a tensor whose every channel contains its own adversarial values, and its qparams."""
    quant_min, quant_max = QUANT_RANGES[quant_range]
    channels = 1 if axis is None else ADVERSARIAL_SHAPE[axis]
    per_channel = math.prod(ADVERSARIAL_SHAPE) // channels
    generator = torch.Generator().manual_seed(channels)

    rows, scales, zero_points = [], [], []
    for channel in range(channels):
        scale = SCALES[channel % len(SCALES)]
        float_zp = FLOAT_ZERO_POINTS[quant_range][channel % len(FLOAT_ZERO_POINTS[quant_range])]
        zero_point = _integer_zero_point(float_zp, quant_min, quant_max)
        values = adversarial_values(scale, zero_point, quant_min, quant_max, dtype)
        tiled = values.repeat(per_channel // values.numel() + 1)[:per_channel]
        rows.append(tiled[torch.randperm(per_channel, generator=generator)])
        scales.append(scale)
        zero_points.append(float_zp if float_zero_point else zero_point)

    other = [size for dim, size in enumerate(ADVERSARIAL_SHAPE) if dim != axis]
    x = torch.stack(rows).reshape(channels, *other)
    x = x.movedim(0, axis) if axis is not None else x.reshape(ADVERSARIAL_SHAPE)

    zero_point_dtype = torch.float32 if float_zero_point else torch.int32
    scale_tensor = torch.tensor(scales, dtype=torch.float32)
    zero_point_tensor = torch.tensor(zero_points, dtype=zero_point_dtype)
    if axis is None:
        scale_tensor, zero_point_tensor = scale_tensor[0], zero_point_tensor[0]
    return x, scale_tensor, zero_point_tensor


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
@pytest.mark.parametrize("axis", list(AXES.values()), ids=list(AXES))
@pytest.mark.parametrize("quant_range", list(QUANT_RANGES))
@pytest.mark.parametrize("float_zero_point", [False, True], ids=["int-zp", "float-zp"])
def test_adversarial_input_matches_reference(
    dtype: torch.dtype,
    layout: str,
    axis: int | None,
    quant_range: str,
    float_zero_point: bool,
    block_size: None,
) -> None:
    x, scale, zero_point = adversarial_input(quant_range, axis, float_zero_point, dtype)
    x = LAYOUTS[layout](x)
    generator = torch.Generator().manual_seed(1)
    grad_output = torch.randn(x.shape, generator=generator).to(dtype)

    assert_matches_reference(x, scale, zero_point, *QUANT_RANGES[quant_range], axis, grad_output)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_non_finite_gradient_matches_reference(dtype: torch.dtype, block_size: None) -> None:
    x = torch.tensor([-20.0, -1.0, 0.0, 1.0, 20.0, 0.5, -20.0, 20.0, 3.0], dtype=dtype)
    grad_output = torch.tensor(
        [math.inf, math.inf, -math.inf, math.nan, math.nan, -1.0, -2.0, -math.inf, 1e30],
        dtype=dtype,
    )
    # Five copies, so that small blocks split the tensor.
    x, grad_output = x.repeat(5), grad_output.repeat(5)

    assert_matches_reference(x, torch.tensor(0.1), torch.tensor(0), -128, 127, None, grad_output)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("axis", [None, 0, 1], ids=["per-tensor", "axis-0", "axis-1"])
def test_expanded_input_matches_reference(dtype: torch.dtype, axis: int | None) -> None:
    generator = torch.Generator().manual_seed(2)
    row = (torch.randn(1, 37, generator=generator) * 4).to(dtype)
    x = row.expand(5, 37)  # stride 0 along dim 0
    channels = 1 if axis is None else x.shape[axis]
    scale = torch.rand(channels, generator=generator) * 0.05 + 0.01
    zero_point = torch.randint(-5, 5, (channels,), generator=generator, dtype=torch.int32)
    if axis is None:
        scale, zero_point = scale[0], zero_point[0]
    grad_output = torch.randn(x.shape, generator=generator).to(dtype)

    assert_matches_reference(x, scale, zero_point, -8, 7, axis, grad_output)


# -- seeded random inputs ---------------------------------------------------------

SHAPES = {
    "empty": (0,),
    "empty-channels": (3, 0, 4),
    "scalar": (),
    "vector": (7,),
    "matrix": (33, 17),
    "conv-weight": (16, 8, 3, 3),
    "activation": (4, 6, 9, 11),
    "five-d": (2, 3, 4, 5, 6),
}


def _random_case(
    shape: tuple[int, ...], axis: int | None, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * 3).to(dtype)
    channels = 1 if axis is None else shape[axis]
    # Scales that put roughly the outer 5% of a standard normal past the range.
    scale = (torch.rand(channels, generator=generator) * 0.02 + 0.04).float()
    zero_point = torch.randint(-10, 10, (channels,), generator=generator, dtype=torch.int32)
    if axis is None:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    grad_output = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    return x, scale, zero_point, grad_output


def _random_cases() -> list[pytest.param]:
    cases = []
    for name, shape in SHAPES.items():
        axes: list[int | None] = [None, *range(len(shape))]
        for axis in axes:
            label = "per-tensor" if axis is None else f"axis-{axis}"
            cases.append(pytest.param(shape, axis, id=f"{name}-{label}"))
    return cases


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize(("shape", "axis"), _random_cases())
def test_random_input_matches_reference(
    shape: tuple[int, ...], axis: int | None, dtype: torch.dtype, block_size: None
) -> None:
    x, scale, zero_point, grad_output = _random_case(shape, axis, dtype, seed=len(shape))

    assert_matches_reference(x, scale, zero_point, -128, 127, axis, grad_output)


@pytest.fixture
def two_threads() -> Iterator[None]:
    # The block size scales with the intra-op thread count; two threads keep
    # the large test's block count the same on every machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("axis", [None, 1], ids=["per-tensor", "axis-1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_large_input_with_default_blocks_matches_reference(
    axis: int | None, dtype: torch.dtype, two_threads: None
) -> None:
    shape = (4, 64, 96, 97)
    assert math.prod(shape) > 2 * 2 * qatcore_cpu.kernel.BLOCK_ELEMENTS_PER_THREAD
    x, scale, zero_point, grad_output = _random_case(shape, axis, dtype, seed=3)

    assert_matches_reference(x, scale, zero_point, 0, 255, axis, grad_output)


# -- hand-computed numerics ---------------------------------------------------------


def test_gradient_mask_follows_rounded_code() -> None:
    codes = torch.tensor([-9, -8.6, -8.4, -8, -1, 0, 7, 7.4, 7.6, 9])
    x = (codes * 0.1).requires_grad_()

    fake_quantize_cpu(x, torch.tensor(0.1), torch.tensor(0), -8, 7).sum().backward()

    assert x.grad is not None
    assert x.grad.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]


@pytest.mark.parametrize(
    ("zero_point", "expected"),
    [(2.7, 3), (2.5, 2), (3.5, 4), (-0.7, 0), (300.0, 255)],
    ids=["up", "tie-down", "tie-up", "negative", "above-range"],
)
def test_float_zero_point_acts_as_rounded_clamped_integer(zero_point: float, expected: int) -> None:
    x = torch.linspace(-2, 14, 41)
    scale = torch.tensor(0.05)

    per_tensor = fake_quantize_cpu(x, scale, torch.tensor(zero_point), 0, 255)
    as_integer = fake_quantize_cpu(x, scale, torch.tensor(expected, dtype=torch.int32), 0, 255)
    per_channel = fake_quantize_cpu(
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


def test_float_zero_points_per_channel_match_per_tensor() -> None:
    zero_points = [2.7, 2.5, 3.5, -0.7, 300.0]
    x = torch.linspace(-2, 14, 41).repeat(len(zero_points), 1)
    scale = torch.tensor(0.05)

    per_channel = fake_quantize_cpu(
        x, scale.repeat(len(zero_points)), torch.tensor(zero_points), 0, 255, axis=0
    )

    for channel, zero_point in enumerate(zero_points):
        per_tensor = fake_quantize_cpu(x[channel], scale, torch.tensor(zero_point), 0, 255)
        assert_identical(per_channel[channel], per_tensor, f"zero point {zero_point}")


def test_output_keeps_channels_last_layout() -> None:
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)

    y = fake_quantize_cpu(x, torch.tensor(0.05), torch.tensor(0), -128, 127)

    assert y.is_contiguous(memory_format=torch.channels_last)


def test_scale_requiring_grad_builds_graph_like_reference() -> None:
    x = torch.randn(10)
    scale = torch.tensor(0.05, requires_grad=True)

    y = fake_quantize_cpu(x, scale, torch.tensor(0), -128, 127)
    expected = qatcore.fake_quantize_reference(x, scale, torch.tensor(0), -128, 127)
    y.sum().backward()

    assert y.requires_grad == expected.requires_grad
    assert scale.grad is None


def test_no_grad_call_builds_no_graph() -> None:
    x = torch.randn(10, requires_grad=True)

    with torch.no_grad():
        y = fake_quantize_cpu(x, torch.tensor(0.05), torch.tensor(0), -128, 127)

    assert y.grad_fn is None
    assert not y.requires_grad


# -- argument checks ----------------------------------------------------------------


@pytest.mark.parametrize(
    "scale", [0.0, -0.1, math.nan, math.inf], ids=["zero", "negative", "nan", "inf"]
)
@pytest.mark.parametrize("axis", [None, 0], ids=["per-tensor", "per-channel"])
def test_invalid_scale_raises(scale: float, axis: int | None) -> None:
    x = torch.randn(3, 4)
    if axis is None:
        scales, zero_points = torch.tensor(scale), torch.tensor(0)
    else:
        scales = torch.tensor([0.1, scale, 0.1])
        zero_points = torch.zeros(3, dtype=torch.int32)

    with pytest.raises(ValueError, match="finite scales > 0"):
        fake_quantize_cpu(x, scales, zero_points, -128, 127, axis)


INVALID_ARGUMENTS = {
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
    with pytest.raises(ValueError) as cpu_error:
        fake_quantize_cpu(x, *arguments)

    assert str(cpu_error.value) == str(reference_error.value)


# -- discovery ----------------------------------------------------------------------


def test_entry_point_is_declared_by_distribution() -> None:
    entry_points = importlib.metadata.entry_points(group="qatcore")
    cpu = [entry_point for entry_point in entry_points if entry_point.name == "cpu"]

    assert len(cpu) == 1
    assert cpu[0].value == "qatcore_cpu.plugin"
    assert cpu[0].dist is not None
    assert cpu[0].dist.metadata["Name"] == "qatcore-cpu"


def test_fresh_plugin_manager_discovers_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QATCORE_BLOCK_PLUGINS", raising=False)
    monkeypatch.delenv("QATCORE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    manager = qatcore.PluginManager(strict=True)

    kernels = manager.registry.kernels

    assert kernels[("default", "cpu")] is fake_quantize_cpu
    assert kernels.entry(("default", "cpu")).plugin == "cpu"
    assert "cpu" in manager.names()


def test_process_registry_has_kernel() -> None:
    kernels = qatcore.plugin_manager().registry.kernels

    assert kernels[("default", "cpu")] is fake_quantize_cpu
    assert kernels.entry(("default", "cpu")).plugin == "cpu"


@pytest.mark.parametrize(
    "spec",
    [
        qatcore.QuantSpec(bits=8, signed=False, symmetric=False),
        qatcore.QuantSpec(bits=8, signed=True, symmetric=True, axis=0),
    ],
    ids=["per-tensor", "per-channel"],
)
def test_fake_quantize_module_runs_cpu_kernel(spec: qatcore.QuantSpec) -> None:
    fake_quant = qatcore.FakeQuantize(spec, channels=6 if spec.per_channel else None)
    x = torch.randn(6, 10, requires_grad=True)

    y = fake_quant(x)

    assert fake_quant.kernel("cpu") is fake_quantize_cpu
    assert y.grad_fn is not None
    assert type(y.grad_fn).__name__ == "_CPUFakeQuantizeBackward"
    expected = qatcore.fake_quantize_reference(
        x, fake_quant.scale, fake_quant.zero_point, spec.quant_min, spec.quant_max, spec.axis
    )
    assert_identical(y.detach(), expected.detach(), "FakeQuantize output")


# -- learnable kernel -----------------------------------------------------------------


def run_learnable(
    kernel: Callable[..., torch.Tensor],
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_range: tuple[int, int],
    axis: int | None,
    grad_factor: float,
    grad_output: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    x = x.detach().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    zero_point = zero_point.detach().clone().to(torch.float32).requires_grad_()
    out = kernel(x, scale, zero_point, *quant_range, axis, grad_factor)
    out.backward(grad_output)
    assert x.grad is not None
    assert scale.grad is not None
    assert zero_point.grad is not None
    return out.detach(), x.grad, scale.grad, zero_point.grad


def assert_matches_learnable_reference(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_range: tuple[int, int],
    axis: int | None,
    grad_factor: float,
    grad_output: torch.Tensor,
) -> None:
    """Assert that the output and all three gradients match, and the output with grad off."""
    args = (x, scale, zero_point, quant_range, axis, grad_factor, grad_output)
    actual = run_learnable(fake_quantize_learnable_cpu, *args)
    expected = run_learnable(qatcore.fake_quantize_learnable_reference, *args)
    names = ("output", "x gradient", "scale gradient", "zero-point gradient")
    for name, got, want in zip(names, actual, expected):
        assert_identical(got, want, name)

    with torch.no_grad():
        out = fake_quantize_learnable_cpu(x, scale, zero_point, *quant_range, axis, grad_factor)
    assert_identical(out, expected[0], "output without grad")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
@pytest.mark.parametrize("axis", list(AXES.values()), ids=list(AXES))
@pytest.mark.parametrize("quant_range", list(QUANT_RANGES))
def test_learnable_adversarial_input_matches_reference(
    dtype: torch.dtype, layout: str, axis: int | None, quant_range: str, block_size: None
) -> None:
    x, scale, zero_point = adversarial_input(quant_range, axis, True, dtype)
    x = LAYOUTS[layout](x)
    grad_output = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)

    assert_matches_learnable_reference(
        x, scale, zero_point, QUANT_RANGES[quant_range], axis, 0.03, grad_output
    )


@pytest.mark.parametrize(("shape", "axis"), _random_cases())
def test_learnable_random_input_matches_reference(shape: tuple[int, ...], axis: int | None) -> None:
    generator = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=generator) * 3
    channels = 1 if axis is None else shape[axis]
    scale = torch.rand(channels, generator=generator) * 0.02 + 0.04
    zero_point = torch.rand(channels, generator=generator) * 20 - 10
    if axis is None:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    grad_output = torch.randn(shape, generator=generator)

    assert_matches_learnable_reference(x, scale, zero_point, (-128, 127), axis, 0.5, grad_output)


def test_learnable_grad_output_in_other_layout_matches_reference() -> None:
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 5, 5, generator=generator).contiguous(memory_format=torch.channels_last)
    grad_output = torch.randn(2, 3, 5, 5, generator=generator)
    zero_point = torch.tensor([0.0, 3.5, -2.5])

    assert_matches_learnable_reference(
        x, torch.full((3,), 0.02), zero_point, (-8, 7), 1, 1.0, grad_output
    )


@pytest.mark.parametrize("value", [0.0, -1.0], ids=["zero", "negative"])
def test_learnable_scale_below_eps_matches_reference(value: float) -> None:
    x = torch.tensor([1e-7, -3e-7, 2e-5, 0.0])

    assert_matches_learnable_reference(
        x, torch.tensor(value), torch.tensor(0.0), (-128, 127), None, 1.0, torch.ones(4)
    )


def test_process_registry_has_learnable_kernel() -> None:
    kernels = qatcore.plugin_manager().registry.learnable_kernels

    assert kernels[("default", "cpu")] is fake_quantize_learnable_cpu
    assert kernels.entry(("default", "cpu")).plugin == "cpu"


def test_learnable_fake_quantize_module_runs_cpu_kernel() -> None:
    spec = qatcore.QuantSpec(signed=False, symmetric=False, learnable=True)
    fake_quant = qatcore.FakeQuantize(spec)

    y = fake_quant(torch.randn(6, 10, requires_grad=True))

    assert fake_quant.kernel("cpu") is fake_quantize_learnable_cpu
    assert y.grad_fn is not None
    assert type(y.grad_fn).__name__ == "_CPULearnableFakeQuantizeBackward"
