"""ONNX export for qatcore: QAT models as Q/DQ graphs with int8 weights."""

from qatcore_onnx._export import MAX_OPSET, OnnxReport, export_onnx
from qatcore_onnx._qdq import PER_CHANNEL_MIN_OPSET, QDQ_MIN_OPSET, QDQLayer
from qatcore_onnx._runtime import run_onnx

__all__ = [
    "MAX_OPSET",
    "OnnxReport",
    "PER_CHANNEL_MIN_OPSET",
    "QDQLayer",
    "QDQ_MIN_OPSET",
    "export_onnx",
    "run_onnx",
]
