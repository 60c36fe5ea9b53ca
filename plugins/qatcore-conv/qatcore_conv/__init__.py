"""QAT convs for qatcore.

Exports Conv1d/2d/3d, ConvTranspose1d/2d/3d, and the fused ConvReLU, ConvBn,
ConvBnReLU, ConvTransposeReLU, ConvTransposeBn and ConvTransposeBnReLU in 1d,
2d and 3d.
"""

from qatcore_conv.conv_bn import (
    ConvBn1d,
    ConvBn2d,
    ConvBn3d,
    ConvBnReLU1d,
    ConvBnReLU2d,
    ConvBnReLU3d,
    QATConvBnNd,
)
from qatcore_conv.modules import Conv1d, Conv2d, Conv3d, ConvReLU1d, ConvReLU2d, ConvReLU3d
from qatcore_conv.transposed import (
    ConvTranspose1d,
    ConvTranspose2d,
    ConvTranspose3d,
    ConvTransposeReLU1d,
    ConvTransposeReLU2d,
    ConvTransposeReLU3d,
    QATConvTransposeNd,
)
from qatcore_conv.transposed_bn import (
    ConvTransposeBn1d,
    ConvTransposeBn2d,
    ConvTransposeBn3d,
    ConvTransposeBnReLU1d,
    ConvTransposeBnReLU2d,
    ConvTransposeBnReLU3d,
    QATConvTransposeBnNd,
)

__all__ = [
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvBn1d",
    "ConvBn2d",
    "ConvBn3d",
    "ConvBnReLU1d",
    "ConvBnReLU2d",
    "ConvBnReLU3d",
    "ConvReLU1d",
    "ConvReLU2d",
    "ConvReLU3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "ConvTransposeBn1d",
    "ConvTransposeBn2d",
    "ConvTransposeBn3d",
    "ConvTransposeBnReLU1d",
    "ConvTransposeBnReLU2d",
    "ConvTransposeBnReLU3d",
    "ConvTransposeReLU1d",
    "ConvTransposeReLU2d",
    "ConvTransposeReLU3d",
    "QATConvBnNd",
    "QATConvTransposeBnNd",
    "QATConvTransposeNd",
]
