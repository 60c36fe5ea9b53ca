"""QAT transposed convolutions: the shared mixin, and plain and ReLU-fused ConvTranspose1d/2d/3d."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qatcore import (
    QATModule,
    QConfig,
    SwapError,
    build_fake_quant,
    check_float_modules,
    copy_parameter,
    qualified_name,
)

__all__ = [
    "ConvTranspose1d",
    "ConvTranspose2d",
    "ConvTranspose3d",
    "ConvTransposeReLU1d",
    "ConvTransposeReLU2d",
    "ConvTransposeReLU3d",
    "QATConvTransposeNd",
]

# A ConvTranspose weight has shape (in_channels, out_channels // groups, *kernel_size):
# its output channels lie along axis 1.
WEIGHT_CHANNEL_AXIS = 1
OUTPUT_CHANNEL_AXIS = 1


class QATConvTransposeNd(QATModule):
    """Behaviour shared by every QAT transposed conv, whatever its dimension.

    A concrete class combines this mixin with a ``torch.nn`` transposed conv
    class and declares ``float_types`` and ``conv_transpose``, the functional
    form of the convolution. For a fused transposed conv-activation it also
    sets ``activation_type``, used when the class is built directly rather
    than from float modules::

        class ConvTranspose2d(QATConvTransposeNd, nn.ConvTranspose2d):
            float_types = (nn.ConvTranspose2d,)
            conv_transpose = staticmethod(F.conv_transpose2d)

        class ConvTransposeReLU2d(QATConvTransposeNd, nn.ConvTranspose2d):
            float_types = (nn.ConvTranspose2d, nn.ReLU)
            conv_transpose = staticmethod(F.conv_transpose2d)
            activation_type = nn.ReLU

    The forward is
    ``output_fq(activation(conv_transpose(x, weight_fq(weight), bias)))``
    with the ``output_size`` argument of the float module. The weight has
    shape ``(in_channels, out_channels // groups, *kernel_size)``, so a
    per-channel weight spec must use ``axis=1`` and gets ``out_channels``
    scales, one per output channel, also when ``groups > 1``. Per-channel
    output specs use ``axis=1`` as well.
    """

    conv_transpose: ClassVar[Callable[..., torch.Tensor]]
    activation_type: ClassVar[type[nn.Module] | None] = None

    # Set by the nn.ConvTranspose base class.
    weight: nn.Parameter
    bias: nn.Parameter | None
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    output_padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    _output_padding: Any

    def __init__(self, *args: Any, qconfig: QConfig | None = None, **kwargs: Any) -> None:
        """Build like the ``torch.nn`` transposed conv, plus the fake quantizers for ``qconfig``.

        Without ``qconfig`` neither the weight nor the output is quantized.

        Raises:
            SwapError: ``qconfig`` cannot be applied to this module.
        """
        super().__init__(*args, **kwargs)
        self.activation = self.activation_type() if self.activation_type is not None else None
        self.weight_fake_quant = None
        self.output_fake_quant = None
        self.qconfig = None
        if qconfig is not None:
            self._init_fake_quants(qconfig, qualified_name("", self))

    @classmethod
    def from_float(
        cls, module: nn.Module | tuple[nn.Module, ...], qconfig: QConfig, *, name: str = ""
    ) -> QATConvTransposeNd:
        """Build the QAT transposed conv from a float one, or from the tuple of fused modules.

        The QAT module shares the float modules' parameters and takes over
        the modules that follow the transposed conv. It and its fake
        quantizers take the float transposed conv's training mode. The
        adopted modules keep their own mode until the next ``train()`` or
        ``eval()`` call, as they would in the float model.

        Raises:
            SwapError: ``module`` does not match ``float_types`` exactly,
                ``qconfig`` is not a QConfig, the weight is computed by a
                hook, or a per-channel spec uses an axis other than 1; the
                message names ``name``.
        """
        modules, where = check_float_modules(cls, module, qconfig, name)
        conv = modules[0]

        # Built on the meta device so that no throwaway weight is allocated;
        # the float module's parameters are assigned right after.
        qat = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            output_padding=conv.output_padding,
            groups=conv.groups,
            bias=conv.bias is not None,
            dilation=conv.dilation,
            padding_mode=conv.padding_mode,
            device="meta",
            dtype=conv.weight.dtype,
        )
        qat.weight = conv.weight
        qat.bias = conv.bias
        qat._init_fake_quants(qconfig, where)
        qat.train(conv.training)
        qat._adopt_members(modules[1:], where)
        return qat

    def _adopt_members(self, members: tuple[nn.Module, ...], where: str) -> None:
        """Take over the float modules that follow the transposed conv in a fused group."""
        if members:
            self.activation = members[-1]

    def _init_fake_quants(self, qconfig: QConfig, where: str) -> None:
        weight_spec = qconfig.weight
        if weight_spec is not None:
            weight_spec = weight_spec.resolve_axis(WEIGHT_CHANNEL_AXIS)
        weight_channels = None
        if weight_spec is not None and weight_spec.axis is not None:
            if weight_spec.axis != WEIGHT_CHANNEL_AXIS:
                raise SwapError(
                    f"{where}: the weight spec quantizes per channel along axis "
                    f"{weight_spec.axis}, but a transposed conv weight has shape "
                    f"(in_channels, out_channels // groups, *kernel_size) = "
                    f"{tuple(self.weight.shape)}, with the output channels along axis 1; "
                    "set QuantSpec(axis=qatcore.OUTPUT_CHANNELS), which every QAT module "
                    "resolves to its own output-channel axis, or axis=None for one scale "
                    "per tensor"
                )
            weight_channels = self.out_channels

        output_spec = qconfig.activation
        if output_spec is not None:
            output_spec = output_spec.resolve_axis(OUTPUT_CHANNEL_AXIS)
        output_channels = None
        if output_spec is not None and output_spec.axis is not None:
            if output_spec.axis != OUTPUT_CHANNEL_AXIS:
                raise SwapError(
                    f"{where}: per-channel output quantization of a transposed conv needs "
                    f"axis=1 (the output channels), got axis={output_spec.axis}; set "
                    "QuantSpec(axis=1) in QConfig.activation, or axis=None for one scale "
                    "per tensor"
                )
            output_channels = self.out_channels

        self.qconfig = qconfig
        device = self.weight.device
        self.weight_fake_quant = build_fake_quant(
            weight_spec, weight_channels, "weight", where, device
        )
        self.output_fake_quant = build_fake_quant(
            output_spec, output_channels, "output", where, device
        )

    def fake_quantized_weight(self) -> torch.Tensor:
        """Return the weight after its fake quantizer, in the float weight's layout.

        In training mode with the observer enabled this updates the weight
        observer, as :meth:`forward` does. Without a weight fake quantizer
        the weight itself is returned.
        """
        return self._fake_quantized_weight(self.weight)

    def _fake_quantized_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``weight``, a tensor of the weight's shape, per output channel."""
        fake_quant = self.weight_fake_quant
        if fake_quant is None:
            return weight
        if self.groups == 1 or not fake_quant.spec.per_channel:
            return fake_quant(weight)

        # With groups > 1 the weight (in, out // groups, *k) stacks one block of
        # in // groups rows per group. Output channel g * (out // groups) + j is
        # column j of block g. Permuting the view (groups, in // groups,
        # out // groups, *k) to (in // groups, groups, out // groups, *k) puts
        # all out_channels in that order along axis 1. The fake quantizer
        # observes and applies one scale per output channel there, and the
        # inverse permutation restores the layout for the convolution.
        groups = self.groups
        rows = self.in_channels // groups
        columns = self.out_channels // groups
        kernel = tuple(weight.shape[2:])
        blocks = weight.reshape(groups, rows, columns, *kernel)
        by_channel = blocks.transpose(0, 1).reshape(rows, self.out_channels, *kernel)
        quantized = fake_quant(by_channel)
        blocks = quantized.reshape(rows, groups, columns, *kernel).transpose(0, 1)
        return blocks.reshape(weight.shape)

    def _conv_transpose_forward(
        self,
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        output_padding: list[int] | tuple[int, ...],
    ) -> torch.Tensor:
        """Run the transposed conv of this module's configuration with ``weight`` and ``bias``."""
        return self.conv_transpose(
            input,
            weight,
            bias,
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
        )

    def _transposed_output(self, input: torch.Tensor, output_padding: list[int]) -> torch.Tensor:
        """Return the output before the activation and the output fake quantizer."""
        weight = self._fake_quantized_weight(self.weight)
        return self._conv_transpose_forward(input, weight, self.bias, output_padding)

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        """Run the transposed conv with the fake-quantized weight, then fake-quantize the output.

        A fused activation runs before the output fake quantizer.

        Args:
            input: Batched or unbatched input.
            output_size: The spatial output size (optionally with the
                leading batch and channel sizes), chosen among the sizes the
                stride allows, as for ``torch.nn.ConvTranspose2d``.

        Raises:
            ValueError: ``output_size`` has the wrong length or a size the
                stride cannot produce.
        """
        input = self._quantized_input(input)
        spatial_dims = len(self.kernel_size)
        output_padding = self._output_padding(
            input,
            output_size,
            list(self.stride),
            list(self.padding),
            list(self.kernel_size),
            spatial_dims,
            list(self.dilation),
        )
        output = self._transposed_output(input, output_padding)
        if self.activation is not None:
            output = self.activation(output)

        if self.output_fake_quant is None:
            return output
        if output.dim() == spatial_dims + 1 and self.output_fake_quant.spec.per_channel:
            # Unbatched input: add the batch axis so that axis 1 is the channels.
            return self.output_fake_quant(output.unsqueeze(0)).squeeze(0)
        return self.output_fake_quant(output)

    def to_float(self) -> nn.Module:
        """Return the float transposed conv (and activation) with copies of the parameters."""
        bias = copy_parameter(self.bias) if self.bias is not None else None
        conv = self._float_conv_transpose(copy_parameter(self.weight), bias)
        if self.activation is None:
            return conv
        return nn.Sequential(conv, copy.deepcopy(self.activation)).train(self.training)

    def _float_conv_transpose(self, weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Module:
        """Build the float transposed conv of this module's configuration around the parameters."""
        conv = self.float_types[0](
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            output_padding=self.output_padding,
            groups=self.groups,
            bias=bias is not None,
            dilation=self.dilation,
            padding_mode=self.padding_mode,
            device="meta",
            dtype=self.weight.dtype,
        )
        conv.weight = weight
        conv.bias = bias
        return conv.train(self.training)


class ConvTranspose1d(QATConvTransposeNd, nn.ConvTranspose1d):
    """QAT ``nn.ConvTranspose1d``: fake-quantized weight and output."""

    float_types = (nn.ConvTranspose1d,)
    conv_transpose = staticmethod(F.conv_transpose1d)


class ConvTranspose2d(QATConvTransposeNd, nn.ConvTranspose2d):
    """QAT ``nn.ConvTranspose2d``: fake-quantized weight and output."""

    float_types = (nn.ConvTranspose2d,)
    conv_transpose = staticmethod(F.conv_transpose2d)


class ConvTranspose3d(QATConvTransposeNd, nn.ConvTranspose3d):
    """QAT ``nn.ConvTranspose3d``: fake-quantized weight and output."""

    float_types = (nn.ConvTranspose3d,)
    conv_transpose = staticmethod(F.conv_transpose3d)


class ConvTransposeReLU1d(QATConvTransposeNd, nn.ConvTranspose1d):
    """QAT ``nn.ConvTranspose1d`` followed by ``nn.ReLU``, fake-quantizing the ReLU output."""

    float_types = (nn.ConvTranspose1d, nn.ReLU)
    conv_transpose = staticmethod(F.conv_transpose1d)
    activation_type = nn.ReLU


class ConvTransposeReLU2d(QATConvTransposeNd, nn.ConvTranspose2d):
    """QAT ``nn.ConvTranspose2d`` followed by ``nn.ReLU``, fake-quantizing the ReLU output."""

    float_types = (nn.ConvTranspose2d, nn.ReLU)
    conv_transpose = staticmethod(F.conv_transpose2d)
    activation_type = nn.ReLU


class ConvTransposeReLU3d(QATConvTransposeNd, nn.ConvTranspose3d):
    """QAT ``nn.ConvTranspose3d`` followed by ``nn.ReLU``, fake-quantizing the ReLU output."""

    float_types = (nn.ConvTranspose3d, nn.ReLU)
    conv_transpose = staticmethod(F.conv_transpose3d)
    activation_type = nn.ReLU
