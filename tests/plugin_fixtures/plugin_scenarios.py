"""Plugin scenarios that tests/test_plugins.py runs in child processes.

Run ``python -m plugin_scenarios NAME`` with this folder on ``PYTHONPATH``.
The scenario uses the process-wide plugin manager as the environment
configures it and prints what it observed as one JSON object on the last
line of stdout, so that the test asserts each fact with pytest's messages.
An error that a scenario expects is recorded as
``{"type", "message", "plugin", "distribution"}`` rather than raised.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import core_alone
import torch
from torch import nn

import qatcore
from qatcore._registry import describe_key


def _outcome(call: Callable[[], object]) -> dict[str, Any]:
    """Run ``call`` and return its JSON-able result, or the error it raised."""
    try:
        value = call()
    except Exception as error:
        return {
            "value": None,
            "error": {
                "type": type(error).__name__,
                "message": str(error),
                "plugin": getattr(error, "plugin", None),
                "distribution": getattr(error, "distribution", None),
            },
        }
    return {"value": value, "error": None}


def _failures(manager: qatcore.PluginManager) -> list[dict[str, Any]]:
    return [
        {
            "name": failure.name,
            "distribution": failure.distribution,
            "version": failure.version,
            "stage": failure.stage,
            "error": f"{type(failure.error).__name__}: {failure.error}",
            "description": failure.describe(),
        }
        for failure in manager.failures()
    ]


def _skipped(manager: qatcore.PluginManager) -> list[dict[str, Any]]:
    return [
        {
            "name": skip.name,
            "distribution": skip.distribution,
            "version": skip.version,
            "stage": skip.stage,
            "reason": skip.reason,
            "description": skip.describe(),
        }
        for skip in manager.skipped()
    ]


def _plugins(manager: qatcore.PluginManager) -> dict[str, dict[str, Any]]:
    return {
        info.name: {
            "distribution": info.distribution,
            "version": info.version,
            "registrations": {
                table: [describe_key(key) for key in keys]
                for table, keys in info.registrations.items()
            },
        }
        for info in manager.plugins()
    }


def _entry_plugins(manager: qatcore.PluginManager, table: str) -> dict[str, str]:
    """Map each key of a registry table to the plugin that registered it."""
    lookup = manager.registry.tables()[table]
    return {describe_key(key): lookup.entry(key).plugin for key in lookup}


def _swap_conv2d_with_x86() -> dict[str, Any]:
    model = nn.Sequential(nn.Conv2d(1, 2, 3))
    qat_model = qatcore.swap_modules(model, qatcore.get_qconfig("x86"))
    output = qat_model(torch.randn(1, 1, 5, 5))
    swapped = type(qat_model[0])
    return {
        "type": f"{swapped.__module__}.{swapped.__qualname__}",
        "output_shape": list(output.shape),
    }


class _LogRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(
            {
                "logger": record.name,
                "level": record.levelname,
                "message": record.getMessage(),
                "has_traceback": record.exc_info is not None,
            }
        )


def broken_site() -> dict[str, Any]:
    """Load the installed plugins next to broken, conflicting and duplicate test plugins."""
    handler = _LogRecords()
    logging.getLogger("qatcore").addHandler(handler)
    manager = qatcore.plugin_manager()

    return {
        "failures": _failures(manager),
        "plugins": _plugins(manager),
        "observers": _entry_plugins(manager, "observers"),
        "qconfigs": _entry_plugins(manager, "qconfigs"),
        "swap": _outcome(_swap_conv2d_with_x86),
        "log": handler.records,
    }


def unavailable_site() -> dict[str, Any]:
    """Load plugins that report a missing requirement at import and in a hook."""
    handler = _LogRecords()
    logging.getLogger("qatcore").addHandler(handler)
    manager = qatcore.plugin_manager()

    return {
        "skipped": _outcome(lambda: _skipped(manager)),
        "failures": _failures(manager),
        "plugins": _plugins(manager),
        "names": manager.names(),
        "observers": _entry_plugins(manager, "observers"),
        "log": handler.records,
    }


def strict() -> dict[str, Any]:
    """Look up a preset twice with a plugin that fails to import, under the strict switch."""
    return {
        "first_lookup": _outcome(lambda: repr(qatcore.get_qconfig("x86"))),
        "second_lookup": _outcome(lambda: repr(qatcore.get_qconfig("x86"))),
    }


def blocked() -> dict[str, Any]:
    """Report what loads, and which CPU kernel a fake quantizer uses, with a plugin blocked."""
    from qatcore._fake_quantize import resolve_kernel

    manager = qatcore.plugin_manager()
    fake_quant = qatcore.FakeQuantize(qatcore.QuantSpec(observer="minmax"))
    output = fake_quant(torch.linspace(-1.0, 1.0, 11))
    return {
        "blocked": manager.blocked(),
        "names": manager.names(),
        "plugins": sorted(_plugins(manager)),
        "cpu_kernel_registered": ("default", "cpu") in manager.registry.kernels,
        "resolves_to_reference": resolve_kernel("default", "cpu")
        is qatcore.fake_quantize_reference,
        "fake_quantize_uses_reference": fake_quant.kernel("cpu") is qatcore.fake_quantize_reference,
        "fake_quantize_output_finite": bool(torch.isfinite(output).all()),
    }


def _inline_observer(spec: qatcore.QuantSpec, channels: int | None, **options: Any) -> nn.Module:
    return nn.Identity()


INLINE_QCONFIG = qatcore.QConfig(activation=qatcore.QuantSpec(observer="inline_minmax"))


class InlinePlugin:
    """An in-process plugin, as a script or a test registers with ``qatcore.register_plugin``."""

    @qatcore.hookimpl
    def qatcore_register_observers(self, registry: qatcore.Registry) -> None:
        registry.register_observer("inline_minmax", _inline_observer)

    @qatcore.hookimpl
    def qatcore_register_qconfigs(self, registry: qatcore.Registry) -> None:
        registry.register_qconfig("inline", INLINE_QCONFIG)


def autoload_disabled() -> dict[str, Any]:
    """Run the core-alone checks, then register and unregister an in-process plugin."""
    manager = qatcore.plugin_manager()
    report: dict[str, Any] = {"core_alone": _outcome(core_alone.check_core_alone)}

    name = qatcore.register_plugin(InlinePlugin(), name="inline")
    report["registered"] = {
        "name": name,
        "names": manager.names(),
        "plugins": _plugins(manager),
        "qconfig_matches": _outcome(lambda: qatcore.get_qconfig("inline") == INLINE_QCONFIG),
        "qconfigs": _entry_plugins(manager, "qconfigs"),
        "observers": _entry_plugins(manager, "observers"),
    }

    qatcore.unregister_plugin("inline")
    report["unregistered"] = {
        "names": manager.names(),
        "qconfig": _outcome(lambda: repr(qatcore.get_qconfig("inline"))),
        "observers": _entry_plugins(manager, "observers"),
    }
    return report


SCENARIOS = {
    "broken_site": broken_site,
    "strict": strict,
    "unavailable_site": unavailable_site,
    "blocked": blocked,
    "autoload_disabled": autoload_disabled,
}


if __name__ == "__main__":
    print(json.dumps(SCENARIOS[sys.argv[1]]()))
