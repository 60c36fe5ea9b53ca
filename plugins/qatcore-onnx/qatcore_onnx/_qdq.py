"""The export form of a QAT layer: float ops with fake quantization that ONNX writes as Q/DQ.

``torch.onnx.export`` (the TorchScript exporter) writes
``torch.fake_quantize_per_tensor_affine`` and
``torch.fake_quantize_per_channel_affine`` as a QuantizeLinear and
DequantizeLinear pair. Each :class:`QDQLayer` quantizes its input (unless
another layer's output quantizer already did), runs the float layer on its
fake-quantized weight, applies the fused activation, and quantizes the
output once, after the activation. The weight pair is replaced afterwards
by an int8 initializer holding the exact codes (see ``_graph``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qatcore import DeployError, QuantizedLayer, QuantParams, qualified_name

__all__ = ["PER_CHANNEL_MIN_OPSET", "QDQ_MIN_OPSET", "QDQLayer", "onnx_code_range"]

# QuantizeLinear and DequantizeLinear exist since opset 10; their ``axis``
# attribute, which per-channel scales need, since opset 13.
QDQ_MIN_OPSET = 10
PER_CHANNEL_MIN_OPSET = 13

_INT8 = (-128, 127)
_UINT8 = (0, 255)
_CONV_TRANSPOSE = {
    nn.ConvTranspose1d: F.conv_transpose1d,
    nn.ConvTranspose2d: F.conv_transpose2d,
    nn.ConvTranspose3d: F.conv_transpose3d,
}
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def onnx_code_range(params: QuantParams, role: str, where: str) -> tuple[int, int]:
    """Return the range of the 8-bit ONNX type that contains ``params``' codes: int8 or uint8.

    Raises:
        DeployError: The codes fit in neither type; the message names ``where``.
    """
    if _UINT8[0] <= params.quant_min and params.quant_max <= _UINT8[1]:
        return _UINT8
    if _INT8[0] <= params.quant_min and params.quant_max <= _INT8[1]:
        return _INT8
    raise DeployError(
        f"{where}: its {role} codes span [{params.quant_min}, {params.quant_max}], which "
        "neither int8 [-128, 127] nor uint8 [0, 255] holds, and the ONNX export writes "
        "QuantizeLinear and DequantizeLinear with 8-bit types only; train with a spec of "
        "at most 8 bits"
    )


class QDQLayer(nn.Module):
    """One QAT layer as float ops between fake quantizers, in the form ONNX exports as Q/DQ.

    ``weight`` is the float layer's weight in the layout its quantizer
    reads. For a grouped transposed conv with one scale per output channel
    that layout differs from the conv's (see :func:`_weight_by_channel`),
    and :meth:`forward` restores the conv's layout after dequantizing.

    Attributes:
        name: The qualified name of the QAT module this layer replaces.
        weight_codes: The exact weight codes of training, in ``weight``'s
            layout, as int32.
    """

    def __init__(self, layer: QuantizedLayer) -> None:
        super().__init__()
        where = qualified_name(layer.name, layer.module)
        float_layer = layer.layer
        supported = (*_CONV, *_CONV_TRANSPOSE, nn.Linear)
        if not isinstance(float_layer, supported):
            names = ", ".join(kind.__name__ for kind in supported)
            raise DeployError(
                f"{where}: it computes a {type(float_layer).__name__}, which the ONNX exporter "
                f"cannot write with quantized weights (it takes {names}); keep the module "
                "float by mapping its type to None in the qconfig"
            )
        self.name = layer.name
        self.input_params = layer.input
        self.input_from = layer.input_from
        self.weight_params = layer.weight
        self.output_params = layer.output
        self.input_range = onnx_code_range(layer.input, "input", where)
        self.weight_range = onnx_code_range(layer.weight, "weight", where)
        self.output_range = onnx_code_range(layer.output, "output", where)

        # The float layer is kept out of the module tree, so that the only
        # weight in the exported graph is ``self.weight``, under a name the
        # weight rewrite looks for.
        self._float_layer = (float_layer,)
        self.grouped_by_channel = (
            isinstance(float_layer, tuple(_CONV_TRANSPOSE))
            and float_layer.groups > 1
            and layer.weight.axis is not None
        )
        weight = float_layer.weight.detach().float()
        if self.grouped_by_channel:
            weight = _weight_by_channel(weight, float_layer.groups)
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        bias = float_layer.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)
        self.activation = layer.activation
        self.weight_codes = layer.weight.codes(self.weight)

    @property
    def float_layer(self) -> nn.Module:
        """The float layer (BatchNorm folded) whose configuration :meth:`forward` runs."""
        return self._float_layer[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ONNX Runtime 1.32 fuses a linear layer into int8 QGemm only when
        # its input is a matrix, and runs the MatMul and Add that
        # torch.onnx.export writes for other ranks in float. The input
        # quantizer is per tensor and the activation elementwise, so the
        # leading axes can be flattened first and restored at the end.
        leading = None
        if isinstance(self.float_layer, nn.Linear) and x.dim() != 2:
            leading = x.shape[:-1]
            x = x.reshape(-1, x.shape[-1])
        if self.input_from is None:
            x = _fake_quantize_activation(x, self.input_params, self.input_range)
        else:
            x = _requantize(x, self.input_params, self.input_range)
        weight = _fake_quantize_weight(self.weight, self.weight_params, self.weight_range)
        output = self._layer_forward(x, weight)
        if self.activation is not None:
            output = self.activation(output)
        output = _fake_quantize_activation(output, self.output_params, self.output_range)
        if leading is not None:
            output = output.reshape(*leading, output.shape[-1])
        return output

    def _layer_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        layer = self.float_layer
        if isinstance(layer, nn.Linear):
            return F.linear(x, weight, self.bias)
        if isinstance(layer, _CONV):
            return layer._conv_forward(x, weight, self.bias)
        if self.grouped_by_channel:
            weight = _weight_by_group(weight, layer.groups)
        conv_transpose = _CONV_TRANSPOSE[type(layer)]
        return conv_transpose(
            x,
            weight,
            self.bias,
            layer.stride,
            layer.padding,
            layer.output_padding,
            layer.groups,
            layer.dilation,
        )

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layer={self.float_layer!r}"


def _weight_by_channel(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Put all output channels of a grouped transposed conv weight along axis 1.

    The weight ``(in, out // groups, *k)`` stacks one block of
    ``in // groups`` rows per group, and output channel
    ``g * (out // groups) + j`` is column ``j`` of block ``g``. The result
    has shape ``(in // groups, out, *k)``, the layout in which qatcore-conv's
    QAT transposed conv applies one scale per output channel.
    """
    rows = weight.shape[0] // groups
    columns = weight.shape[1]
    kernel = tuple(weight.shape[2:])
    blocks = weight.reshape(groups, rows, columns, *kernel)
    return blocks.transpose(0, 1).reshape(rows, groups * columns, *kernel)


