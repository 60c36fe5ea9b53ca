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
                chain, apart = self._match(node, pattern)
                if chain is not None and not grouped.intersection(chain):
                    groups.append(chain)
                    grouped.update(chain)
                    break
                for names, cause in apart:
                    reason = f"not fused as {' + '.join(names)}: {cause}"
                    for name in names:
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
        chain, apart = self._match(starts[0], pattern, tuple(names))
        if chain == tuple(names):
            return ""
        for members, cause in apart:
            if tuple(names[: len(members)]) == members:
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
        self,
        node: torch.fx.Node,
        pattern: tuple[type[nn.Module], ...],
        names: tuple[str, ...] | None = None,
    ) -> tuple[tuple[str, ...] | None, list[tuple[tuple[str, ...], str]]]:
        """Return the chain of names matching ``pattern`` from ``node``, else the chains kept apart.

        Without a chain, the second item lists the chains that the model
        keeps from fusing, each with the cause. Such a chain has the
        pattern's types, or a subclass of one. The list is empty when the
        types do not match.
        ``names``, when given, picks the member to follow where a module
        feeds several modules of the next type.
        """
        if type(self._module(node)) is not pattern[0]:
            return None, []
        chain = [str(node.target)]
        current = node
        for position, kind in enumerate(pattern[1:], start=1):
            following = [user for user in current.users if type(self._module(user)) is kind]
            if not following:
                return None, self._subclass_apart(chain, current, kind)
            if names is not None:
                following = [
                    user for user in following if str(user.target) == names[position]
                ] or following
            apart = []
            for after in following:
                others = [user for user in current.users if user is not after]
                if others:
                    described = ", ".join(_describe_user(user) for user in others)
                    cause = f"the output of {current.target} also feeds {described}"
                    apart.append(((*chain, str(after.target)), cause))
            if apart:
                return None, apart
            after = following[0]
            chain.append(str(after.target))
            if [*after.args, *after.kwargs.values()] != [current]:
                cause = (
                    f"the call of {after.target} takes other arguments besides the output "
                    f"of {current.target}"
                )
                return None, [(tuple(chain), cause)]
            current = after

        for name in chain:
            if self.calls[name] != 1:
                cause = (
                    f"the forward calls {name} {self.calls[name]} times, and one fused module "
                    "cannot stand for several calls"
                )
                return None, [(tuple(chain), cause)]
        return tuple(chain), []

    def _subclass_apart(
        self, chain: list[str], current: torch.fx.Node, kind: type[nn.Module]
    ) -> list[tuple[tuple[str, ...], str]]:
        # A following module whose type subclasses the pattern's type would
        # fuse if it were exact, so the plan reports it instead of skipping it.
        users = list(current.users)
        module = self._module(users[0]) if len(users) == 1 else None
        if module is None or not isinstance(module, kind):
            return []
        cause = (
            f"{users[0].target} is a {describe_key(type(module))}, a subclass of "
            f"{describe_key(kind)}, and only exact types fuse; register a fusion pattern "
            "with the subclass to fuse it"
        )
        return [((*chain, str(users[0].target)), cause)]


def _describe_user(node: torch.fx.Node) -> str:
    if node.op == "output":
        return "the model's output"
    if node.op == "call_module":
        return str(node.target)
    return node.name
