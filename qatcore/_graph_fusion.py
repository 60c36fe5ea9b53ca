"""Fusion groups found by tracing a model's forward with torch.fx."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch.fx
from torch import nn
from torch.nn.modules import module as torch_module

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


# Hook attributes whose hooks run when a module is called. Tracing calls
# each container it enters, so these hooks run on the tracer's proxies.
_CALL_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
_GLOBAL_CALL_HOOKS = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
)

# torch.fx recurses through about seven Python frames per container it
# enters: with torch 2.13 and the default recursion limit of 1000, tracing a
# conv nested in 142 nn.Sequential containers raises RecursionError.
_MAX_SEQUENTIAL_DEPTH = 50


class _Call:
    """A node of a :class:`_CallChain`: the attributes of ``torch.fx.Node`` that fusion reads."""

    __slots__ = ("args", "kwargs", "name", "op", "target", "users")

    def __init__(self, op: str, target: str, args: tuple[_Call, ...] = ()) -> None:
        self.op = op
        self.target = target
        self.name = target
        self.args = args
        self.kwargs: dict[str, _Call] = {}
        self.users: dict[_Call, None] = {}
        for arg in args:
            arg.users[self] = None


class _CallChain:
    """The graph of a forward that passes its input through modules one after another."""

    def __init__(self) -> None:
        self.nodes = [_Call("placeholder", "input")]

    def call_module(self, target: str) -> None:
        """Append a call of the module ``target`` on the output of the previous node."""
        self.nodes.append(_Call("call_module", target, (self.nodes[-1],)))

    def output(self) -> None:
        """Append the model's output: the last node's output."""
        self.nodes.append(_Call("output", "output", (self.nodes[-1],)))


def sequential_graph(model: nn.Module, tracer: torch.fx.Tracer | None = None) -> _CallChain | None:
    """Return the nodes that tracing ``model`` records, found without tracing where that is safe.

    ``nn.Sequential.forward`` calls its children in order, each on the
    previous child's output. In a tree of plain ``nn.Sequential``
    containers the leaf modules therefore form one chain, and the graph
    is known from the tree alone. This is far cheaper than tracing, which
    runs every container's forward on proxies.

    ``tracer`` decides which modules are leaves, as it would when tracing;
    by default every module without children is one.

    Returns None, so that the caller traces, for any other model. That
    includes a container with hooks or a ``forward`` of its own, a module
    registered under two names, a ``None`` child, global module hooks, and
    nesting deeper than 50 containers, where tracing may hit the recursion
    limit.
    """
    if type(model) is not nn.Sequential:
        return None
    # These dicts are private to torch. One that a later torch lacks counts as
    # containing hooks, so that the model is traced.
    if any(getattr(torch_module, name, True) for name in _GLOBAL_CALL_HOOKS):
        return None

    tracer = tracer or _LeafTracer()
    chain = _CallChain()
    seen: set[int] = set()
    # (qualified name, module, nesting depth, whether it sits inside a leaf)
    stack: list[tuple[str, nn.Module, int, bool]] = [("", model, 0, False)]
    while stack:
        name, module, depth, in_leaf = stack.pop()
        if id(module) in seen:
            return None  # tracing names a module by the first of its names
        seen.add(id(module))
        children = [(child_name, child) for child_name, child in module._modules.items()]
        if in_leaf or (name and tracer.is_leaf_module(module, name)):
            if not in_leaf:
                chain.call_module(name)
            # Modules inside a leaf are never called as nodes; they are
            # walked only to find a module registered twice.
            stack.extend((name, child, depth, True) for _, child in children if child is not None)
            continue
        if not _calls_children_in_order(module, is_root=not name):
            return None
        if depth == _MAX_SEQUENTIAL_DEPTH or any(child is None for _, child in children):
            return None
        stack.extend(
            (f"{name}.{child_name}" if name else child_name, child, depth + 1, False)
            for child_name, child in reversed(children)
        )
    chain.output()
    return chain


def _calls_children_in_order(module: nn.Module, *, is_root: bool) -> bool:
    """Return whether tracing a call of ``module`` records exactly its children's calls in order."""
    if type(module) is not nn.Sequential:
        return False
    if is_root:
        return True  # tracing calls the root's class forward directly, without hooks
    return (
        not any(getattr(module, kind, None) for kind in _CALL_HOOKS)
        and "forward" not in module.__dict__
        and module.__dict__.get("_compiled_call_impl") is None
    )


class TracedModel:
    """A model's forward traced with torch.fx, searched for chains of module calls.

    For a tree of plain ``nn.Sequential`` containers, :func:`sequential_graph`
    gives the same nodes without tracing.

    Raises:
        TraceFailure: torch.fx could not trace the model.
    """

    def __init__(self, model: nn.Module) -> None:
        graph: torch.fx.Graph | _CallChain | None = sequential_graph(model)
        if graph is None:
            try:
                graph = _LeafTracer().trace(model)
            except Exception as error:  # fx raises many types for untraceable code
                raise TraceFailure(f"{type(error).__name__}: {error}") from None
        self.graph = graph
        self.model = model
        # The module of each call_module target met so far, by qualified name.
        self._modules: dict[str, nn.Module] = {}
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
        name = str(node.target)
        module = self._modules.get(name)
        if module is None:
            module = self._modules[name] = self.model.get_submodule(name)
        return module

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
