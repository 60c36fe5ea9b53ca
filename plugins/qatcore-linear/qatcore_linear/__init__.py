"""QAT Linear, the fused LinearReLU, and Linear-BatchNorm1d with the BN folded."""

from qatcore_linear.linear_bn import LinearBn1d, LinearBnReLU1d, QATLinearBnBase
from qatcore_linear.modules import Linear, LinearReLU, QATLinearBase

__all__ = [
    "Linear",
    "LinearBn1d",
    "LinearBnReLU1d",
    "LinearReLU",
    "QATLinearBase",
    "QATLinearBnBase",
]
