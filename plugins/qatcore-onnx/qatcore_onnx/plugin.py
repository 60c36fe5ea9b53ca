"""Entry point of the qatcore-onnx plugin: registers the ``onnx`` exporter."""

from __future__ import annotations

from qatcore import Registry, hookimpl
from qatcore_onnx._export import export_onnx


@hookimpl
def qatcore_register_backends(registry: Registry) -> None:
    registry.register_exporter("onnx", export_onnx)
