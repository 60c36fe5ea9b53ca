"""Fusion groups found by tracing a model's forward with torch.fx."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import NamedTuple

import torch.fx
from torch import nn

__all__ = ["TraceFailure", "TracedFusions", "traced_fusions"]


class TraceFailure(Exception):
    """torch.fx could not trace the model, so its wiring is unknown."""


class TracedFusions(NamedTuple):
    """Result of tracing: the groups to fuse, and the reasons other chains were not fused."""

    groups: list[tuple[str, ...]]
    """Qualified names of each group, in call order."""

    blocked: dict[str, str]
    """For each module of a registered pattern left unfused, the reason."""


def traced_fusions(
    model: nn.Module, patterns: Iterable[tuple[type[nn.Module], ...]]
) -> TracedFusions:
    """Find the groups of modules that the model calls back to back as a registered pattern.

    A group's modules must form a chain in the traced graph: each member's
    only input is the previous member's output, and that output has no
    other user. Modules called more than once are never grouped. Longer
    patterns are matched first. A chain of the right types that fails one of
    these conditions is reported in :attr:`TracedFusions.blocked`.

    Raises:
        TraceFailure: ``torch.fx.symbolic_trace`` failed on the model.
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as error:  # fx raises many types for untraceable code
        raise TraceFailure(f"{type(error).__name__}: {error}") from None

    matcher = _ChainMatcher(model, graph)
    ordered = sorted(patterns, key=len, reverse=True)
    grouped: set[str] = set()
    groups = []
    blocked: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or str(node.target) in grouped:
            continue
        for pattern in ordered:
            chain, reason = matcher.match(node, pattern)
            if chain is not None and not grouped.intersection(chain):
                groups.append(chain)
                grouped.update(chain)
                break
            if reason:
                for name in matcher.partial:
                    blocked.setdefault(name, reason)
    return TracedFusions(
        groups, {name: reason for name, reason in blocked.items() if name not in grouped}
    )


class _ChainMatcher:
    def __init__(self, model: nn.Module, graph: torch.fx.Graph) -> None:
        self.model = model
        self.calls = Counter(str(node.target) for node in graph.nodes if node.op == "call_module")
        # Names of the modules that matched the pattern before the chain broke.
        self.partial: list[str] = []

    def module(self, node: torch.fx.Node) -> nn.Module | None:
        if node.op != "call_module":
            return None
        return self.model.get_submodule(str(node.target))

    def match(
        self, node: torch.fx.Node, pattern: tuple[type[nn.Module], ...]
    ) -> tuple[tuple[str, ...] | None, str]:
        """Return the chain of names matching ``pattern`` from ``node``, or why there is none.

        The reason is empty when the types do not match; it is set when they
        do but the wiring forbids fusing.
        """
        self.partial = []
        if type(self.module(node)) is not pattern[0]:
            return None, ""
        self.partial.append(str(node.target))
        current = node
        for kind in pattern[1:]:
            following = [user for user in current.users if type(self.module(user)) is kind]
            if not following:
                return None, ""
            after = following[0]
            if after.args != (current,) or after.kwargs:
                return None, ""
            self.partial.append(str(after.target))
            others = [user for user in current.users if user is not after]
            if others:
                described = ", ".join(_describe_user(user) for user in others)
                return None, self._reason(f"the output of {current.target} also feeds {described}")
            current = after

        for name in self.partial:
            if self.calls[name] != 1:
                times = self.calls[name]
                return None, self._reason(
                    f"the forward calls {name} {times} times, and one fused module "
                    "cannot stand for several calls"
                )
        return tuple(self.partial), ""

    def _reason(self, cause: str) -> str:
        return f"not fused as {' + '.join(self.partial)}: {cause}"


def _describe_user(node: torch.fx.Node) -> str:
    if node.op == "output":
        return "the model's output"
    if node.op == "call_module":
        return str(node.target)
    return node.name
