"""``qatcore export``: a trained QAT state_dict to an ONNX file, with its checks and errors."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import qatcore
from qatcore import _demo
from qatcore._cli import main

pytest.importorskip("qatcore_conv")
pytest.importorskip("qatcore_observers")
pytest.importorskip("qatcore_x86")
onnx = pytest.importorskip("onnx")
pytest.importorskip("qatcore_onnx")

FACTORY_MODULE = "qatcore_export_models"
FACTORY_SOURCE = """\
    from torch import nn


    def build():
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.Flatten())


    def build_other():
        return nn.Sequential(nn.Conv2d(1, 8, 3), nn.Flatten())


    def build_longer():
        return nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.Conv2d(2, 2, 1), nn.Flatten()
        )
"""


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / f"{FACTORY_MODULE}.py").write_text(textwrap.dedent(FACTORY_SOURCE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield FACTORY_MODULE
    sys.modules.pop(FACTORY_MODULE, None)


def trained_state_dict(model: nn.Module, shape: tuple[int, ...], path: Path) -> Path:
    torch.manual_seed(0)
    qat_model = qatcore.swap_modules(model, qatcore.get_qconfig("x86"))
    optimizer = torch.optim.SGD(qat_model.parameters(), lr=0.01)
    for _ in range(3):
        loss = qat_model(torch.rand(shape)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save(qat_model.state_dict(), path)
    return path


def test_export_writes_checked_onnx(
    factory_module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from qatcore_export_models import build  # type: ignore[import-not-found]

    state = trained_state_dict(build(), (4, 1, 8, 8), tmp_path / "qat.pt")
    output = tmp_path / "model.onnx"

    code = main(
        [
            "export",
            f"{factory_module}:build",
            "--state-dict",
            str(state),
            "--input-shape",
            "2,1,8,8",
            "-o",
            str(output),
        ]
    )

    printed = capsys.readouterr().out
    assert code == 0
    onnx.checker.check_model(onnx.load(output), full_check=True)
    assert f"to {output} (onnx)" in printed
    assert "output quantization steps" in printed


def test_export_demo_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = trained_state_dict(_demo.build_model(), (8, 1, 8, 8), tmp_path / "qat.pt")
    output = tmp_path / "digits.onnx"

    code = main(["export", "demo", "--state-dict", str(state), "-o", str(output)])

    assert code == 0
    model = onnx.load(output)
    assert [value.type.tensor_type.shape.dim[1].dim_value for value in model.graph.input] == [1]


@pytest.mark.parametrize(
    ("factory", "detail"),
    [("build_other", "size mismatch for 0.weight"), ("build_longer", "unexpected: 3.weight")],
)
def test_export_rejects_state_dict_of_other_model(
    factory_module: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    factory: str,
    detail: str,
) -> None:
    import qatcore_export_models  # type: ignore[import-not-found]

    model = getattr(qatcore_export_models, factory)()
    state = trained_state_dict(model, (2, 1, 8, 8), tmp_path / "qat.pt")

    code = main(
        [
            "export",
            f"{factory_module}:build",
            "--state-dict",
            str(state),
            "--input-shape",
            "1,1,8,8",
            "-o",
            str(tmp_path / "model.onnx"),
        ]
    )

    error = capsys.readouterr().err
    assert code == 1
    assert "does not fit" in error
    assert detail in error
    assert not (tmp_path / "model.onnx").exists()


def test_export_rejects_missing_state_dict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere.pt"

    code = main(["export", "demo", "--state-dict", str(missing), "-o", str(tmp_path / "m.onnx")])

    assert code == 2
    assert f"{missing} does not exist" in capsys.readouterr().err


def test_export_rejects_a_pickled_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)

    code = main(["export", "demo", "--state-dict", str(path), "-o", str(tmp_path / "m.onnx")])

    assert code == 1
    assert "not a state_dict" in capsys.readouterr().err


def test_export_needs_input_shape(
    factory_module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "export",
            f"{factory_module}:build",
            "--state-dict",
            str(tmp_path / "qat.pt"),
            "-o",
            str(tmp_path / "model.onnx"),
        ]
    )

    assert code == 2
    assert "--input-shape is required" in capsys.readouterr().err


@pytest.mark.parametrize("shape", ["1,x,8", "0,1,8,8", ""])
def test_export_rejects_bad_input_shape(
    tmp_path: Path, shape: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "export",
            "demo",
            "--state-dict",
            "qat.pt",
            "-o",
            str(tmp_path / "m.onnx"),
            f"--input-shape={shape}",
        ]
    )

    assert code == 2
    assert "--input-shape" in capsys.readouterr().err


def test_export_rejects_unknown_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "export",
            "demo",
            "--state-dict",
            "qat.pt",
            "-o",
            str(tmp_path / "m.onnx"),
            "--format",
            "tflite",
        ]
    )

    error = capsys.readouterr().err
    assert code == 2
    assert "unknown export format 'tflite'" in error
    assert "onnx" in error


def test_export_old_opset_names_needed_opset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = trained_state_dict(_demo.build_model(), (8, 1, 8, 8), tmp_path / "qat.pt")

    code = main(
        [
            "export",
            "demo",
            "--state-dict",
            str(state),
            "-o",
            str(tmp_path / "m.onnx"),
            "--opset",
            "11",
        ]
    )

    error = capsys.readouterr().err
    assert code == 1
    assert "cannot export" in error
    assert "13" in error


def test_export_rejects_state_dict_of_other_preset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("qatcore_arm")
    state = trained_state_dict(_demo.build_model(), (8, 1, 8, 8), tmp_path / "qat.pt")

    code = main(
        [
            "export",
            "demo",
            "--state-dict",
            str(state),
            "--qconfig",
            "arm",
            "-o",
            str(tmp_path / "m.onnx"),
        ]
    )

    error = capsys.readouterr().err
    assert code == 1
    assert "does not fit" in error
    assert (
        "weight_fake_quant: its saved qparams were trained for symmetric codes [-63, 63]" in error
    )
    assert not (tmp_path / "m.onnx").exists()


def test_export_rejects_state_dict_without_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = trained_state_dict(_demo.build_model(), (8, 1, 8, 8), tmp_path / "qat.pt")
    older = {
        key: value
        for key, value in torch.load(state, weights_only=True).items()
        if not key.endswith("_extra_state")
    }
    torch.save(older, state)

    code = main(["export", "demo", "--state-dict", str(state), "-o", str(tmp_path / "m.onnx")])

    error = capsys.readouterr().err
    assert code == 1
    assert "does not record the codes its qparams were trained for" in error
    assert "strict=False" in error


def test_export_names_data_parallel_prefix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = trained_state_dict(_demo.build_model(), (8, 1, 8, 8), tmp_path / "qat.pt")
    prefixed = {f"module.{key}": value for key, value in torch.load(state).items()}
    torch.save(prefixed, state)

    code = main(["export", "demo", "--state-dict", str(state), "-o", str(tmp_path / "m.onnx")])

    error = capsys.readouterr().err
    assert code == 1
    assert "keys start with 'module.'" in error
    assert "consume_prefix_in_state_dict_if_present" in error
