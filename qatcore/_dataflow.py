"""Input producers: the QAT module that quantized each QAT module's input, per traced forward.

An int8 engine needs every quantized layer's input as integer codes with a
known scale and zero point. Where a layer's input is the output of another
QAT module's output fake quantizer, passed on unchanged or through
operations that keep values on that quantizer's grid (max pooling, ReLU,
reshapes), the codes are that quantizer's. Any other input, such as the
model's own input or the sum of a residual connection, needs a fake
quantizer of its own, so that training simulates the codes the engine uses.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qatcore._graph_fusion import _LeafTracer, sequential_graph
from qatcore._plan import iter_named_modules
from qatcore._protocol import QATModule

__all__ = ["input_producers", "qat_modules"]

# Modules, functions and methods whose output values are values of their
# first argument (or their maximum, or zero), so a tensor on a quantization
# grid stays on it. Dropout counts because conversion and export run in eval
# mode, where it returns its input.
_GRID_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)
_GRID_FUNCTIONS = frozenset(
    {
        operator.getitem,
        torch.flatten,
        torch.reshape,
        torch.squeeze,
        torch.unsqueeze,
        torch.permute,
        torch.transpose,
        torch.relu,
        F.relu,
        F.max_pool1d,
        F.max_pool2d,
        F.max_pool3d,
        F.adaptive_max_pool1d,
        F.adaptive_max_pool2d,
        F.adaptive_max_pool3d,
        F.dropout,
    }
)
_GRID_METHODS = frozenset(
    {
        "view",
        "reshape",
        "flatten",
        "permute",
        "transpose",
        "contiguous",
        "squeeze",
        "unsqueeze",
        "relu",
        "clone",
        "detach",
    }
)


class _QATLeafTracer(_LeafTracer):
    # A QAT module is one call, whatever it holds.
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, QATModule) or super().is_leaf_module(module, qualified_name)


def qat_modules(model: nn.Module) -> Iterator[tuple[str, QATModule]]:
    """Yield ``(qualified name, module)`` for each QAT module of ``model``, outermost first.

    The modules inside a QAT module are not searched.
    """
    stack: list[tuple[str, nn.Module]] = [("", model)]
    seen: set[int] = set()
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, QATModule):
            yield name, module
            continue
        children = [
            (f"{name}.{child_name}" if name else child_name, child)
            for child_name, child in module._modules.items()
            if child is not None
        ]
        stack.extend(reversed(children))


# Hook attributes of a module; a hook may change the values a call returns.
_CALL_HOOKS = ("_forward_pre_hooks", "_forward_hooks")
_GLOBAL_CALL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks")

# In-place ops whose result keeps a grid, so that mutating with them is harmless.
_GRID_IN_PLACE = frozenset({"relu_", F.relu, torch.relu_})
_IN_PLACE_OPERATORS = frozenset(
    {
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        operator.ifloordiv,
        operator.ipow,
        operator.setitem,
    }
)


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, kind, None) for kind in _CALL_HOOKS)


def _written_in_place(node: Any, modules: dict[str, nn.Module]) -> Any:
    """Return the node whose values ``node`` changes in place, or None."""
    target = node.target
    if "out" in node.kwargs:
        return node.kwargs["out"]
    if not node.args:
        return None
    if node.op == "call_module":
        module = modules[str(target)]
        writes = getattr(module, "inplace", False) is True and type(module) is not nn.ReLU
        return node.args[0] if writes else None
    if node.op == "call_method":
        name = str(target)
        writes = name.endswith("_") and not name.startswith("_") and name not in _GRID_IN_PLACE
        return node.args[0] if writes else None
    if node.op == "call_function":
        if target in _GRID_IN_PLACE:
            return None
        name = getattr(target, "__name__", "")
        writes = (
            target in _IN_PLACE_OPERATORS
            or node.kwargs.get("inplace") is True
            or (name.endswith("_") and not name.startswith("_"))
        )
        return node.args[0] if writes else None
    return None


def _mutated_nodes(graph: Any, modules: dict[str, nn.Module]) -> set[Any]:
    """Return the nodes whose values an in-place op may change.

    torch.fx records ``y.mul_(3)`` as a node that nothing uses, and a later
    call still reads ``y``, so the grid of ``y`` cannot be trusted. A tensor
    computed from ``y`` by a function or method may be a view of it (a
    slice, a chunk, ``y.data``), so a write to it counts as a write to ``y``
    too. The walk back stops at module calls and at the model's inputs.
    """
    mutated: set[Any] = set()
    for node in graph.nodes:
        target = _written_in_place(node, modules)
        while hasattr(target, "op") and target not in mutated:
            mutated.add(target)
            if target.op not in ("call_method", "call_function") or not target.args:
                break
            target = target.args[0]
    return mutated


def _keeps_grid(node: Any, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        module = modules[str(node.target)]
        if _has_hooks(module):
            return False
        return type(module) in _GRID_MODULES or type(module).__name__ == "FusedAway"
    if node.op == "call_function":
        return node.target in _GRID_FUNCTIONS
    if node.op == "call_method":
        return node.target in _GRID_METHODS
    return False


def _producer(node: Any, modules: dict[str, nn.Module], mutated: set[Any]) -> str | None:
    """Return the QAT module whose per-tensor output fake quantizer made ``node``'s values."""
    # ``node`` is a torch.fx.Node, or a node of the call chain that
    # sequential_graph builds, with the same attributes.
    while hasattr(node, "op"):
        if node in mutated:
            return None
        if node.op == "call_module":
            target = str(node.target)
            module = modules[target]
            if isinstance(module, QATModule):
                quantizer = module.output_fake_quant
                if quantizer is None or quantizer.spec.per_channel or _has_hooks(module):
                    return None
                return target
        if not _keeps_grid(node, modules):
            return None
        node = node.args[0] if node.args else None
    return None


def input_producers(model: nn.Module) -> dict[str, str | None] | None:
    """Map each QAT module called in ``model``'s forward to the QAT module that quantized its input.

    The value is the qualified name of the QAT module whose per-tensor
    output fake quantizer produced the input's values. It is ``None`` where
    the input is on no such grid: the model's input, the result of an
    addition, an average pool or a float module. It is also ``None`` where
    a forward hook, a forward pre-hook of the consumer or an in-place op
    (other than ReLU) may change the values on the way, and for a module
    called on several inputs with different producers. QAT modules that the
    forward does not call are missing from the map.

    Returns None when torch.fx cannot trace the model, so that the wiring is
    unknown.
    """
    tracer = _QATLeafTracer()
    graph = sequential_graph(model, tracer)
    if graph is None:
        try:
            graph = tracer.trace(model)
        except Exception:  # fx raises many types for untraceable code
            return None

    modules = dict(iter_named_modules(model))
    mutated = _mutated_nodes(graph, modules)
    # torch keeps these dicts private; one that a later torch lacks counts as hooked.
    global_hooks = any(getattr(torch.nn.modules.module, kind, True) for kind in _GLOBAL_CALL_HOOKS)
    found: dict[str, set[str | None]] = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        target = str(node.target)
        module = modules[target]
        if not isinstance(module, QATModule):
            continue
        source = None
        if node.args and not global_hooks and not module._forward_pre_hooks:
            source = _producer(node.args[0], modules, mutated)
        found.setdefault(target, set()).add(source)
    return {
        name: next(iter(sources)) if len(sources) == 1 else None for name, sources in found.items()
    }
