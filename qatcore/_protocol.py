"""The QAT module contract, and the conv specialisation that every QAT conv shares."""

from __future__ import annotations

import abc
import copy
from typing import Any, ClassVar

import torch
from torch import nn

from qatcore._config import QConfig, QuantSpec
from qatcore._fake_quantize import FakeQuantize

__all__ = [
    "QATConvNd",
    "QATModule",
    "SwapError",
    "build_fake_quant",
    "check_float_modules",
    "copy_parameter",
    "qualified_name",
]


class SwapError(ValueError):
    """A module cannot be swapped to QAT, or back to float, as configured."""


class QATModule(metaclass=abc.ABCMeta):
    """The contract every QAT module implements, as a mixin for ``nn.Module``.

    A QAT module is built from its float module (or, for a fused module,
    the tuple of float modules in call order) with :meth:`from_float`. It
    shares the float module's parameters rather than copying them,
    fake-quantizes its weight before use and its output after use, and
    builds an equivalent float module with :meth:`to_float`. A fused type
    rejects a group of float modules that it cannot fuse with
    :meth:`fusion_problem`, before any of them is swapped.

    Attributes:
        float_types: The float module types this class replaces, in call
            order; one type for a plain module, several for a fused one.
        weight_fake_quant: Fake quantizer of the weight, or ``None``.
        output_fake_quant: Fake quantizer of the output, or ``None``.
        input_fake_quant: Fake quantizer of the input, a submodule that only
            some modules have. :func:`qatcore.swap_modules` adds one where no
            other QAT module's output fake quantizer quantized the input, so
            that the codes an int8 engine reads are the codes training used.
            Read it with :meth:`input_quantizer`.
    """

    float_types: ClassVar[tuple[type[nn.Module], ...]]
    weight_fake_quant: FakeQuantize | None
    output_fake_quant: FakeQuantize | None

    @classmethod
    @abc.abstractmethod
    def from_float(
        cls, module: nn.Module | tuple[nn.Module, ...], qconfig: QConfig, *, name: str = ""
    ) -> QATModule:
        """Build the QAT module from its float module, sharing its parameters.

        Args:
            module: The float module, or a tuple of them for a fused type.
            qconfig: The specs for the weight and the output.
            name: The module's qualified name in its model, used in errors.

        Raises:
            SwapError: The module's configuration cannot be quantized as asked.
        """

    @classmethod
    def fusion_problem(cls, modules: tuple[nn.Module, ...]) -> str:
        """Return why ``modules`` cannot be fused into this type, or ``""`` when they can.

        The planner calls this before it plans a fusion, so that a group which
        ``from_float`` would reject stays unfused instead. ``modules`` are the
        float modules in call order, their types already checked against
        ``float_types``. The reason is a short phrase without the module's
        qualified name, which the caller adds. The default accepts every group.
        """
        return ""

    @abc.abstractmethod
    def to_float(self) -> nn.Module:
        """Return an equivalent float module that shares no tensor with this one.

        Its output equals this module's output with fake quantization
        disabled. A fused module returns an ``nn.Sequential`` of its float
        modules in call order.
        """

    def input_quantizer(self) -> FakeQuantize | None:
        """Return the fake quantizer of this module's input, or ``None`` when it has none."""
        return self._modules.get("input_fake_quant")  # type: ignore[attr-defined, return-value]

    def _quantized_input(self, input: torch.Tensor) -> torch.Tensor:
        """Return ``input`` through the input fake quantizer, if the module has one."""
        quantizer = self.input_quantizer()
        return input if quantizer is None else quantizer(input)

    def qparams(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Return ``{"input": (scale, zero_point), "weight": (...), "output": (...)}``.

        Only the tensors this module quantizes are keys.
        """
        found = {}
        quantizers = {
            "input": self.input_quantizer(),
            "weight": getattr(self, "weight_fake_quant", None),
            "output": getattr(self, "output_fake_quant", None),
        }
        for role, fake_quant in quantizers.items():
            if fake_quant is not None:
                found[role] = fake_quant.qparams()
        return found


def qualified_name(name: str, module: nn.Module) -> str:
    """Return ``"name (Type)"`` for error messages; the root module is ``<root>``."""
    return f"{name or '<root>'} ({type(module).__name__})"


def check_float_modules(
    qat_type: type[QATModule],
    module: nn.Module | tuple[nn.Module, ...],
    qconfig: object,
    name: str,
) -> tuple[tuple[nn.Module, ...], str]:
    """Validate the arguments of a ``from_float`` call; return the modules and their label.

    Raises:
        SwapError: The modules do not match ``qat_type.float_types`` exactly,
            ``qconfig`` is not a QConfig, or the first module's weight is
            computed by a hook rather than a Parameter. The message starts
            with the module's qualified name.
    """
    modules = module if isinstance(module, tuple) else (module,)
    first = modules[0]
    where = qualified_name(name, first)
    if len(modules) != len(qat_type.float_types) or not all(
        type(part) is expected for part, expected in zip(modules, qat_type.float_types)
    ):
        got = ", ".join(type(part).__name__ for part in modules)
        want = ", ".join(kind.__name__ for kind in qat_type.float_types)
        raise SwapError(f"{where}: {qat_type.__name__} is built from ({want}), got ({got})")
    if not isinstance(qconfig, QConfig):
        raise SwapError(f"{where}: qconfig must be a QConfig, got {qconfig!r}")
    weight = getattr(first, "weight", None)
    if weight is not None and not isinstance(weight, nn.Parameter):
        raise SwapError(
            f"{where}: its weight is a computed {type(weight).__name__}, not a "
            "Parameter, as hook-based torch.nn.utils.spectral_norm and weight_norm leave "
            "it; remove them (torch.nn.utils.remove_spectral_norm or remove_weight_norm) "
            "before swapping"
        )
    return modules, where


def build_fake_quant(
    spec: QuantSpec | None,
    channels: int | None,
    what: str,
    where: str,
    device: torch.device | None = None,
) -> FakeQuantize | None:
    """Build the fake quantizer for ``spec``, or return None when the tensor stays float.

    With ``device``, the fake quantizer is moved there, unless it is the
    meta device, which a module built without values uses.

    Raises:
        SwapError: The observer or kernel is not registered, or the spec
            cannot be applied; the message names ``where`` and ``what``.
    """
    if spec is None:
        return None
    try:
        fake_quant = FakeQuantize(spec, channels=channels)
    except (KeyError, ValueError) as error:
        message = error.args[0] if error.args else str(error)
        raise SwapError(f"{where}: cannot build the {what} fake quantizer: {message}") from None
    if device is not None and device.type != "meta" and fake_quant.scale.device != device:
        fake_quant.to(device)
    return fake_quant


class QATConvNd(QATModule):
    """Behaviour shared by every QAT conv, whatever its dimension.

    A concrete class combines this mixin with a ``torch.nn`` conv class and
    declares ``float_types``; for a fused conv-activation it also sets
    ``activation_type``, used when the class is built directly rather than
    from float modules. For example::

        class Conv2d(QATConvNd, nn.Conv2d):
            float_types = (nn.Conv2d,)

        class ConvReLU2d(QATConvNd, nn.Conv2d):
            float_types = (nn.Conv2d, nn.ReLU)
            activation_type = nn.ReLU

    The forward is
    ``output_fq(activation(conv(input_fq(x), weight_fq(weight), bias)))``
    with every padding mode of the float conv. Per-channel weight specs must
    use ``axis=0`` (output channels), the axis that int8 engines quantize a
    conv weight along; per-channel output specs must use ``axis=1``.
    :data:`~qatcore.OUTPUT_CHANNELS` resolves to these axes.
    """

    activation_type: ClassVar[type[nn.Module] | None] = None

    def __init__(self, *args: Any, qconfig: QConfig | None = None, **kwargs: Any) -> None:
        """Build like the ``torch.nn`` conv, plus the fake quantizers for ``qconfig``.

        Without ``qconfig`` neither the weight nor the output is quantized.
        """
        super().__init__(*args, **kwargs)
        self.activation = self.activation_type() if self.activation_type is not None else None
        self.weight_fake_quant = None
        self.output_fake_quant = None
        self.qconfig = None
        if qconfig is not None:
            self._init_fake_quants(qconfig, qualified_name("", self))

    # Set by the nn.Conv base class.
    weight: nn.Parameter
    bias: nn.Parameter | None
    out_channels: int
    _conv_forward: Any

    def reset_parameters(self) -> None:
        """Initialise the weight and bias as the ``torch.nn`` conv does, unless they are on meta.

        A meta tensor has no values to initialise. :meth:`from_float` builds
        on the meta device and so skips the work.
        """
        if self.weight.device.type != "meta":
            super().reset_parameters()  # type: ignore[misc]

    @classmethod
    def from_float(
        cls, module: nn.Module | tuple[nn.Module, ...], qconfig: QConfig, *, name: str = ""
    ) -> QATConvNd:
        """Build the QAT conv from a float conv, or from a (conv, activation) tuple.

        The QAT conv and its fake quantizers take the float conv's training
        mode. The modules after the conv keep their own mode until the next
        ``train()`` or ``eval()`` call, as they would in the float model.

        Raises:
            SwapError: ``module`` does not match ``float_types`` exactly,
                ``qconfig`` is not a QConfig, the weight is computed by a
                hook, or a per-channel spec uses an axis other than 0 for the
                weight or 1 for the output. The message names ``name``.
        """
        modules, where = check_float_modules(cls, module, qconfig, name)
        conv = modules[0]

        qat = cls._from_conv_arguments(conv)
        qat.weight = conv.weight
        qat.bias = conv.bias
        qat._init_fake_quants(qconfig, where)
        if not conv.training:
            qat.train(False)  # a module is built in training mode
        qat._adopt_members(modules[1:], where)
        return qat

    @classmethod
    def _from_conv_arguments(cls, conv: nn.Module) -> QATConvNd:
        # Built on the meta device so that no throwaway weight is allocated;
        # the float conv's parameters are assigned right after.
        return cls(  # type: ignore[call-arg]
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
            dtype=conv.weight.dtype,
        )

    def _init_fake_quants(self, qconfig: QConfig, where: str) -> None:
        self.qconfig = qconfig
        weight_spec = None if qconfig.weight is None else qconfig.weight.resolve_axis(0)
        weight_channels = None
        if weight_spec is not None and weight_spec.axis is not None:
            if weight_spec.axis != 0:
                raise SwapError(
                    f"{where}: the weight spec quantizes per channel along axis "
                    f"{weight_spec.axis}, but a conv weight takes one scale per output "
                    f"channel, along axis 0 of its shape {tuple(self.weight.shape)} = "
                    "(out_channels, in_channels // groups, *kernel_size); set "
                    "QuantSpec(axis=qatcore.OUTPUT_CHANNELS) or axis=0, or axis=None for "
                    "one scale per tensor"
                )
            weight_channels = self.out_channels
        device = self.weight.device
        self.weight_fake_quant = build_fake_quant(
            weight_spec, weight_channels, "weight", where, device
        )

        output_spec = None if qconfig.activation is None else qconfig.activation.resolve_axis(1)
        output_channels = None
        if output_spec is not None and output_spec.axis is not None:
            if output_spec.axis != 1:
                raise SwapError(
                    f"{where}: per-channel output quantization of a conv needs axis=1 (the "
                    f"output channels), got axis={output_spec.axis}; set QuantSpec(axis=1) "
                    "in QConfig.activation, or axis=None for one scale per tensor"
                )
            output_channels = self.out_channels
        self.output_fake_quant = build_fake_quant(
            output_spec, output_channels, "output", where, device
        )

    def _adopt_members(self, members: tuple[nn.Module, ...], where: str) -> None:
        """Take over the float modules that follow the conv in a fused group."""
        if members:
            self.activation = members[-1]

    def _fake_quantized_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if self.weight_fake_quant is None:
            return weight
        return self.weight_fake_quant(weight)

    def _conv_output(self, input: torch.Tensor) -> torch.Tensor:
        """Return the output before the activation and the output fake quantizer."""
        return self._conv_forward(input, self._fake_quantized_weight(self.weight), self.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = self._conv_output(self._quantized_input(input))
        if self.activation is not None:
            output = self.activation(output)
        if self.output_fake_quant is not None:
            if output.dim() < self.weight.dim() and self.output_fake_quant.spec.per_channel:
                # Unbatched input: add the batch axis so that axis 1 is the channels.
                return self.output_fake_quant(output.unsqueeze(0)).squeeze(0)
            output = self.output_fake_quant(output)
        return output

    def to_float(self) -> nn.Module:
        """Return the float conv (and activation) with copies of the parameters."""
        bias = copy_parameter(self.bias) if self.bias is not None else None
        conv = self._float_conv(copy_parameter(self.weight), bias)
        if self.activation is None:
            return conv
        return nn.Sequential(conv, copy.deepcopy(self.activation)).train(self.training)

    def _float_conv(self, weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Module:
        """Build the float conv of this module's configuration around ``weight`` and ``bias``."""
        float_conv_type = self.float_types[0]
        conv = float_conv_type(
            self.in_channels,  # type: ignore[attr-defined]
            self.out_channels,
            self.kernel_size,  # type: ignore[attr-defined]
            stride=self.stride,  # type: ignore[attr-defined]
            padding=self.padding,  # type: ignore[attr-defined]
            dilation=self.dilation,  # type: ignore[attr-defined]
            groups=self.groups,  # type: ignore[attr-defined]
            bias=bias is not None,
            padding_mode=self.padding_mode,  # type: ignore[attr-defined]
            device="meta",
            dtype=self.weight.dtype,
        )
        conv.weight = weight
        conv.bias = bias
        return conv.train(self.training)


def copy_parameter(parameter: nn.Parameter) -> nn.Parameter:
    """Return a Parameter with a copy of ``parameter``'s data and its ``requires_grad``."""
    return nn.Parameter(parameter.detach().clone(), requires_grad=parameter.requires_grad)
