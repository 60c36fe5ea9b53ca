"""BatchNorm folded into the weight of the layer before it, as QAT simulates it.

The fold computes what the ConvBn modules of torch.ao.nn.intrinsic.qat
compute on their numerically stable slow path (torch 2.13), for any layer
whose output channels BatchNorm normalizes: conv, transposed conv, linear.
In training mode a float pass gives the batch statistics and updates the
BN running statistics. Then the weight scaled by ``gamma / running_std`` is
fake-quantized and applied, and the result is rescaled to the batch
statistics. A channel whose ``gamma`` is 0 gets a zero weight and outputs
``beta``, with no division by ``gamma`` anywhere.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from qatcore._protocol import SwapError

__all__ = ["BatchNormFolding"]


class BatchNormFolding(metaclass=abc.ABCMeta):
    """Mixin for a QAT layer followed by BatchNorm, with the BN folded into its weight.

    The layer keeps the BN module as ``bn`` and calls
    :meth:`_bn_folded_output` in its forward. A concrete class provides
    :meth:`_apply_weight` and ``_fake_quantized_weight(weight)``, and overrides
    :meth:`_scale_output_channels` where its weight does not keep the output
    channels along axis 0. The layer's output has its channels along axis 1,
    where BatchNorm expects them.

    Call :meth:`freeze_bn_stats` to stop updating the BN running statistics
    and use them instead of the batch statistics: the layer then computes
    ``layer -> BN(eval)`` even in training mode. Only that call freezes
    them. An adopted BN keeps the mode it had in the float model until the
    next ``train()`` or ``eval()`` call sets it, as for any child module.
    """

    bn_type: ClassVar[type[_BatchNorm]]
    """The BatchNorm class that a directly built layer gets, such as ``nn.BatchNorm2d``."""

    bn: _BatchNorm
    freeze_bn: bool
    training: bool
    activation: nn.Module | None

    # Set by the torch.nn layer class.
    weight: nn.Parameter
    bias: nn.Parameter | None

    # Provided by the QAT layer class: the weight after the weight fake quantizer.
    _fake_quantized_weight: Callable[[torch.Tensor], torch.Tensor]

    def __init__(
        self,
        *args: Any,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        qconfig: Any = None,
        **kwargs: Any,
    ) -> None:
        """Build like the ``torch.nn`` layer, plus a fresh ``bn_type`` and the fake quantizers."""
        super().__init__(*args, qconfig=qconfig, **kwargs)  # type: ignore[call-arg]
        self.bn = self.bn_type(
            _output_channels(self),  # type: ignore[arg-type]
            eps=eps,
            momentum=momentum,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        self.freeze_bn = False

    @abc.abstractmethod
    def _apply_weight(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, **options: Any
    ) -> torch.Tensor:
        """Return the layer's output for ``input`` computed with ``weight`` and ``bias``.

        ``options`` are the keyword arguments given to :meth:`_bn_folded_output`
        for this call, such as a transposed conv's output padding.
        """

    def _scale_output_channels(self, weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """Return ``weight`` with each output channel multiplied by its entry of ``factor``."""
        shape = [1] * weight.dim()
        shape[0] = -1
        return weight * factor.reshape(shape)

    @classmethod
    def fusion_problem(cls, modules: tuple[nn.Module, ...]) -> str:
        """Return why the layer ``modules[0]`` and its BatchNorm ``modules[1]`` cannot fold.

        Returns ``""`` when they can. They cannot when the BatchNorm keeps
        no running statistics, or normalizes a number of features other
        than the layer's output channels (its ``out_channels``, or
        ``out_features`` for a linear layer).
        """
        bn = modules[1]
        if not isinstance(bn, _BatchNorm):
            return f"its second module is a {type(bn).__name__}, not a BatchNorm"
        return _bn_problem(bn, _output_channels(modules[0]))

    def _adopt_bn(self, bn: _BatchNorm, channels: int, where: str) -> None:
        """Take over ``bn``, the float BatchNorm that follows the layer, keeping its mode.

        Raises:
            SwapError: ``bn`` keeps no running statistics, or normalizes a
                number of features other than ``channels``.
        """
        problem = _bn_problem(bn, channels)
        if problem:
            raise SwapError(f"{where}: {problem}; keep it unfused with fuse=False")

        self.bn = bn
        self.freeze_bn = False

    def _adopt_members(self, members: tuple[nn.Module, ...], where: str) -> None:
        """Take over the float BatchNorm, and the activation if any, that follow the layer."""
        self._adopt_bn(members[0], _output_channels(self), where)  # type: ignore[arg-type]
        self.activation = members[1] if len(members) > 1 else None

    def _folded_float_modules(
        self, build_layer: Callable[[nn.Parameter, nn.Parameter], nn.Module]
    ) -> nn.Sequential:
        """Return the float layer with BN folded in, as an ``nn.Sequential`` in member order.

        ``build_layer(weight, bias)`` builds the float layer. The BN slot is
        an ``nn.Identity``, so that the float modules go back into the same
        places. In eval mode the result computes this module's eval output
        with fake quantization off, up to float rounding.
        """
        members = [build_layer(*self._folded_parameters()), nn.Identity()]
        if self.activation is not None:
            members.append(copy.deepcopy(self.activation))
        return nn.Sequential(*members).train(self.training)

    def train(self, mode: bool = True) -> BatchNormFolding:
        """Set training mode; frozen BN statistics stay frozen."""
        self.training = mode
        for module in self.children():  # type: ignore[attr-defined]
            if module is not self.bn or not self.freeze_bn:
                module.train(mode)
        return self

    def freeze_bn_stats(self, frozen: bool = True) -> BatchNormFolding:
        """Stop (or, with ``frozen=False``, resume) BN statistics updates."""
        self.freeze_bn = frozen
        self.bn.train(self.training and not frozen)
        return self

    def _bn_folded_output(self, input: torch.Tensor, **options: Any) -> torch.Tensor:
        """Return the output of layer then BN, with the folded weight fake-quantized.

        ``options`` go to each :meth:`_apply_weight` call.
        """
        bn = self.bn
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var)
        # A zero bias rather than none keeps the same kernel as torch.ao, whose
        # results these match bit for bit.
        zero_bias = torch.zeros(bn.num_features, device=self.weight.device, dtype=input.dtype)

        if bn.training:
            # NOTE: this float pass costs one more layer forward and backward
            # per training step than torch.ao's default fold, which divides by
            # gamma instead and turns a zero gamma into NaN.
            float_output = self._apply_weight(input, self.weight, zero_bias, **options)
            with torch.no_grad():
                biased = float_output
                if self.bias is not None:
                    biased = float_output + _along_channels(self.bias, float_output)
                bn(biased)  # updates the running statistics exactly as BatchNorm does

        running_std = torch.sqrt(bn.running_var + bn.eps)
        folded = self._scale_output_channels(self.weight, gamma / running_std)
        quantized = self._fake_quantized_weight(folded)
        output = self._apply_weight(input, quantized, zero_bias, **options)

        if bn.training:
            dims = [0, *range(2, float_output.dim())]
            mean = float_output.mean(dims)
            variance = torch.square(float_output - _along_channels(mean, float_output)).mean(dims)
            std = torch.sqrt(variance + bn.eps)
            output = output * _along_channels(running_std / std, output)
        else:
            mean = bn.running_mean - (self.bias if self.bias is not None else 0)
            std = running_std

        output = output + _along_channels(beta - gamma * mean / std, output)
        if self.bias is not None:
            # The layer's bias cancels out of the normalized output. Adding
            # zero made from it keeps the bias in the graph, so that
            # DistributedDataParallel finds it used.
            output = output + _along_channels(self.bias - self.bias, output)
        return output

    def _folded_parameters(self) -> tuple[nn.Parameter, nn.Parameter]:
        """Return new weight and bias Parameters with the BN running statistics folded in.

        The float layer built from them computes, in eval mode, what this
        layer then BN compute in eval mode with fake quantization off.
        """
        bn = self.bn
        with torch.no_grad():
            inverse_std = torch.rsqrt(bn.running_var + bn.eps)
            gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
            beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var)
            bias = self.bias if self.bias is not None else torch.zeros_like(bn.running_mean)
            weight = self._scale_output_channels(self.weight, gamma * inverse_std)
            folded_bias = (bias - bn.running_mean) * inverse_std * gamma + beta
        requires_grad = self.weight.requires_grad
        return (
            nn.Parameter(weight.to(self.weight.dtype), requires_grad=requires_grad),
            nn.Parameter(folded_bias.to(self.weight.dtype), requires_grad=requires_grad),
        )


def _bn_problem(bn: _BatchNorm, channels: int) -> str:
    """Return why ``bn`` cannot be folded into a layer with ``channels`` outputs, or ``""``."""
    if not bn.track_running_stats or bn.running_var is None or bn.running_mean is None:
        return (
            f"its {type(bn).__name__} has track_running_stats=False, so there are no "
            "running statistics to fold"
        )
    if bn.num_features != channels:
        return (
            f"its {type(bn).__name__} has {bn.num_features} features but the layer has "
            f"{channels} output channels"
        )
    return ""


def _output_channels(layer: nn.Module) -> int:
    """Return the output channels of a conv, transposed conv or linear layer, float or QAT.

    Raises:
        TypeError: ``layer`` has neither ``out_channels`` nor ``out_features``.
    """
    for attribute in ("out_channels", "out_features"):
        channels = getattr(layer, attribute, None)
        if isinstance(channels, int):
            return channels
    raise TypeError(
        f"{type(layer).__name__} has neither out_channels nor out_features; a "
        "BatchNormFolding class for it must override fusion_problem"
    )


def _along_channels(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-channel vector to broadcast along axis 1 of ``like``."""
    shape = [1] * like.dim()
    shape[1] = -1
    return values.reshape(shape)
