"""Entry point of the qatcore-x86 plugin."""

from __future__ import annotations

from qatcore import Registry, hookimpl
from qatcore_x86.preset import X86_QCONFIG


@hookimpl
def qatcore_register_qconfigs(registry: Registry) -> None:
    registry.register_qconfig("x86", X86_QCONFIG)
