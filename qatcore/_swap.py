"""Swap float modules for QAT modules and back, as the plan decides."""

from __future__ import annotations

import contextlib
import gc
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import attrs
import torch
from torch import nn

from qatcore._config import QConfig
from qatcore._copy import copy_module_tree
from qatcore._dataflow import input_producers
from qatcore._fake_quantize import FakeQuantize
from qatcore._plan import (
    FUSE,
    KEEP,
    OTHER_HOOKS,
    POST_HOOKS,
    PRE_HOOKS,
    SWAP,
    FusedAway,
    FuseLike,
    Plan,
    QConfigLike,
    iter_named_modules,
    plan,
)
from qatcore._plugins import plugin_manager
from qatcore._protocol import QATModule, SwapError, build_fake_quant, qualified_name
from qatcore._warnings import CoverageWarning, QatcoreWarning

__all__ = [
    "enable_fake_quant",
    "freeze_bn_stats",
    "freeze_observers",
    "nonfinite_counts",
    "set_observer_sync",
    "swap_modules",
    "to_float",
]


def _move_hooks(source: nn.Module, target: nn.Module, kinds: tuple[str, ...]) -> None:
    for kind in kinds:
        if kind in source.__dict__:
            target.__dict__[kind] = source.__dict__[kind]


def _clear_hooks(module: nn.Module, kinds: tuple[str, ...]) -> None:
    for kind in kinds:
        if kind in module.__dict__:
            module.__dict__[kind] = type(module.__dict__[kind])()


