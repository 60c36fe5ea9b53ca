"""qatcore.convert across plugins: model shapes, round trips through a new process, and errors."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import torch
from torch import nn

import qatcore

pytest.importorskip("qatcore_observers")
pytest.importorskip("qatcore_conv")
pytest.importorskip("qatcore_linear")
pytest.importorskip("qatcore_x86")
pytest.importorskip("qatcore_arm")

# Backend name -> the PyTorch quantized engine its converter uses.
ENGINES = {"x86": "x86", "arm": "qnnpack"}
# Backend name -> how conversion errors name the backend and its engine.
TARGETS = {"x86": "the x86 engine", "arm": "the arm backend (qnnpack engine)"}
BACKENDS = [
    pytest.param(
        backend,
        id=backend,
        marks=pytest.mark.skipif(
            engine not in torch.backends.quantized.supported_engines,
            reason=f"this torch build has no {engine} quantized engine",
        ),
    )
    for backend, engine in ENGINES.items()
]

# The model of the round trip, defined once as source so that a new process
# builds exactly the model the test process trains.
MODEL_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
            self.body = nn.Conv2d(4, 4, 3, padding=1)
            self.up = nn.ConvTranspose2d(4, 3, 2, stride=2)
            self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(3 * 8 * 8, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.stem(x)
            y = self.body(y) + y
            return self.head(self.up(y))


    def build_model() -> nn.Module:
        torch.manual_seed(0)
        return Residual()
    """
)

CHILD_SOURCE = textwrap.dedent(
    """
    import sys

    import torch

    import qatcore
    from model import build_model

    backend, state_path, inputs_path, outputs_path = sys.argv[1:]
    qat = qatcore.swap_modules(build_model(), qatcore.get_qconfig(backend))
    qat.load_state_dict(torch.load(state_path))
    qat.eval()
    int8 = qatcore.convert(qat, backend)
    with torch.no_grad():
        torch.save(int8(torch.load(inputs_path)), outputs_path)
    """
)


def _build_model() -> nn.Module:
    namespace: dict[str, object] = {}
    exec(compile(MODEL_SOURCE, "model.py", "exec"), namespace)
    return namespace["build_model"]()  # type: ignore[operator]


@pytest.fixture(autouse=True)
def _restore_engine() -> Iterator[None]:
    # convert() selects the backend's engine for the whole process.
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


def _train(qat: nn.Module, input_shape: tuple[int, ...], steps: int = 3) -> nn.Module:
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.05)
    for _ in range(steps):
        loss = (qat(torch.randn(input_shape)) - 1).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return qat


def _max_steps(qat: nn.Module, int8: nn.Module, x: torch.Tensor, output_scale: float) -> float:
    with torch.no_grad():
        return ((qat(x) - int8(x)).abs().max() / output_scale).item()


