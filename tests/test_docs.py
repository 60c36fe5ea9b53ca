"""The docs and the README stay true to the code: hooks, public names, commands, versions."""

from __future__ import annotations

import configparser
import inspect
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import qatcore
from qatcore import _hookspecs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PLUGINS = ROOT / "plugins"


def hook_specs() -> list[Callable[..., object]]:
    """Return the functions of ``qatcore._hookspecs`` that carry the hookspec marker."""
    marker = f"{_hookspecs.PROJECT}_spec"
    return [
        function
        for name, function in inspect.getmembers(_hookspecs, inspect.isfunction)
        if name.startswith("qatcore_") and hasattr(function, marker)
    ]


def signature_of(function: Callable[..., object]) -> str:
    """Return ``name(param, ...)``, the form a hook section is headed with."""
    parameters = ", ".join(inspect.signature(function).parameters)
    return f"{function.__name__}({parameters})"


def section_headings(path: Path) -> list[str]:
    return [line[3:].strip() for line in path.read_text().splitlines() if line.startswith("## ")]


def docs_text() -> str:
    return "\n".join(path.read_text() for path in sorted(DOCS.rglob("*.md")))


def code_blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", path.read_text(), re.MULTILINE | re.DOTALL)


def test_hook_specs_found() -> None:
    names = {function.__name__ for function in hook_specs()}

    assert "qatcore_register_modules" in names
    assert len(names) >= 4


@pytest.mark.parametrize("spec", hook_specs(), ids=lambda spec: spec.__name__)
def test_hook_has_reference_section(spec: Callable[..., object]) -> None:
    assert signature_of(spec) in section_headings(DOCS / "hooks.md")


def test_hook_sections_name_existing_hooks() -> None:
    signatures = {signature_of(spec) for spec in hook_specs()}
    hook_headings = [
        heading for heading in section_headings(DOCS / "hooks.md") if heading.startswith("qatcore_")
    ]

    assert hook_headings
    for heading in hook_headings:
        assert heading in signatures, f"docs/hooks.md documents {heading}, which is no hook spec"


@pytest.mark.parametrize("name", qatcore.__all__)
def test_public_name_in_docs(name: str) -> None:
    # A name counts as documented where it appears as code: `qatcore.name`,
    # `name(...)`, `name.attribute` or `name`.
    pattern = rf"`(qatcore\.)?{re.escape(name)}[`(.\[]"
    assert re.search(pattern, docs_text()), f"qatcore.{name} is mentioned nowhere in docs/"


def test_ci_runs_readme_test_command() -> None:
    commands = code_blocks(README, "sh")
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()

    assert len(commands) == 2, "the Quick start has two commands, install-and-demo and test"
    test_command = commands[1].strip()
    assert test_command in ci_lines


def test_readme_install_command_names_every_plugin() -> None:
    install_command = code_blocks(README, "sh")[0]
    plugin_folders = sorted(path.parent.name for path in PLUGINS.glob("*/pyproject.toml"))

    assert plugin_folders
    for folder in plugin_folders:
        assert f"./plugins/{folder} " in install_command + " ", folder
    assert "-c constraints.txt" in install_command
    assert install_command.rstrip().endswith("qatcore demo")


def test_user_guide_lists_every_tox_env() -> None:
    config = configparser.ConfigParser(interpolation=None)
    config.read(ROOT / "tox.ini")
    env_list = [env.strip() for env in config["tox"]["env_list"].split(",")]
    guide = (DOCS / "user-guide.md").read_text()

    assert "core" in env_list
    for env in env_list:
        assert f"| `{env}` |" in guide, f"tox env {env} is missing from the user guide's table"


def test_readme_swap_example_runs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in ("qatcore_conv", "qatcore_observers", "qatcore_x86", "qatcore_onnx"):
        pytest.importorskip(module)
    example = code_blocks(README, "python")[0]
    monkeypatch.chdir(tmp_path)  # the example writes model.onnx
    engine = torch.backends.quantized.engine

    try:
        exec(compile(example, str(README), "exec"), {})
    finally:
        torch.backends.quantized.engine = engine

    output = capsys.readouterr().out
    assert "ConvReLU2d" in output
    assert "no QAT mapping for torch.nn.Flatten" in output
    assert (tmp_path / "model.onnx").is_file()


def test_plugins_versioned_in_lockstep() -> None:
    tomllib = pytest.importorskip("tomllib")
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    major, minor = (int(part) for part in core["version"].split(".")[:2])
    requirement = f"qatcore>={major}.{minor},<{major}.{minor + 1}"
    pyprojects = sorted(PLUGINS.glob("*/pyproject.toml"))

    assert pyprojects
    for path in pyprojects:
        project = tomllib.loads(path.read_text())["project"]
        assert project["version"] == core["version"], path.parent.name
        assert requirement in project["dependencies"], path.parent.name
