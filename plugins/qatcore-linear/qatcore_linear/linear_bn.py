"""QAT linear-BatchNorm1d: BN folded into the weight before fake quantization.

The fold is :class:`qatcore.BatchNormFolding`'s, which matches the ConvBn
modules of torch.ao.nn.intrinsic.qat on their numerically stable slow path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qatcore import BatchNormFolding
from qatcore_linear.modules import QATLinearBase

__all__ = ["LinearBn1d", "LinearBnReLU1d", "QATLinearBnBase"]


class QATLinearBnBase(BatchNormFolding, QATLinearBase):
    """A linear layer followed by BatchNorm1d (and optionally an activation), with BN folded.

    BatchNorm1d normalizes axis 1 of its input, so the fused module takes
    only input of shape ``(batch, in_features)``, whose output keeps the
    features along axis 1. For inputs of another rank, such as
    ``(batch, tokens, in_features)``, keep the Linear and the BatchNorm1d
    unfused with ``swap_modules(..., fuse=False)``, or fuse only the layers
    that see 2-D inputs.

    Call :meth:`freeze_bn_stats` to stop updating the BN running
    statistics and use them instead of the batch statistics. The module then
    computes ``linear -> BN(eval)`` even in training mode.
    """

    bn_type = nn.BatchNorm1d

    def _apply_weight(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        return F.linear(input, weight, bias)

    def _linear_output(self, input: torch.Tensor) -> torch.Tensor:
        """Return the BN output before the activation and the output fake quantizer.

        Raises:
            ValueError: ``input`` is not of shape ``(batch, in_features)``.
        """
        if input.dim() != 2:
            raise ValueError(
                f"{type(self).__name__} needs input of shape (batch, in_features), got shape "
                f"{tuple(input.shape)}, because BatchNorm1d normalizes axis 1, which holds "
                "the features only for 2-D input; keep Linear and BatchNorm1d unfused "
                "(swap_modules(..., fuse=False)) or fuse them only where the input is 2-D"
            )
        return self._bn_folded_output(input)

    def to_float(self) -> nn.Module:
        """Return the linear layer with BN folded in, then an ``nn.Identity`` and the activation."""
        return self._folded_float_modules(self._float_linear)


class LinearBn1d(QATLinearBnBase):
    """QAT ``nn.Linear`` followed by ``nn.BatchNorm1d``, folded; input ``(batch, in_features)``."""

    float_types = (nn.Linear, nn.BatchNorm1d)


class LinearBnReLU1d(QATLinearBnBase):
    """QAT ``nn.Linear``, ``nn.BatchNorm1d`` and ``nn.ReLU``, folded and fused."""

    float_types = (nn.Linear, nn.BatchNorm1d, nn.ReLU)
    activation_type = nn.ReLU
