"""Deployment: the int8 view of a trained QAT model, and the calls that convert and export it.

Converters and exporters come from backend plugins. Each reads a QAT model
through :func:`quantized_layers`, which gives every QAT module as its float
layer (BatchNorm folded in), its activation and the qparams of its input,
weight and output. The qparams are the fake quantizers' own, so the scales
used in training are the scales deployed.
"""

from __future__ import annotations

from collections.abc import Callable
from os import PathLike
from typing import Any

import attrs
import torch
from torch import nn

from qatcore._dataflow import input_producers, qat_modules
from qatcore._fake_quantize import FakeQuantize
from qatcore._plan import POST_HOOKS, PRE_HOOKS, iter_named_modules
from qatcore._plugins import plugin_manager
from qatcore._protocol import QATModule, qualified_name
from qatcore._reference import fake_quantize_reference

__all__ = [
    "DeployError",
    "QuantParams",
    "QuantizedLayer",
    "convert",
    "export",
    "quantized_layers",
    "replace_layers",
]


class DeployError(ValueError):
    """A QAT model cannot be converted or exported as asked.

    The message names the module's qualified path, the operation or setting
    that the target cannot take, the target, and the fix.
    """


@attrs.frozen(eq=False)
class QuantParams:
    """The quantization of one tensor of a trained QAT layer.

    Attributes:
        scale: float32 scale, a scalar or one per channel along ``axis``.
        zero_point: int32 zero point of the same shape.
        quant_min: Smallest integer code.
        quant_max: Largest integer code.
        axis: ``None`` per tensor, else the channel axis.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    quant_min: int
    quant_max: int
    axis: int | None = None

    @classmethod
    def of(cls, fake_quant: FakeQuantize) -> QuantParams:
        """Return the qparams that ``fake_quant`` applies now."""
        scale, zero_point = fake_quant.qparams()
        axis = fake_quant.spec.axis
        return cls(
            scale=scale,
            zero_point=zero_point,
            quant_min=fake_quant.quant_min,
            quant_max=fake_quant.quant_max,
            axis=axis if isinstance(axis, int) else None,
        )

    @property
    def signed(self) -> bool:
        """Whether the codes include negative numbers."""
        return self.quant_min < 0

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` quantized and dequantized exactly as the QAT model does it."""
        with torch.no_grad():
            return fake_quantize_reference(
                x,
                self.scale.to(x.device),
                self.zero_point.to(x.device),
                self.quant_min,
                self.quant_max,
                self.axis,
            )

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Return the int32 codes of ``x``, the codes that :meth:`fake_quantize` dequantizes."""
        shape = [1] * x.dim()
        if self.axis is not None:
            shape[self.axis] = -1
        scale = self.scale.to(x.device).reshape(shape)
        zero_point = self.zero_point.to(x.device).reshape(shape)
        # A dequantized value divided by its scale is its code minus the zero
        # point up to float rounding, far less than the half step that rounding removes.
        steps = torch.round(self.fake_quantize(x).double() / scale.double())
        return (steps + zero_point).to(torch.int32)


@attrs.frozen(eq=False)
class QuantizedLayer:
    """One QAT module of a model as an int8 engine runs it.

    Attributes:
        name: The module's qualified name in the model.
        module: The QAT module itself.
        layer: Its float layer in eval mode, with BatchNorm folded in, such
            as an ``nn.Conv2d``.
        activation: The activation fused after the layer, such as
            ``nn.ReLU``, or ``None``. It runs before the output is quantized.
        input: Qparams of the layer's input.
        weight: Qparams of the layer's weight. Per-channel scales are
            ordered by output channel. A transposed conv with ``groups > 1``
            has no weight axis with one entry per output channel. Its
            scales apply along axis 1 of the weight regrouped to
            ``(in_channels // groups, out_channels, *kernel_size)``, in
            which output channel ``g * (out_channels // groups) + j`` is
            column ``j`` of group ``g``'s rows, as the QAT module quantizes it.
        output: Qparams of the output, after the activation.
        input_from: Qualified name of the QAT module whose output quantizer
            also quantizes this layer's input, or ``None`` when the layer
            has an input fake quantizer of its own.
    """

    name: str
    module: QATModule
    layer: nn.Module
    activation: nn.Module | None
    input: QuantParams
    weight: QuantParams
    output: QuantParams
    input_from: str | None


def _float_parts(name: str, module: QATModule) -> tuple[nn.Module, nn.Module | None]:
    float_module = module.to_float().eval()
    if not isinstance(float_module, nn.Sequential):
        return float_module, None
    parts = [part for part in float_module if not isinstance(part, nn.Identity)]
    if len(parts) > 2:
        kinds = ", ".join(type(part).__name__ for part in parts)
        raise DeployError(
            f"{qualified_name(name, module)}: its float equivalent is ({kinds}); a deployed "
            "layer is one weighted layer and at most one activation"
        )
    return parts[0], parts[1] if len(parts) > 1 else None


def _quantizer(name: str, module: QATModule, role: str) -> FakeQuantize:
    where = qualified_name(name, module)
    quantizer = getattr(module, f"{role}_fake_quant", None)
    if quantizer is None:
        spec = "weight" if role == "weight" else "activation"
        raise DeployError(
            f"{where}: its {role} is not quantized (QConfig.{spec} is None), and int8 "
            f"engines need a quantized {role}; swap it with a QConfig that sets "
            f"QConfig.{spec}, or keep the module float by mapping it to None in the qconfig"
        )
    if not quantizer.fake_quant_enabled:
        raise DeployError(
            f"{where}: its {role} fake quantizer is disabled, so the QAT model does not "
            "simulate the int8 result; call qatcore.enable_fake_quant(model) before converting"
        )
    if role == "output" and quantizer.spec.per_channel:
        raise DeployError(
            f"{where}: its output is quantized per channel (axis {quantizer.spec.axis}), but "
            "int8 engines take one scale per activation tensor; use QuantSpec(axis=None) in "
            "QConfig.activation"
        )
    return quantizer


def quantized_layers(model: nn.Module) -> list[QuantizedLayer]:
    """Return every QAT module of ``model`` as a :class:`QuantizedLayer`, in model order.

    A module registered under several names is listed once, under its
    first name.

    Raises:
        DeployError: ``model`` has no QAT module, or a QAT module lacks a
            weight or output quantizer, has one disabled, quantizes its
            output per channel, or has an input that nothing quantized. The
            message names the module.
    """
    modules = list(qat_modules(model))
    if not modules:
        raise DeployError(
            f"{type(model).__name__} has no QAT module to deploy; swap it first with "
            "qatcore.swap_modules(model, qconfig), then train it"
        )
    producers: dict[str, str | None] | None = None
    layers = []
    for name, module in modules:
        where = qualified_name(name, module)
        weight = _quantizer(name, module, "weight")
        output = _quantizer(name, module, "output")
        own_input = module.input_quantizer()
        input_from = None
        if own_input is not None:
            input_params = QuantParams.of(_quantizer(name, module, "input"))
        else:
            if producers is None:
                producers = input_producers(model) or {}
            input_from = producers.get(name)
            if input_from is None:
                raise DeployError(
                    f"{where}: its input has no fake quantizer and is not the unchanged "
                    "quantized output of another QAT module, so its int8 codes are unknown. "
                    "A forward hook, a forward pre-hook or an in-place change added after "
                    "the swap changes that input; remove it, or swap the float model again "
                    "with qatcore.swap_modules(model, qconfig), which adds input quantizers "
                    "unless quantize_inputs=False, and train it again"
                )
            producer = model.get_submodule(input_from)
            input_params = QuantParams.of(_quantizer(input_from, producer, "output"))
        layer, activation = _float_parts(name, module)
        layers.append(
            QuantizedLayer(
                name=name,
                module=module,
                layer=layer,
                activation=activation,
                input=input_params,
                weight=QuantParams.of(weight),
                output=QuantParams.of(output),
                input_from=input_from,
            )
        )
    return layers


def replace_layers(model: nn.Module, build: Callable[[QuantizedLayer], nn.Module]) -> nn.Module:
    """Return a copy of ``model`` in eval mode with each QAT module replaced by ``build(layer)``.

    The model itself is not changed. Each built module gets copies of its
    QAT module's forward hooks and forward pre-hooks. Every module that is not a QAT module
    is copied unchanged, and a QAT module registered under several names
    is replaced under each by one built module. A converter or exporter
    calls this with a ``build`` that makes the module its target runs.

    Raises:
        DeployError: As :func:`quantized_layers` raises, or as ``build``
            does, or a module inside a QAT module has a forward hook.
    """
    from qatcore._copy import copy_module_tree
    from qatcore._swap import _replace

    layers = quantized_layers(model)
    built = {layer.name: _with_hooks_of(layer, build(layer)) for layer in layers}
    if isinstance(model, QATModule):
        return built[""].eval()
    by_module = {id(layer.module): built[layer.name] for layer in layers}
    names = [
        (name, id(module))
        for name, module in iter_named_modules(model)
        if isinstance(module, QATModule)
    ]
    result = copy_module_tree(model)
    for name, key in names:
        if key in by_module:
            _replace(result, name, by_module[key])
    return result.eval()


def _with_hooks_of(layer: QuantizedLayer, built: nn.Module) -> nn.Module:
    """Give ``built`` copies of the forward hooks of ``layer``'s QAT module, and return it.

    The hooks then change the deployed layer's input and output as they
    change the QAT module's. A hook inside the QAT module, on a fake
    quantizer or a fused activation, has no counterpart in a deployed layer.

    Raises:
        DeployError: A module inside the QAT module has a forward hook.
    """
    for name, inner in layer.module.named_modules():
        if name and any(getattr(inner, kind, None) for kind in PRE_HOOKS + POST_HOOKS):
            raise DeployError(
                f"{qualified_name(layer.name, layer.module)}: its submodule {name} "
                f"({type(inner).__name__}) has a forward hook, which a deployed layer cannot "
                "run because it has no such submodule; remove the hook before converting, or "
                "register it on the QAT module itself"
            )
    for kind in PRE_HOOKS + POST_HOOKS:
        hooks = getattr(layer.module, kind, None)
        if hooks:
            built.__dict__[kind] = type(hooks)(hooks)
    return built


MAX_LAYER_STEPS = 1.0
"""The largest difference, in output steps, that :func:`convert` accepts between an int8
layer and its QAT module on the example inputs."""


def convert(
    model: nn.Module, backend: str = "x86", *, example_inputs: tuple[Any, ...] | None = None
) -> nn.Module:
    """Return an int8 model for ``backend`` that computes what the QAT ``model`` computes in eval.

    The converter of ``backend`` comes from a plugin: ``"x86"`` from
    qatcore-x86 (PyTorch's x86 engine) and ``"arm"`` from qatcore-arm (its
    qnnpack engine) build PyTorch's quantized CPU modules. Each QAT module
    becomes one int8 layer that quantizes its float input with the input
    qparams of training and returns a float output, so the model's entry and
    exit, and the float operations between layers, need no edit. ``model``
    is not changed.

    With ``example_inputs``, the positional inputs of one forward call, each
    int8 layer is checked on the input its QAT module receives in eval mode:
    its output must be within one output step of the QAT module's. That
    catches what no trace of the forward shows, such as a write to a
    tensor's ``.data`` between two layers.

    Raises:
        KeyError: No converter is registered for ``backend``; the message
            lists the registered ones and the plugin that provides it.
        DeployError: A module cannot run on the backend, or an int8 layer
            differs from its QAT module by more than one output step on
            ``example_inputs``. The message names the module.
    """
    converter = plugin_manager().registry.converters[backend]
    converted = converter(model)
    if example_inputs is not None:
        _check_layers(model, converted, tuple(example_inputs), backend)
    return converted


def _check_layers(
    model: nn.Module, converted: nn.Module, example_inputs: tuple[Any, ...], backend: str
) -> None:
    """Raise where an int8 layer of ``converted`` differs from its QAT module on the inputs."""
    layers = quantized_layers(model)
    calls: dict[str, tuple[tuple[Any, ...], torch.Tensor]] = {}
    handles = []
    for layer in layers:

        def record(
            module: nn.Module, args: tuple[Any, ...], output: Any, name: str = layer.name
        ) -> None:
            if name not in calls and isinstance(output, torch.Tensor):
                # Copies, because the forward may change these tensors in place later.
                copied = tuple(
                    arg.detach().clone() if isinstance(arg, torch.Tensor) else arg for arg in args
                )
                calls[name] = (copied, output.detach().clone())

        # Prepended, so that it records the output before other hooks change it.
        handles.append(layer.module.register_forward_hook(record, prepend=True))
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training

    for layer in layers:
        if layer.name not in calls:
            continue
        args, expected = calls[layer.name]
        int8_layer = converted.get_submodule(layer.name) if layer.name else converted
        with torch.no_grad():
            actual = int8_layer.forward(*args)  # the hooks ran on args already
        scale = float(layer.output.scale)
        steps = float((actual - expected).abs().nan_to_num(0.0).max()) / scale
        if steps > MAX_LAYER_STEPS + 1e-4:
            source = (
                f"the quantized output of {layer.input_from}"
                if layer.input_from is not None
                else "its input fake quantizer's"
            )
            raise DeployError(
                f"{qualified_name(layer.name, layer.module)}: on the example inputs its "
                f"{backend} int8 layer differs from the QAT module by {steps:.4g} output "
                f"steps, where at most {MAX_LAYER_STEPS:g} is expected. Its input should carry "
                f"the codes of {source}, but something between changes it in a way that "
                "torch.fx did not record, such as assigning a tensor's .data; make that "
                "change with ops that return a new tensor, swap the float model again and "
                "train it"
            )


def export(
    model: nn.Module,
    path: str | PathLike[str],
    example_inputs: tuple[Any, ...],
    *,
    format: str = "onnx",
    **options: Any,
) -> Any:
    """Export the QAT ``model`` to ``path`` in ``format``, with the qparams of training.

    The exporter of ``format`` comes from a plugin: ``"onnx"`` from
    qatcore-onnx, ``"tensorrt"`` from qatcore-tensorrt. ``example_inputs``
    are the positional inputs of one forward call. ``options`` go to the
    exporter, and what it returns is returned. ``model`` is not changed.

    Raises:
        KeyError: No exporter is registered for ``format``.
        DeployError: A module cannot be exported; the message names the
            module, the operation and what cannot take it.
    """
    exporter = plugin_manager().registry.exporters[format]
    return exporter(model, path, example_inputs, **options)
