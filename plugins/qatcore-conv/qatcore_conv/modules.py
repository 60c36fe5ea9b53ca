"""QAT convolutions: thin declarations over the core's QATConvNd."""

from __future__ import annotations

from torch import nn

from qatcore import QATConvNd

__all__ = ["Conv1d", "Conv2d", "Conv3d", "ConvReLU1d", "ConvReLU2d", "ConvReLU3d"]


class Conv1d(QATConvNd, nn.Conv1d):
    """QAT ``nn.Conv1d``: fake-quantized weight and output."""

    float_types = (nn.Conv1d,)


class Conv2d(QATConvNd, nn.Conv2d):
    """QAT ``nn.Conv2d``: fake-quantized weight and output."""

    float_types = (nn.Conv2d,)


class Conv3d(QATConvNd, nn.Conv3d):
    """QAT ``nn.Conv3d``: fake-quantized weight and output."""

    float_types = (nn.Conv3d,)


class ConvReLU1d(QATConvNd, nn.Conv1d):
    """QAT ``nn.Conv1d`` followed by ``nn.ReLU``; the output is fake-quantized after the ReLU."""

    float_types = (nn.Conv1d, nn.ReLU)
    activation_type = nn.ReLU


class ConvReLU2d(QATConvNd, nn.Conv2d):
    """QAT ``nn.Conv2d`` followed by ``nn.ReLU``; the output is fake-quantized after the ReLU."""

    float_types = (nn.Conv2d, nn.ReLU)
    activation_type = nn.ReLU


class ConvReLU3d(QATConvNd, nn.Conv3d):
    """QAT ``nn.Conv3d`` followed by ``nn.ReLU``; the output is fake-quantized after the ReLU."""

    float_types = (nn.Conv3d, nn.ReLU)
    activation_type = nn.ReLU
