"""copy_module_tree against copy.deepcopy, on modules with the state that models carry."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from qatcore._copy import copy_module_tree


class Scaled(nn.Module):
    """A module with a buffer, a non-persistent buffer and plain attributes of several kinds."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.register_buffer("scale", torch.full((3,), 2.0))
        self.register_buffer("cache", torch.zeros(3), persistent=False)
        self.sizes = (3, (1, 2))
        self.names = ["a", "b"]
        self.options = {"mode": "fast", "steps": [1, 2]}
        self.ratio = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


class CountingCopy(nn.Module):
    """A module with its own __deepcopy__, which copy_module_tree must call."""

    copies = 0

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))

    def __deepcopy__(self, memo: dict[int, Any]) -> CountingCopy:
        CountingCopy.copies += 1
        copied = CountingCopy()
        memo[id(self)] = copied
        copied.weight = copy.deepcopy(self.weight, memo)
        return copied


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _forward_hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    return output + 1


def test_copy_equals_deepcopy_state() -> None:
    model = nn.Sequential(Scaled(), nn.BatchNorm1d(3), nn.ReLU())
    model[1].running_mean.fill_(0.25)

    copied = copy_module_tree(model)
    expected = copy.deepcopy(model)

    for ours, theirs in zip(copied.modules(), expected.modules()):
        assert type(ours) is type(theirs)
        assert ours.__dict__.keys() == theirs.__dict__.keys()
    assert copied.state_dict().keys() == expected.state_dict().keys()
    for name, tensor in expected.state_dict().items():
        assert torch.equal(copied.state_dict()[name], tensor), name
    assert torch.equal(copied[0].cache, model[0].cache)
    assert copied[0]._non_persistent_buffers_set == {"cache"}
    assert copied[0].sizes == (3, (1, 2))
    assert copied[0].options == {"mode": "fast", "steps": [1, 2]}


def test_copy_shares_nothing_mutable() -> None:
    model = nn.Sequential(Scaled(), nn.BatchNorm1d(3))

    copied = copy_module_tree(model)

    originals = {id(tensor) for tensor in _tensors(model)}
    assert not originals.intersection(id(tensor) for tensor in _tensors(copied))
    storages = {tensor.untyped_storage().data_ptr() for tensor in _tensors(model)}
    assert not storages.intersection(t.untyped_storage().data_ptr() for t in _tensors(copied))
    assert copied[0].names is not model[0].names
    assert copied[0].options["steps"] is not model[0].options["steps"]
    assert copied[0]._non_persistent_buffers_set is not model[0]._non_persistent_buffers_set
    for kind in ("_forward_hooks", "_forward_pre_hooks", "_parameters", "_buffers"):
        assert getattr(copied[0], kind) is not getattr(model[0], kind), kind


def test_copy_keeps_parameter_flags() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    model[0].bias.requires_grad_(False)

    copied = copy_module_tree(model)

    assert isinstance(copied[0].weight, nn.Parameter)
    assert copied[0].weight.requires_grad
    assert not copied[0].bias.requires_grad


def test_copy_carries_hooks() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    model[0].register_forward_hook(_forward_hook)
    x = torch.randn(1, 2)

    copied = copy_module_tree(model)

    assert list(copied[0]._forward_hooks.values()) == [_forward_hook]
    assert torch.equal(copied(x), model(x))
    copied[0]._forward_hooks.clear()
    assert len(model[0]._forward_hooks) == 1


def test_copy_shares_what_the_model_shares() -> None:
    model = nn.Sequential(Scaled(), Scaled())
    model[1].names = model[0].names
    model[1].register_buffer("scale", model[0].scale)

    copied = copy_module_tree(model)

    assert copied[1].names is copied[0].names
    assert copied[1].scale is copied[0].scale
    assert copied[1].names is not model[0].names


def test_copy_keeps_views_of_one_storage() -> None:
    model = nn.Sequential(Scaled())
    model[0].register_buffer("head", model[0].scale[:2])

    copied = copy_module_tree(model)
    copied[0].scale.fill_(5.0)

    assert torch.equal(copied[0].head, torch.full((2,), 5.0))
    assert torch.equal(model[0].head, torch.full((2,), 2.0))


def test_copy_calls_custom_deepcopy() -> None:
    model = nn.Sequential(CountingCopy(), nn.Linear(2, 2))
    before = CountingCopy.copies

    copied = copy_module_tree(model)

    assert CountingCopy.copies == before + 1
    assert type(copied[0]) is CountingCopy
    assert copied[0].weight is not model[0].weight
    assert list(model._modules) == ["0", "1"]


def test_copy_keeps_ordered_dict_attributes() -> None:
    module = nn.Linear(2, 2)
    module.table = OrderedDict(first=1, second=[2])

    copied = copy_module_tree(nn.Sequential(module))[0]

    assert type(copied.table) is OrderedDict
    assert list(copied.table) == ["first", "second"]
    assert copied.table["second"] == [2]
    assert copied.table["second"] is not module.table["second"]


def test_copy_calls_instance_deepcopy() -> None:
    module = nn.Linear(2, 2)
    replacement = nn.Linear(2, 2)
    module.__deepcopy__ = lambda memo: replacement

    copied = copy_module_tree(nn.Sequential(module))

    assert copied[0] is replacement
