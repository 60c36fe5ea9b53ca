"""Checks that hold when the core runs without any plugin.

``check_core_alone`` runs in the pytest process when no distribution
declares a ``qatcore`` entry point, and in a child process started with
``QATCORE_DISABLE_PLUGIN_AUTOLOAD=1``, which must behave the same. The
child has no pytest, so the checks are plain asserts with their own messages.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable

from torch import nn

import qatcore
from qatcore._fake_quantize import resolve_kernel

# A key of each table that a first-party plugin provides, and that plugin's distribution.
FIRST_PARTY_KEYS = (
    ("modules", nn.Conv2d, "qatcore-conv"),
    ("fusions", (nn.Conv2d, nn.ReLU), "qatcore-conv"),
    ("observers", "minmax", "qatcore-observers"),
    ("observers", "moving_average_minmax", "qatcore-observers"),
    ("kernels", ("default", "cpu"), "qatcore-cpu"),
    ("qconfigs", "x86", "qatcore-x86"),
)


def expected_hint(distribution: str) -> str:
    """Return the advice a missed lookup gives for a key that ``distribution`` provides."""
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return f"install the {distribution} plugin"
    return f"the {distribution} plugin provides it and is installed but not loaded"


def _error_of(expected: type[Exception], call: Callable[[], object]) -> str:
    """Run ``call`` and return the message of the ``expected`` error it raises."""
    try:
        result = call()
    except expected as error:
        return str(error)
    raise AssertionError(f"expected {expected.__name__}, got the result {result!r}")


def check_core_alone() -> None:
    """Raise AssertionError unless the process-wide registry is empty and its misses name plugins.

    Call it on a plugin manager that has loaded nothing yet.
    """
    manager = qatcore.plugin_manager()
    registry = manager.registry

    assert manager.plugins() == [], f"expected no plugins, got {manager.plugins()}"
    assert manager.failures() == [], f"expected no failures, got {manager.failures()}"
    for name, table in registry.tables().items():
        assert len(table) == 0, f"expected an empty {name} table, got {list(table)}"

    for name, key, distribution in FIRST_PARTY_KEYS:
        message = _error_of(KeyError, lambda: registry.tables()[name][key])  # noqa: B023
        assert expected_hint(distribution) in message, message
        assert "(registered: none)" in message, message

    message = _error_of(KeyError, lambda: qatcore.get_qconfig("x86"))
    assert expected_hint("qatcore-x86") in message, message

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    qconfig = qatcore.QConfig(weight=qatcore.QuantSpec(axis=0), activation=qatcore.QuantSpec())
    message = _error_of(qatcore.SwapError, lambda: qatcore.swap_modules(model, qconfig))
    assert "no QAT module mappings are registered" in message, message
    assert expected_hint("qatcore-conv") in message, message

    spec = qatcore.QuantSpec(observer="minmax")
    message = _error_of(KeyError, lambda: qatcore.FakeQuantize(spec))
    assert expected_hint("qatcore-observers") in message, message

    kernel = resolve_kernel("default", "cpu")
    assert kernel is qatcore.fake_quantize_reference, f"expected the reference kernel, got {kernel}"
