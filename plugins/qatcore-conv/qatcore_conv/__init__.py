"""QAT Conv1d/2d/3d, ConvTranspose1d/2d/3d and fused ConvReLU1d/2d/3d for qatcore."""

from qatcore_conv.modules import Conv1d, Conv2d, Conv3d, ConvReLU1d, ConvReLU2d, ConvReLU3d
from qatcore_conv.transposed import (
    ConvTranspose1d,
    ConvTranspose2d,
    ConvTranspose3d,
    QATConvTransposeNd,
)

__all__ = [
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvReLU1d",
    "ConvReLU2d",
    "ConvReLU3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "QATConvTransposeNd",
]
