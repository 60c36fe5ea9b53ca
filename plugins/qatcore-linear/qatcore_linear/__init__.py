"""QAT Linear and fused LinearReLU for qatcore."""

from qatcore_linear.modules import Linear, LinearReLU, QATLinearBase

__all__ = ["Linear", "LinearReLU", "QATLinearBase"]