def _split(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


def _submodule(model: nn.Module, name: str) -> nn.Module:
    """Return the module at ``name``, a qualified name that the plan of ``model`` lists."""
    # What model.get_submodule(name) returns for such a name, without its
    # checks, which cost more than the walk.
    module = model
    if name:
        for part in name.split("."):
            module = module._modules[part]  # type: ignore[assignment]
    return module


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, child = _split(name)
    setattr(_submodule(model, parent), child, module)


def _check_coverage(decisions: Plan, qconfig: QConfigLike) -> None:
    registry = plugin_manager().registry
    missing = [entry for entry in decisions if entry.action == KEEP and entry.missing_plugin]
    names = ", ".join(entry.name or "<root>" for entry in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    if missing and not registry.modules:
        raise SwapError(
            f"no QAT module mappings are registered, so no module can be swapped; "
            f"modules {names}{more} would be swapped: {missing[0].reason}"
        )
    if missing:
        warnings.warn(
            f"{len(missing)} modules stay float because no loaded plugin maps their type: "
            f"{names}{more}; {missing[0].reason}",
            CoverageWarning,
            stacklevel=3,
        )
    subclasses = [entry for entry in decisions if entry.subclass_of]
    if subclasses:
        names = ", ".join(f"{entry.name or '<root>'} ({entry.float_type})" for entry in subclasses)
        warnings.warn(
            f"{len(subclasses)} modules stay float because their type subclasses a mapped "
            f"type but is not mapped itself: {names}; register a QAT mapping for the subclass "
            "with qatcore.register_module to swap them",
            CoverageWarning,
            stacklevel=3,
        )
    if (
        not missing
        and not subclasses
        and qconfig is not None
        and not any(entry.action != KEEP for entry in decisions)
    ):
        kept = ", ".join(sorted({entry.float_type for entry in decisions})) or "none"
        warnings.warn(
            f"nothing was swapped: no loaded plugin maps any module type of this model "
            f"(types: {kept}); qatcore.plan(model, qconfig) lists each module with its reason",
            CoverageWarning,
            stacklevel=3,
        )


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector until the block ends.

    Swapping a model builds dozens of objects for each of its modules, and
    most of them live on in the result. Converting it back copies as many.
    As they pile up, the collector runs full collections, each over every
    object of the process: three during one swap of the 2,000 conv-BN-ReLU
    blocks of benchmarks/bench_swap.py, a third of its time on a 2-core x86
    machine. The few reference cycles that a swap leaves as garbage are
    collected after it. The pause is process-wide, so other threads run
    without cyclic collection until the block ends.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def swap_modules(
    model: nn.Module,
    qconfig: QConfigLike,
    *,
    inplace: bool = False,
    fuse: FuseLike = True,
    quantize_inputs: bool = True,
) -> nn.Module:
    """Return ``model`` with every mapped module replaced by its QAT module.

    Modules are swapped as :func:`plan` decides: mapped types become their
    QAT types, registered fusion patterns inside ``nn.Sequential`` become
    one fused QAT module (the later members leave a :class:`FusedAway`
    placeholder, so indices stay valid), and everything else stays float.
    Forward hooks move to the module that replaces their owner.

    A swapped module whose input no other QAT module quantized, such as
    the first layer or the layer after a residual addition, gets an input
    fake quantizer (``input_fake_quant``) with its activation spec made per
    tensor. Training then uses the codes that :func:`qatcore.convert` and
    :func:`qatcore.export` give an int8 engine. The inputs are found in the
    forward traced with ``torch.fx``; where it cannot be traced, every
    swapped module gets one.

    Args:
        model: The float model; it may itself be a mapped module.
        qconfig: A QConfig for every module, or a mapping from a
            qualified-name prefix or module type to a QConfig or None.
        inplace: Change ``model`` itself instead of a deep copy. The caller's
            model is never changed otherwise.
        fuse: Which modules to fuse, as :func:`plan` takes it.
        quantize_inputs: Add the input fake quantizers. Without them the
            QAT model computes what torch.ao's eager QAT modules compute,
            but cannot be converted to int8.

    Returns:
        The QAT model: a new object unless ``inplace`` is true.

    Raises:
        TypeError: ``model`` or ``qconfig`` has the wrong type.
        SwapError: A module cannot be swapped as configured; the message
            names its qualified path. Also raised when ``inplace`` is true
            and the root itself would change type, and when no plugin maps
            any module type at all while the model has modules that a
            first-party plugin would swap.

    Warns:
        CoverageWarning: Modules stay float because the plugin that maps
            their type is not installed.
    """
    with _collector_paused():
        decisions = plan(model, qconfig, fuse=fuse)
        _check_coverage(decisions, qconfig)
        if inplace and any(entry.name == "" and entry.action != KEEP for entry in decisions):
            raise SwapError(
                f"the model itself ({type(model).__name__}) is swapped to a QAT type, which "
                "cannot happen in place; call qatcore.swap_modules(model, qconfig) without "
                "inplace=True and use the returned module"
            )
        if not inplace:
            model = copy_module_tree(model)

        # A module registered under several names becomes one QAT module for all of them.
        swapped: dict[int, nn.Module] = {}
        # (qualified name, QAT module, its QConfig) of every module built here.
        built: list[tuple[str, nn.Module, QConfig]] = []
        for entry in decisions:
            if entry.action == SWAP:
                assert entry.qat_type is not None and entry.qconfig is not None
                original = _submodule(model, entry.name)
                if id(original) in swapped:
                    _replace(model, entry.name, swapped[id(original)])
                    continue
                qat = entry.qat_type.from_float(original, entry.qconfig, name=entry.name)
                swapped[id(original)] = qat
                built.append((entry.name, qat, entry.qconfig))
                _move_hooks(original, qat, PRE_HOOKS + POST_HOOKS + OTHER_HOOKS)
                if entry.name == "":
                    if quantize_inputs:
                        _add_input_quantizers(qat, built)
                    return qat
                _replace(model, entry.name, qat)
            elif entry.action == FUSE:
                assert entry.qat_type is not None and entry.qconfig is not None
                members = tuple(_submodule(model, member) for member in entry.members)
                fused = entry.qat_type.from_float(members, entry.qconfig, name=entry.name)
                built.append((entry.name, fused, entry.qconfig))
                _move_hooks(members[0], fused, PRE_HOOKS + OTHER_HOOKS)
                _move_hooks(members[-1], fused, POST_HOOKS)
                # Later members (the activation) run inside the fused module;
                # their hooks now belong to it and must not fire a second time.
                for member in members[1:]:
                    _clear_hooks(member, PRE_HOOKS + POST_HOOKS + OTHER_HOOKS)
                _replace(model, entry.members[0], fused)
                group = uuid.uuid4().hex
                fused._qatcore_fusion_group = group  # type: ignore[union-attr]
                for position, (member_name, member) in enumerate(
                    zip(entry.members[1:], members[1:]), start=1
                ):
                    placeholder = FusedAway(type(member).__name__, entry.name, position, group)
                    _replace(model, member_name, placeholder.train(member.training))
        for note_group in decisions.unchecked_groups:
            warnings.warn(
                f"the fuse group {note_group} is not checked against the forward, because torch.fx "
                "could not trace the model; fused results are right only if the forward calls "
                "its members back to back on one tensor",
                QatcoreWarning,
                stacklevel=2,
            )
        if quantize_inputs:
            _add_input_quantizers(model, built)
        return model


def _add_input_quantizers(model: nn.Module, built: list[tuple[str, nn.Module, QConfig]]) -> None:
    """Give each module of ``built`` whose input no QAT module quantized an input fake quantizer.

    The quantizer takes the module's activation spec, per tensor, as int8
    engines quantize a layer's input. A module without an activation spec
    gets none, and cannot be converted.
    """
    producers = input_producers(model)
    for name, module, qconfig in built:
        if qconfig.activation is None or module._modules.get("input_fake_quant") is not None:
            continue
        if producers is not None and producers.get(name) is not None:
            continue
        spec = attrs.evolve(qconfig.activation, axis=None)
        device = getattr(module, "weight", torch.empty(0)).device
        quantizer = build_fake_quant(spec, None, "input", qualified_name(name, module), device)
        assert quantizer is not None
        module.input_fake_quant = quantizer.train(module.training)


def _float_replacements(
    name: str, module: QATModule, placeholders: dict[str, dict[int, str]]
) -> list[tuple[str, nn.Module]]:
    """Return ``(qualified name, float module)`` pairs that replace a QAT module."""
    float_module = module.to_float()
    if len(type(module).float_types) < 2:
        return [(name, float_module)]
    # A fused module built by swap_modules left FusedAway placeholders where
    # its later members were; the float members go back into those slots.
    # Placeholders carry the fused module's group token, and older ones only
    # the fused module's name.
    members = list(float_module.children())
    group = getattr(module, "_qatcore_fusion_group", None)
    slots = placeholders.get(group, {}) if group else placeholders.get(name, {})
    if sorted(slots) != list(range(1, len(members))):
        return [(name, float_module)]
    return [(name, members[0])] + [(slots[index], members[index]) for index in sorted(slots)]


def to_float(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Return ``model`` with every QAT module replaced by its float equivalent.

    Fused modules are split back into their float members where their
    :class:`FusedAway` placeholders are. Without ``inplace`` the result
    shares no tensor with ``model``; its outputs equal the QAT model's with
    fake quantization disabled.
    """
    if isinstance(model, QATModule):
        float_module = model.to_float()
        _move_hooks(model, float_module, PRE_HOOKS + POST_HOOKS + OTHER_HOOKS)
        return float_module
    with _collector_paused():
        return _tree_to_float(model, inplace=inplace)


def _tree_to_float(model: nn.Module, *, inplace: bool) -> nn.Module:
    """Convert every QAT module inside ``model``, which is no QAT module itself."""
    if not inplace:
        model = copy_module_tree(model)

    qat_modules = []
    placeholders: dict[str, dict[int, str]] = {}
    for name, module in iter_named_modules(model):
        if isinstance(module, QATModule):
            qat_modules.append((name, module))
        elif isinstance(module, FusedAway):
            key = getattr(module, "group", "") or module.fused_into
            placeholders.setdefault(key, {})[module.position] = name
    # One float module for each QAT module, whatever number of names it has.
    converted: dict[int, nn.Module] = {}
    for name, module in qat_modules:
        if id(module) in converted:
            _replace(model, name, converted[id(module)])
            continue
        replacements = _float_replacements(name, module, placeholders)
        _keep_parameter_ties(module, replacements[0][1])
        converted[id(module)] = replacements[0][1] if len(replacements) == 1 else module
        for index, (target, float_module) in enumerate(replacements):
            if index == 0:
                _move_hooks(module, float_module, PRE_HOOKS + OTHER_HOOKS)
            if index == len(replacements) - 1:
                _move_hooks(module, float_module, POST_HOOKS)
            _replace(model, target, float_module)
    return model


def _keep_parameter_ties(module: nn.Module, float_module: nn.Module) -> None:
    """Give ``float_module`` the QAT module's own weight and bias where it copied them unchanged.

    A weight tied to another module's, such as a language model head tied to
    its embedding, then stays tied in the float model. A weight that BN was
    folded into has other values and stays a new Parameter.
    """
    if isinstance(float_module, nn.Sequential):
        float_module = float_module[0]
    for attribute in ("weight", "bias"):
        own = getattr(module, attribute, None)
        copied = getattr(float_module, attribute, None)
        if (
            isinstance(own, nn.Parameter)
            and isinstance(copied, nn.Parameter)
            and own.dtype == copied.dtype
            and own.shape == copied.shape
            and torch.equal(own, copied)
        ):
            setattr(float_module, attribute, own)


def _fake_quants(model: nn.Module) -> Iterator[tuple[str, FakeQuantize]]:
    for name, module in iter_named_modules(model):
        if isinstance(module, FakeQuantize):
            yield name, module


def set_observer_sync(model: nn.Module, enabled: bool = True, group: Any = None) -> nn.Module:
    """Turn the cross-rank reduction of every observer in ``model`` on or off.

    Args:
        model: A QAT model, or any module holding observers.
        enabled: Reduce each batch's statistics across ranks when
            torch.distributed is initialised (the default for new observers),
            or keep each rank's own.
        group: The process group to reduce over; ``None`` is the default group.

    Returns:
        ``model``, for chaining.
    """
    for _, fake_quant in _fake_quants(model):
        fake_quant.observer.sync = enabled
        fake_quant.observer.process_group = group
    return model


def freeze_observers(model: nn.Module, frozen: bool = True) -> nn.Module:
    """Stop (or, with ``frozen=False``, restart) every observer; qparams stay as they are.

    Returns:
        ``model``, for chaining.
    """
    for _, fake_quant in _fake_quants(model):
        fake_quant.observer_enabled = not frozen
    return model


def freeze_bn_stats(model: nn.Module, frozen: bool = True) -> nn.Module:
    """Stop (or, with ``frozen=False``, resume) BatchNorm statistics updates in fused QAT modules.

    Applies to every QAT module of ``model`` that folds a BatchNorm, such as
    the conv-BN modules of qatcore-conv: frozen, they use the running
    statistics in training too.

    Returns:
        ``model``, for chaining.
    """
    for _, module in iter_named_modules(model):
        if isinstance(module, QATModule) and callable(getattr(module, "freeze_bn_stats", None)):
            module.freeze_bn_stats(frozen)
    return model


def enable_fake_quant(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn fake quantization on or off in every QAT module of ``model``.

    With it off, QAT modules compute in float (observers still run in
    training mode unless frozen).

    Returns:
        ``model``, for chaining.
    """
    for _, fake_quant in _fake_quants(model):
        fake_quant.fake_quant_enabled = enabled
    return model


def nonfinite_counts(model: nn.Module) -> dict[str, int]:
    """Return, per fake quantizer that met NaN or inf, how many batches held such values.

    Keys are qualified names (``"features.0.output_fake_quant"``). Those
    values never entered the observers' statistics; a count shows where
    they came from.
    """
    counts = {}
    for name, fake_quant in _fake_quants(model):
        count = getattr(fake_quant.observer, "nonfinite_batches", None)
        if count is not None and int(count) > 0:
            counts[name] = int(count)
    return counts
