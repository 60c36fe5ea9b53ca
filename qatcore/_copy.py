"""Deep copies of module trees that cost no recursion per level of nesting."""

from __future__ import annotations

import copy
import copyreg
from collections import OrderedDict
from typing import Any

from torch import nn

__all__ = ["copy_module_tree"]

# Types that copy.deepcopy returns unchanged.
_ATOMIC_TYPES = frozenset({type(None), bool, int, float, complex, str, bytes})
_MISSING = object()


def copy_module_tree(model: nn.Module) -> nn.Module:
    """Return a deep copy of ``model`` made module by module, so that depth costs no recursion.

    ``copy.deepcopy`` recurses once per level of nesting and raises
    RecursionError on a model some hundreds of levels deep. Here each module
    is copied with its children detached, and the copies are joined again.
    One memo serves every module, so that shared modules and tied
    parameters stay shared in the copy.
    """
    modules: list[nn.Module] = []
    seen: set[int] = set()
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        modules.append(module)
        stack.extend(child for child in module._modules.values() if child is not None)

    memo: dict[int, Any] = {}
    copies = {id(module): _copy_without_children(module, memo) for module in modules}
    for module in modules:
        copies[id(module)].__dict__["_modules"] = type(module._modules)(
            (name, None if child is None else copies[id(child)])
            for name, child in module._modules.items()
        )
    return copies[id(model)]


def _copy_without_children(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """Return a deep copy of ``module`` with an empty ``_modules``, to which the caller adds."""
    copied = memo.get(id(module), _MISSING)
    if copied is not _MISSING:
        return copied  # reached already through an attribute of a module copied earlier
    if not _copies_as_module_state(type(module)) or "__deepcopy__" in module.__dict__:
        children = module.__dict__["_modules"]
        module.__dict__["_modules"] = type(children)()
        try:
            return copy.deepcopy(module, memo)
        finally:
            module.__dict__["_modules"] = children

    # What copy.deepcopy does for such a class, without its per-object dispatch:
    # a new instance, then a deep copy of Module.__getstate__() to __setstate__.
    cls = type(module)
    copied = cls.__new__(cls)
    memo[id(module)] = copied
    state = {}
    for name, value in module.__dict__.items():
        kind = type(value)
        if kind in _ATOMIC_TYPES:
            state[name] = value
        elif kind is OrderedDict and not value and id(value) not in memo and not vars(value):
            # Most hook dicts of a module are empty. This copies them as _deepcopy_value does.
            state[name] = memo[id(value)] = OrderedDict()
        elif name == "_modules":
            state[name] = kind()
        elif name != "_compiled_call_impl":  # left out by Module.__getstate__
            state[name] = _deepcopy_value(value, memo)
    copied.__setstate__(state)
    return copied


def _copies_as_module_state(cls: type) -> bool:
    """Return whether ``copy.deepcopy`` copies instances of ``cls`` through ``Module.__getstate__``.

    A class that defines its own ``__deepcopy__``, ``__reduce__``,
    ``__reduce_ex__``, ``__getstate__`` or ``__getnewargs__``, or has a
    ``copyreg`` entry, is copied by ``copy.deepcopy`` itself.
    """
    return (
        getattr(cls, "__deepcopy__", None) is None
        and cls not in copyreg.dispatch_table
        and cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
        and cls.__getstate__ is nn.Module.__getstate__
        and not hasattr(cls, "__getnewargs_ex__")
        and not hasattr(cls, "__getnewargs__")
    )


def _deepcopy_value(value: Any, memo: dict[int, Any]) -> Any:
    """Return ``copy.deepcopy(value, memo)``, with fast paths for a module's usual attributes.

    Dicts such as the hook, parameter and buffer dicts, sets of buffer names
    and tuples of atomic values are copied here. Every other value, tensors
    included, goes to ``copy.deepcopy``.
    """
    kind = type(value)
    if kind in _ATOMIC_TYPES:
        return value
    copied = memo.get(id(value), _MISSING)
    if copied is not _MISSING:
        return copied
    if kind is dict or (kind is OrderedDict and not vars(value)):
        copied = kind()
        memo[id(value)] = copied
        for key, item in value.items():
            copied[_deepcopy_value(key, memo)] = _deepcopy_value(item, memo)
        return copied
    if kind is tuple and all(type(item) in _ATOMIC_TYPES for item in value):
        return value  # what copy.deepcopy returns for a tuple of atomic values
    if kind is set and all(type(item) in _ATOMIC_TYPES for item in value):
        copied = set(value)
        memo[id(value)] = copied
        return copied
    return copy.deepcopy(value, memo)
