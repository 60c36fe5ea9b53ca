"""Hook specifications: what a qatcore plugin can implement.

A plugin is a module (or any object) with functions named like the hooks
below, each marked with :data:`qatcore.hookimpl`. Every hook receives the
plugin's own :class:`~qatcore.Registry` view and registers entries on it;
the return value is ignored. Hooks are called when the registry is first
needed, and again after an in-process plugin is registered or
unregistered, in the order: modules, observers, kernels, qconfigs,
backends. A
plugin implements only the hooks it needs.

A hook that finds a requirement of its plugin missing on this machine (a
device, an optional library) raises :class:`qatcore.PluginUnavailable`
with the reason. The plugin is then reported as skipped rather than
failed, and none of its entries count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from qatcore._registry import Registry

PROJECT = "qatcore"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["hookimpl", "hookspec"]


@hookspec
def qatcore_register_modules(registry: Registry) -> None:
    """Register float-to-QAT module mappings and fusion patterns.

    Call :meth:`Registry.register_module` and
    :meth:`Registry.register_fusion`.

    :param registry: The registry view of the calling plugin.

    Added in 0.1.
    """


@hookspec
def qatcore_register_observers(registry: Registry) -> None:
    """Register observer factories by name.

    Call :meth:`Registry.register_observer`. The name is what a
    ``QuantSpec(observer=...)`` refers to.

    :param registry: The registry view of the calling plugin.

    Added in 0.1.
    """


@hookspec
def qatcore_register_kernels(registry: Registry) -> None:
    """Register fake-quant kernels by kernel name and device type.

    Call :meth:`Registry.register_kernel`, and
    :meth:`Registry.register_observing_kernel` for a kernel that takes a
    FakeQuantize's whole training step. A kernel must match the reference
    kernel bit for bit, outputs and gradients alike.

    :param registry: The registry view of the calling plugin.

    Added in 0.1.
    """


@hookspec
def qatcore_register_qconfigs(registry: Registry) -> None:
    """Register preset QConfigs by name.

    Call :meth:`Registry.register_qconfig`. The name is what
    :func:`qatcore.get_qconfig` looks up.

    :param registry: The registry view of the calling plugin.

    Added in 0.1.
    """


@hookspec
def qatcore_register_backends(registry: Registry) -> None:
    """Register int8 converters and exporters by backend or format name.

    Call :meth:`Registry.register_converter` for a backend that
    :func:`qatcore.convert` builds an int8 model for, and
    :meth:`Registry.register_exporter` for a file format that
    :func:`qatcore.export` writes.

    :param registry: The registry view of the calling plugin.

    Added in 0.2.
    """


@hookspec
def qatcore_plugin_notes() -> list[str]:
    """Return facts about the plugin on this machine for ``qatcore plugins`` to print.

    A note states what a user would otherwise miss, such as an optional
    speed-up that is not built, with the reason and the fix. A plugin that
    cannot run at all raises :class:`qatcore.PluginUnavailable` from its
    registration hook instead.

    Added in 0.1.
    """


REGISTRATION_HOOKS = (
    "qatcore_register_modules",
    "qatcore_register_observers",
    "qatcore_register_kernels",
    "qatcore_register_qconfigs",
    "qatcore_register_backends",
)
