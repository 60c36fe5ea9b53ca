"""TensorRT for qatcore: a symmetric int8 preset and an ONNX export TensorRT builds in int8."""

from qatcore_tensorrt._export import check_tensorrt, export_tensorrt
from qatcore_tensorrt.preset import TENSORRT_QCONFIG

__all__ = ["TENSORRT_QCONFIG", "check_tensorrt", "export_tensorrt"]
