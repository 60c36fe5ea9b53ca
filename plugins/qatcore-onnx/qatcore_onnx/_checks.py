"""Checks that :func:`qatcore_onnx.export_onnx` runs before any export work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from qatcore import DeployError, QuantizedLayer, qualified_name
from qatcore_onnx._qdq import PER_CHANNEL_MIN_OPSET, QDQ_MIN_OPSET

__all__ = [
    "MAX_OPSET",
    "check_float32",
    "check_opset",
    "check_path",
    "check_runs",
    "first_line",
]

# The highest opset that torch.onnx.export writes with dynamo=False
# (torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET in torch 2.13).
MAX_OPSET = 20


def check_path(path: Path) -> None:
    """Reject an output path that cannot be written, before any export work."""
    if path.is_dir():
        raise IsADirectoryError(
            f"qatcore_onnx.export_onnx: the output path {str(path)!r} is a directory; pass a "
            f"file path such as {str(path / 'model.onnx')!r}"
        )
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(
            f"qatcore_onnx.export_onnx: the folder {str(folder)!r} of the output path "
            f"{str(path)!r} does not exist; create it first, or pass a path in an existing folder"
        )


def check_float32(model: nn.Module) -> None:
    # A float64 model is rejected, not cast. QuantizeLinear and
    # DequantizeLinear take no float64 tensor in opsets 10 to 20, so the graph
    # would take and return float32 tensors, unlike the model. Casting a copy
    # would also make the report compare ONNX Runtime with a float32 model
    # that the caller never trained or ran.
    tensors = [*model.parameters(), *model.buffers()]
    if any(tensor.dtype == torch.float64 for tensor in tensors):
        raise DeployError(
            f"{type(model).__name__}: its parameters are float64, but QuantizeLinear and "
            "DequantizeLinear in ONNX compute in float32; call model.float() and pass float32 "
            "example inputs"
        )


def check_runs(model: nn.Module, inputs: tuple[Any, ...]) -> None:
    """Run ``model`` in eval mode on ``inputs``, so that a wrong input is reported as such."""
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as error:  # any error of the model's own forward
        raise DeployError(
            f"{type(model).__name__} raises on the example inputs "
            f"({_describe_inputs(inputs)}): {type(error).__name__}: {first_line(error)}; "
            "pass example inputs of the shapes and dtypes that the model's forward takes"
        ) from error


def _describe_inputs(inputs: tuple[Any, ...]) -> str:
    parts = []
    for item in inputs:
        if isinstance(item, torch.Tensor):
            parts.append(f"{item.dtype} tensor of shape {tuple(item.shape)}")
        else:
            parts.append(type(item).__name__)
    return ", ".join(parts) if parts else "none"


def check_opset(opset: int, layers: list[QuantizedLayer]) -> None:
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise DeployError(f"qatcore_onnx.export_onnx: opset must be an int, got {opset!r}")
    if opset > MAX_OPSET:
        raise DeployError(
            f"qatcore_onnx.export_onnx: opset {opset} is above {MAX_OPSET}, the highest that "
            "torch.onnx.export writes with the TorchScript exporter; "
            f"use opset={MAX_OPSET} or lower"
        )
    first = layers[0]
    if opset < QDQ_MIN_OPSET:
        raise DeployError(
            f"{qualified_name(first.name, first.module)}: its quantized tensors need "
            f"QuantizeLinear and DequantizeLinear, which ONNX has since opset {QDQ_MIN_OPSET}, "
            f"but opset {opset} was requested; export with opset={QDQ_MIN_OPSET} or higher "
            f"(opset={PER_CHANNEL_MIN_OPSET} or higher for per-channel weights)"
        )
    for layer in layers:
        if opset < PER_CHANNEL_MIN_OPSET and layer.weight.axis is not None:
            raise DeployError(
                f"{qualified_name(layer.name, layer.module)}: its weight has one scale per "
                f"channel (axis {layer.weight.axis}), and DequantizeLinear takes an axis since "
                f"opset {PER_CHANNEL_MIN_OPSET}, but opset {opset} was requested; export with "
                f"opset={PER_CHANNEL_MIN_OPSET} or higher, or train with a per-tensor weight spec "
                "(QuantSpec(axis=None))"
            )


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