class _ResidualConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(2, 4, 3, padding=1)
        self.second = nn.Conv2d(4, 4, 3, padding=1)
        self.last = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.first(x)
        return self.last(self.second(y) + y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_add_matches_qat(backend: str) -> None:
    qat = qatcore.swap_modules(_ResidualConvs(), qatcore.get_qconfig(backend))
    _train(qat, (2, 2, 5, 5)).eval()
    int8 = qatcore.convert(qat, backend)

    # The sum of the residual connection is on no quantizer's grid, so the
    # last conv quantizes its input itself.
    assert qat.second.input_quantizer() is None
    assert qat.last.input_quantizer() is not None
    assert isinstance(int8.last, qatcore.Int8Layer)
    output_scale = float(qat.last.output_fake_quant.qparams()[0])
    for factor in (1.0, 50.0):
        x = torch.randn(2, 2, 5, 5) * factor
        assert _max_steps(qat, int8, x, output_scale) <= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_flatten_then_linear_matches_qat(backend: str) -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 4)
    )
    qat = qatcore.swap_modules(model, qatcore.get_qconfig(backend))
    _train(qat, (2, 2, 4, 4)).eval()
    int8 = qatcore.convert(qat, backend)

    # Max pooling and flattening keep the conv's codes, so the linear takes them.
    assert qat[4].input_quantizer() is None
    assert isinstance(int8[0], qatcore.Int8Layer)
    assert isinstance(int8[4], qatcore.Int8Layer)
    output_scale = float(qat[4].output_fake_quant.qparams()[0])
    for factor in (1.0, 50.0):
        x = torch.randn(2, 2, 4, 4) * factor
        assert _max_steps(qat, int8, x, output_scale) <= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_module_is_converted_once(backend: str) -> None:
    shared = nn.Conv2d(2, 2, 3, padding=1)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    qat = qatcore.swap_modules(model, qatcore.get_qconfig(backend), fuse=False)
    _train(qat, (2, 2, 4, 4)).eval()
    int8 = qatcore.convert(qat, backend)

    # Its two calls take inputs from different producers, so it quantizes its input.
    assert qat[0] is qat[2]
    assert qat[0].input_quantizer() is not None
    assert isinstance(int8[0], qatcore.Int8Layer)
    assert int8[0] is int8[2]
    output_scale = float(qat[2].output_fake_quant.qparams()[0])
    for factor in (1.0, 50.0):
        x = torch.randn(2, 2, 4, 4) * factor
        assert _max_steps(qat, int8, x, output_scale) <= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_in_new_process_is_bit_identical(backend: str, tmp_path: Path) -> None:
    qat = qatcore.swap_modules(_build_model(), qatcore.get_qconfig(backend))
    _train(qat, (2, 2, 4, 4)).eval()
    torch.manual_seed(1)
    inputs = torch.cat([torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4) * 50])
    with torch.no_grad():
        expected = qatcore.convert(qat, backend)(inputs)
    (tmp_path / "model.py").write_text(MODEL_SOURCE)
    (tmp_path / "child.py").write_text(CHILD_SOURCE)
    torch.save(qat.state_dict(), tmp_path / "state.pt")
    torch.save(inputs, tmp_path / "inputs.pt")

    result = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "child.py"),
            backend,
            str(tmp_path / "state.pt"),
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "outputs.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    actual = torch.load(tmp_path / "outputs.pt")
    assert torch.equal(actual, expected)


def _qat_conv(backend: str, qconfig: qatcore.QConfig | None = None, **options: object) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, **options), nn.Conv2d(3, 2, 1))
    qat = qatcore.swap_modules(model, qconfig or qatcore.get_qconfig(backend))
    return _train(qat, (2, 2, 4, 4)).eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_input_quantizer_is_rejected(backend: str) -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 2, 1))
    qat = qatcore.swap_modules(model, qatcore.get_qconfig(backend), quantize_inputs=False)

    with pytest.raises(qatcore.DeployError) as raised:
        qatcore.convert(qat.eval(), backend)

    message = str(raised.value)
    assert message.startswith("0 (Conv2d): its input has no fake quantizer")
    assert "quantize_inputs=False" in message


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_only_qconfig_is_rejected(backend: str) -> None:
    weight_only = attrs.evolve(qatcore.get_qconfig(backend), activation=None)
    qat = _qat_conv(backend, weight_only)

    with pytest.raises(qatcore.DeployError) as raised:
        qatcore.convert(qat, backend)

    message = str(raised.value)
    assert message.startswith("0 (Conv2d): its output is not quantized")
    assert "QConfig.activation is None" in message
    assert "swap it with a QConfig that sets QConfig.activation" in message


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_channel_output_is_rejected(backend: str) -> None:
    preset = qatcore.get_qconfig(backend)
    per_channel = attrs.evolve(
        preset, activation=attrs.evolve(preset.activation, axis=qatcore.OUTPUT_CHANNELS)
    )
    qat = _qat_conv(backend, per_channel)

    with pytest.raises(qatcore.DeployError) as raised:
        qatcore.convert(qat, backend)

    message = str(raised.value)
    assert message.startswith("0 (Conv2d): its output is quantized per channel (axis 1)")
    assert "use QuantSpec(axis=None) in QConfig.activation" in message


