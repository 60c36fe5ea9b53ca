"""Int8 conversion for the arm backend: every conv and linear kind, compared with the QAT model."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import qatcore

pytest.importorskip("qatcore_observers")
pytest.importorskip("qatcore_conv")
pytest.importorskip("qatcore_linear")

BACKEND = "arm"
ENGINE = "qnnpack"

pytestmark = pytest.mark.skipif(
    ENGINE not in torch.backends.quantized.supported_engines,
    reason=f"this torch build has no {ENGINE} quantized engine",
)

CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED_TYPES = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BATCH_NORM_TYPES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}

# Pattern name -> (transposed, with BatchNorm, with ReLU, QAT class name without the "Nd").
CONV_PATTERNS = {
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
LINEAR_PATTERNS = {
    "linear": (False, False, "Linear"),
    "linear-relu": (False, True, "LinearReLU"),
    "linear-bn": (True, False, "LinearBn1d"),
    "linear-bn-relu": (True, True, "LinearBnReLU1d"),
}
INPUT_FACTORS = (pytest.param(1.0, id="calibrated"), pytest.param(50.0, id="far-outside"))
STEPS = 3
# The unfused layers run with and without bias. The fused ones keep it, because
# BatchNorm folding absorbs a bias into its shift.
CONV_CASES = [
    pytest.param(pattern, dims, bias, id=f"{pattern}{dims}d{'' if bias else '-no-bias'}")
    for pattern in CONV_PATTERNS
    for dims in (1, 2, 3)
    for bias in ((True, False) if pattern in ("conv", "conv-transpose") else (True,))
    if not (CONV_PATTERNS[pattern][0] and dims == 3)
]
# PyTorch 2.13's qnnpack engine returns wrong codes for every ConvTranspose3d,
# so the converter rejects it.
REJECTED_CASES = [pattern for pattern, (transposed, *_) in CONV_PATTERNS.items() if transposed]
LINEAR_CASES = [
    pytest.param(pattern, bias, id=f"{pattern}{'' if bias else '-no-bias'}")
    for pattern in LINEAR_PATTERNS
    for bias in ((True, False) if pattern == "linear" else (True,))
]


@pytest.fixture(autouse=True)
def _restore_engine() -> Iterator[None]:
    # convert() selects the backend's engine for the whole process.
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


def _conv_model(pattern: str, dims: int, bias: bool) -> nn.Sequential:
    transposed, batch_norm, relu, _ = CONV_PATTERNS[pattern]
    if transposed:
        first = TRANSPOSED_TYPES[dims](2, 3, 2, stride=2, bias=bias)
    else:
        first = CONV_TYPES[dims](2, 3, 3, padding=1, bias=bias)
    layers = [first]
    if batch_norm:
        layers.append(BATCH_NORM_TYPES[dims](3))
    if relu:
        layers.append(nn.ReLU())
    layers.append(CONV_TYPES[dims](3, 2, 3, padding=1))
    return nn.Sequential(*layers)


def _linear_model(pattern: str, bias: bool) -> nn.Sequential:
    batch_norm, relu, _ = LINEAR_PATTERNS[pattern]
    layers: list[nn.Module] = [nn.Linear(5, 6, bias=bias)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(6))
    if relu:
        layers.append(nn.ReLU())
    layers.append(nn.Linear(6, 3))
    return nn.Sequential(*layers)


def _train(model: nn.Sequential, input_shape: tuple[int, ...]) -> nn.Sequential:
    """Swap ``model`` with the preset and train a few SGD steps to move observers and BN stats."""
    qat = qatcore.swap_modules(model, qatcore.get_qconfig(BACKEND))
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.05)
    for _ in range(STEPS):
        loss = (qat(torch.randn(input_shape)) - 1).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return qat.eval()


def _output_codes(output: torch.Tensor, quantizer: qatcore.FakeQuantize) -> torch.Tensor:
    scale, zero_point = quantizer.qparams()
    return (torch.round(output / scale) + zero_point).int()


def _assert_int8_matches_qat(qat: nn.Sequential, x: torch.Tensor) -> None:
    int8 = qatcore.convert(qat, BACKEND)
    with torch.no_grad():
        expected = qat(x)
        actual = int8(x)
    output_quantizer = qat[-1].output_fake_quant
    expected_codes = _output_codes(expected, output_quantizer)
    actual_codes = _output_codes(actual, output_quantizer)

    assert (expected_codes - actual_codes).abs().max().item() <= 1
    assert actual_codes.max().item() == expected_codes.max().item()
    assert actual_codes.min().item() == expected_codes.min().item()


def _assert_outside_calibration(qat: nn.Sequential, x: torch.Tensor, factor: float) -> None:
    # The far-outside inputs exceed the input quantizer's range on both sides,
    # so the int8 input saturates where the QAT input does.
    if factor > 1:
        quantizer = qat[0].input_quantizer()
        scale, zero_point = quantizer.qparams()
        assert x.max().item() > float((quantizer.quant_max - zero_point) * scale)
        assert x.min().item() < float((quantizer.quant_min - zero_point) * scale)


def _check_wiring(qat: nn.Sequential, qat_class: str) -> None:
    assert type(qat[0]).__name__ == qat_class
    assert qat[0].input_quantizer() is not None
    # The second layer takes the first one's quantized output, so it has no
    # input quantizer and the int8 model passes the first layer's codes on.
    assert qat[-1].input_quantizer() is None


@functools.cache
def _trained_conv(pattern: str, dims: int, bias: bool) -> nn.Sequential:
    torch.manual_seed(0)
    return _train(_conv_model(pattern, dims, bias), (2, 2) + (4,) * dims)


@functools.cache
def _trained_linear(pattern: str, bias: bool) -> nn.Sequential:
    torch.manual_seed(0)
    return _train(_linear_model(pattern, bias), (4, 5))


@pytest.mark.parametrize("factor", INPUT_FACTORS)
@pytest.mark.parametrize(("pattern", "dims", "bias"), CONV_CASES)
def test_conv_pattern_matches_qat(pattern: str, dims: int, bias: bool, factor: float) -> None:
    qat = _trained_conv(pattern, dims, bias)
    _check_wiring(qat, f"{CONV_PATTERNS[pattern][3]}{dims}d")
    torch.manual_seed(1)

    x = torch.randn((2, 2) + (4,) * dims) * factor
    _assert_outside_calibration(qat, x, factor)

    _assert_int8_matches_qat(qat, x)


@pytest.mark.parametrize("factor", INPUT_FACTORS)
@pytest.mark.parametrize(("pattern", "bias"), LINEAR_CASES)
def test_linear_pattern_matches_qat(pattern: str, bias: bool, factor: float) -> None:
    qat = _trained_linear(pattern, bias)
    _check_wiring(qat, LINEAR_PATTERNS[pattern][2])
    torch.manual_seed(1)

    x = torch.randn(4, 5) * factor
    _assert_outside_calibration(qat, x, factor)

    _assert_int8_matches_qat(qat, x)


@pytest.mark.parametrize("pattern", REJECTED_CASES)
def test_transposed_conv3d_is_rejected(pattern: str) -> None:
    qat = _train(_conv_model(pattern, 3, True), (2, 2, 4, 4, 4))

    with pytest.raises(qatcore.DeployError) as raised:
        qatcore.convert(qat, BACKEND)

    message = str(raised.value)
    assert message.startswith(f"0 ({CONV_PATTERNS[pattern][3]}3d)")
    assert "ConvTranspose3d" in message
    assert "qnnpack engine" in message
    assert "arm backend" in message
    assert "Keep the layer float" in message
