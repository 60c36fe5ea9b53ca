"""Fusion groups found by tracing a model's forward with torch.fx."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch.fx
from torch import nn

__all__ = ["TraceFailure", "traced_fusion_groups"]


class TraceFailure(Exception):
    """torch.fx could not trace the model, so its wiring is unknown."""


def _called_module(node: torch.fx.Node, model: nn.Module) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return model.get_submodule(str(node.target))


def traced_fusion_groups(
    model: nn.Module, patterns: Iterable[tuple[type[nn.Module], ...]]
) -> list[tuple[str, ...]]:
    """Return the groups of qualified names that the model calls back to back as a pattern.

    A group's modules must form a chain in the traced graph: each member's
    only input is the previous member's output, and that output has no
    other user. Modules called more than once are never grouped. Longer
    patterns are matched first.

    Raises:
        TraceFailure: ``torch.fx.symbolic_trace`` failed on the model.
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as error:  # fx raises many types for untraceable code
        raise TraceFailure(f"{type(error).__name__}: {error}") from None

    calls = Counter(str(node.target) for node in graph.nodes if node.op == "call_module")
    ordered = sorted(patterns, key=len, reverse=True)
    grouped: set[str] = set()
    groups = []
    for node in graph.nodes:
        if node.op != "call_module" or str(node.target) in grouped:
            continue
        for pattern in ordered:
            chain = _match_chain(node, pattern, model, calls)
            if chain is not None and not grouped.intersection(chain):
                groups.append(chain)
                grouped.update(chain)
                break
    return groups


def _match_chain(
    node: torch.fx.Node,
    pattern: tuple[type[nn.Module], ...],
    model: nn.Module,
    calls: Counter[str],
) -> tuple[str, ...] | None:
    chain: list[str] = []
    current = node
    previous: torch.fx.Node | None = None
    for position, kind in enumerate(pattern):
        module = _called_module(current, model)
        if type(module) is not kind or calls[str(current.target)] != 1:
            return None
        if previous is not None and (current.args != (previous,) or current.kwargs):
            return None
        chain.append(str(current.target))
        if position == len(pattern) - 1:
            break
        users = list(current.users)
        if len(users) != 1:
            return None  # the intermediate output has another user
        previous = current
        current = users[0]
    return tuple(chain)
