"""The demo job on small sizes: accuracies, plan, determinism, saved state_dict, progress."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import qatcore
from qatcore import _demo

REDUCED = {"epochs": 1, "qat_epochs": 1, "samples": 200}


@pytest.fixture(scope="module")
def demo_dependencies() -> None:
    """Skip unless scikit-learn and the plugins that the x86 demo swaps with are installed."""
    for module in ("sklearn", "qatcore_conv", "qatcore_observers", "qatcore_x86"):
        pytest.importorskip(module)


@pytest.fixture(scope="module")
def reduced_result(demo_dependencies: None) -> _demo.DemoResult:
    return _demo.run_demo(seed=0, **REDUCED)


def conv_names() -> list[str]:
    return [
        name for name, module in _demo.build_model().named_modules() if type(module) is nn.Conv2d
    ]


def test_reduced_demo_accuracies_in_range(reduced_result: _demo.DemoResult) -> None:
    assert 0.0 <= reduced_result.float_accuracy <= 1.0
    assert 0.0 <= reduced_result.qat_accuracy <= 1.0
    assert reduced_result.train_size == 160
    assert reduced_result.test_size == 40
    assert reduced_result.qconfig_name == "x86"


def test_reduced_demo_plan_covers_every_conv(reduced_result: _demo.DemoResult) -> None:
    covered = {entry.name for entry in reduced_result.plan.by_action("swap")}
    for entry in reduced_result.plan.by_action("fuse"):
        covered.update(entry.members)

    assert conv_names(), "the demo model has no conv to check"
    for name in conv_names():
        assert name in covered, f"conv {name} was neither swapped nor fused"
    assert len(reduced_result.plan.by_action("fuse")) == 3


def test_reduced_demo_model_has_no_float_conv(reduced_result: _demo.DemoResult) -> None:
    float_convs = [
        name
        for name, module in reduced_result.qat_model.named_modules()
        if isinstance(module, nn.Conv2d) and not isinstance(module, qatcore.QATModule)
    ]
    assert float_convs == []
    assert not reduced_result.qat_model.training


def test_demo_same_seed_same_result(demo_dependencies: None) -> None:
    first = _demo.run_demo(seed=3, **REDUCED)
    second = _demo.run_demo(seed=3, **REDUCED)

    assert first.float_accuracy == second.float_accuracy
    assert first.qat_accuracy == second.qat_accuracy
    first_state = first.qat_model.state_dict()
    second_state = second.qat_model.state_dict()
    assert first_state.keys() == second_state.keys()
    for key, value in first_state.items():
        assert torch.equal(value, second_state[key]), key


def test_demo_other_seed_other_weights(demo_dependencies: None) -> None:
    first = _demo.run_demo(seed=1, **REDUCED)
    second = _demo.run_demo(seed=2, **REDUCED)

    first_weight = first.qat_model.state_dict()["0.weight"]
    second_weight = second.qat_model.state_dict()["0.weight"]
    assert not torch.equal(first_weight, second_weight)


def test_demo_leaves_global_state(demo_dependencies: None) -> None:
    threads = torch.get_num_threads()
    rng_state = torch.random.get_rng_state()

    _demo.run_demo(seed=5, **REDUCED)

    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng_state)


def test_demo_output_loads_into_fresh_swap(demo_dependencies: None, tmp_path: Path) -> None:
    output = tmp_path / "new" / "folder"
    result = _demo.run_demo(seed=0, output=output, **REDUCED)

    path = output / _demo.STATE_DICT_NAME
    assert result.state_dict_path == path
    assert path.is_file()
    state_dict = torch.load(path, weights_only=True)
    fresh = qatcore.swap_modules(_demo.build_model(), qatcore.get_qconfig("x86"))
    fresh.load_state_dict(state_dict, strict=True)

    fresh.eval()
    images = _demo.load_digits_split(200).test_images
    with torch.no_grad():
        assert torch.equal(fresh(images), result.qat_model(images))


def test_split_fixed_and_stratified(demo_dependencies: None) -> None:
    first = _demo.load_digits_split()
    second = _demo.load_digits_split()

    assert len(first.train_labels) + len(first.test_labels) == _demo.DIGITS_SAMPLES
    assert torch.equal(first.test_labels, second.test_labels)
    assert torch.equal(first.test_images, second.test_images)
    assert first.train_images.shape[1:] == (1, 8, 8)
    assert first.train_images.dtype == torch.float32
    assert float(first.train_images.min()) >= 0.0
    assert float(first.train_images.max()) <= 1.0
    assert torch.bincount(first.test_labels, minlength=10).min() >= 35


@pytest.mark.parametrize("samples", [_demo.MIN_SAMPLES - 1, _demo.DIGITS_SAMPLES + 1, 0])
def test_split_rejects_samples_out_of_range(samples: int) -> None:
    with pytest.raises(ValueError, match=f"samples must be between .* got {samples}"):
        _demo.load_digits_split(samples)


@pytest.mark.parametrize("option", ["epochs", "qat_epochs"])
def test_demo_rejects_zero_epochs(option: str) -> None:
    with pytest.raises(ValueError, match=f"{option} must be at least 1, got 0"):
        _demo.run_demo(**{option: 0})


def test_missing_sklearn_names_demo_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import raise ImportError.
    for module in ("sklearn", "sklearn.datasets", "sklearn.model_selection"):
        monkeypatch.setitem(sys.modules, module, None)

    with pytest.raises(_demo.MissingDependencyError, match=r"pip install 'qatcore\[demo\]'"):
        _demo.load_digits_split()


def step(epoch: int, index: int, steps: int = 4) -> _demo.TrainingStep:
    return _demo.TrainingStep("float", epoch, 2, index, steps, 0.25)


def test_progress_bar_on_file_writes_finished_epochs() -> None:
    stream = io.StringIO()
    bar = _demo.ProgressBar(stream)

    for epoch in (1, 2):
        for index in range(1, 5):
            bar(step(epoch, index))

    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("float epoch 1/2 [" + "#" * _demo.ProgressBar.WIDTH + "] 4/4")
    assert lines[1].endswith("loss 0.2500")
    assert "\r" not in stream.getvalue()


class TerminalStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_terminal_redraws_each_step() -> None:
    stream = TerminalStream()
    bar = _demo.ProgressBar(stream)

    for index in range(1, 5):
        bar(step(1, index))

    text = stream.getvalue()
    assert text.count("\r") == 4
    assert text.endswith("\n")
    half = "#" * (_demo.ProgressBar.WIDTH // 2) + "-" * (_demo.ProgressBar.WIDTH // 2)
    assert f"[{half}] 2/4" in text


def test_demo_qconfig_changes_both_specs(demo_dependencies: None) -> None:
    qconfig = _demo.demo_qconfig("x86", observer="minmax", bits=4)

    for spec in (qconfig.weight, qconfig.activation):
        assert spec.observer == "minmax"
        assert spec.bits == 4
    assert qconfig.weight.symmetric
    assert not qconfig.activation.symmetric


def test_demo_at_four_bits_uses_sixteen_codes(demo_dependencies: None) -> None:
    result = _demo.run_demo(seed=0, observer="minmax", bits=4, **REDUCED)

    for name, module in result.qat_model.named_modules():
        if not isinstance(module, qatcore.FakeQuantize):
            continue
        if name.endswith("weight_fake_quant"):
            # The x86 preset's weights use the narrow symmetric range [-7, 7].
            assert (module.quant_min, module.quant_max) == (-7, 7)
        else:
            assert module.quant_max - module.quant_min == 15


def test_reduced_demo_scores_int8_on_x86_engine(reduced_result: _demo.DemoResult) -> None:
    engine = next(row for row in reduced_result.deployed if row.target == "x86 engine")

    assert engine.reason == ""
    assert engine.max_steps is not None
    assert engine.max_steps <= 1.0
    assert engine.agreement is not None
    assert engine.agreement >= 0.95
    assert engine.accuracy is not None
    assert abs(engine.accuracy - reduced_result.qat_accuracy) <= 0.05


def test_reduced_demo_scores_int8_in_onnx_runtime(reduced_result: _demo.DemoResult) -> None:
    pytest.importorskip("qatcore_onnx")

    runtime = next(row for row in reduced_result.deployed if row.target == "ONNX Runtime")

    assert runtime.reason == ""
    assert runtime.max_steps is not None
    assert runtime.max_steps <= 1.0
    assert runtime.accuracy is not None
    assert abs(runtime.accuracy - reduced_result.qat_accuracy) <= 0.05


def test_demo_keeps_quantized_engine(demo_dependencies: None) -> None:
    previous = torch.backends.quantized.engine
    other = next(engine for engine in torch.backends.quantized.supported_engines if engine != "x86")
    torch.backends.quantized.engine = other
    try:
        _demo.run_demo(seed=1, **REDUCED)

        assert torch.backends.quantized.engine == other
    finally:
        torch.backends.quantized.engine = previous


def test_demo_output_keeps_onnx_file(demo_dependencies: None, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("qatcore_onnx")

    result = _demo.run_demo(seed=0, output=tmp_path, **REDUCED)

    runtime = next(row for row in result.deployed if row.target == "ONNX Runtime")
    assert runtime.path == tmp_path / _demo.ONNX_NAME
    onnx.checker.check_model(onnx.load(runtime.path))
