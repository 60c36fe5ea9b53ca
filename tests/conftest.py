"""Fixtures shared by the core tests."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator

import pytest

from qatcore import _plugins

FIRST_PARTY_DISTRIBUTIONS = (
    "qatcore-conv",
    "qatcore-cpu",
    "qatcore-linear",
    "qatcore-observers",
    "qatcore-x86",
)


@pytest.fixture
def fresh_plugin_manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[_plugins.PluginManager]:
    """Yield a new process-wide plugin manager with no plugin switch set, and reset it afterwards.

    The switches are removed from the environment, so a test finds the
    installed plugins loaded whatever the shell that runs pytest has set.
    """
    for switch in (_plugins.ENV_BLOCK, _plugins.ENV_DISABLE_AUTOLOAD, _plugins.ENV_STRICT):
        monkeypatch.delenv(switch, raising=False)
    yield _plugins.reset_plugin_manager()
    _plugins.reset_plugin_manager()


@pytest.fixture(scope="session")
def first_party_plugins() -> None:
    """Skip the test unless the four first-party plugin distributions are installed."""
    missing = []
    for name in FIRST_PARTY_DISTRIBUTIONS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        pytest.skip(f"needs the first-party plugins; not installed: {', '.join(missing)}")
