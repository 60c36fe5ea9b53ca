"""The onnx exporter: Q/DQ placement, int8 weights, and ONNX Runtime against the QAT model."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import qatcore
from qatcore.testing import DeployCase, check_deployed_output, deploy_cases, train_deploy_case
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


@pytest.mark.parametrize("input_scale", INPUT_SCALES, ids=["calibrated", "saturated"])
@pytest.mark.parametrize("case", deploy_cases(), ids=str)
def test_every_pattern_matches_qat(case: DeployCase, input_scale: float, tmp_path: Path) -> None:
    qat = train_deploy_case(case, qatcore.get_qconfig("x86"))
    torch.manual_seed(1)
    x = torch.randn(case.input_shape) * input_scale

    report = export_onnx(qat, tmp_path / "model.onnx", (x,))

    with torch.no_grad():
        check_deployed_output(qat, qat(x), run_onnx(report.path, x))


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


def _ort_optimized_ops(path: Path, tmp_path: Path) -> list[str]:
    """Return the op types of the graph that ONNX Runtime runs, at run_onnx's ORT_ENABLE_ALL."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "ort-optimized.onnx")
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


FLOAT_COMPUTE_OPS = {"Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul"}


class SmallCnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(8 * 2 * 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


# id -> (float model factory, input shape, the int8 op ONNX Runtime runs it as)
INT8_CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], str]] = {
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU()), (2, 3, 8), "QLinearConv"),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 3, 2)), (2, 2, 4, 4, 4), "QLinearConv"),
    "grouped-conv2d": (
        lambda: nn.Sequential(nn.Conv2d(4, 6, 3, groups=2)),
        (2, 4, 6, 6),
        "QLinearConv",
    ),
    "linear": (lambda: nn.Sequential(nn.Linear(5, 4)), (3, 5), "QGemm"),
    "linear-3d-input": (lambda: nn.Sequential(nn.Linear(5, 4), nn.ReLU()), (2, 3, 5), "QGemm"),
    "linear-no-bias": (lambda: nn.Sequential(nn.Linear(5, 4, bias=False)), (3, 5), "QLinearMatMul"),
}


# The presets whose activations ONNX Runtime runs in int8; arm comes from qatcore-arm.
INT8_PRESETS = [
    "x86",
    pytest.param(
        "arm",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("qatcore_arm") is None, reason="needs qatcore-arm"
        ),
    ),
]


