"""QAT transposed conv-BatchNorm: BN folded into the weight before fake quantization.

The fold is :class:`qatcore.BatchNormFolding`'s, which matches the
numerically stable slow path of torch.ao's ConvBn modules. Here it scales a
weight whose output channels lie along axis 1 and, with ``groups > 1``, are
split over blocks of rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qatcore import BatchNormFolding
from qatcore_conv.transposed import QATConvTransposeNd

__all__ = [
    "ConvTransposeBn1d",
    "ConvTransposeBn2d",
    "ConvTransposeBn3d",
    "ConvTransposeBnReLU1d",
    "ConvTransposeBnReLU2d",
    "ConvTransposeBnReLU3d",
    "QATConvTransposeBnNd",
]


class QATConvTransposeBnNd(BatchNormFolding, QATConvTransposeNd):
    """A transposed conv followed by BatchNorm (and optionally an activation), with BN folded.

    Call :meth:`freeze_bn_stats` to stop updating the BN running
    statistics and use them instead of the batch statistics. The module then
    computes ``conv_transpose -> BN(eval)`` even in training mode. The
    forward takes ``output_size`` as the float transposed conv does, and
    needs batched input, as BatchNorm does.
    """

    def _scale_output_channels(self, weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        # Output channel g * (out // groups) + j is column j of the rows of
        # group g, so the view (groups, in // groups, out // groups, *k) takes
        # factor reshaped to (groups, 1, out // groups, 1, ...).
        groups = self.groups
        blocks = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
        shape = [groups, 1, weight.shape[1]] + [1] * (weight.dim() - 2)
        return (blocks * factor.reshape(shape)).reshape(weight.shape)

    def _apply_weight(
        self,
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        output_padding: list[int] | None = None,
    ) -> torch.Tensor:
        if output_padding is None:
            output_padding = list(self.output_padding)
        return self._conv_transpose_forward(input, weight, bias, output_padding)

    def _transposed_output(self, input: torch.Tensor, output_padding: list[int]) -> torch.Tensor:
        if input.dim() != self.weight.dim():
            raise ValueError(
                f"{type(self).__name__} needs batched input of {self.weight.dim()} dimensions, "
                f"got shape {tuple(input.shape)}, because BatchNorm does"
            )
        return self._bn_folded_output(input, output_padding=output_padding)

    def to_float(self) -> nn.Module:
        """Return the folded transposed conv, an ``nn.Identity`` and the activation."""
        return self._folded_float_modules(self._float_conv_transpose)


class ConvTransposeBn1d(QATConvTransposeBnNd, nn.ConvTranspose1d):
    """QAT ``nn.ConvTranspose1d`` followed by ``nn.BatchNorm1d``, folded."""

    float_types = (nn.ConvTranspose1d, nn.BatchNorm1d)
    conv_transpose = staticmethod(F.conv_transpose1d)
    bn_type = nn.BatchNorm1d


class ConvTransposeBn2d(QATConvTransposeBnNd, nn.ConvTranspose2d):
    """QAT ``nn.ConvTranspose2d`` followed by ``nn.BatchNorm2d``, folded."""

    float_types = (nn.ConvTranspose2d, nn.BatchNorm2d)
    conv_transpose = staticmethod(F.conv_transpose2d)
    bn_type = nn.BatchNorm2d


class ConvTransposeBn3d(QATConvTransposeBnNd, nn.ConvTranspose3d):
    """QAT ``nn.ConvTranspose3d`` followed by ``nn.BatchNorm3d``, folded."""

    float_types = (nn.ConvTranspose3d, nn.BatchNorm3d)
    conv_transpose = staticmethod(F.conv_transpose3d)
    bn_type = nn.BatchNorm3d


class ConvTransposeBnReLU1d(QATConvTransposeBnNd, nn.ConvTranspose1d):
    """QAT ``nn.ConvTranspose1d``, ``nn.BatchNorm1d`` and ``nn.ReLU``, folded and fused."""

    float_types = (nn.ConvTranspose1d, nn.BatchNorm1d, nn.ReLU)
    conv_transpose = staticmethod(F.conv_transpose1d)
    bn_type = nn.BatchNorm1d
    activation_type = nn.ReLU


class ConvTransposeBnReLU2d(QATConvTransposeBnNd, nn.ConvTranspose2d):
    """QAT ``nn.ConvTranspose2d``, ``nn.BatchNorm2d`` and ``nn.ReLU``, folded and fused."""

    float_types = (nn.ConvTranspose2d, nn.BatchNorm2d, nn.ReLU)
    conv_transpose = staticmethod(F.conv_transpose2d)
    bn_type = nn.BatchNorm2d
    activation_type = nn.ReLU


class ConvTransposeBnReLU3d(QATConvTransposeBnNd, nn.ConvTranspose3d):
    """QAT ``nn.ConvTranspose3d``, ``nn.BatchNorm3d`` and ``nn.ReLU``, folded and fused."""

    float_types = (nn.ConvTranspose3d, nn.BatchNorm3d, nn.ReLU)
    conv_transpose = staticmethod(F.conv_transpose3d)
    bn_type = nn.BatchNorm3d
    activation_type = nn.ReLU
