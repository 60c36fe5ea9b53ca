"""Fusion groups found by tracing a model's forward with torch.fx."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch.fx
from torch import nn

from qatcore._registry import describe_key

__all__ = ["TraceFailure", "TracedFusions", "TracedModel"]


class TraceFailure(Exception):
    """torch.fx could not trace the model, so its wiring is unknown."""


class TracedFusions(NamedTuple):
    """Result of a fusion search: the groups to fuse, and why other chains did not fuse."""

    groups: list[tuple[str, ...]]
    """Qualified names of each group, in call order."""

    blocked: dict[str, str]
    """For each module of a registered pattern left unfused, the reason."""


class _LeafTracer(torch.fx.Tracer):
    # Fusion joins modules, never code inside one, so every module without
    # children is a leaf. A user subclass of a torch.nn layer then stays one
    # call even when its forward branches on tensor values or shapes.
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return next(module.children(), None) is None or super().is_leaf_module(
            module, qualified_name
        )


class TracedModel:
    """A model's forward traced with torch.fx, searched for chains of module calls.

    Raises:
        TraceFailure: torch.fx could not trace the model.
    """

    def __init__(self, model: nn.Module) -> None:
        try:
            self.graph = _LeafTracer().trace(model)
        except Exception as error:  # fx raises many types for untraceable code
            raise TraceFailure(f"{type(error).__name__}: {error}") from None
        self.model = model
        self.calls = Counter(
            str(node.target) for node in self.graph.nodes if node.op == "call_module"
        )
        # Names of the modules that matched a pattern before the chain broke.
        self.partial: list[str] = []

    def fusions(self, patterns: Iterable[tuple[type[nn.Module], ...]]) -> TracedFusions:
        """Find the groups of modules that the forward calls back to back as a pattern.

        A group's modules must form a chain: each member's only input is the
        previous member's output, and that output has no other user. Modules
        called more than once are never grouped. Longer patterns are matched
        first. A chain of matching types that fails one of these conditions
        is reported in :attr:`TracedFusions.blocked`.
        """
        ordered = sorted(patterns, key=len, reverse=True)
        grouped: set[str] = set()
        groups = []
        blocked: dict[str, str] = {}
        for node in self.graph.nodes:
            if node.op != "call_module" or str(node.target) in grouped:
                continue
            for pattern in ordered:
                chain, cause = self._match(node, pattern)
                if chain is not None and not grouped.intersection(chain):
                    groups.append(chain)
                    grouped.update(chain)
                    break
                if cause:
                    reason = f"not fused as {' + '.join(self.partial)}: {cause}"
                    for name in self.partial:
                        blocked.setdefault(name, reason)
        unfused = {name: reason for name, reason in blocked.items() if name not in grouped}
        return TracedFusions(groups, unfused)

    def chain_problem(self, names: Sequence[str]) -> str:
        """Return why the forward does not call ``names`` back to back, or ``""`` if it does."""
        pattern = tuple(type(self.model.get_submodule(name)) for name in names)
        starts = [
            node
            for node in self.graph.nodes
            if node.op == "call_module" and str(node.target) == names[0]
        ]
        if not starts:
            return f"the forward never calls {names[0]}"
        chain, cause = self._match(starts[0], pattern)
        if chain == tuple(names):
            return ""
        if cause:
            return cause
        return (
            f"the forward does not pass the output of each member straight to the next "
            f"({' -> '.join(names)})"
        )

    def _module(self, node: torch.fx.Node) -> nn.Module | None:
        if node.op != "call_module":
            return None
        return self.model.get_submodule(str(node.target))

    def _match(
        self, node: torch.fx.Node, pattern: tuple[type[nn.Module], ...]
    ) -> tuple[tuple[str, ...] | None, str]:
        """Return the chain of names matching ``pattern`` from ``node``, or the cause there is none.

        The cause is empty when the types do not match. It is set when they
        do, or match but for a subclass, and the model forbids fusing;
        :attr:`partial` then names the modules that matched.
        """
        self.partial = []
        if type(self._module(node)) is not pattern[0]:
            return None, ""
        self.partial.append(str(node.target))
        current = node
        for kind in pattern[1:]:
            following = [user for user in current.users if type(self._module(user)) is kind]
            if not following:
                return None, self._subclass_cause(current, kind)
            after = following[0]
            self.partial.append(str(after.target))
            if [*after.args, *after.kwargs.values()] != [current]:
                return None, (
                    f"the call of {after.target} takes other arguments besides the output "
                    f"of {current.target}"
                )
            others = [user for user in current.users if user is not after]
            if others:
                described = ", ".join(_describe_user(user) for user in others)
                return None, f"the output of {current.target} also feeds {described}"
            current = after

        for name in self.partial:
            if self.calls[name] != 1:
                return None, (
                    f"the forward calls {name} {self.calls[name]} times, and one fused module "
                    "cannot stand for several calls"
                )
        return tuple(self.partial), ""

    def _subclass_cause(self, current: torch.fx.Node, kind: type[nn.Module]) -> str:
        # A following module whose type subclasses the pattern's type would
        # fuse if it were exact, so the plan reports it instead of skipping it.
        users = list(current.users)
        module = self._module(users[0]) if len(users) == 1 else None
        if module is None or not isinstance(module, kind):
            return ""
        self.partial.append(str(users[0].target))
        return (
            f"{users[0].target} is a {describe_key(type(module))}, a subclass of "
            f"{describe_key(kind)}, and only exact types fuse; register a fusion pattern "
            "with the subclass to fuse it"
        )


def _describe_user(node: torch.fx.Node) -> str:
    if node.op == "output":
        return "the model's output"
    if node.op == "call_module":
        return str(node.target)
    return node.name
