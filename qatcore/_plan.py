"""The swap plan: what happens to each module of a model, and why."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import attrs
from torch import nn
from torch.nn.utils import parametrize

from qatcore._batchnorm import BatchNormFolding
from qatcore._config import QConfig
from qatcore._fake_quantize import FakeQuantize
from qatcore._graph_fusion import TracedModel, TraceFailure
from qatcore._plugins import plugin_manager
from qatcore._protocol import QATModule, SwapError
from qatcore._registry import Registry, describe_key, install_hint

__all__ = [
    "FUSE",
    "FuseLike",
    "OTHER_HOOKS",
    "POST_HOOKS",
    "PRE_HOOKS",
    "FusedAway",
    "KEEP",
    "Plan",
    "PlanEntry",
    "QConfigLike",
    "SWAP",
    "iter_named_modules",
    "join_name",
    "plan",
]

QConfigLike = QConfig | Mapping[str | type, QConfig | None] | None
FuseLike = bool | Sequence[Sequence[str]]
"""``True`` to fuse the registered patterns found in the model, ``False`` to fuse
nothing, or explicit groups of qualified names to fuse exactly."""
"""A QConfig for the whole model, or a mapping from a qualified-name prefix or a
module type to a QConfig or ``None`` (keep float)."""

SWAP = "swap"
FUSE = "fuse"
KEEP = "keep"

# Module attributes that hold hooks; a swapped module takes over the same
# dicts, so existing hook handles still remove their hooks.
PRE_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
POST_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
OTHER_HOOKS = (
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


class FusedAway(nn.Identity):
    """Placeholder left where a module was fused into another module.

    It keeps the indices of an ``nn.Sequential`` valid and marks the slot
    where :func:`to_float` puts the float module back.

    Args:
        float_type_name: Class name of the module that was here.
        fused_into: Qualified name of the fused QAT module that runs it now,
            relative to the model that was swapped.
        position: Its index among the fused module's members.
        group: A token that the fused module carries too, so that
            :func:`to_float` finds the placeholders of a fused module wherever
            the model now sits, inside a larger model for example.
    """

    def __init__(
        self, float_type_name: str = "", fused_into: str = "", position: int = 0, group: str = ""
    ) -> None:
        super().__init__()
        # Plain attributes, written past nn.Module's slower __setattr__: a
        # swap leaves one placeholder per fused member.
        self.__dict__.update(
            float_type_name=float_type_name, fused_into=fused_into, position=position, group=group
        )

    def extra_repr(self) -> str:
        return f"was {self.float_type_name}, fused into {self.fused_into or '<root>'}"


@attrs.frozen
class PlanEntry:
    """The decision for one module, or for one group of fused modules.

    Attributes:
        name: Qualified name of the module (the first one of a fused group);
            ``""`` is the root.
        action: ``"swap"``, ``"fuse"`` or ``"keep"`` (stays float).
        float_type: Class name of the float module (all members for a fusion).
        qat_type: The QAT class it becomes, or ``None`` when kept float.
        members: Qualified names of every module in a fused group.
        reason: Why it is kept float, or what it becomes.
        qconfig: The QConfig applied, or ``None``.
        missing_plugin: The first-party distribution that would swap a module
            kept float for lack of a mapping, or ``None``.
        subclass_of: For a module kept float because only its base class is
            mapped, the name of that base class.
    """

    name: str
    action: str
    float_type: str
    qat_type: type[nn.Module] | None = None
    members: tuple[str, ...] = ()
    reason: str = ""
    qconfig: QConfig | None = None
    missing_plugin: str | None = None
    subclass_of: str | None = None


class Plan(Sequence[PlanEntry]):
    """The decisions of :func:`plan`, module by module, in model order.

    Attributes:
        notes: Remarks on the plan as a whole, such as why fusion fell back
            to ``nn.Sequential`` containers.
        unchecked_groups: Explicit fuse groups that could not be checked
            against the forward, because torch.fx could not trace the model.
    """

    def __init__(
        self,
        entries: list[PlanEntry],
        notes: Sequence[str] = (),
        unchecked_groups: Sequence[tuple[str, ...]] = (),
    ) -> None:
        self._entries = entries
        self.notes = list(notes)
        self.unchecked_groups = list(unchecked_groups)

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        return self._entries[index]

    def __len__(self) -> int:
        return len(self._entries)

    def by_action(self, action: str) -> list[PlanEntry]:
        """Return the entries whose action is ``action``."""
        return [entry for entry in self._entries if entry.action == action]

    def summary(self) -> str:
        """Return one line counting swapped, fused and float modules."""
        swapped = len(self.by_action(SWAP))
        fused = len(self.by_action(FUSE))
        kept = len(self.by_action(KEEP))
        groups = "group" if fused == 1 else "groups"
        return f"{swapped} swapped, {fused} fused {groups}, {kept} kept float"

    def table(self) -> str:
        """Return the plan as an aligned text table; a fused group lists all its members."""
        rows = [("module", "action", "float type", "becomes / reason")]
        for entry in self._entries:
            outcome = describe_key(entry.qat_type) if entry.qat_type is not None else ""
            if entry.reason:
                outcome = f"{outcome} ({entry.reason})" if outcome else entry.reason
            names = " + ".join(entry.members) if entry.members else entry.name or "<root>"
            rows.append((names, entry.action, entry.float_type, outcome))
        widths = [max(len(row[column]) for row in rows) for column in range(3)]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3]
            for row in rows
        ]
        lines.insert(1, "  ".join("-" * width for width in widths) + "  " + "-" * 16)
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


class _QConfigResolver:
    def __init__(self, qconfig: QConfigLike) -> None:
        self.global_qconfig: QConfig | None = None
        # Whether the global qconfig was given, rather than left at None.
        self.has_global = False
        self.by_name: dict[str, QConfig | None] = {}
        self.by_type: dict[type, QConfig | None] = {}
        if qconfig is None or isinstance(qconfig, QConfig):
            self.global_qconfig = qconfig
            self.has_global = True
            return
        if not isinstance(qconfig, Mapping):
            raise TypeError(
                "qconfig must be a QConfig, None, or a mapping from a qualified-name prefix or "
                f"module type to a QConfig or None, got {type(qconfig).__name__}"
            )
        for key, value in qconfig.items():
            if value is not None and not isinstance(value, QConfig):
                raise TypeError(
                    f"qconfig[{key!r}] must be a QConfig or None, got {type(value).__name__}"
                )
            if key == "":
                self.global_qconfig = value
                self.has_global = True
            elif isinstance(key, str):
                self.by_name[key] = value
            elif isinstance(key, type) and issubclass(key, nn.Module):
                self.by_type[key] = value
            else:
                raise TypeError(
                    f"qconfig keys must be qualified-name prefixes (str) or module types, "
                    f"got {key!r}"
                )

    def __call__(self, name: str, module: nn.Module) -> QConfig | None:
        best: str | None = None
        for prefix in self.by_name:
            if (name == prefix or name.startswith(prefix + ".")) and (
                best is None or len(prefix) > len(best)
            ):
                best = prefix
        if best is not None:
            return self.by_name[best]
        if type(module) in self.by_type:
            return self.by_type[type(module)]
        return self.global_qconfig

    def configured(self, name: str, module: nn.Module) -> bool:
        """Return whether a key of the mapping, or the global qconfig, applies to the module."""
        return (
            self.has_global
            or type(module) in self.by_type
            or any(name == prefix or name.startswith(prefix + ".") for prefix in self.by_name)
        )

    def check_names(self, names: set[str]) -> None:
        for prefix in self.by_name:
            if not any(name == prefix or name.startswith(prefix + ".") for name in names):
                raise SwapError(
                    f"qconfig key {prefix!r} matches no module of the model; keys are "
                    "qualified names as model.named_modules() lists them"
                )


def join_name(prefix: str, name: str) -> str:
    """Return the qualified name of ``name`` inside ``prefix``; either may be empty."""
    if not prefix or not name:
        return prefix or name
    return f"{prefix}.{name}"


def named_children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return every ``(name, child)`` of ``module``, a child registered twice under both names."""
    return [(name, child) for name, child in module._modules.items() if child is not None]


