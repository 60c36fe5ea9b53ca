"""The ``qatcore`` command line: plugins, plan and demo, in process and as the console script."""

from __future__ import annotations

import importlib.metadata
import os
import re
import runpy
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import qatcore
from qatcore import _demo
from qatcore._cli import main
from qatcore._plugins import (
    ENV_BLOCK,
    ENV_DISABLE_AUTOLOAD,
    ENV_STRICT,
    PluginManager,
    reset_plugin_manager,
)

FACTORY_MODULE = "qatcore_cli_models"
FACTORY_SOURCE = """\
    from torch import nn


    def build():
        return nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2)
        )


    def build_list():
        return [nn.Conv2d(1, 4, 3)]


    def build_broken():
        raise RuntimeError("the factory failed on purpose")


    class SideBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y


    def build_side_branch():
        return SideBranch()


    LAYERS = 3
    """


@pytest.fixture
def factory_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_plugin_manager: PluginManager
) -> Iterator[Path]:
    """Write the model factory module into a folder and make that the working directory."""
    (tmp_path / f"{FACTORY_MODULE}.py").write_text(textwrap.dedent(FACTORY_SOURCE))
    monkeypatch.chdir(tmp_path)
    # `qatcore plan` puts the working directory on sys.path; restore it afterwards.
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    sys.modules.pop(FACTORY_MODULE, None)


class PresetPlugin:
    """An in-process plugin with a preset, so that plan tests need no installed plugin."""

    @qatcore.hookimpl
    def qatcore_register_qconfigs(self, registry: qatcore.Registry) -> None:
        registry.register_qconfig(TEST_PRESET, qatcore.QConfig(weight=qatcore.QuantSpec()))


TEST_PRESET = "cli_test"


@pytest.fixture
def test_preset(fresh_plugin_manager: PluginManager) -> None:
    qatcore.register_plugin(PresetPlugin(), name="cli_test_preset")


@pytest.fixture
def conv_plugins() -> None:
    for module in ("qatcore_conv", "qatcore_linear", "qatcore_observers", "qatcore_x86"):
        pytest.importorskip(module)


def console_script() -> str:
    """Return the path of the installed ``qatcore`` console script."""
    beside_python = Path(sys.executable).parent / "qatcore"
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which("qatcore")
    if found is None:
        pytest.fail("the qatcore console script is not installed beside this Python or on PATH")
    return found


def factory_plan_summary() -> str:
    """Return the plan summary of the factory module's model, built in this process."""
    build = runpy.run_path(str(Path.cwd() / f"{FACTORY_MODULE}.py"))["build"]
    return qatcore.plan(build(), qatcore.get_qconfig("x86")).summary()


def table_line(output: str, *cells: str) -> str:
    """Return the table line whose first cells (split on runs of spaces) are ``cells``."""
    for line in output.splitlines():
        if re.split(r"\s{2,}", line.strip())[: len(cells)] == list(cells):
            return line
    raise AssertionError(f"no line starts with the cells {cells} in:\n{output}")


# -- qatcore plugins -----------------------------------------------------------


@pytest.mark.usefixtures("conv_plugins", "fresh_plugin_manager")
def test_plugins_lists_first_party(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plugins"])

    output = capsys.readouterr().out
    assert code == 0
    for entry, distribution in (
        ("conv", "qatcore-conv"),
        ("observers", "qatcore-observers"),
        ("x86", "qatcore-x86"),
    ):
        version = importlib.metadata.version(distribution)
        assert table_line(output, entry, distribution, version)
    assert "modules: torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d" in output
    assert "fusions: (torch.nn.Conv1d, torch.nn.ReLU)" in output
    assert "observers: minmax, moving_average_minmax" in table_line(output, "observers")
    assert "qconfigs: x86" in table_line(output, "x86")
    assert "failed to load" not in output


@pytest.mark.usefixtures("conv_plugins", "fresh_plugin_manager")
def test_plugins_reports_blocked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_BLOCK, "x86")
    reset_plugin_manager()

    code = main(["plugins"])

    output = capsys.readouterr().out
    assert code == 0
    assert f"blocked by {ENV_BLOCK}: x86" in output
    assert "qatcore-x86" not in output
    assert table_line(output, "conv", "qatcore-conv")


class BrokenPlugin:
    @qatcore.hookimpl
    def qatcore_register_observers(self, registry: qatcore.Registry) -> None:
        raise RuntimeError("registration fails on purpose")


