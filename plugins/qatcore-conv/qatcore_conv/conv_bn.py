"""QAT conv-BatchNorm: BN folded into the weight before fake quantization.

The fold is :class:`qatcore.BatchNormFolding`'s, which matches the ConvBn
modules of torch.ao.nn.intrinsic.qat on their numerically stable slow path.
"""

from __future__ import annotations

import torch
from torch import nn

from qatcore import BatchNormFolding, QATConvNd

__all__ = [
    "ConvBn1d",
    "ConvBn2d",
    "ConvBn3d",
    "ConvBnReLU1d",
    "ConvBnReLU2d",
    "ConvBnReLU3d",
    "QATConvBnNd",
]


class QATConvBnNd(BatchNormFolding, QATConvNd):
    """A conv followed by BatchNorm (and optionally an activation), with BN folded.

    Call :meth:`freeze_bn_stats` to stop updating the BN running
    statistics and use them instead of the batch statistics. The module then
    computes ``conv -> BN(eval)`` even in training mode.
    """

    def _apply_weight(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        return self._conv_forward(input, weight, bias)

    def _conv_output(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != self.weight.dim():
            raise ValueError(
                f"{type(self).__name__} needs batched input of {self.weight.dim()} dimensions, "
                f"got shape {tuple(input.shape)}, because BatchNorm does"
            )
        return self._bn_folded_output(input)

    def to_float(self) -> nn.Module:
        """Return the conv with BN folded in, then an ``nn.Identity`` and the activation."""
        return self._folded_float_modules(self._float_conv)


class ConvBn1d(QATConvBnNd, nn.Conv1d):
    """QAT ``nn.Conv1d`` followed by ``nn.BatchNorm1d``, folded."""

    float_types = (nn.Conv1d, nn.BatchNorm1d)
    bn_type = nn.BatchNorm1d


class ConvBn2d(QATConvBnNd, nn.Conv2d):
    """QAT ``nn.Conv2d`` followed by ``nn.BatchNorm2d``, folded."""

    float_types = (nn.Conv2d, nn.BatchNorm2d)
    bn_type = nn.BatchNorm2d


class ConvBn3d(QATConvBnNd, nn.Conv3d):
    """QAT ``nn.Conv3d`` followed by ``nn.BatchNorm3d``, folded."""

    float_types = (nn.Conv3d, nn.BatchNorm3d)
    bn_type = nn.BatchNorm3d


class ConvBnReLU1d(QATConvBnNd, nn.Conv1d):
    """QAT ``nn.Conv1d``, ``nn.BatchNorm1d`` and ``nn.ReLU``, folded and fused."""

    float_types = (nn.Conv1d, nn.BatchNorm1d, nn.ReLU)
    bn_type = nn.BatchNorm1d
    activation_type = nn.ReLU


class ConvBnReLU2d(QATConvBnNd, nn.Conv2d):
    """QAT ``nn.Conv2d``, ``nn.BatchNorm2d`` and ``nn.ReLU``, folded and fused."""

    float_types = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU)
    bn_type = nn.BatchNorm2d
    activation_type = nn.ReLU


class ConvBnReLU3d(QATConvBnNd, nn.Conv3d):
    """QAT ``nn.Conv3d``, ``nn.BatchNorm3d`` and ``nn.ReLU``, folded and fused."""

    float_types = (nn.Conv3d, nn.BatchNorm3d, nn.ReLU)
    bn_type = nn.BatchNorm3d
    activation_type = nn.ReLU