def iter_named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(qualified name, module)`` depth-first in model order, under every name.

    A module registered under several names is yielded under each of them,
    where ``model.named_modules()`` yields it once.
    """
    # Iterative, so that very deep models do not hit Python's recursion limit.
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        yield name, module
        children = named_children(module)
        stack.extend((join_name(name, child), sub) for child, sub in reversed(children))


def _registered_names(model: nn.Module) -> dict[int, list[str]]:
    """Map each module's id to the qualified names it is registered under, in model order.

    A module registered twice has two names. The modules inside a container
    registered twice are listed under the container's first name only,
    because one swap there changes them under both.
    """
    names: dict[int, list[str]] = {}
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        seen = id(module) in names
        names.setdefault(id(module), []).append(name)
        if not seen:
            children = named_children(module)
            stack.extend((join_name(name, child), sub) for child, sub in reversed(children))
    return names


def _parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """Map each Parameter's id to the qualified names that hold it, several for a tied one."""
    owners: dict[int, list[str]] = {}
    seen: set[int] = set()
    for module_name, module in iter_named_modules(model):
        if id(module) in seen:
            continue
        seen.add(id(module))
        for name, parameter in module._parameters.items():
            if parameter is not None:
                owners.setdefault(id(parameter), []).append(join_name(module_name, name))
    return owners


