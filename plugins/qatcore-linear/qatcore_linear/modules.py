"""QAT linear layers: Linear and the fused LinearReLU, thin declarations over QATLinearBase."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qatcore import (
    QATModule,
    QConfig,
    QuantSpec,
    SwapError,
    build_fake_quant,
    check_float_modules,
    copy_parameter,
    qualified_name,
)

__all__ = ["Linear", "LinearReLU", "QATLinearBase"]

WEIGHT_AXIS = 0
"""Per-channel axis of weight specs: ``out_features``, one scale per row of the weight."""

OUTPUT_AXIS = 1
"""Per-channel axis of output specs: axis 1 of the output viewed as ``(N, out_features)``."""


class QATLinearBase(QATModule, nn.Linear):
    """Behaviour shared by every QAT linear layer, fused or not.

    A concrete class declares ``float_types``; for a fused linear-activation
    it also sets ``activation_type``, used when the class is built directly
    rather than from float modules. For example::

        class Linear(QATLinearBase):
            float_types = (nn.Linear,)

        class LinearReLU(QATLinearBase):
            float_types = (nn.Linear, nn.ReLU)
            activation_type = nn.ReLU

    The forward is ``output_fq(activation(linear(x, weight_fq(weight), bias)))``
    for inputs of any rank ``(*, in_features)``.

    Per-channel weight specs use ``axis=0`` (``out_features``). Per-channel
    output specs use ``axis=1`` and quantize along the last axis of the
    output, its ``out_features``, whatever the input's rank. The output
    fake quantizer receives the output reshaped to ``(N, out_features)``, with
    ``N`` the product of the leading axes. One spec thus serves
    ``(batch, features)``, ``(batch, tokens, features)`` and unbatched
    inputs, and a per-channel activation spec shared with convs (whose
    channels are axis 1) fits both.
    """

    activation_type: ClassVar[type[nn.Module] | None] = None

    def __init__(self, *args: Any, qconfig: QConfig | None = None, **kwargs: Any) -> None:
        """Build like ``nn.Linear``, plus the fake quantizers for ``qconfig``.

        Without ``qconfig`` neither the weight nor the output is quantized.

        Raises:
            SwapError: ``qconfig`` quantizes the weight per channel along an
                axis other than 0 or the output along an axis other than 1, or
                names an unregistered observer or kernel.
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
    ) -> QATLinearBase:
        """Build the QAT layer from an ``nn.Linear``, or a (linear, activation) tuple.

        The QAT layer shares the float layer's weight and bias Parameters.
        It and its fake quantizers take the float layer's training mode. The
        modules after the linear layer keep their own mode until the next
        ``train()`` or ``eval()`` call, as they would in the float model.

        Raises:
            SwapError: The modules do not match ``float_types``, ``qconfig``
                is not a QConfig, the weight is not a Parameter, or the
                qconfig cannot be applied (see :class:`QATLinearBase`).
        """
        modules, where = check_float_modules(cls, module, qconfig, name)
        linear = modules[0]

        # Built on the meta device so that no throwaway weight is allocated;
        # the float layer's parameters are assigned right after.
        qat = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            dtype=linear.weight.dtype,
        )
        qat.weight = linear.weight
        qat.bias = linear.bias
        qat._init_fake_quants(qconfig, where)
        qat.train(linear.training)
        qat._adopt_members(modules[1:], where)
        return qat

    def _init_fake_quants(self, qconfig: QConfig, where: str) -> None:
        weight_spec = _resolved_spec(qconfig, "weight", WEIGHT_AXIS, "out_features", where)
        output_spec = _resolved_spec(
            qconfig,
            "activation",
            OUTPUT_AXIS,
            "out_features, the last axis of the output whatever the input's rank",
            where,
        )

        self.qconfig = qconfig
        device = self.weight.device
        self.weight_fake_quant = build_fake_quant(
            weight_spec, self.out_features, "weight", where, device
        )
        self.output_fake_quant = build_fake_quant(
            output_spec, self.out_features, "output", where, device
        )

    def _adopt_members(self, members: tuple[nn.Module, ...], where: str) -> None:
        """Take over the float modules that follow the linear layer in a fused group."""
        if members:
            self.activation = members[-1]

    def _fake_quantized_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if self.weight_fake_quant is None:
            return weight
        return self.weight_fake_quant(weight)

    def _linear_output(self, input: torch.Tensor) -> torch.Tensor:
        """Return the output before the activation and the output fake quantizer."""
        return F.linear(input, self._fake_quantized_weight(self.weight), self.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = self._linear_output(self._quantized_input(input))
        if self.activation is not None:
            output = self.activation(output)
        if self.output_fake_quant is None:
            return output
        if not self.output_fake_quant.spec.per_channel:
            return self.output_fake_quant(output)
        # Axis 1 of the spec is the last axis of the output, for any input rank.
        rows = output.reshape(-1, self.out_features)
        return self.output_fake_quant(rows).reshape(output.shape)

    def to_float(self) -> nn.Module:
        """Return the float linear (and activation) with copies of the parameters."""
        bias = copy_parameter(self.bias) if self.bias is not None else None
        linear = self._float_linear(copy_parameter(self.weight), bias)
        if self.activation is None:
            return linear
        return nn.Sequential(linear, copy.deepcopy(self.activation)).train(self.training)

    def _float_linear(self, weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
        """Build the float linear layer of this module's shape around ``weight`` and ``bias``."""
        linear = self.float_types[0](
            self.in_features,
            self.out_features,
            bias=bias is not None,
            device="meta",
            dtype=self.weight.dtype,
        )
        linear.weight = weight
        linear.bias = bias
        return linear.train(self.training)


class Linear(QATLinearBase):
    """QAT ``nn.Linear``: fake-quantized weight and output."""

    float_types = (nn.Linear,)


class LinearReLU(QATLinearBase):
    """QAT ``nn.Linear`` followed by ``nn.ReLU``; the output is fake-quantized after the ReLU."""

    float_types = (nn.Linear, nn.ReLU)
    activation_type = nn.ReLU


def _resolved_spec(
    qconfig: QConfig, field: str, axis: int, meaning: str, where: str
) -> QuantSpec | None:
    """Return the spec of ``field`` with its output-channel axis resolved to ``axis``.

    Raises:
        SwapError: The spec is per channel along another axis.
    """
    spec = getattr(qconfig, field)
    if spec is None:
        return None
    spec = spec.resolve_axis(axis)
    if spec.axis is None or spec.axis == axis:
        return spec
    role = "weight" if field == "weight" else "output"
    raise SwapError(
        f"{where}: per-channel {role} quantization of a linear layer needs axis={axis} "
        f"({meaning}), got axis={spec.axis}; set QuantSpec(axis={axis}) in "
        f"QConfig.{field}, or axis=None for one scale per tensor"
    )
