"""Int8 conversion to PyTorch's quantized CPU modules, for the engine a backend plugin names.

The x86 and arm backends share this converter and differ in the engine
(``torch.backends.quantized.engine``) that packs and runs the weights.
Each QAT layer becomes an :class:`Int8Layer`: it quantizes its float input
with the input qparams of training, runs the quantized module with the
trained weight codes and output qparams, and returns a float output.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from typing import Any

import attrs
import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from torch import nn

from qatcore._deploy import DeployError, QuantizedLayer, QuantParams, replace_layers

__all__ = ["Int8Layer", "TorchEngineConverter"]

# Float layer type -> (quantized type, quantized type fused with ReLU or None).
_QUANTIZED_TYPES: dict[type[nn.Module], tuple[type[nn.Module], type[nn.Module] | None]] = {
    nn.Conv1d: (nnq.Conv1d, nniq.ConvReLU1d),
    nn.Conv2d: (nnq.Conv2d, nniq.ConvReLU2d),
    nn.Conv3d: (nnq.Conv3d, nniq.ConvReLU3d),
    nn.ConvTranspose1d: (nnq.ConvTranspose1d, None),
    nn.ConvTranspose2d: (nnq.ConvTranspose2d, None),
    nn.ConvTranspose3d: (nnq.ConvTranspose3d, None),
    nn.Linear: (nnq.Linear, nniq.LinearReLU),
}
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_QUANTIZED_TRANSPOSED = (nnq.ConvTranspose1d, nnq.ConvTranspose2d, nnq.ConvTranspose3d)
# Quantized layer type -> its spatial dimensions, 0 for linear.
_SPATIAL_DIMS: dict[type[nn.Module], int] = {
    nnq.Linear: 0,
    nnq.Conv1d: 1,
    nnq.Conv2d: 2,
    nnq.Conv3d: 3,
    nnq.ConvTranspose1d: 1,
    nnq.ConvTranspose2d: 2,
    nnq.ConvTranspose3d: 3,
}
_PADDING_MODES = ("zeros", "reflect")
_INT16_MAX = 32767


@contextlib.contextmanager
def _engine(engine: str) -> Iterator[None]:
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


@contextlib.contextmanager
def _quantized_tensors() -> Iterator[None]:
    # torch 2.13 warns that its quantized tensor types will be removed in a
    # later release. The warning is about the engine modules this converter
    # targets, which it states in its documentation, not about the caller.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        yield


def _quantize(values: torch.Tensor, params: QuantParams, dtype: torch.dtype) -> torch.Tensor:
    """Return ``values`` as a quantized tensor with exactly the codes the QAT model uses."""
    # quantize_per_tensor rounds ``x / scale + zero_point`` as one sum, which
    # breaks ties differently from QAT when the zero point is odd. A value
    # that is already fake-quantized lies on a code, so no tie remains.
    exact = params.fake_quantize(values.float())
    with _quantized_tensors():
        if params.axis is None:
            return torch.quantize_per_tensor(
                exact, float(params.scale), int(params.zero_point), dtype
            )
        return torch.quantize_per_channel(
            exact, params.scale.double(), params.zero_point.long(), params.axis, dtype
        )


@functools.cache
def _transposed_conv_is_exact(
    engine: str, quantized_type: type[nn.Module], per_channel: bool, groups: int, out_per_group: int
) -> bool:
    """Return whether ``engine`` runs ``quantized_type`` to within one output code of float math.

    The probe builds a small random transposed conv with this weight scheme
    (one scale per tensor or per output channel), group count and output
    channels per group, and 2 input channels per group. It runs the conv and
    compares the codes with the float transposed conv of the dequantized
    tensors. An engine that rejects the configuration, when packing or when
    running, fails the probe.
    """
    # NOTE: the probe covers one small shape (kernel 2, stride 2). In torch
    # 2.13 the failures it detects hold for every shape tried: the x86 and
    # onednn engines return wrong codes for a per-tensor weight whenever the
    # input and output channel counts differ and both exceed 1, which the
    # probe's 2 inputs and 3 outputs per group expose; qnnpack returns wrong
    # codes for every ConvTranspose3d and cannot run a per-channel transposed
    # conv with groups > 1.
    generator = torch.Generator().manual_seed(0)
    dims = _SPATIAL_DIMS[quantized_type]
    functional = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]
    in_channels = 2 * groups
    out_channels = out_per_group * groups
    weight_shape = (in_channels, out_per_group) + (2,) * dims
    values = torch.randn(weight_shape, generator=generator)
    output_scale, output_zero_point = 0.01, 128
    with _engine(engine), _quantized_tensors():
        if per_channel:
            weight = torch.quantize_per_channel(
                values,
                torch.full((out_per_group,), 0.02, dtype=torch.float64),
                torch.zeros(out_per_group, dtype=torch.long),
                1,
                torch.qint8,
            )
        else:
            weight = torch.quantize_per_tensor(values, 0.02, 0, torch.qint8)
        module = quantized_type(in_channels, out_channels, 2, stride=2, groups=groups, bias=False)
        shape = (1, in_channels) + (3,) * dims
        x = torch.quantize_per_tensor(torch.rand(shape, generator=generator), 0.01, 3, torch.quint8)
        try:
            module.set_weight_bias(weight, None)
            module.scale = output_scale
            module.zero_point = output_zero_point
            codes = module(x).int_repr().int()
        except RuntimeError:
            return False
    expected = functional(x.dequantize(), weight.dequantize(), stride=2, groups=groups)
    expected_codes = torch.clamp(torch.round(expected / output_scale) + output_zero_point, 0, 255)
    return bool((codes - expected_codes.int()).abs().max() <= 1)


@functools.cache
def _saturates_pair_sums(engine: str, quantized_type: type[nn.Module]) -> bool:
    """Return whether ``engine`` adds pairs of uint8 x int8 products in int16, saturating them.

    FBGEMM does so with AVX2's vpmaddubsw on CPUs without VNNI instructions.
    The probe feeds input code 255 against weight code 127 over 64 input
    channels: each pair sum is 64,770, beyond int16, so an engine that
    saturates writes a code near 101 where the exact result is 200.
    """
    channels = 64
    exact_code = 200
    transposed = quantized_type in _QUANTIZED_TRANSPOSED
    dims = _SPATIAL_DIMS[quantized_type]
    weight_shape = ((channels, 1) if transposed else (1, channels)) + (1,) * dims
    input_shape = (2, channels) + (2,) * dims
    with _engine(engine), _quantized_tensors():
        if dims == 0:
            module = nnq.Linear(channels, 1)
        else:
            module = quantized_type(channels, 1, 1)
        weight = torch.quantize_per_tensor(torch.full(weight_shape, 127.0), 1.0, 0, torch.qint8)
        x = torch.quantize_per_tensor(torch.full(input_shape, 255.0), 1.0, 0, torch.quint8)
        try:
            module.set_weight_bias(weight, None)
            module.scale = channels * 255 * 127 / exact_code
            module.zero_point = 0
            codes = module(x).int_repr()
        except RuntimeError:
            return False  # the layer fails at packing or run time, which _build reports
    return bool((codes != exact_code).any())


class Int8Layer(nn.Module):
    """One QAT layer converted to a PyTorch quantized module, with float input and output.

    It quantizes the input with the input qparams of training, runs
    ``quantized``, applies ReLU on the quantized result when ``relu_after``
    is set (for layers whose int8 module does not fuse it), and dequantizes.
    With ``output``, the result is clamped to that spec's code range where
    it is narrower than uint8's ``[0, 255]``, such as ``[0, 127]``, so that
    it saturates where the QAT model does.

    Attributes:
        name: The qualified name of the QAT module this layer replaces.
        engine: The quantized engine the packed weights are for.
    """

    def __init__(
        self,
        name: str,
        engine: str,
        input: QuantParams,
        quantized: nn.Module,
        relu_after: bool = False,
        output: QuantParams | None = None,
    ) -> None:
        super().__init__()
        self.output = output
        self.name = name
        self.engine = engine
        self.input = input
        self.quantized = quantized
        self.relu_after = relu_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.backends.quantized.engine != self.engine:
            raise RuntimeError(
                f"{self.name or '<root>'}: this int8 layer was converted for the "
                f"{self.engine!r} engine, but torch.backends.quantized.engine is "
                f"{torch.backends.quantized.engine!r}; set torch.backends.quantized.engine = "
                f"{self.engine!r} before running the model"
            )
        # NOTE: between two int8 layers the codes are dequantized and
        # quantized again. Passing the quantized tensor on would save both passes.
        output = self.quantized(_quantize(x, self.input, torch.quint8))
        if self.relu_after:
            output = torch.relu(output)
        if x.dtype == torch.float64:
            # The QAT model dequantizes in float64; float32 would round each
            # grid value differently.
            scale = torch.tensor(output.q_scale(), dtype=torch.float32).double()
            result = (output.int_repr().double() - output.q_zero_point()) * scale
        else:
            result = output.dequantize()
        if self.output is not None and (self.output.quant_min > 0 or self.output.quant_max < 255):
            # The engine saturates at the uint8 bounds, and the QAT model at
            # the output spec's narrower ones, such as [0, 127] for 7 bits.
            # The values lie on the output grid, so clamping them is exact.
            scale = float(self.output.scale)
            zero_point = int(self.output.zero_point)
            result = result.clamp(
                (self.output.quant_min - zero_point) * scale,
                (self.output.quant_max - zero_point) * scale,
            )
        if x.is_contiguous():
            # The quantized convs return channels_last tensors whatever their
            # input, where a float conv keeps a contiguous input's layout,
            # which code such as ``y.view(len(y), -1)`` relies on.
            result = result.contiguous()
        return result.to(x.dtype)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # torch 2.13's quantized conv modules restore their own attributes on
        # unpickling but not nn.Module's hook dicts, so calling one after
        # torch.load or copy.deepcopy raises AttributeError '_backward_hooks'.
        template = nn.Module().__dict__
        for module in self.modules():
            for name, value in template.items():
                if name not in module.__dict__ and isinstance(value, (dict, set)):
                    module.__dict__[name] = type(value)()

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, engine={self.engine!r}, input_scale={float(self.input.scale)}, "
            f"input_zero_point={int(self.input.zero_point)}"
        )


class _PerChannelTransposed(nn.Module):
    """A transposed conv with one weight scale per output channel, as one int8 op per channel.

    For engines that pack transposed conv weights with one scale per tensor
    only. Every channel's op writes codes with the same output qparams, so
    joining them is exact.
    """

    # NOTE: one op per output channel costs far more than one op per layer;
    # an engine with per-channel transposed kernels (qnnpack) runs one.

    def __init__(self, channels: list[nn.Module], groups: int, in_per_group: int) -> None:
        super().__init__()
        self.channels = nn.ModuleList(channels)
        self.groups = groups
        self.in_per_group = in_per_group
        self.out_per_group = len(channels) // groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for index, conv in enumerate(self.channels):
            group = index // self.out_per_group
            start = group * self.in_per_group
            part = x[:, start : start + self.in_per_group] if self.groups > 1 else x
            outputs.append(conv(part.contiguous()))
        return torch.cat(outputs, dim=1)


class TorchEngineConverter:
    """Convert QAT models to PyTorch's quantized CPU modules for one quantized engine.

    A backend plugin registers an instance as its converter::

        registry.register_converter("x86", qatcore.TorchEngineConverter("x86"))

    Supported layers: conv 1d/2d/3d (padding modes zeros and reflect), their
    ReLU fusions, transposed conv 1d/2d/3d, linear and linear-ReLU,
    BatchNorm folded in. Activations must be uint8 codes in ``[0, 255]``
    and weights int8 codes in ``[-128, 127]``.

    Args:
        engine: A name of ``torch.backends.quantized.supported_engines``.
        backend: The backend name used in messages; defaults to ``engine``.
    """

    def __init__(self, engine: str, backend: str | None = None) -> None:
        self.engine = engine
        self.backend = backend or engine

    def __repr__(self) -> str:
        return f"TorchEngineConverter(engine={self.engine!r}, backend={self.backend!r})"

    @property
    def _target(self) -> str:
        """The backend and engine, as messages name them: ``"the arm backend (qnnpack engine)"``."""
        if self.backend == self.engine:
            return f"the {self.engine} engine"
        return f"the {self.backend} backend ({self.engine} engine)"

    def __call__(self, model: nn.Module) -> nn.Module:
        """Return the int8 model and select this engine for the process.

        ``torch.backends.quantized.engine`` is set to the engine, which the
        int8 layers need whenever they run.

        Raises:
            DeployError: The engine is missing from this torch build, or a
                layer or its qparams cannot run on it. The message names the
                module, the operation and the engine.
        """
        if self.engine not in torch.backends.quantized.supported_engines:
            raise DeployError(
                f"the {self.backend} backend needs PyTorch's {self.engine!r} quantized engine, "
                f"which this torch build lacks (it has "
                f"{', '.join(torch.backends.quantized.supported_engines)})"
            )
        with _engine(self.engine), _quantized_tensors():
            converted = replace_layers(model, self._build)
        torch.backends.quantized.engine = self.engine
        return converted

    def _problem(self, layer: QuantizedLayer, where: str) -> str:
        float_type = type(layer.layer)
        if float_type not in _QUANTIZED_TYPES:
            supported = ", ".join(kind.__name__ for kind in _QUANTIZED_TYPES)
            return (
                f"it computes a {float_type.__name__}, which has no int8 module here ({supported})"
            )
        if layer.activation is not None and type(layer.activation) is not nn.ReLU:
            name = type(layer.activation).__name__
            return f"its fused activation {name} has no int8 op; only ReLU has"
        padding_mode = getattr(layer.layer, "padding_mode", "zeros")
        if padding_mode not in _PADDING_MODES:
            return (
                f"padding_mode={padding_mode!r} has no int8 conv; use 'zeros' or 'reflect', or "
                "keep the layer float"
            )
        if hasattr(layer.layer, "padding") and _padding(layer.layer) is None:
            return (
                f"padding={layer.layer.padding!r} pads one side more than the other here "
                "(an even kernel extent), which the int8 conv cannot; give the conv an explicit "
                "padding, or keep the layer float"
            )
        for role in ("input", "output"):
            params: QuantParams = getattr(layer, role)
            if params.quant_min < 0:
                return (
                    f"its {role} codes span [{params.quant_min}, {params.quant_max}], but the "
                    "engine takes activations as unsigned uint8 codes in [0, 255]; train with "
                    f"an unsigned activation spec such as the {self.backend!r} preset's"
                )
            if params.quant_max > 255:
                return (
                    f"its {role} codes span [{params.quant_min}, {params.quant_max}], but the "
                    "engine takes activations as uint8 codes in [0, 255]; train with an "
                    "activation spec of at most 8 bits"
                )
        if layer.weight.quant_min < -128 or layer.weight.quant_max > 127:
            return (
                f"its weight codes span [{layer.weight.quant_min}, {layer.weight.quant_max}], "
                "but the engine takes weights as int8 codes in [-128, 127]; train with a "
                f"signed weight spec of at most 8 bits such as the {self.backend!r} preset's"
            )
        return ""

    def _build(self, layer: QuantizedLayer) -> nn.Module:
        where = f"{layer.name or '<root>'} ({type(layer.module).__name__})"
        problem = self._problem(layer, where)
        if problem:
            raise DeployError(f"{where}: cannot convert for {self._target}: {problem}")
        float_layer = layer.layer
        if isinstance(float_layer, _TRANSPOSED):
            return self._build_transposed(layer, where)
        plain_type, relu_type = _QUANTIZED_TYPES[type(float_layer)]
        self._check_pair_sums(layer, where, plain_type)
        fuse_relu = layer.activation is not None and relu_type is not None
        quantized_type = relu_type if fuse_relu else plain_type
        weight = _quantize(float_layer.weight.detach(), layer.weight, torch.qint8)
        bias = None if float_layer.bias is None else float_layer.bias.detach().float()
        try:
            quantized = _empty_quantized(quantized_type, float_layer)
            quantized.set_weight_bias(weight, bias)
        except RuntimeError as error:
            raise self._packing_error(where, float_layer, error) from None
        _set_output(quantized, layer.output)
        relu_after = layer.activation is not None and not fuse_relu
        return Int8Layer(layer.name, self.engine, layer.input, quantized, relu_after, layer.output)

    def _build_transposed(self, layer: QuantizedLayer, where: str) -> nn.Module:
        """Build a transposed conv as one int8 op, or as one op per output channel.

        Some engines compute a whole transposed conv wrongly or cannot run it
        (see :func:`_transposed_conv_is_exact`), so the layer runs as one op
        only where a probe of the engine matches float math.
        """
        float_layer = layer.layer
        quantized_type = _QUANTIZED_TYPES[type(float_layer)][0]
        per_channel = layer.weight.axis is not None
        groups = float_layer.groups
        out_per_group = float_layer.out_channels // groups
        relu_after = layer.activation is not None
        # A grouped per-channel weight has one scale per output channel, but
        # its axis 1 holds only the out_channels // groups columns of one
        # group, so no per-channel quantized tensor of its shape can carry them.
        whole_layer = not (per_channel and groups > 1) and _transposed_conv_is_exact(
            self.engine, quantized_type, per_channel, min(groups, 2), min(out_per_group, 3)
        )
        if whole_layer or _transposed_conv_is_exact(self.engine, quantized_type, False, 1, 1):
            self._check_pair_sums(layer, where, quantized_type)
        try:
            if whole_layer:
                weight = _quantize(float_layer.weight.detach(), layer.weight, torch.qint8)
                bias = None if float_layer.bias is None else float_layer.bias.detach().float()
                quantized = _empty_quantized(quantized_type, float_layer)
                quantized.set_weight_bias(weight, bias)
                _set_output(quantized, layer.output)
            elif _transposed_conv_is_exact(self.engine, quantized_type, False, 1, 1):
                quantized = _transposed_by_channel(layer, quantized_type)
            else:
                raise DeployError(
                    f"{where}: cannot convert for {self._target}: the "
                    f"{self.engine} engine of PyTorch {torch.__version__} computes "
                    f"{type(float_layer).__name__} wrongly, even one output channel at a "
                    "time. Its int8 codes differ from float math by more than one step. Keep "
                    "the layer float by mapping its type to None in the qconfig, or convert "
                    "for another backend"
                )
        except RuntimeError as error:
            raise self._packing_error(where, float_layer, error) from None
        return Int8Layer(layer.name, self.engine, layer.input, quantized, relu_after, layer.output)

    def _check_pair_sums(
        self, layer: QuantizedLayer, where: str, quantized_type: type[nn.Module]
    ) -> None:
        """Raise where the engine would saturate on the layer's codes (CPUs without VNNI)."""
        weight_code = max(-layer.weight.quant_min, layer.weight.quant_max)
        pair_sum = 2 * layer.input.quant_max * weight_code
        if pair_sum <= _INT16_MAX or not _saturates_pair_sums(self.engine, quantized_type):
            return
        raise DeployError(
            f"{where}: cannot convert for {self._target}: its input codes reach "
            f"{layer.input.quant_max} and its weight codes {weight_code} in magnitude, so a "
            f"pair of products sums to {pair_sum}, but on this CPU the {self.engine} engine "
            "adds such pairs in int16, which saturates "
            f"above {_INT16_MAX} (the CPU lacks VNNI instructions); train with 7-bit weights "
            "(QuantSpec(bits=7, narrow_range=True)), as the x86 preset does, or convert on "
            "a CPU with VNNI"
        )

    def _packing_error(
        self, where: str, float_layer: nn.Module, error: RuntimeError
    ) -> DeployError:
        message = str(error).splitlines()[0]
        return DeployError(
            f"{where}: the {self.engine} engine cannot pack its {type(float_layer).__name__} "
            f"weight: {message}"
        )


