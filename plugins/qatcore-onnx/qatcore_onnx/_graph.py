"""Rewrite of the exported graph: each weight as int8 codes feeding DequantizeLinear.

The TorchScript exporter writes a fake-quantized weight as its float
initializer followed by QuantizeLinear and DequantizeLinear. ONNX Runtime
and TensorRT expect the quantized weight itself: an int8 (or uint8)
initializer read by DequantizeLinear. The codes come from
:meth:`qatcore.QuantParams.codes`, never from QuantizeLinear's own
rounding, which can break ties differently from the QAT kernel.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper

__all__ = ["store_weight_codes"]


def store_weight_codes(model: onnx.ModelProto, codes_by_name: dict[str, torch.Tensor]) -> int:
    """Replace each float weight and its QuantizeLinear by an initializer of the exact codes.

    ``codes_by_name`` maps an initializer name to the int32 codes of that
    weight. The new initializer has the type of the QuantizeLinear's zero
    point (int8 or uint8), and every DequantizeLinear that read the
    QuantizeLinear reads it instead. Returns how many weights were replaced.

    Raises:
        ValueError: A weight in ``codes_by_name`` is not quantized by a
            QuantizeLinear, or its codes do not fit the zero point's type.
    """
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    constants = _constant_values(graph)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    replaced = 0
    removed: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in codes_by_name:
            continue
        weight_name = node.input[0]
        dtype = _zero_point_dtype(node, initializers, constants)
        codes = codes_by_name[weight_name].numpy()
        info = np.iinfo(dtype)
        if codes.min() < info.min or codes.max() > info.max:
            raise ValueError(
                f"the codes of weight {weight_name!r} span [{codes.min()}, {codes.max()}], "
                f"outside the {np.dtype(dtype).name} type of its QuantizeLinear zero point"
            )
        codes_name = f"{weight_name}_quantized"
        graph.initializer.append(numpy_helper.from_array(codes.astype(dtype), codes_name))
        for consumer in consumers.get(node.output[0], []):
            for index, name in enumerate(consumer.input):
                if name == node.output[0]:
                    consumer.input[index] = codes_name
        removed.append(node)
        replaced += 1

    for node in removed:
        graph.node.remove(node)
    still_used = {name for node in graph.node for name in node.input}
    for tensor in list(graph.initializer):
        if tensor.name in codes_by_name and tensor.name not in still_used:
            graph.initializer.remove(tensor)

    missing = set(codes_by_name) - {node.input[0] for node in removed}
    missing &= set(initializers)
    if missing:
        raise ValueError(
            f"weights {sorted(missing)} reach no QuantizeLinear in the exported graph, so their "
            "codes could not be stored"
        )
    return replaced


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {}
    for node in graph.node:
        if node.op_type != "Constant":
            continue
        for attribute in node.attribute:
            if attribute.name == "value":
                values[node.output[0]] = numpy_helper.to_array(attribute.t)
    return values


def _zero_point_dtype(
    node: onnx.NodeProto,
    initializers: dict[str, onnx.TensorProto],
    constants: dict[str, np.ndarray],
) -> type[np.integer]:
    """Return the numpy type of ``node``'s output: its zero point's type, uint8 without one."""
    if len(node.input) < 3 or not node.input[2]:
        return np.uint8
    name = node.input[2]
    if name in initializers:
        dtype = numpy_helper.to_array(initializers[name]).dtype
    elif name in constants:
        dtype = constants[name].dtype
    else:
        raise ValueError(
            f"the zero point {name!r} of QuantizeLinear {node.name!r} is computed in the graph, "
            "so its type is unknown"
        )
    if dtype == np.int8:
        return np.int8
    if dtype == np.uint8:
        return np.uint8
    raise ValueError(f"QuantizeLinear {node.name!r} has a zero point of type {dtype}, not 8-bit")