@pytest.mark.parametrize("backend", BACKENDS)
def test_circular_padding_is_rejected(backend: str) -> None:
    qat = _qat_conv(backend, padding_mode="circular")

    with pytest.raises(qatcore.DeployError) as raised:
        qatcore.convert(qat, backend)

    message = str(raised.value)
    assert message.startswith(f"0 (Conv2d): cannot convert for {TARGETS[backend]}")
    assert "padding_mode='circular'" in message
    assert "use 'zeros' or 'reflect'" in message


@pytest.mark.parametrize("backend", BACKENDS)
def test_signed_activations_are_rejected(backend: str) -> None:
    preset = qatcore.get_qconfig(backend)
    signed = attrs.evolve(preset, activation=attrs.evolve(preset.activation, signed=True))
    qat = _qat_conv(backend, signed)

    with pytest.raises(qatcore.DeployError) as raised:
        qatcore.convert(qat, backend)

    message = str(raised.value)
    assert message.startswith(f"0 (Conv2d): cannot convert for {TARGETS[backend]}")
    spec = signed.activation
    assert f"codes span [{spec.quant_min}, {spec.quant_max}]" in message
    assert f"unsigned activation spec such as the {backend!r} preset's" in message


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_engine_at_run_time_is_rejected(backend: str) -> None:
    int8 = qatcore.convert(_qat_conv(backend), backend)
    other = next(
        engine
        for engine in torch.backends.quantized.supported_engines
        if engine not in ("none", ENGINES[backend])
    )
    torch.backends.quantized.engine = other

    with pytest.raises(RuntimeError) as raised:
        int8(torch.randn(1, 2, 4, 4))

    message = str(raised.value)
    assert message.startswith("0: this int8 layer was converted for the")
    assert f"torch.backends.quantized.engine is {other!r}" in message
    assert f"set torch.backends.quantized.engine = {ENGINES[backend]!r}" in message


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_without_qat_module_is_rejected(backend: str) -> None:
    with pytest.raises(qatcore.DeployError) as raised:
        qatcore.convert(nn.Sequential(nn.ReLU()), backend)

    message = str(raised.value)
    assert message.startswith("Sequential has no QAT module to deploy")
    assert "qatcore.swap_modules(model, qconfig)" in message


def test_unknown_backend_lists_registered_ones() -> None:
    with pytest.raises(KeyError) as raised:
        qatcore.convert(_qat_conv("x86"), "tpu")

    message = str(raised.value)
    assert "'tpu'" in message
    assert "'arm'" in message
    assert "'x86'" in message


@pytest.mark.parametrize(
    "training", [pytest.param(True, id="train"), pytest.param(False, id="eval")]
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_convert_leaves_qat_model_unchanged(backend: str, training: bool) -> None:
    qat = qatcore.swap_modules(_build_model(), qatcore.get_qconfig(backend))
    _train(qat, (2, 2, 4, 4)).train(training)
    state = copy.deepcopy(qat.state_dict())
    types = [type(module) for module in qat.modules()]

    qatcore.convert(qat, backend)

    assert qat.training is training
    assert all(module.training is training for module in qat.modules())
    assert [type(module) for module in qat.modules()] == types
    after = qat.state_dict()
    assert list(after) == list(state)
    for key, value in state.items():
        assert torch.equal(after[key], value), key


FULL_RANGE = qatcore.QConfig(
    weight=qatcore.QuantSpec(axis=qatcore.OUTPUT_CHANNELS),
    activation=qatcore.QuantSpec(bits=8, signed=False, symmetric=False),
)

# Converts a full-range model and an x86-preset model in a process whose
# FBGEMM and oneDNN are limited to AVX2, as on a CPU without VNNI.
AVX2_SOURCE = textwrap.dedent(
    """
    import json

    import torch
    from torch import nn

    import qatcore

    full_range = qatcore.QConfig(
        weight=qatcore.QuantSpec(axis=qatcore.OUTPUT_CHANNELS),
        activation=qatcore.QuantSpec(bits=8, signed=False, symmetric=False),
    )
    results = {}
    for name, qconfig in (("full_range", full_range), ("x86", qatcore.get_qconfig("x86"))):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(64, 8, 1), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
        qat = qatcore.swap_modules(model, qconfig)
        for _ in range(3):
            qat(torch.rand(8, 64, 4, 4))
        qat.eval()
        try:
            int8 = qatcore.convert(qat, "x86")
        except qatcore.DeployError as error:
            results[name] = str(error)
            continue
        x = torch.rand(8, 64, 4, 4) * 50
        scale = float(qat[2].output_fake_quant.scale)
        with torch.no_grad():
            results[name] = float((int8(x) - qat(x)).abs().max()) / scale
    print(json.dumps(results))
    """
)


def test_full_range_inputs_rejected_without_vnni(tmp_path: Path) -> None:
    script = tmp_path / "avx2.py"
    script.write_text(AVX2_SOURCE)
    environment = {
        **os.environ,
        "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "PYTHONWARNINGS": "ignore",
    }

    completed = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
        check=True,
    )

    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert "0 (Conv2d)" in results["full_range"]
    assert "adds such pairs in int16" in results["full_range"]
    assert "QuantSpec(bits=7, narrow_range=True)" in results["full_range"]
    assert results["x86"] <= 1.0 + 1e-4


