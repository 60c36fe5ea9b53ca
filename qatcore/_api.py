"""Module-level registration and lookup functions of the public API."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from qatcore._config import QConfig
from qatcore._plugins import plugin_manager
from qatcore._registry import Kernel, ObserverFactory, ObservingKernel

__all__ = [
    "get_qconfig",
    "register_fusion",
    "register_kernel",
    "register_observing_kernel",
    "register_module",
    "register_observer",
    "register_plugin",
    "unregister_plugin",
]

T = TypeVar("T", bound=type)


def get_qconfig(name: str) -> QConfig:
    """Return the preset QConfig registered as ``name`` (for example ``"x86"``).

    Raises:
        KeyError: No preset of that name is registered; the message lists
            the registered presets and the plugin that provides ``name``.
    """
    return plugin_manager().registry.qconfigs[name]


def register_module(
    float_type: type[nn.Module], qat_type: type[nn.Module] | None = None, *, override: bool = False
) -> Callable[[T], T] | None:
    """Map ``float_type`` to a QAT type for every later swap in this process.

    Call it with both types, or use it as a class decorator::

        @qatcore.register_module(MyBlock)
        class QATMyBlock(qatcore.QATModule, nn.Module): ...

    Raises:
        RegistryError: A plugin or earlier call mapped ``float_type``
            already and ``override`` is false, or a type is not a module
            class or the QAT type does not implement :class:`QATModule`.
    """
    if qat_type is None:

        def decorate(cls: T) -> T:
            plugin_manager().register_user("module", float_type, cls, override=override)
            return cls

        return decorate
    plugin_manager().register_user("module", float_type, qat_type, override=override)
    return None


def register_fusion(
    pattern: tuple[type[nn.Module], ...], fused_qat_type: type[nn.Module], *, override: bool = False
) -> None:
    """Fuse consecutive children of an ``nn.Sequential`` that match ``pattern``.

    Raises:
        RegistryError: The pattern is registered already and ``override`` is
            false, or the pattern or type is malformed.
    """
    plugin_manager().register_user("fusion", pattern, fused_qat_type, override=override)


def register_observer(name: str, factory: ObserverFactory, *, override: bool = False) -> None:
    """Make an observer factory available as ``QuantSpec(observer=name)``.

    Raises:
        RegistryError: ``name`` is taken and ``override`` is false.
    """
    plugin_manager().register_user("observer", name, factory, override=override)


def register_kernel(
    name: str, device_type: str, kernel: Kernel, *, learnable: bool = False, override: bool = False
) -> None:
    """Use ``kernel`` for ``QuantSpec(kernel=name)`` on tensors of ``device_type``.

    With ``learnable=True`` it serves specs with ``learnable=True``; see
    :meth:`Registry.register_kernel`.

    Raises:
        RegistryError: The pair is taken and ``override`` is false.
    """
    plugin_manager().register_user(
        "kernel", name, device_type, kernel, learnable=learnable, override=override
    )


def register_observing_kernel(
    name: str, device_type: str, kernel: ObservingKernel, *, override: bool = False
) -> None:
    """Let ``kernel`` run the training step of ``QuantSpec(kernel=name)`` on ``device_type``.

    See :meth:`Registry.register_observing_kernel`.

    Raises:
        RegistryError: The pair is taken and ``override`` is false.
    """
    plugin_manager().register_user("observing_kernel", name, device_type, kernel, override=override)


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register an in-process plugin object for this process; return its name."""
    return plugin_manager().register(plugin, name=name)


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered with :func:`register_plugin` (or an entry point)."""
    plugin_manager().unregister(name)
