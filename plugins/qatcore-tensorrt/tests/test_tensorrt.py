"""The tensorrt preset and exporter: symmetric int8, zero points of 0, checked before export."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import qatcore
from qatcore_onnx import OnnxReport, run_onnx
from qatcore_tensorrt import TENSORRT_QCONFIG

pytest.importorskip("qatcore_conv")
pytest.importorskip("qatcore_linear")
pytest.importorskip("qatcore_observers")

CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv-bn-relu2d": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
        (2, 3, 6, 6),
    ),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 3, 2)), (2, 2, 4, 4, 4)),
    "conv-transpose-bn-relu2d": (
        lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
        (2, 3, 4, 4),
    ),
    "conv-transpose1d": (lambda: nn.Sequential(nn.ConvTranspose1d(3, 4, 3)), (2, 3, 5)),
    "linear-bn-relu": (
        lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU()),
        (3, 5),
    ),
    "linear": (lambda: nn.Sequential(nn.Linear(5, 4)), (3, 5)),
}


def train_qat(float_model: nn.Module, shape: tuple[int, ...], preset: str) -> nn.Module:
    """Swap ``float_model`` with ``preset``, train a few steps, and return it in eval mode."""
    qat = qatcore.swap_modules(float_model, qatcore.get_qconfig(preset))
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.05)
    qat.train()
    for _ in range(3):
        loss = qat(torch.randn(*shape)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return qat.eval()


def test_preset_is_symmetric_int8() -> None:
    weight = TENSORRT_QCONFIG.weight
    activation = TENSORRT_QCONFIG.activation

    assert qatcore.get_qconfig("tensorrt") is TENSORRT_QCONFIG
    assert (weight.quant_min, weight.quant_max) == (-128, 127)
    assert weight.symmetric
    assert weight.axis == qatcore.OUTPUT_CHANNELS
    assert (activation.quant_min, activation.quant_max) == (-128, 127)
    assert activation.symmetric
    assert activation.axis is None


def test_plugin_registers_preset_and_exporter() -> None:
    registry = qatcore.plugin_manager().registry

    assert registry.qconfigs.entry("tensorrt").plugin == "tensorrt"
    assert registry.exporters.entry("tensorrt").plugin == "tensorrt"


def test_trained_zero_points_stay_zero() -> None:
    torch.manual_seed(0)
    factory, shape = CASES["conv-bn-relu2d"]
    qat = train_qat(factory(), shape, "tensorrt")

    for layer in qatcore.quantized_layers(qat):
        for params in (layer.input, layer.weight, layer.output):
            assert not params.zero_point.any()


@pytest.mark.parametrize("input_scale", [1.0, 50.0], ids=["calibrated", "saturated"])
@pytest.mark.parametrize("case", list(CASES))
def test_ort_matches_qat_within_one_step(case: str, input_scale: float, tmp_path: Path) -> None:
    torch.manual_seed(0)
    factory, shape = CASES[case]
    qat = train_qat(factory(), shape, "tensorrt")
    x = torch.randn(*shape) * input_scale
    step = float(qatcore.quantized_layers(qat)[-1].output.scale)

    report = qatcore.export(qat, tmp_path / "model.onnx", (x,), format="tensorrt")

    assert isinstance(report, OnnxReport)
    assert report.max_diff_steps is not None
    assert report.max_diff_steps <= 1.0
    with torch.no_grad():
        expected = qat(x)
    actual = run_onnx(report.path, x)
    assert ((actual - expected).abs() <= step * (1 + 1e-4)).all()


def test_x86_trained_model_is_rejected(tmp_path: Path) -> None:
    pytest.importorskip("qatcore_x86")
    torch.manual_seed(0)
    factory, shape = CASES["conv-bn-relu2d"]
    qat = train_qat(factory(), shape, "x86")

    with pytest.raises(qatcore.DeployError, match=r"^0 \(ConvBnReLU2d\).*zero point"):
        qatcore.export(qat, tmp_path / "model.onnx", (torch.randn(*shape),), format="tensorrt")

    assert not (tmp_path / "model.onnx").exists()


def test_opset_below_13_is_rejected(tmp_path: Path) -> None:
    torch.manual_seed(0)
    factory, shape = CASES["linear"]
    qat = train_qat(factory(), shape, "tensorrt")

    with pytest.raises(qatcore.DeployError, match=r"0 \(Linear\).*opset 13 or higher"):
        qatcore.export(
            qat, tmp_path / "model.onnx", (torch.randn(*shape),), format="tensorrt", opset=12
        )
