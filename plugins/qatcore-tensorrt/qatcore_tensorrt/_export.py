"""The ``tensorrt`` exporter: the ONNX export, restricted to what TensorRT's int8 layers take."""

from __future__ import annotations

from os import PathLike
from typing import Any

import torch
from torch import nn

import qatcore
from qatcore import DeployError, QuantizedLayer, QuantParams, qualified_name
from qatcore_onnx import PER_CHANNEL_MIN_OPSET, OnnxReport, export_onnx

__all__ = ["check_tensorrt", "export_tensorrt"]

# Signed 8-bit code ranges TensorRT's int8 tensors hold: the full range, and
# the narrow one, which the ONNX export applies with a Clip.
_SIGNED_8_BIT = ((-128, 127), (-127, 127))


def _problem(params: QuantParams, role: str) -> str:
    nonzero = params.zero_point[params.zero_point != 0]
    if nonzero.numel():
        return (
            f"its {role} has zero point {int(nonzero[0])}, but TensorRT takes only zero "
            "points of 0 (symmetric quantization)"
        )
    if (params.quant_min, params.quant_max) not in _SIGNED_8_BIT:
        return (
            f"its {role} codes span [{params.quant_min}, {params.quant_max}], but TensorRT "
            "takes int8 codes in [-128, 127]"
        )
    return ""


def check_tensorrt(layers: list[QuantizedLayer]) -> None:
    """Check that every layer's input, weight and output are symmetric signed 8-bit.

    Raises:
        DeployError: A zero point is not 0 or a range is not signed 8-bit;
            the message names the first such module.
    """
    for layer in layers:
        roles = [("weight", layer.weight), ("output", layer.output)]
        if layer.input_from is None:
            roles.insert(0, ("input", layer.input))
        for role, params in roles:
            problem = _problem(params, role)
            if problem:
                raise DeployError(
                    f"{qualified_name(layer.name, layer.module)}: cannot export for TensorRT: "
                    f"{problem}; swap the float model with qatcore.get_qconfig('tensorrt') "
                    "and train it again"
                )


def export_tensorrt(
    model: nn.Module,
    path: str | PathLike[str],
    example_inputs: tuple[Any, ...] | torch.Tensor,
    *,
    opset: int = 17,
    **options: Any,
) -> OnnxReport:
    """Export the trained QAT ``model`` as an ONNX Q/DQ graph that TensorRT builds in int8.

    The file is what :func:`qatcore_onnx.export_onnx` writes, after a check
    that every quantized tensor is symmetric signed 8-bit (zero point 0),
    as TensorRT's explicit quantization requires. ``options`` go to
    :func:`qatcore_onnx.export_onnx`. Build the engine from the file with
    ``trtexec --onnx=PATH --int8`` or the TensorRT ONNX parser.

    Raises:
        DeployError: ``opset`` is below 13 (TensorRT reads per-channel
            DequantizeLinear, which needs it), a tensor is not symmetric
            signed 8-bit, or the ONNX export fails; the message names the
            module.
    """
    layers = qatcore.quantized_layers(model)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < PER_CHANNEL_MIN_OPSET:
        first = layers[0]
        raise DeployError(
            f"{qualified_name(first.name, first.module)}: the tensorrt export needs opset "
            f"{PER_CHANNEL_MIN_OPSET} or higher for per-channel DequantizeLinear, got "
            f"opset={opset!r}; export with opset={PER_CHANNEL_MIN_OPSET} or higher"
        )
    check_tensorrt(layers)
    return export_onnx(model, path, example_inputs, opset=opset, **options)