def _has_hooks(module: nn.Module, kinds: tuple[str, ...]) -> bool:
    return any(getattr(module, kind, None) for kind in kinds)


def mapped_base(module: nn.Module, registry: Registry) -> type[nn.Module] | None:
    """Return the mapped float type that ``module``'s unmapped type subclasses, if any."""
    kind = type(module)
    for mapped in registry.modules:
        if kind is not mapped and issubclass(kind, mapped):
            return mapped
    return None


def _keep_reason(module: nn.Module, registry: Registry) -> str:
    kind = type(module)
    base = mapped_base(module, registry)
    if base is not None:
        # Swapping would replace the subclass with the base's QAT type and
        # silently drop whatever the subclass adds, so it stays float.
        return (
            f"no QAT mapping for {describe_key(kind)}, a subclass of {describe_key(base)}; "
            "only exact types are swapped, so register a mapping for the subclass"
        )
    hint = registry.modules.provider_hint(kind)
    if hint is not None:
        return f"no QAT mapping for {describe_key(kind)}; {install_hint(hint)}"
    return f"no QAT mapping for {describe_key(kind)}"


class _Planner:
    def __init__(
        self, model: nn.Module, qconfig: QConfigLike, registry: Registry, fuse: FuseLike
    ) -> None:
        self.model = model
        self.resolve = _QConfigResolver(qconfig)
        self.registry = registry
        # Longest patterns first, so that a longer pattern wins over its prefix.
        self.fusions = sorted(registry.fusions.items(), key=lambda item: -len(item[0]))
        self.auto_fuse = fuse is True
        self.explicit_groups = _check_fuse_argument(fuse)
        self.entries: list[PlanEntry] = []
        self.notes: dict[str, str] = {}
        self.plan_notes: list[str] = []
        # Later members of explicit groups: planned with their group's first member.
        self.grouped: set[str] = set()
        # Every name of each module, in model order; more than one for a shared module.
        self.names = _registered_names(model)
        self.parameter_owners = _parameter_owners(model)
        self.unchecked_groups: list[tuple[str, ...]] = []
        self._traced: TracedModel | TraceFailure | None = None

    def run(self) -> Plan:
        order = {name: index for index, (name, _) in enumerate(iter_named_modules(self.model))}
        self.resolve.check_names(set(order))
        for group in self.explicit_groups:
            self._plan_explicit_group(group, order)
        if self.auto_fuse and self.registry.fusions:
            self._plan_traced_groups()

        stack: list[tuple[str, nn.Module]] = [("", self.model)]
        while stack:
            name, module = stack.pop()
            children = self._plan_module(name, module)
            stack.extend(reversed(children))

        self.entries.sort(key=lambda entry: order[entry.name])
        return Plan(self.entries, self.plan_notes, self.unchecked_groups)

    def _trace(self) -> TracedModel | TraceFailure:
        """Trace the model once; return the traced model, or why tracing failed."""
        if self._traced is None:
            try:
                self._traced = TracedModel(self.model)
            except TraceFailure as error:
                self._traced = error
        return self._traced

    def _plan_traced_groups(self) -> None:
        """Fuse the chains that the traced forward calls, or fall back to containers."""
        traced = self._trace()
        if isinstance(traced, TraceFailure):
            self.plan_notes.append(
                f"torch.fx could not trace the model ({traced}); fusion looked only at "
                "consecutive children of nn.Sequential containers"
            )
            return
        self.auto_fuse = False  # the graph covers nn.Sequential children too
        groups, blocked = traced.fusions(self.registry.fusions)
        for name, reason in blocked.items():
            if name not in self.grouped:
                self.notes.setdefault(name, reason)
        for group in groups:
            if self.grouped.intersection(group):
                continue  # an explicit group took a member already
            members = [(name, self.model.get_submodule(name)) for name in group]
            first_name, first = members[0]
            qconfig = self.resolve(first_name, first)
            if qconfig is None:
                continue
            problem = self._fusion_problem(members)
            if problem:
                self._note_unfused(group, problem)
                continue
            self._add_fused(group, members, qconfig)

    def _fusion_problem(self, members: list[tuple[str, nn.Module]]) -> str:
        """Return why ``members``, matching a registered pattern, cannot fuse, or ``""``."""
        for name, module in members:
            others = [other for other in self.names[id(module)] if other != name]
            if others:
                return (
                    f"{name} is also registered as {others[0]}, and a fused module can take "
                    "only one place"
                )
        fused_type = self.registry.fusions[tuple(type(module) for _, module in members)]
        return (
            _hooks_blocking_fusion(members)
            or self._qconfigs_blocking_fusion(members)
            or self._ties_blocking_fold(fused_type, members)
            or fused_type.fusion_problem(tuple(module for _, module in members))
        )

    def _ties_blocking_fold(
        self, fused_type: type[nn.Module], members: list[tuple[str, nn.Module]]
    ) -> str:
        # Folding BN rewrites the layer's weight and bias in to_float, which
        # would untie them from another module that shares them.
        if not issubclass(fused_type, BatchNormFolding):
            return ""
        name, layer = members[0]
        for attribute in ("weight", "bias"):
            parameter = getattr(layer, attribute, None)
            if not isinstance(parameter, nn.Parameter):
                continue
            own = join_name(name, attribute)
            others = [other for other in self.parameter_owners[id(parameter)] if other != own]
            if others:
                return (
                    f"{own} is tied to {others[0]}, and folding BatchNorm into it would "
                    "untie them in the float model"
                )
        return ""

    def _note_unfused(self, group: Sequence[str], problem: str) -> None:
        """Record on each member of ``group`` why the group was not fused."""
        for name in group:
            self.notes[name] = f"not fused as {' + '.join(group)}: {problem}"

    def _plan_module(self, name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
        """Plan ``module`` and return the children that still need a plan."""
        if isinstance(module, FusedAway):
            raise SwapError(
                f"{name or '<root>'} (FusedAway) is the placeholder of a {module.float_type_name} "
                f"fused into {module.fused_into or '<root>'}; call qatcore.to_float on a model "
                "that holds both, or swap the float model"
            )
        if isinstance(module, (QATModule, FakeQuantize)):
            raise SwapError(
                f"{name or '<root>'} ({type(module).__name__}) is already a QAT module; "
                "swap the float model, or call qatcore.to_float first"
            )
        if name in self.grouped:
            return []
        first_name = self.names[id(module)][0]
        if first_name != name:
            self._plan_alias(name, first_name, module)
            return []
        qconfig = self.resolve(name, module)
        float_type = type(module).__name__
        qat_type = self.registry.modules.get(type(module))
        if qat_type is not None and not parametrize.is_parametrized(module):
            if qconfig is None:
                entry = PlanEntry(name, KEEP, float_type, reason="the qconfig maps it to None")
            else:
                self._check_qconfig(name, module, qconfig)
                note = self.notes.get(name, "")
                entry = PlanEntry(name, SWAP, float_type, qat_type, reason=note, qconfig=qconfig)
            self.entries.append(entry)
            return []

        if parametrize.is_parametrized(module):
            reason = (
                "its parameters are parametrized (weight_norm, spectral_norm or another "
                "torch.nn.utils.parametrize parametrization), which a QAT module cannot take "
                "over; remove them with torch.nn.utils.parametrize.remove_parametrizations "
                "before swapping"
            )
            self.entries.append(PlanEntry(name, KEEP, float_type, reason=reason))
            return []

        children = [(join_name(name, child), sub) for child, sub in named_children(module)]
        if not children:
            if qconfig is None:
                entry = PlanEntry(name, KEEP, float_type, reason="the qconfig maps it to None")
            else:
                base = mapped_base(module, self.registry)
                reason = _keep_reason(module, self.registry)
                if name in self.notes:
                    reason = f"{reason}; {self.notes[name]}"
                entry = PlanEntry(
                    name,
                    KEEP,
                    float_type,
                    reason=reason,
                    missing_plugin=self.registry.modules.provider_hint(type(module)),
                    subclass_of=describe_key(base) if base is not None else None,
                )
            self.entries.append(entry)
            return []
        if isinstance(module, nn.Sequential) and self.auto_fuse:
            return self._plan_fusions(children)
        return children

    def _plan_alias(self, name: str, first_name: str, module: nn.Module) -> None:
        """Plan a second name of a module: it gets whatever the first name gets.

        Raises:
            SwapError: The qconfig configures the second name, or a module
                inside it, otherwise than the first.
        """
        for suffix, inner in iter_named_modules(module):
            first_path, path = join_name(first_name, suffix), join_name(name, suffix)
            if self.resolve.configured(path, inner) and self.resolve(path, inner) != self.resolve(
                first_path, inner
            ):
                raise SwapError(
                    f"{path} ({type(inner).__name__}) is the same module as {first_path}, but "
                    "the qconfig configures the two names differently; one module has one "
                    "config, so give both names the same one"
                )
        if next(module.children(), None) is not None:
            return  # a shared container: its modules are planned under the first name
        first = next(entry for entry in self.entries if entry.name == first_name)
        reason = f"the same module as {first_name}, so it is planned with it"
        self.entries.append(attrs.evolve(first, name=name, reason=reason))

    def _plan_explicit_group(self, group: tuple[str, ...], order: dict[str, int]) -> None:
        """Plan one group of names that the caller asked to fuse, or raise why it cannot be."""
        described = "(" + ", ".join(repr(name) for name in group) + ")"
        for name in group:
            if name not in order:
                raise SwapError(f"fuse group {described}: the model has no module {name!r}")
            if name in self.grouped or any(entry.name == name for entry in self.entries):
                raise SwapError(f"fuse group {described}: {name!r} is in another group too")
        members = [(name, self.model.get_submodule(name)) for name in group]
        pattern = tuple(type(module) for _, module in members)
        fused_type = self.registry.fusions.get(pattern)
        if fused_type is None:
            raise SwapError(
                f"fuse group {described}: {self.registry.fusions.missing_message(pattern)}"
            )
        first_name, first = members[0]
        qconfig = self.resolve(first_name, first)
        problem = (
            "the qconfig maps its first member to None" if qconfig is None else ""
        ) or self._fusion_problem(members)
        traced = self._trace()
        if not problem and isinstance(traced, TracedModel):
            problem = traced.chain_problem(group)
        if problem:
            raise SwapError(f"fuse group {described} cannot be fused: {problem}")
        if isinstance(traced, TraceFailure):
            self.unchecked_groups.append(group)
            self.plan_notes.append(
                f"torch.fx could not trace the model ({traced}), so the fuse group "
                f"{described} is not checked against the forward; the forward must call its "
                "members back to back on one tensor"
            )
        assert qconfig is not None  # checked just above
        self._add_fused(group, members, qconfig)

    def _add_fused(
        self, group: tuple[str, ...], members: list[tuple[str, nn.Module]], qconfig: QConfig
    ) -> None:
        first_name, first = members[0]
        self._check_qconfig(first_name, first, qconfig)
        pattern = tuple(type(module) for _, module in members)
        float_types = " + ".join(kind.__name__ for kind in pattern)
        fused_type = self.registry.fusions[pattern]
        self.entries.append(
            PlanEntry(first_name, FUSE, float_types, fused_type, group, qconfig=qconfig)
        )
        self.grouped.update(group)

    def _plan_fusions(self, children: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
        """Plan fused groups among consecutive children; return the children left over."""
        rest = []
        index = 0
        while index < len(children):
            group = self._match_fusion(children, index)
            if group is None:
                rest.append(children[index])
                index += 1
                continue
            pattern, fused_type, qconfig = group
            members = children[index : index + len(pattern)]
            self._check_qconfig(members[0][0], members[0][1], qconfig)
            names = tuple(member_name for member_name, _ in members)
            float_types = " + ".join(type(member).__name__ for _, member in members)
            self.entries.append(
                PlanEntry(names[0], FUSE, float_types, fused_type, names, qconfig=qconfig)
            )
            index += len(pattern)
        return rest

    def _match_fusion(
        self, children: list[tuple[str, nn.Module]], index: int
    ) -> tuple[tuple[type, ...], type[nn.Module], QConfig] | None:
        first_name, first = children[index]
        qconfig = self.resolve(first_name, first)
        if qconfig is None:
            return None
        for pattern, fused_type in self.fusions:
            window = children[index : index + len(pattern)]
            if len(window) != len(pattern):
                continue
            if not all(type(module) is kind for (_, module), kind in zip(window, pattern)):
                continue
            problem = self._fusion_problem(window)
            if problem:
                self._note_unfused([name for name, _ in window], problem)
                continue
            return pattern, fused_type, qconfig
        return None

    def _qconfigs_blocking_fusion(self, window: list[tuple[str, nn.Module]]) -> str:
        # A fused module has one qconfig, the first member's. A later member
        # that no key configures follows it, as with {nn.Conv2d: qconfig}; one
        # configured otherwise (None included) keeps the group apart.
        first_name, first = window[0]
        qconfig = self.resolve(first_name, first)
        for name, module in window[1:]:
            if not self.resolve.configured(name, module):
                continue
            own = self.resolve(name, module)
            if own is None:
                return f"the qconfig maps {name} to None, while {first_name} is quantized"
            if own != qconfig:
                return f"{name} has a qconfig other than {first_name}'s"
        return ""

    def _check_qconfig(self, name: str, module: nn.Module, qconfig: QConfig) -> None:
        """Raise SwapError now if ``qconfig`` names an unregistered observer or kernel."""
        for role, spec in (("weight", qconfig.weight), ("output", qconfig.activation)):
            if spec is None:
                continue
            problem = None
            if spec.observer not in self.registry.observers:
                problem = self.registry.observers.missing_message(spec.observer)
            elif spec.kernel not in ("default", "reference") and not any(
                kernel_name == spec.kernel for kernel_name, _ in self.registry.kernels
            ):
                problem = self.registry.kernels.missing_message((spec.kernel, "cpu"))
            if problem is not None:
                raise SwapError(
                    f"{name or '<root>'} ({type(module).__name__}): the {role} spec cannot be "
                    f"used: {problem}"
                )


def _hooks_blocking_fusion(window: list[tuple[str, nn.Module]]) -> str:
    # A fused module runs its members back to back, so a hook that must see
    # an intermediate tensor (a forward hook on any member but the last, a
    # pre-hook on any member but the first) would see the wrong one.
    for position, (name, module) in enumerate(window):
        if position < len(window) - 1 and _has_hooks(module, POST_HOOKS):
            return f"{name} has forward hooks that need its own output"
        if position > 0 and _has_hooks(module, PRE_HOOKS):
            return f"{name} has forward pre-hooks that need its own input"
        if position > 0 and _has_hooks(module, OTHER_HOOKS):
            return f"{name} has backward or state-dict hooks that only the first member can keep"
    return ""


def _check_fuse_argument(fuse: FuseLike) -> list[tuple[str, ...]]:
    if isinstance(fuse, bool):
        return []
    if isinstance(fuse, str) or not isinstance(fuse, Sequence):
        raise TypeError(
            "fuse must be True, False, or a sequence of groups of qualified module names, "
            f"got {fuse!r}"
        )
    groups = []
    for group in fuse:
        if isinstance(group, str) or not isinstance(group, Sequence) or len(group) < 2:
            raise TypeError(
                f"each fuse group must be a sequence of at least two qualified names, got {group!r}"
            )
        if not all(isinstance(name, str) for name in group):
            raise TypeError(f"fuse group names must be str, got {group!r}")
        groups.append(tuple(group))
    return groups


def plan(model: nn.Module, qconfig: QConfigLike, *, fuse: FuseLike = True) -> Plan:
    """Decide, module by module, what :func:`swap_modules` would do to ``model``.

    Every leaf module appears in the plan: swapped, fused with its
    neighbours, or kept float with the reason.

    Args:
        model: The float model.
        qconfig: A QConfig for every module, or a mapping from a
            qualified-name prefix or module type to a QConfig or None.
        fuse: ``True`` fuses registered patterns that the forward, traced
            with ``torch.fx``, calls back to back, where each intermediate
            output has no other user. Where tracing fails it fuses
            consecutive children of an ``nn.Sequential`` only, and
            :attr:`Plan.notes` records it. ``False`` fuses nothing. A sequence of
            groups, such as ``[("conv1", "relu1")]``, fuses exactly those
            modules, wherever they sit; the model's forward must call each
            group's members back to back on one tensor.

    Raises:
        TypeError: ``qconfig`` or ``fuse`` has the wrong type.
        SwapError: A qconfig name key matches no module, the model already
            contains QAT modules, or an explicit fuse group names a missing
            module or matches no registered pattern.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return _Planner(model, qconfig, plugin_manager().registry, fuse).run()
