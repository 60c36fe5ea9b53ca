"""The installed qatcore-cuda distribution: discovery, and its skip where a requirement is missing.

These tests use the distribution as pip installed it, found through its
``qatcore`` entry point. Where the CUDA kernel cannot run, the plugin must
be reported as skipped with the reason, not as failed, by the plugin
manager and by ``qatcore plugins``. The case without Triton runs in a child
Python whose ``import triton`` fails, so that it needs no second
environment.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import qatcore
import qatcore_cuda.plugin
from qatcore._plugins import ENV_BLOCK, ENV_DISABLE_AUTOLOAD, ENV_STRICT
from qatcore_cuda import fake_quantize_cuda, unavailable_reason

VERSION = importlib.metadata.version("qatcore-cuda")

REASON = unavailable_reason()

needs_missing_requirement = pytest.mark.skipif(
    REASON is None,
    reason="Triton and a CUDA device are present here, so the plugin registers its kernel",
)

# Run in a child Python: importing triton fails there as if it were not
# installed, then the plugin manager loads the installed plugins.
WITHOUT_TRITON = textwrap.dedent(
    """\
    import json
    import sys

    sys.modules["triton"] = None

    import torch

    import qatcore
    from qatcore_cuda import fake_quantize_cuda, fake_quantize_triton

    manager = qatcore.plugin_manager()
    x = torch.linspace(-1.0, 1.0, 11)
    args = (x, torch.tensor(0.1), torch.tensor(0), -8, 7)
    try:
        fake_quantize_triton(*args)
        triton_error = None
    except ImportError as error:
        triton_error = str(error)
    report = {
        "skipped": [[skip.name, skip.distribution, skip.reason] for skip in manager.skipped()],
        "failures": [failure.describe() for failure in manager.failures()],
        "fallback_matches": torch.equal(
            fake_quantize_cuda(*args), qatcore.fake_quantize_reference(*args)
        ),
        "triton_error": triton_error,
    }
    print(json.dumps(report))
    """
)


def clean_environment() -> dict[str, str]:
    """Return this process's environment without the plugin switches."""
    return {key: value for key, value in os.environ.items() if not key.startswith("QATCORE_")}


def console_script() -> str:
    beside_python = Path(sys.executable).parent / "qatcore"
    if not beside_python.is_file():
        pytest.fail(f"the qatcore console script is not installed beside {sys.executable}")
    return str(beside_python)


@pytest.fixture
def manager(monkeypatch: pytest.MonkeyPatch) -> qatcore.PluginManager:
    """Return a new plugin manager that loads the installed plugins, whatever the shell set."""
    for switch in (ENV_BLOCK, ENV_DISABLE_AUTOLOAD, ENV_STRICT):
        monkeypatch.delenv(switch, raising=False)
    return qatcore.PluginManager()


# -- the installed distribution ---------------------------------------------------------


def test_entry_point_is_declared_by_distribution() -> None:
    entry_points = [
        entry_point
        for entry_point in importlib.metadata.entry_points(group="qatcore")
        if entry_point.name == "cuda"
    ]

    assert len(entry_points) == 1
    assert entry_points[0].value == "qatcore_cuda.plugin"
    assert entry_points[0].dist is not None
    assert entry_points[0].dist.metadata["Name"] == "qatcore-cuda"


@needs_missing_requirement
def test_skip_reported_with_reason(manager: qatcore.PluginManager) -> None:
    skipped = {skip.name: skip for skip in manager.skipped()}

    assert "cuda" in skipped, f"cuda is not among the skipped plugins: {manager.skipped()}"
    assert skipped["cuda"].distribution == "qatcore-cuda"
    assert skipped["cuda"].version == VERSION
    assert skipped["cuda"].stage == "register"
    assert skipped["cuda"].reason == REASON


@needs_missing_requirement
def test_skip_reason_names_cuda() -> None:
    assert REASON is not None
    if not torch.backends.cuda.is_built():
        assert f"torch {torch.__version__} was built without CUDA" in REASON
    else:
        assert "no CUDA device: torch.cuda.is_available() is False" in REASON


@needs_missing_requirement
def test_skipped_plugin_registers_nothing(manager: qatcore.PluginManager) -> None:
    assert ("default", "cuda") not in manager.registry.kernels
    assert "cuda" not in {info.name for info in manager.plugins()}
    assert "cuda" not in {failure.name for failure in manager.failures()}


@needs_missing_requirement
def test_skip_logged_at_debug_only(
    manager: qatcore.PluginManager, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="qatcore"):
        manager.skipped()

    records = [record for record in caplog.records if "'cuda'" in record.getMessage()]
    assert records, "the skip was not logged"
    assert all(record.levelno == logging.DEBUG for record in records)


@needs_missing_requirement
def test_strict_mode_does_not_raise_for_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_BLOCK, raising=False)
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD, raising=False)
    manager = qatcore.PluginManager(strict=True)

    assert "cuda" in {skip.name for skip in manager.skipped()}
    assert manager.failures() == []


@needs_missing_requirement
def test_cli_lists_skip_and_exits_0(tmp_path: Path) -> None:
    completed = subprocess.run(
        [console_script(), "plugins"],
        cwd=tmp_path,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )

    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "skipped, because a requirement is missing:" in completed.stdout
    line = f"  plugin 'cuda' from qatcore-cuda {VERSION} is unavailable: {REASON}"
    assert line in completed.stdout.splitlines()
    assert "qatcore-cuda" not in completed.stderr


@pytest.fixture(scope="module")
def without_triton_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRITON],
        cwd=tmp_path_factory.mktemp("workdir"),
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_missing_triton_reported_as_skip(without_triton_report: dict[str, Any]) -> None:
    skipped = {
        name: (distribution, reason)
        for name, distribution, reason in without_triton_report["skipped"]
    }

    assert "cuda" in skipped
    assert skipped["cuda"][0] == "qatcore-cuda"
    assert "Triton is not installed" in skipped["cuda"][1]
    assert without_triton_report["failures"] == []


def test_missing_triton_falls_back_to_reference(without_triton_report: dict[str, Any]) -> None:
    assert without_triton_report["fallback_matches"]
    assert "needs Triton: Triton is not installed" in without_triton_report["triton_error"]


# -- the hook, in process -----------------------------------------------------------------


def test_hook_registers_kernel_when_requirements_met(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qatcore_cuda.plugin, "unavailable_reason", lambda: None)
    registry = qatcore.Registry(plugin="cuda")

    qatcore_cuda.plugin.qatcore_register_kernels(registry)

    assert registry.kernels[("default", "cuda")] is fake_quantize_cuda
    assert list(registry.kernels) == [("default", "cuda")]


def test_hook_raises_unavailable_with_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qatcore_cuda.plugin, "unavailable_reason", lambda: "no GPU here")
    registry = qatcore.Registry(plugin="cuda")

    with pytest.raises(qatcore.PluginUnavailable, match="no GPU here") as raised:
        qatcore_cuda.plugin.qatcore_register_kernels(registry)

    assert raised.value.reason == "no GPU here"
    assert len(registry.kernels) == 0


def test_reason_without_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    reason = unavailable_reason()

    assert reason is not None
    assert reason.startswith("no CUDA device: torch.cuda.is_available() is False")
