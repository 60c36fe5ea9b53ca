"""QAT conv-BatchNorm: BN folded into the weight before fake quantization.

The fold computes what the ConvBn modules of torch.ao.nn.intrinsic.qat
compute on their numerically stable slow path (torch 2.13). In training
mode a float conv pass gives the batch statistics and updates the BN
running statistics. Then the weight scaled by ``gamma / running_std`` is
fake-quantized and convolved, and the result is rescaled to the batch
statistics. A channel whose ``gamma`` is 0 gets a zero weight and outputs
``beta``, with no division by ``gamma`` anywhere.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from qatcore import QATConvNd, SwapError

__all__ = [
    "ConvBn1d",
    "ConvBn2d",
    "ConvBn3d",
    "ConvBnReLU1d",
    "ConvBnReLU2d",
    "ConvBnReLU3d",
    "QATConvBnNd",
]


class QATConvBnNd(QATConvNd):
    """A conv followed by BatchNorm (and optionally an activation), with BN folded.

    Call :meth:`freeze_bn_stats` to stop updating the BN running
    statistics and use them instead of the batch statistics. The module then
    computes ``conv -> BN(eval)`` even in training mode.
    """

    bn_type: ClassVar[type[_BatchNorm]]
    bn: _BatchNorm

    def __init__(
        self,
        *args: Any,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        qconfig: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, qconfig=qconfig, **kwargs)
        self.bn = self.bn_type(
            self.out_channels,
            eps=eps,
            momentum=momentum,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        self.freeze_bn = False

    def _adopt_members(self, members: tuple[nn.Module, ...], where: str) -> None:
        bn = members[0]
        if not bn.track_running_stats or bn.running_var is None or bn.running_mean is None:
            raise SwapError(
                f"{where}: its {type(bn).__name__} has track_running_stats=False, so there "
                "are no running statistics to fold; keep it unfused with fuse=False"
            )
        if bn.num_features != self.out_channels:
            raise SwapError(
                f"{where}: its {type(bn).__name__} has {bn.num_features} features but the "
                f"conv has {self.out_channels} output channels"
            )
        self.bn = bn
        self.freeze_bn = not bn.training
        self.activation = members[1] if len(members) > 1 else None

    def train(self, mode: bool = True) -> QATConvBnNd:
        """Set training mode; frozen BN statistics stay frozen."""
        self.training = mode
        for module in self.children():
            if module is not self.bn or not self.freeze_bn:
                module.train(mode)
        return self

    def freeze_bn_stats(self, frozen: bool = True) -> QATConvBnNd:
        """Stop (or, with ``frozen=False``, resume) BN statistics updates."""
        self.freeze_bn = frozen
        self.bn.train(self.training and not frozen)
        return self

    def _channel_shapes(self) -> tuple[list[int], list[int]]:
        per_weight = [1] * self.weight.dim()
        per_weight[0] = -1
        per_output = [1] * self.weight.dim()
        per_output[1] = -1
        return per_weight, per_output

    def _conv_output(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != self.weight.dim():
            raise ValueError(
                f"{type(self).__name__} needs batched input of {self.weight.dim()} dimensions, "
                f"got shape {tuple(input.shape)}, because BatchNorm does"
            )
        bn = self.bn
        per_weight, per_output = self._channel_shapes()
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var)
        zero_bias = torch.zeros(self.out_channels, device=self.weight.device, dtype=input.dtype)

        if bn.training:
            conv_output = self._conv_forward(input, self.weight, zero_bias)
            with torch.no_grad():
                biased = (
                    conv_output
                    if self.bias is None
                    else conv_output + self.bias.reshape(per_output)
                )
                bn(biased)  # updates the running statistics exactly as BatchNorm does

        running_std = torch.sqrt(bn.running_var + bn.eps)
        folded = self.weight * (gamma / running_std).reshape(per_weight)
        output = self._conv_forward(input, self._fake_quantized_weight(folded), zero_bias)

        if bn.training:
            dims = [0, *range(2, self.weight.dim())]
            mean = conv_output.mean(dims)
            variance = torch.square(conv_output - mean.reshape(per_output)).mean(dims)
            std = torch.sqrt(variance + bn.eps)
            output = output * (running_std / std).reshape(per_output)
        else:
            mean = bn.running_mean - (self.bias if self.bias is not None else 0)
            std = running_std

        output = output + (beta - gamma * mean / std).reshape(per_output)
        if self.bias is not None:
            # The conv bias cancels out of the normalized output. Adding zero
            # made from it keeps the bias in the graph, so that
            # DistributedDataParallel finds it used.
            output = output + (self.bias - self.bias).reshape(per_output)
        return output

    def to_float(self) -> nn.Module:
        """Return the conv with BN folded in, as an ``nn.Sequential`` in member order.

        The BN slot is an ``nn.Identity``, so that the float modules go
        back into the same places. In eval mode its output equals this
        module's eval output with fake quantization off, up to float rounding.
        """
        bn = self.bn
        weight, bias = torch.nn.utils.fuse_conv_bn_weights(
            self.weight.detach().clone(),
            self.bias.detach().clone() if self.bias is not None else None,
            bn.running_mean,
            bn.running_var,
            bn.eps,
            bn.weight.detach() if bn.weight is not None else None,
            bn.bias.detach() if bn.bias is not None else None,
        )
        weight = nn.Parameter(weight.detach().clone(), requires_grad=self.weight.requires_grad)
        bias = nn.Parameter(bias.detach().clone(), requires_grad=self.weight.requires_grad)
        members: list[nn.Module] = [self._float_conv(weight, bias), nn.Identity()]
        if self.activation is not None:
            members.append(copy.deepcopy(self.activation))
        return nn.Sequential(*members).train(self.training)


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