def test_full_range_inputs_follow_this_cpu() -> None:
    from qatcore._int8 import _saturates_pair_sums

    torch.backends.quantized.engine = "x86"
    qat = _train(
        qatcore.swap_modules(nn.Sequential(nn.Conv2d(64, 8, 1)), FULL_RANGE), (8, 64, 4, 4)
    )
    qat.eval()

    if _saturates_pair_sums("x86", torch.ao.nn.quantized.Conv2d):
        with pytest.raises(qatcore.DeployError, match="adds such pairs in int16"):
            qatcore.convert(qat, "x86")
        return
    int8 = qatcore.convert(qat, "x86")
    x = torch.rand(8, 64, 4, 4) * 50
    assert _max_steps(qat, int8, x, float(qat[0].output_fake_quant.scale)) <= 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_hooks_run_in_int8_layer(backend: str) -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 2, 1))
    model[0].register_forward_hook(lambda module, args, output: output * 3)
    model[1].register_forward_pre_hook(lambda module, args: (args[0] + 0.5,))
    qat = _train(qatcore.swap_modules(model, qatcore.get_qconfig(backend)), (4, 2, 6, 6))
    qat.eval()

    int8 = qatcore.convert(qat, backend)

    assert len(int8[0]._forward_hooks) == 1
    assert len(int8[1]._forward_pre_hooks) == 1
    x = torch.randn(4, 2, 6, 6)
    assert _max_steps(qat, int8, x, float(qat[1].output_fake_quant.scale)) <= 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_hook_inside_qat_module_is_rejected(backend: str) -> None:
    qat = _train(
        qatcore.swap_modules(nn.Sequential(nn.Conv2d(2, 4, 3)), qatcore.get_qconfig(backend)),
        (4, 2, 6, 6),
    )
    qat.eval()
    qat[0].output_fake_quant.register_forward_hook(lambda module, args, output: output)

    with pytest.raises(qatcore.DeployError) as error:
        qatcore.convert(qat, backend)

    assert "0 (Conv2d): its submodule output_fake_quant" in str(error.value)
    assert "remove the hook" in str(error.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_padding_converts(backend: str, padding: str) -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=padding, dilation=2), nn.Conv2d(4, 2, 1))
    qat = _train(qatcore.swap_modules(model, qatcore.get_qconfig(backend)), (4, 2, 9, 9))
    qat.eval()

    int8 = qatcore.convert(qat, backend)

    x = torch.randn(4, 2, 9, 9)
    assert int8(x).shape == qat(x).shape
    assert _max_steps(qat, int8, x, float(qat[1].output_fake_quant.scale)) <= 1.0


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("backend", BACKENDS)
def test_uneven_same_padding_is_rejected(backend: str) -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 2, padding="same"), nn.Conv2d(3, 2, 1))
    qat = _train(qatcore.swap_modules(model, qatcore.get_qconfig(backend)), (2, 2, 4, 4)).eval()

    with pytest.raises(qatcore.DeployError) as raised:
        qatcore.convert(qat, backend)

    message = str(raised.value)
    assert message.startswith(f"0 (Conv2d): cannot convert for {TARGETS[backend]}")
    assert "padding='same' pads one side more than the other" in message
    assert "explicit padding" in message