@pytest.mark.parametrize("preset", INT8_PRESETS)
def test_ort_runs_cnn_in_int8(preset: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    qat = train_qat(SmallCnn(), (4, 3, 8, 8), preset)
    x = torch.randn(4, 3, 8, 8)

    report = export_onnx(qat, tmp_path / "model.onnx", (x,))

    ops = _ort_optimized_ops(report.path, tmp_path)
    assert ops.count("QLinearConv") == 2
    assert ops.count("QGemm") == 1
    assert FLOAT_COMPUTE_OPS.isdisjoint(ops), ops
    assert report.max_diff_steps is not None
    assert report.max_diff_steps <= 1.0
    assert_within_one_step(qat, report.path, x)


@pytest.mark.parametrize("preset", INT8_PRESETS)
@pytest.mark.parametrize("case", list(INT8_CASES))
def test_ort_runs_layer_in_int8(case: str, preset: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    factory, shape, int8_op = INT8_CASES[case]
    qat = train_qat(factory(), shape, preset)
    x = torch.randn(*shape) * 3

    report = export_onnx(qat, tmp_path / "model.onnx", (x,))

    ops = _ort_optimized_ops(report.path, tmp_path)
    assert ops.count(int8_op) == 1
    assert FLOAT_COMPUTE_OPS.isdisjoint(ops), ops
    assert report.max_diff_steps is not None
    assert report.max_diff_steps <= 1.0
    assert_within_one_step(qat, report.path, x)


def test_narrow_range_layer_runs_float_in_ort(tmp_path: Path) -> None:
    torch.manual_seed(0)
    qconfig = qatcore.QConfig(
        weight=qatcore.QuantSpec(bits=4, axis=qatcore.OUTPUT_CHANNELS, narrow_range=True),
        activation=qatcore.QuantSpec(bits=4, signed=False, symmetric=False),
    )
    qat = qatcore.swap_modules(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), qconfig)
    for _ in range(3):
        qat(torch.randn(2, 3, 6, 6))
    qat.eval()

    report = export_onnx(qat, tmp_path / "model.onnx", (torch.randn(2, 3, 6, 6) * 50,))

    ops = _ort_optimized_ops(report.path, tmp_path)
    assert "QLinearConv" not in ops
    assert ops.count("Conv") == 1
    assert ops.count("Clip") == 2
    assert report.max_diff_steps == 0.0


def test_linear_3d_input_keeps_dynamic_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    qat = train_qat(nn.Sequential(nn.Linear(5, 4), nn.ReLU()), (2, 3, 5))

    report = export_onnx(
        qat,
        tmp_path / "model.onnx",
        (torch.randn(2, 3, 5),),
        dynamic_axes={"input": {0: "batch", 1: "sequence"}},
    )

    assert_within_one_step(qat, report.path, torch.randn(6, 7, 5) * 3)


def test_float64_model_is_rejected(tmp_path: Path) -> None:
    torch.manual_seed(0)
    factory, shape = CASES["conv-relu2d"]
    qat = train_qat(factory(), shape).double()

    with pytest.raises(qatcore.DeployError, match=r"float64.*model\.float\(\)") as caught:
        export_onnx(qat, tmp_path / "model.onnx", (torch.randn(*shape, dtype=torch.float64),))

    assert "module not found" not in str(caught.value)
    assert "opset" not in str(caught.value)
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize(
    ("x", "model_error"),
    [
        pytest.param(torch.randn(3, 7), "cannot be multiplied", id="wrong-shape"),
        pytest.param(torch.ones(3, 5, dtype=torch.int64), "Long", id="integer-dtype"),
    ],
)
def test_inputs_the_model_rejects(x: torch.Tensor, model_error: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    factory, shape = CASES["linear-relu"]
    qat = train_qat(factory(), shape)

    with pytest.raises(qatcore.DeployError, match="raises on the example inputs") as caught:
        export_onnx(qat, tmp_path / "model.onnx", (x,))

    message = str(caught.value)
    assert model_error in message
    assert f"shape {tuple(x.shape)}" in message
    assert "module not found" not in message
    assert "opset" not in message
    assert not (tmp_path / "model.onnx").exists()


def _fail_if_exported(*args: object, **kwargs: object) -> None:
    raise AssertionError("torch.onnx.export ran before the output path was checked")


def test_missing_output_folder_fails_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    factory, shape = CASES["linear"]
    qat = train_qat(factory(), shape)
    monkeypatch.setattr(torch.onnx, "export", _fail_if_exported)
    path = tmp_path / "missing" / "model.onnx"

    with pytest.raises(FileNotFoundError, match="does not exist; create it first") as caught:
        export_onnx(qat, path, (torch.randn(*shape),))

    assert str(tmp_path / "missing") in str(caught.value)
    assert str(path) in str(caught.value)


def test_directory_output_path_fails_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    factory, shape = CASES["linear"]
    qat = train_qat(factory(), shape)
    monkeypatch.setattr(torch.onnx, "export", _fail_if_exported)

    with pytest.raises(IsADirectoryError, match="is a directory; pass a file path") as caught:
        export_onnx(qat, tmp_path, (torch.randn(*shape),))

    assert str(tmp_path) in str(caught.value)
    assert not list(tmp_path.iterdir())


def test_failed_export_prints_nothing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    qat = train_qat(nn.Sequential(nn.Linear(5, 4), Airy(), nn.Linear(4, 2)), (3, 5))
    capfd.readouterr()

    with pytest.raises(qatcore.DeployError, match="special_airy_ai"):
        export_onnx(qat, tmp_path / "model.onnx", (torch.randn(3, 5),))

    captured = capfd.readouterr()
    assert captured.out == ""
    assert captured.err == ""


def test_nan_outputs_are_counted_not_measured(tmp_path: Path) -> None:
    torch.manual_seed(0)
    factory, shape = CASES["linear"]
    qat = train_qat(factory(), shape)
    x = torch.randn(*shape)
    x[1, 2] = float("nan")

    report = export_onnx(qat, tmp_path / "model.onnx", (x,))

    assert report.nan_outputs == 4  # the whole row of the NaN sample
    assert report.max_abs_diff is not None
    assert math.isfinite(report.max_abs_diff)
    assert report.max_diff_steps is not None
    assert report.max_diff_steps <= 1.0
    text = str(report)
    assert "inf" not in text
    assert "4 output values are NaN in the QAT model" in text
    assert torch.isfinite(report.outputs[0]).all()


class DataWrite(nn.Module):
    """Two convs with a write to ``.data`` between them, which tracing does not record."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3)
        self.second = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.first(x)
        y.data.mul_(3)
        return self.second(y)


class OutArgument(nn.Module):
    """A conv whose output is changed through an ``out=`` argument, which the exporter rejects."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        torch.mul(y, 3, out=y)
        return y


def test_untraced_write_is_rejected(tmp_path: Path) -> None:
    torch.manual_seed(0)
    qat = train_qat(DataWrite(), (4, 3, 8, 8))

    with pytest.raises(qatcore.DeployError) as error:
        export_onnx(qat, tmp_path / "model.onnx", (torch.randn(4, 3, 8, 8),))

    message = str(error.value)
    assert "output quantization steps on the example inputs" in message
    assert "where at most 1 is expected" in message
    assert ".data" in message


def test_out_argument_names_the_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    qat = qatcore.swap_modules(OutArgument(), qatcore.get_qconfig("x86"))
    with torch.no_grad():  # an out= argument takes no tensor that requires grad
        qat(torch.randn(4, 3, 8, 8))
    qat.eval()

    with pytest.raises(qatcore.DeployError, match=r"^OutArgument .*cannot write it"):
        export_onnx(qat, tmp_path / "model.onnx", (torch.randn(4, 3, 8, 8),))
