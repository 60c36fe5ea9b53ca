"""The onnx exporter: Q/DQ placement, int8 weights, and ONNX Runtime against the QAT model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import qatcore
from qatcore_onnx import OnnxReport, export_onnx, run_onnx

pytest.importorskip("qatcore_conv")
pytest.importorskip("qatcore_linear")
pytest.importorskip("qatcore_observers")
pytest.importorskip("qatcore_x86")

# id -> (float model factory, input shape). One case per layer kind and fusion
# pattern that qatcore-conv and qatcore-linear register.
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 4, 3)), (2, 3, 8)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), (2, 3, 6, 6)),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 3, 2)), (2, 2, 4, 4, 4)),
    "conv-relu1d": (lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU()), (2, 3, 8)),
    "conv-relu2d": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (2, 3, 6, 6)),
    "conv-relu3d": (lambda: nn.Sequential(nn.Conv3d(2, 3, 2), nn.ReLU()), (2, 2, 4, 4, 4)),
    "conv-bn2d": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (2, 3, 6, 6)),
    "conv-bn-relu1d": (
        lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.ReLU()),
        (2, 3, 8),
    ),
    "conv-bn-relu2d": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU()),
        (2, 3, 7, 7),
    ),
    "conv-bn-relu3d": (
        lambda: nn.Sequential(nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3), nn.ReLU()),
        (2, 2, 4, 4, 4),
    ),
    "conv-transpose1d": (lambda: nn.Sequential(nn.ConvTranspose1d(3, 4, 3, stride=2)), (2, 3, 5)),
    "conv-transpose2d": (lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 3)), (2, 3, 4, 4)),
    "conv-transpose3d": (lambda: nn.Sequential(nn.ConvTranspose3d(2, 3, 2)), (2, 2, 3, 3, 3)),
    "grouped-conv-transpose1d": (
        lambda: nn.Sequential(nn.ConvTranspose1d(4, 6, 3, groups=2)),
        (2, 4, 5),
    ),
    "conv-transpose-relu2d": (
        lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.ReLU()),
        (2, 3, 4, 4),
    ),
    "conv-transpose-bn2d": (
        lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4)),
        (2, 3, 4, 4),
    ),
    "conv-transpose-bn-relu1d": (
        lambda: nn.Sequential(nn.ConvTranspose1d(3, 4, 3), nn.BatchNorm1d(4), nn.ReLU()),
        (2, 3, 5),
    ),
    "conv-transpose-bn-relu3d": (
        lambda: nn.Sequential(nn.ConvTranspose3d(2, 3, 2), nn.BatchNorm3d(3), nn.ReLU()),
        (2, 2, 3, 3, 3),
    ),
    "linear": (lambda: nn.Sequential(nn.Linear(5, 4)), (3, 5)),
    "linear-relu": (lambda: nn.Sequential(nn.Linear(5, 4), nn.ReLU()), (3, 5)),
    "linear-bn1d": (lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)), (3, 5)),
    "linear-bn-relu": (
        lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU()),
        (3, 5),
    ),
}

# Inputs near the training data, and far outside the calibrated range so
# that the input and output quantizers saturate.
INPUT_SCALES = (1.0, 50.0)


def train_qat(float_model: nn.Module, shape: tuple[int, ...], preset: str = "x86") -> nn.Module:
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


def output_scale(qat: nn.Module) -> float:
    return float(qatcore.quantized_layers(qat)[-1].output.scale)


def assert_within_one_step(qat: nn.Module, path: Path, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = qat(x)
    actual = run_onnx(path, x)
    step = output_scale(qat)

    assert actual.shape == expected.shape
    # 1e-4 steps absorb the float32 rounding of the two grid values.
    assert ((actual - expected).abs() <= step * (1 + 1e-4)).all()


@pytest.mark.parametrize("input_scale", INPUT_SCALES, ids=["calibrated", "saturated"])
@pytest.mark.parametrize("case", list(CASES))
def test_ort_matches_qat_within_one_step(case: str, input_scale: float, tmp_path: Path) -> None:
    torch.manual_seed(0)
    factory, shape = CASES[case]
    qat = train_qat(factory(), shape)
    x = torch.randn(*shape) * input_scale

    report = export_onnx(qat, tmp_path / "model.onnx", (x,))

    assert report.max_diff_steps is not None
    assert report.max_diff_steps <= 1.0
    assert_within_one_step(qat, report.path, x)


def test_export_leaves_model_unchanged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    factory, shape = CASES["conv-bn-relu2d"]
    qat = train_qat(factory(), shape).train()
    before = {key: value.clone() for key, value in qat.state_dict().items()}

    export_onnx(qat, tmp_path / "model.onnx", (torch.randn(*shape),))

    after = qat.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert all(module.training for module in qat.modules())


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.head(self.body(y) + y)


class PoolFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(2)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(self.pool(x)), 1))


@pytest.mark.parametrize("input_scale", INPUT_SCALES, ids=["calibrated", "saturated"])
@pytest.mark.parametrize(
    ("factory", "shape"),
    [
        pytest.param(Residual, (2, 3, 6, 6), id="residual"),
        pytest.param(PoolFirst, (2, 3, 8, 8), id="float-op-first"),
    ],
)
def test_multi_layer_model_matches_qat(
    factory: Callable[[], nn.Module], shape: tuple[int, ...], input_scale: float, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    qat = train_qat(factory(), shape)
    x = torch.randn(*shape) * input_scale

    report = export_onnx(qat, tmp_path / "model.onnx", (x,))

    assert report.max_diff_steps is not None
    assert report.max_diff_steps <= 1.0
    assert_within_one_step(qat, report.path, x)


def test_residual_add_gets_its_own_input_qdq(tmp_path: Path) -> None:
    torch.manual_seed(0)
    qat = train_qat(Residual(), (2, 3, 6, 6))

    report = export_onnx(qat, tmp_path / "model.onnx", (torch.randn(2, 3, 6, 6),))

    graph = onnx.load(report.path).graph
    producers = {output: node for node in graph.node for output in node.output}
    quantized_sums = [
        node
        for node in graph.node
        if node.op_type == "QuantizeLinear"
        and node.input[0] in producers
        and producers[node.input[0]].op_type == "Add"
    ]
    assert len(quantized_sums) == 1


def _graph(path: Path) -> onnx.GraphProto:
    return onnx.load(path).graph


def test_checker_accepts_the_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    qat = train_qat(PoolFirst(), (2, 3, 8, 8))

    report = export_onnx(qat, tmp_path / "model.onnx", (torch.randn(2, 3, 8, 8),))

    onnx.checker.check_model(onnx.load(report.path), full_check=True)
    assert isinstance(report, OnnxReport)
    assert report.opset == 17
    assert onnx.load(report.path).opset_import[0].version == 17


def test_conv_relu_share_one_output_qdq(tmp_path: Path) -> None:
    torch.manual_seed(0)
    factory, shape = CASES["conv-bn-relu2d"]
    qat = train_qat(factory(), shape)

    report = export_onnx(qat, tmp_path / "model.onnx", (torch.randn(*shape),))

    graph = _graph(report.path)
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    (conv,) = [node for node in graph.node if node.op_type == "Conv"]
    after_conv = consumers[conv.output[0]]
    assert [node.op_type for node in after_conv] == ["Relu"]
    after_relu = consumers[after_conv[0].output[0]]
    assert [node.op_type for node in after_relu] == ["QuantizeLinear"]
    after_quantize = consumers[after_relu[0].output[0]]
    assert [node.op_type for node in after_quantize] == ["DequantizeLinear"]
    assert not any(node.op_type == "BatchNormalization" for node in graph.node)


def test_weights_are_int8_codes_of_training(tmp_path: Path) -> None:
    torch.manual_seed(0)
    factory, shape = CASES["conv-bn-relu2d"]
    qat = train_qat(factory(), shape)
    layer = qatcore.quantized_layers(qat)[0]
    expected_codes = layer.weight.codes(layer.layer.weight.detach())

    report = export_onnx(qat, tmp_path / "model.onnx", (torch.randn(*shape),))

    graph = _graph(report.path)
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    (conv,) = [node for node in graph.node if node.op_type == "Conv"]
    producers = {output: node for node in graph.node for output in node.output}
    weight_dequantize = producers[conv.input[1]]
    assert weight_dequantize.op_type == "DequantizeLinear"
    codes = initializers[weight_dequantize.input[0]]
    assert codes.data_type == onnx.TensorProto.INT8
    assert torch.equal(torch.from_numpy(numpy_helper.to_array(codes).copy()).int(), expected_codes)
    axis = [attribute.i for attribute in weight_dequantize.attribute if attribute.name == "axis"]
    assert axis == [0]
    assert report.weights == 1


def test_no_float_weight_reaches_quantize_linear(tmp_path: Path) -> None:
    torch.manual_seed(0)
    qat = train_qat(Residual(), (2, 3, 6, 6))

    report = export_onnx(qat, tmp_path / "model.onnx", (torch.randn(2, 3, 6, 6),))

    graph = _graph(report.path)
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    quantized_initializers = [
        node.input[0]
        for node in graph.node
        if node.op_type == "QuantizeLinear" and node.input[0] in initializers
    ]
    assert quantized_initializers == []
    float_weights = [
        tensor.name
        for tensor in graph.initializer
        if tensor.data_type == onnx.TensorProto.FLOAT and len(tensor.dims) > 1
    ]
    assert float_weights == []
    assert report.weights == 3


def test_model_entry_has_one_input_qdq(tmp_path: Path) -> None:
    torch.manual_seed(0)
    qat = train_qat(Residual(), (2, 3, 6, 6))

    report = export_onnx(qat, tmp_path / "model.onnx", (torch.randn(2, 3, 6, 6),))

    graph = _graph(report.path)
    (graph_input,) = [item.name for item in graph.input]
    readers = [node for node in graph.node if graph_input in node.input]
    assert [node.op_type for node in readers] == ["QuantizeLinear"]
    dequantizes = [node for node in graph.node if readers[0].output[0] in node.input]
    assert [node.op_type for node in dequantizes] == ["DequantizeLinear"]


def test_narrow_activation_range_is_clipped(tmp_path: Path) -> None:
    torch.manual_seed(0)
    qconfig = qatcore.QConfig(
        weight=qatcore.QuantSpec(bits=4, axis=qatcore.OUTPUT_CHANNELS, narrow_range=True),
        activation=qatcore.QuantSpec(bits=4, signed=False, symmetric=False),
    )
    float_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    qat = qatcore.swap_modules(float_model, qconfig)
    for _ in range(3):
        qat(torch.randn(2, 3, 6, 6))
    qat.eval()
    x = torch.randn(2, 3, 6, 6) * 50

    report = export_onnx(qat, tmp_path / "model.onnx", (x,))

    assert report.max_diff_steps is not None
    assert report.max_diff_steps <= 1.0
    assert_within_one_step(qat, report.path, x)
    clips = [node for node in _graph(report.path).node if node.op_type == "Clip"]
    assert len(clips) == 2  # the input and the output, both [0, 15]


@pytest.mark.parametrize("opset", [10, 12])
def test_per_channel_weights_need_opset_13(opset: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    factory, shape = CASES["conv-relu2d"]
    qat = train_qat(factory(), shape)

    with pytest.raises(qatcore.DeployError, match=r"0 \(ConvReLU2d\).*opset 13") as caught:
        export_onnx(qat, tmp_path / "model.onnx", (torch.randn(*shape),), opset=opset)

    assert f"opset {opset} was requested" in str(caught.value)
    assert not (tmp_path / "model.onnx").exists()


def test_qdq_needs_opset_10(tmp_path: Path) -> None:
    torch.manual_seed(0)
    factory, shape = CASES["linear"]
    qat = train_qat(factory(), shape)

    with pytest.raises(qatcore.DeployError, match=r"0 \(Linear\).*since opset 10"):
        export_onnx(qat, tmp_path / "model.onnx", (torch.randn(*shape),), opset=9)


def _per_tensor_weight_model() -> nn.Module:
    x86 = qatcore.get_qconfig("x86")
    qconfig = qatcore.QConfig(
        weight=qatcore.QuantSpec(axis=None, observer=x86.weight.observer),
        activation=x86.activation,
    )
    qat = qatcore.swap_modules(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), qconfig)
    for _ in range(3):
        qat(torch.randn(2, 3, 6, 6))
    return qat.eval()


def test_per_tensor_weights_export_at_opset_10(tmp_path: Path) -> None:
    torch.manual_seed(0)
    qat = _per_tensor_weight_model()

    # ONNX Runtime 1.32 cannot run this file with its optimizations: its
    # bias quantization inserts Round, an op of opset 11, into the opset-10
    # graph. So only the checker runs here.
    report = export_onnx(
        qat, tmp_path / "model.onnx", (torch.randn(2, 3, 6, 6),), opset=10, check=False
    )

    assert report.opset == 10
    assert report.weights == 1
    onnx.checker.check_model(onnx.load(report.path), full_check=True)


def test_per_tensor_weights_run_at_opset_11(tmp_path: Path) -> None:
    torch.manual_seed(0)
    qat = _per_tensor_weight_model()
    x = torch.randn(2, 3, 6, 6)

    report = export_onnx(qat, tmp_path / "model.onnx", (x,), opset=11)

    assert report.max_diff_steps is not None
    assert report.max_diff_steps <= 1.0
    assert_within_one_step(qat, report.path, x)


def test_activation_wider_than_8_bits_is_rejected(tmp_path: Path) -> None:
    qconfig = qatcore.QConfig(
        weight=qatcore.QuantSpec(axis=qatcore.OUTPUT_CHANNELS),
        activation=qatcore.QuantSpec(bits=10, signed=False, symmetric=False),
    )
    qat = qatcore.swap_modules(nn.Sequential(nn.Linear(5, 4)), qconfig)
    qat(torch.randn(3, 5))
    qat.eval()

    with pytest.raises(qatcore.DeployError, match=r"0 \(Linear\).*\[0, 1023\]"):
        export_onnx(qat, tmp_path / "model.onnx", (torch.randn(3, 5),))


class Airy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.airy_ai(x)


def test_unsupported_op_names_its_module(tmp_path: Path) -> None:
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(5, 4), Airy(), nn.Linear(4, 2))
    qat = train_qat(float_model, (3, 5))

    with pytest.raises(qatcore.DeployError, match=r"^1 \(Airy\).*special_airy_ai"):
        export_onnx(qat, tmp_path / "model.onnx", (torch.randn(3, 5),))


def test_registered_as_onnx_format(tmp_path: Path) -> None:
    torch.manual_seed(0)
    factory, shape = CASES["linear-relu"]
    qat = train_qat(factory(), shape)
    exporters = qatcore.plugin_manager().registry.exporters

    report = qatcore.export(qat, tmp_path / "model.onnx", (torch.randn(*shape),), format="onnx")

    assert exporters.entry("onnx").plugin == "onnx"
    assert isinstance(report, OnnxReport)
    assert report.path == tmp_path / "model.onnx"


def test_check_false_skips_onnx_runtime(tmp_path: Path) -> None:
    torch.manual_seed(0)
    factory, shape = CASES["linear"]
    qat = train_qat(factory(), shape)

    report = export_onnx(qat, tmp_path / "model.onnx", (torch.randn(*shape),), check=False)

    assert report.max_abs_diff is None
    assert report.max_diff_steps is None
    assert report.path.exists()


def test_run_onnx_rejects_wrong_input_count(tmp_path: Path) -> None:
    torch.manual_seed(0)
    factory, shape = CASES["linear"]
    qat = train_qat(factory(), shape)
    report = export_onnx(qat, tmp_path / "model.onnx", (torch.randn(*shape),))

    with pytest.raises(ValueError, match=r"takes 1 inputs \(input\), got 2"):
        run_onnx(report.path, (torch.randn(*shape), torch.randn(*shape)))


def test_export_prints_nothing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    factory, shape = CASES["conv-relu2d"]
    qat = train_qat(factory(), shape)
    capfd.readouterr()

    export_onnx(qat, tmp_path / "model.onnx", (torch.randn(*shape),))

    captured = capfd.readouterr()
    assert captured.out == ""
    assert captured.err == ""