def _transposed_by_channel(layer: QuantizedLayer, quantized_type: type[nn.Module]) -> nn.Module:
    """Build one single-output-channel int8 op per output channel of a transposed conv."""
    float_layer = layer.layer
    groups = float_layer.groups
    in_per_group = float_layer.in_channels // groups
    out_per_group = float_layer.out_channels // groups
    weight = float_layer.weight.detach()
    bias = None if float_layer.bias is None else float_layer.bias.detach().float()
    channels = []
    for channel in range(float_layer.out_channels):
        group = channel // out_per_group
        rows = slice(group * in_per_group, (group + 1) * in_per_group)
        column = channel % out_per_group
        params = layer.weight
        if params.axis is not None:
            # The fake quantizer gives output channel group * out_per_group +
            # column the scale at that index, as the QAT module orders them.
            params = attrs.evolve(
                params,
                scale=params.scale[channel],
                zero_point=params.zero_point[channel],
                axis=None,
            )
        channel_weight = _quantize(weight[rows, column : column + 1], params, torch.qint8)
        conv = quantized_type(
            in_per_group,
            1,
            float_layer.kernel_size,
            stride=float_layer.stride,
            padding=float_layer.padding,
            output_padding=float_layer.output_padding,
            dilation=float_layer.dilation,
            bias=bias is not None,
        )
        conv.set_weight_bias(channel_weight, None if bias is None else bias[channel : channel + 1])
        _set_output(conv, layer.output)
        channels.append(conv)
    return _PerChannelTransposed(channels, groups, in_per_group)