@pytest.mark.usefixtures("fresh_plugin_manager")
def test_plugins_reports_failure_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    qatcore.register_plugin(BrokenPlugin(), name="broken")

    code = main(["plugins"])

    captured = capsys.readouterr()
    assert code == 1
    assert "failed to load:" in captured.out
    assert (
        "plugin 'broken' failed to register: RuntimeError: registration fails on purpose"
        in captured.out
    )
    assert "Traceback" not in captured.err


class UnavailablePlugin:
    @qatcore.hookimpl
    def qatcore_register_kernels(self, registry: qatcore.Registry) -> None:
        raise qatcore.PluginUnavailable("no GPU device was found")


@pytest.mark.usefixtures("fresh_plugin_manager")
def test_plugins_reports_skip_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    qatcore.register_plugin(UnavailablePlugin(), name="gpu")

    code = main(["plugins"])

    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert "skipped, because a requirement is missing:" in lines
    assert "  plugin 'gpu' is unavailable: no GPU device was found" in lines
    assert "failed to load:" not in lines


class NotedPlugin:
    @qatcore.hookimpl
    def qatcore_register_qconfigs(self, registry: qatcore.Registry) -> None:
        registry.register_qconfig("noted", qatcore.QConfig(weight=qatcore.QuantSpec()))

    @qatcore.hookimpl
    def qatcore_plugin_notes(self) -> list[str]:
        return ["the fast path is not built; reinstall with a C compiler"]


class BrokenNotesPlugin:
    @qatcore.hookimpl
    def qatcore_plugin_notes(self) -> list[str]:
        raise OSError("notes failed on purpose")


@pytest.mark.usefixtures("fresh_plugin_manager")
def test_plugins_prints_notes_under_row(capsys: pytest.CaptureFixture[str]) -> None:
    qatcore.register_plugin(NotedPlugin(), name="noted")
    qatcore.register_plugin(BrokenNotesPlugin(), name="broken_notes")

    code = main(["plugins"])

    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    noted = next(index for index, line in enumerate(lines) if line.startswith("noted "))
    assert lines[noted].endswith("qconfigs: noted")
    assert lines[noted + 1].strip() == (
        "note: the fast path is not built; reinstall with a C compiler"
    )
    broken = next(index for index, line in enumerate(lines) if line.startswith("broken_notes "))
    assert lines[broken].endswith("nothing")
    assert lines[broken + 1].strip() == (
        "note: its qatcore_plugin_notes hook failed: OSError('notes failed on purpose')"
    )


@pytest.mark.usefixtures("fresh_plugin_manager")
def test_plugins_strict_failure_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_STRICT, "1")
    qatcore.register_plugin(BrokenPlugin(), name="broken")

    code = main(["plugins"])

    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("qatcore plugins: error: plugin 'broken' failed to register")
    assert ENV_STRICT in captured.err


# -- qatcore plan --------------------------------------------------------------


