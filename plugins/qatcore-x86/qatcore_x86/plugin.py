"""Entry point of the qatcore-x86 plugin: the x86 preset and the int8 converter for its engine."""

from __future__ import annotations

from qatcore import Registry, TorchEngineConverter, hookimpl
from qatcore_x86.preset import X86_QCONFIG


@hookimpl
def qatcore_register_qconfigs(registry: Registry) -> None:
    registry.register_qconfig("x86", X86_QCONFIG)


@hookimpl
def qatcore_register_backends(registry: Registry) -> None:
    registry.register_converter("x86", TorchEngineConverter("x86"))
