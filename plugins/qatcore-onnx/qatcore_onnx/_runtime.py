"""Running an exported file in ONNX Runtime on CPU."""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

import numpy as np
import onnxruntime
import torch

__all__ = ["run_onnx"]

# ONNX Runtime logs warnings (such as initializers it folds) to stderr;
# only errors and fatal messages are kept, because the library prints nothing.
_LOG_ERRORS_ONLY = 3


def _session(path: str | PathLike[str], optimize: bool) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = _LOG_ERRORS_ONLY
    if not optimize:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    return onnxruntime.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )


def run_onnx(
    path: str | PathLike[str],
    inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    optimize: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Run the ONNX model at ``path`` in ONNX Runtime's CPUExecutionProvider.

    ``inputs`` are the positional inputs, a tensor or a sequence of them, in
    the order of the graph's inputs. With ``optimize`` (the default) ONNX
    Runtime applies all its graph optimizations, which on CPU fuse
    DequantizeLinear, Conv and QuantizeLinear into int8 kernels such as
    QLinearConv. ``optimize=False`` runs the graph node by node in float.

    Returns:
        The output tensor, or a tuple of them when the graph has several.

    Raises:
        ValueError: The number of inputs differs from the graph's.
        onnxruntime.capi.onnxruntime_pybind11_state.Fail: ONNX Runtime
            cannot load or run the model (or a sibling class of that module,
            such as ``InvalidGraph`` or ``NotImplemented``).
    """
    tensors = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    session = _session(path, optimize)
    graph_inputs = session.get_inputs()
    if len(graph_inputs) != len(tensors):
        names = ", ".join(item.name for item in graph_inputs)
        raise ValueError(
            f"qatcore_onnx.run_onnx: the model at {str(path)!r} takes {len(graph_inputs)} "
            f"inputs ({names}), got {len(tensors)}; pass one tensor per graph input"
        )
    feed = {
        item.name: np.ascontiguousarray(tensor.detach().cpu().numpy())
        for item, tensor in zip(graph_inputs, tensors)
    }
    outputs = [torch.from_numpy(value) for value in session.run(None, feed)]
    return outputs[0] if len(outputs) == 1 else tuple(outputs)