@pytest.mark.usefixtures("conv_plugins", "factory_folder")
def test_plan_prints_fused_swapped_and_kept(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", f"{FACTORY_MODULE}:build"])

    output = capsys.readouterr().out
    assert code == 0
    assert table_line(output, "0 + 1", "fuse", "Conv2d + ReLU", "qatcore_conv.modules.ConvReLU2d")
    assert table_line(output, "2", "swap", "Conv2d", "qatcore_conv.modules.Conv2d")
    assert table_line(output, "3", "keep", "Flatten")
    assert table_line(output, "4", "swap", "Linear", "qatcore_linear.modules.Linear")
    assert output.rstrip().endswith(factory_plan_summary())


@pytest.mark.usefixtures("conv_plugins", "factory_folder")
def test_plan_says_why_a_pattern_was_not_fused(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", f"{FACTORY_MODULE}:build_side_branch"])

    output = capsys.readouterr().out
    why = "not fused as conv + bn: the output of conv also feeds add"
    assert code == 0
    assert table_line(output, "conv", "swap", "Conv2d", f"qatcore_conv.modules.Conv2d ({why})")
    assert table_line(
        output, "bn", "keep", "BatchNorm2d", f"no QAT mapping for torch.nn.BatchNorm2d; {why}"
    )


BAD_PLAN_ARGUMENTS = [
    pytest.param(
        [FACTORY_MODULE], f"invalid model factory '{FACTORY_MODULE}'", "MODULE:FACTORY", id="colon"
    ),
    pytest.param(
        ["no_such_module_xyz:build"],
        "cannot import module 'no_such_module_xyz'",
        "PYTHONPATH",
        id="module",
    ),
    pytest.param(
        [f"{FACTORY_MODULE}:buld"], "has no attribute 'buld'", "did you mean build", id="attribute"
    ),
    pytest.param(
        [f"{FACTORY_MODULE}:LAYERS"], f"{FACTORY_MODULE}:LAYERS is not callable", "point", id="call"
    ),
    pytest.param(
        [f"{FACTORY_MODULE}:build_list"],
        "returned an object of type list",
        "torch.nn.Module",
        id="not-module",
    ),
    pytest.param(
        [f"{FACTORY_MODULE}:build", "--qconfig", "no_such_preset"],
        "unknown qconfig 'no_such_preset'",
        "no qconfig registered",
        id="qconfig",
    ),
]


@pytest.mark.usefixtures("factory_folder", "test_preset")
@pytest.mark.parametrize(("arguments", "value", "fix"), BAD_PLAN_ARGUMENTS)
def test_plan_bad_argument_exit_2(
    capsys: pytest.CaptureFixture[str], arguments: list[str], value: str, fix: str
) -> None:
    code = main(["plan", "--qconfig", TEST_PRESET, *arguments])

    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err.startswith("qatcore plan: error: ")
    assert captured.err.count("\n") == 1
    assert value in captured.err
    assert fix in captured.err


@pytest.mark.usefixtures("factory_folder", "test_preset")
def test_plan_factory_error_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["plan", "--qconfig", TEST_PRESET, f"{FACTORY_MODULE}:build_broken"])

    captured = capsys.readouterr()
    assert code == 1
    assert captured.err == (
        f"qatcore plan: error: calling {FACTORY_MODULE}:build_broken() failed: "
        "RuntimeError: the factory failed on purpose\n"
    )


@pytest.mark.usefixtures("conv_plugins")
def test_console_script_plan(factory_folder: Path) -> None:
    environment = {**os.environ, "PYTHONPATH": ""}
    for switch in (ENV_BLOCK, ENV_STRICT, ENV_DISABLE_AUTOLOAD):
        environment.pop(switch, None)

    completed = subprocess.run(
        [console_script(), "plan", f"{FACTORY_MODULE}:build"],
        cwd=factory_folder,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr
    assert table_line(
        completed.stdout, "0 + 1", "fuse", "Conv2d + ReLU", "qatcore_conv.modules.ConvReLU2d"
    )
    assert factory_plan_summary() in completed.stdout


def test_console_script_bad_factory_exit_2(tmp_path: Path) -> None:
    completed = subprocess.run(
        [console_script(), "plan", "no_colon_here"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert completed.returncode == 2
    assert completed.stdout == ""
    assert "invalid model factory 'no_colon_here'" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_python_m_qatcore_version() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "qatcore", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == f"qatcore {qatcore.__version__}\n"


def test_missing_command_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main([])

    assert code == 2
    assert "the following arguments are required: COMMAND" in capsys.readouterr().err


# -- qatcore demo --------------------------------------------------------------

REDUCED_DEMO = ["demo", "--epochs", "1", "--qat-epochs", "1", "--samples", "100"]


@pytest.fixture
def demo_dependencies(conv_plugins: None) -> None:
    pytest.importorskip("sklearn")


@pytest.mark.usefixtures("demo_dependencies", "fresh_plugin_manager")
def test_demo_reduced_prints_report(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    output = tmp_path / "out"

    code = main([*REDUCED_DEMO, "--no-progress", "--seed", "4", "--output", str(output)])

    captured = capsys.readouterr()
    assert code == 0
    assert captured.err == ""
    assert "seed 4, 1 float and 1 QAT epochs, x86 preset" in captured.out
    assert "Swap plan (x86):" in captured.out
    assert table_line(captured.out, "11", "swap", "Conv2d", "qatcore_conv.modules.Conv2d")
    demo_plan = qatcore.plan(_demo.build_model(), qatcore.get_qconfig("x86"))
    assert demo_plan.summary() in captured.out
    assert len(demo_plan.by_action("fuse")) == 3
    assert "Test accuracy on 20 images (80 for training):" in captured.out
    assert re.search(r"^  float: +\d+\.\d\d%$", captured.out, re.MULTILINE)
    assert re.search(
        r"^  QAT: +\d+\.\d\d%  \([+-]\d+\.\d\d points, eval mode\)$", captured.out, re.M
    )
    state_dict_path = output / _demo.STATE_DICT_NAME
    assert f"QAT state_dict saved to {state_dict_path}" in captured.out
    fresh = qatcore.swap_modules(_demo.build_model(), qatcore.get_qconfig("x86"))
    fresh.load_state_dict(torch.load(state_dict_path, weights_only=True), strict=True)


@pytest.mark.usefixtures("demo_dependencies", "fresh_plugin_manager")
def test_demo_progress_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(REDUCED_DEMO)

    captured = capsys.readouterr()
    assert code == 0
    assert re.search(r"^float epoch 1/1 \[#+\] 3/3 loss \d+\.\d{4}$", captured.err, re.MULTILINE)
    assert re.search(r"^qat   epoch 1/1 \[#+\] 3/3 loss", captured.err, re.MULTILINE)
    assert "loss" not in captured.out


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        pytest.param(
            ["--samples", "10"], "argument --samples: expected an integer between", id="samples"
        ),
        pytest.param(
            ["--epochs", "0"], "argument --epochs: expected an integer >= 1, got 0", id="epochs"
        ),
        pytest.param(
            ["--qat-epochs", "x"], "argument --qat-epochs: expected an integer, got 'x'", id="qat"
        ),
        pytest.param(
            ["--seed", str(2**64)],
            "argument --seed: expected an integer between 0 and 18446744073709551615",
            id="seed",
        ),
        pytest.param(
            ["--output", ""], "argument --output: expected a folder path, got an empty", id="output"
        ),
        pytest.param(
            ["--bits", "1"], "argument --bits: expected an integer between 2 and 16", id="bits"
        ),
        pytest.param(
            ["--learnable", "--qat-epochs", "1"],
            "--learnable needs --qat-epochs 2 or more, got 1",
            id="learnable-one-epoch",
        ),
    ],
)
def test_demo_bad_option_exit_2(
    capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    code = main(["demo", *arguments])

    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.usefixtures("demo_dependencies", "fresh_plugin_manager")
def test_demo_observer_and_bits_reach_every_spec(capsys: pytest.CaptureFixture[str]) -> None:
    code = main([*REDUCED_DEMO, "--no-progress", "--observer", "minmax", "--bits", "4"])

    captured = capsys.readouterr()
    assert code == 0
    assert "x86 preset with minmax observer, 4 bits" in captured.out


@pytest.mark.usefixtures("fresh_plugin_manager")
def test_demo_unknown_observer_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("qatcore_x86")  # the default preset is checked first

    code = main(["demo", "--observer", "no_such_observer"])

    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err.startswith(
        "qatcore demo: error: unknown observer 'no_such_observer': no observer registered"
    )


@pytest.mark.usefixtures("fresh_plugin_manager")
def test_demo_unknown_qconfig_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--qconfig", "no_such_preset"])

    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err.startswith("qatcore demo: error: unknown qconfig 'no_such_preset'")


@pytest.mark.usefixtures("demo_dependencies", "fresh_plugin_manager")
def test_demo_unwritable_output_exit_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    code = main([*REDUCED_DEMO, "--no-progress", "--output", str(blocker / "out")])

    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.startswith(f"qatcore demo: error: cannot save the state_dict in {blocker}")
    assert "Test accuracy" not in captured.out


@pytest.mark.usefixtures("demo_dependencies", "fresh_plugin_manager")
@pytest.mark.parametrize("layout", ["file", "folder-at-target"])
def test_demo_unusable_output_fails_before_training(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, layout: str
) -> None:
    output = tmp_path / "out"
    if layout == "file":
        output.write_text("not a folder")
        expected = "is a file; --output takes a folder"
    else:
        (output / "qat_state_dict.pt").mkdir(parents=True)
        expected = "is a folder, so the state_dict cannot be saved there"

    code = main(["demo", "--no-progress", "--output", str(output)])

    captured = capsys.readouterr()
    assert code == 1
    assert expected in captured.err
    assert "epoch" not in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.usefixtures("fresh_plugin_manager", "factory_folder")
def test_plan_strict_failure_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_STRICT, "1")
    qatcore.register_plugin(BrokenPlugin(), name="broken")

    code = main(["plan", f"{FACTORY_MODULE}:build"])

    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("qatcore plan: error: plugin 'broken' failed to register")
