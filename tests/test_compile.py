"""torch.compile of swapped models: one graph, the same numbers as eager mode, few recompiles."""

from __future__ import annotations

import copy

import attrs
import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

import qatcore

pytest.importorskip("qatcore_conv")
pytest.importorskip("qatcore_linear")
pytest.importorskip("qatcore_observers")
pytest.importorskip("qatcore_x86")

STEPS = 3


@pytest.fixture(autouse=True)
def fresh_compile_caches() -> None:
    """Start each test with empty compile caches, so that its recompiles are its own."""
    torch._dynamo.reset()


class ConvBlocks(nn.Module):
    """Conv-BN-ReLU, a conv, and a linear head: the module kinds a QAT model trains."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)
        )
        self.head = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def _qat_model(learnable: bool = False) -> nn.Module:
    torch.manual_seed(0)
    qconfig = qatcore.get_qconfig("x86")
    if learnable:
        qconfig = attrs.evolve(
            qconfig,
            weight=attrs.evolve(qconfig.weight, learnable=True),
            activation=attrs.evolve(qconfig.activation, learnable=True),
        )
    return qatcore.swap_modules(ConvBlocks(), qconfig)


def _batch(step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(2, 3, 8, 8, generator=generator) * (step + 1)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> torch.Tensor:
    optimizer.zero_grad()
    output = model(_batch(step))
    output.square().mean().backward()
    optimizer.step()
    return output.detach()


@pytest.mark.parametrize("learnable", [False, True], ids=["observed", "learnable"])
def test_compiled_training_matches_eager(learnable: bool) -> None:
    eager = _qat_model(learnable)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    eager_optimizer = torch.optim.SGD(eager.parameters(), lr=0.01)
    compiled_optimizer = torch.optim.SGD(compiled_model.parameters(), lr=0.01)

    for step in range(STEPS):
        if learnable and step == 1:
            qatcore.freeze_observers(eager)
            qatcore.freeze_observers(compiled_model)
        eager_output = _train_step(eager, eager_optimizer, step)
        compiled_output = _train_step(compiled, compiled_optimizer, step)

        torch.testing.assert_close(compiled_output, eager_output, rtol=1e-5, atol=1e-5)

    # The compiler may sum in another order, so values agree to float rounding.
    for (name, ours), (_, theirs) in zip(
        compiled_model.named_buffers(), eager.named_buffers(), strict=True
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)
    for (name, ours), (_, theirs) in zip(
        compiled_model.named_parameters(), eager.named_parameters(), strict=True
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)


def test_traced_graph_matches_eager_bit_for_bit() -> None:
    # aot_eager runs the captured graph without generating new kernels, so
    # any difference from eager mode would come from the capture itself.
    eager = _qat_model()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)

    for step in range(STEPS):
        eager(_batch(step))
        compiled(_batch(step))

    for (name, ours), (_, theirs) in zip(
        compiled_model.named_modules(), eager.named_modules(), strict=True
    ):
        if isinstance(ours, qatcore.FakeQuantize):
            assert torch.equal(ours.scale, theirs.scale), name
            assert torch.equal(ours.zero_point, theirs.zero_point), name
            assert torch.equal(ours.observer.min_val, theirs.observer.min_val), name
            assert torch.equal(ours.observer.max_val, theirs.observer.max_val), name


def test_switches_recompile_once_not_every_step() -> None:
    model = _qat_model()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)

    for step in range(STEPS):
        compiled(_batch(step))
    first = counter.frame_count
    qatcore.freeze_observers(model)
    for step in range(STEPS):
        compiled(_batch(step))
    after_freeze = counter.frame_count
    qatcore.enable_fake_quant(model, False)
    for step in range(STEPS):
        compiled(_batch(step))

    assert first == 1
    assert after_freeze == 2
    assert counter.frame_count == 3