def test_activation_wider_than_8_bits_is_rejected() -> None:
    spec = qatcore.QuantSpec(bits=9, signed=False, symmetric=False)
    qconfig = attrs.evolve(qatcore.get_qconfig("x86"), activation=spec)
    qat = _qat_conv("x86", qconfig)

    with pytest.raises(qatcore.DeployError) as raised:
        qatcore.convert(qat, "x86")

    message = str(raised.value)
    assert "codes span [0, 511]" in message
    assert "at most 8 bits" in message
    assert "unsigned activation spec" not in message


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("copier", ["torch.save", "deepcopy"])
def test_converted_model_runs_after_copy(backend: str, copier: str) -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 2, 2, stride=2), nn.Conv2d(2, 2, 1)
    )
    qat = _train(qatcore.swap_modules(model, qatcore.get_qconfig(backend)), (2, 2, 6, 6)).eval()
    int8 = qatcore.convert(qat, backend)

    if copier == "deepcopy":
        copied = copy.deepcopy(int8)
    else:
        buffer = io.BytesIO()
        torch.save(int8, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)

    x = torch.randn(2, 2, 6, 6)
    with torch.no_grad():
        assert torch.equal(copied(x), int8(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_conv_output_keeps_layout(backend: str) -> None:
    qat = _train(
        qatcore.swap_modules(nn.Sequential(nn.Conv2d(2, 4, 3)), qatcore.get_qconfig(backend)),
        (2, 2, 6, 6),
    ).eval()
    int8 = qatcore.convert(qat, backend)

    output = int8(torch.randn(2, 2, 6, 6))

    assert output.is_contiguous()
    assert output.view(2, -1).shape == (2, 64)


class _DataAssignment(nn.Module):
    """Two convs with an assignment to ``.data`` between them, which torch.fx does not record."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(2, 4, 3)
        self.second = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.first(x)
        y.data = y.data * 3
        return self.second(y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_example_inputs_catch_untraced_change(backend: str) -> None:
    qat = _train(
        qatcore.swap_modules(_DataAssignment(), qatcore.get_qconfig(backend)), (4, 2, 6, 6)
    )
    qat.eval()

    with pytest.raises(qatcore.DeployError) as raised:
        qatcore.convert(qat, backend, example_inputs=(torch.randn(4, 2, 6, 6),))

    message = str(raised.value)
    assert message.startswith(f"second (Conv2d): on the example inputs its {backend} int8 layer")
    assert "the quantized output of first" in message
    assert ".data" in message


@pytest.mark.parametrize("backend", BACKENDS)
def test_example_inputs_pass_for_residual_model(backend: str) -> None:
    qat = _train(qatcore.swap_modules(_ResidualConvs(), qatcore.get_qconfig(backend)), (4, 2, 6, 6))
    modes = [module.training for module in qat.modules()]

    int8 = qatcore.convert(qat, backend, example_inputs=(torch.randn(4, 2, 6, 6) * 50,))

    assert isinstance(int8.second, qatcore.Int8Layer)
    assert [module.training for module in qat.modules()] == modes


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_model_converts(backend: str) -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).double()
    qat = qatcore.swap_modules(model, qatcore.get_qconfig(backend))
    torch.manual_seed(0)
    for _ in range(3):  # observe float64 batches
        qat(torch.randn(2, 2, 6, 6, dtype=torch.float64))
    qat.eval()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64) * 50

    int8 = qatcore.convert(qat, backend, example_inputs=(x,))

    assert int8(x).dtype == torch.float64
    assert _max_steps(qat, int8, x, float(qat[2].output_fake_quant.scale)) <= 1.0