def _weight_by_group(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Invert :func:`_weight_by_channel`."""
    rows = weight.shape[0]
    columns = weight.shape[1] // groups
    kernel = tuple(weight.shape[2:])
    blocks = weight.reshape(rows, groups, columns, *kernel).transpose(0, 1)
    return blocks.reshape(groups * rows, columns, *kernel)


def _fake_quantize_activation(
    x: torch.Tensor, params: QuantParams, code_range: tuple[int, int]
) -> torch.Tensor:
    """Fake-quantize ``x`` per tensor over the ONNX type's range, then clip to ``params``' range.

    QuantizeLinear saturates at the bounds of its 8-bit type. A narrower
    range (narrow_range, fewer bits) is applied by a Clip on the
    dequantized value, with bounds computed as the QAT kernel computes a
    clamped code's value in float32, so the clipped value equals QAT's.
    """
    scale = float(params.scale)
    zero_point = int(params.zero_point)
    output = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, *code_range)
    if (params.quant_min, params.quant_max) == code_range:
        return output
    low, high = _clip_bounds(params)
    return torch.clamp(output, low, high)


def _requantize(x: torch.Tensor, params: QuantParams, code_range: tuple[int, int]) -> torch.Tensor:
    """Quantize ``x``, already on ``params``' grid, again right before the layer's op.

    The values pass unchanged, because each is a dequantized code of the
    producing layer's output, and so is already clipped to its range. The
    pair is for ONNX Runtime: its int8 fusions need a DequantizeLinear
    directly on the op's input, so a Flatten or MaxPool between the
    producer's pair and a Gemm or Conv would keep that layer in float.
    ONNX Runtime merges the two pairs when nothing lies between them.
    """
    return torch.fake_quantize_per_tensor_affine(
        x, float(params.scale), int(params.zero_point), *code_range
    )


def _clip_bounds(params: QuantParams) -> tuple[float, float]:
    scale = params.scale.float()
    zero_point = params.zero_point.float()
    low = (torch.tensor(float(params.quant_min)) - zero_point) * scale
    high = (torch.tensor(float(params.quant_max)) - zero_point) * scale
    return float(low), float(high)


def _fake_quantize_weight(
    weight: torch.Tensor, params: QuantParams, code_range: tuple[int, int]
) -> torch.Tensor:
    # The codes this computes are replaced in the ONNX graph by the exact
    # codes of training, so only the pair's qparams and type matter here.
    if params.axis is None:
        return torch.fake_quantize_per_tensor_affine(
            weight, float(params.scale), int(params.zero_point), *code_range
        )
    return torch.fake_quantize_per_channel_affine(
        weight,
        params.scale.float(),
        params.zero_point.int(),
        params.axis,
        *code_range,
    )