def _empty_quantized(quantized_type: type[nn.Module], float_layer: nn.Module) -> nn.Module:
    """Build ``quantized_type`` with ``float_layer``'s configuration, before its weight is set."""
    if isinstance(float_layer, nn.Linear):
        return quantized_type(float_layer.in_features, float_layer.out_features)
    options = {
        "stride": float_layer.stride,
        "padding": _padding(float_layer),
        "dilation": float_layer.dilation,
        "groups": float_layer.groups,
        "bias": float_layer.bias is not None,
        "padding_mode": float_layer.padding_mode,
    }
    if isinstance(float_layer, _TRANSPOSED):
        options["output_padding"] = float_layer.output_padding
    return quantized_type(
        float_layer.in_channels, float_layer.out_channels, float_layer.kernel_size, **options
    )


def _padding(float_layer: nn.Module) -> tuple[int, ...] | None:
    """Return a conv's padding as numbers, or None where ``"same"`` pads its sides unequally.

    The int8 convs take numbers only. ``padding="same"`` pads ``dilation *
    (kernel_size - 1)`` in all along each axis, half on each side when that
    extent is even. An odd extent puts the extra element on the right.
    """
    padding = float_layer.padding
    if padding == "valid":
        return (0,) * len(float_layer.kernel_size)
    if padding != "same":
        return tuple(padding)
    extents = [
        dilation * (kernel - 1)
        for dilation, kernel in zip(float_layer.dilation, float_layer.kernel_size)
    ]
    if any(extent % 2 for extent in extents):
        return None
    return tuple(extent // 2 for extent in extents)


def _set_output(quantized: nn.Module, output: QuantParams) -> None:
    quantized.scale = float(output.scale)
    quantized.zero_point = int(output.zero_point)
