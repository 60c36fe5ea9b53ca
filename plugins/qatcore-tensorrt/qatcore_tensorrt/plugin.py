"""Entry point of the qatcore-tensorrt plugin: the ``tensorrt`` preset and exporter."""

from __future__ import annotations

from qatcore import Registry, hookimpl
from qatcore_tensorrt._export import export_tensorrt
from qatcore_tensorrt.preset import TENSORRT_QCONFIG


@hookimpl
def qatcore_register_qconfigs(registry: Registry) -> None:
    registry.register_qconfig("tensorrt", TENSORRT_QCONFIG)


@hookimpl
def qatcore_register_backends(registry: Registry) -> None:
    registry.register_exporter("tensorrt", export_tensorrt)
