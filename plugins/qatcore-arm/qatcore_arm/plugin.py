"""Entry point of the qatcore-arm plugin: the arm preset and the int8 converter for qnnpack."""

from __future__ import annotations

from qatcore import Registry, TorchEngineConverter, hookimpl
from qatcore_arm.preset import ARM_QCONFIG


@hookimpl
def qatcore_register_qconfigs(registry: Registry) -> None:
    registry.register_qconfig("arm", ARM_QCONFIG)


@hookimpl
def qatcore_register_backends(registry: Registry) -> None:
    registry.register_converter("arm", TorchEngineConverter("qnnpack", backend="arm"))
