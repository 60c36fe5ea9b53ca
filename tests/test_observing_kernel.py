"""Observing kernels: when FakeQuantize hands its training step to one, and when it does not."""

from __future__ import annotations

import pytest
import torch

import qatcore
from qatcore import _plugins


class RunningRange(qatcore.RangeObserver):
    """A running min and max, so that the test needs no observer plugin."""

    def update(
        self, batch_min: torch.Tensor, batch_max: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.minimum(self.min_val, batch_min), torch.maximum(self.max_val, batch_max)


class RecordingKernel:
    """An observing kernel that records its calls and declines every other one."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor, module: qatcore.FakeQuantize) -> torch.Tensor | None:
        self.calls += 1
        if self.calls % 2 == 0:
            return None
        module.scale.fill_(0.5)
        module.zero_point.fill_(0)
        return torch.full_like(x, 7.0)


@pytest.fixture
def recording_kernel(fresh_plugin_manager: _plugins.PluginManager) -> RecordingKernel:
    kernel = RecordingKernel()
    qatcore.register_observer("recording_range", RunningRange)
    # The plain kernel of the same name serves eval mode and declined steps.
    qatcore.register_kernel("recording", "cpu", qatcore.fake_quantize_reference)
    qatcore.register_observing_kernel("recording", "cpu", kernel)
    return kernel


def _module(**spec_options: object) -> qatcore.FakeQuantize:
    spec = qatcore.QuantSpec(
        bits=8,
        signed=False,
        symmetric=False,
        observer="recording_range",
        kernel="recording",
        **spec_options,
    )
    return qatcore.FakeQuantize(spec)


def test_training_step_uses_kernel_output(recording_kernel: RecordingKernel) -> None:
    module = _module()
    x = torch.tensor([-1.0, 3.0])

    out = module(x)

    assert recording_kernel.calls == 1
    assert out.tolist() == [7.0, 7.0]
    assert module.scale.item() == 0.5
    # The kernel took the whole step, so the observer module never ran.
    assert module.observer.min_val.item() == float("inf")


def test_declined_step_takes_observer_and_kernel(recording_kernel: RecordingKernel) -> None:
    module = _module()
    module(torch.tensor([0.0]))
    x = torch.tensor([-1.0, 3.0])

    out = module(x)

    assert recording_kernel.calls == 2
    assert module.observer.min_val.item() == -1.0
    assert module.observer.max_val.item() == 3.0
    # Affine uint8 over [-1, 3]: scale 4 / 255, zero point 255 / 4 = 63.75, rounded to 64.
    assert module.scale.item() == pytest.approx(4 / 255)
    assert module.zero_point.item() == 64
    expected = qatcore.fake_quantize_reference(x, module.scale, module.zero_point, 0, 255)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("mode", ["eval", "observer-off", "fake-quant-off", "learnable"])
def test_kernel_skipped_outside_observed_training(
    recording_kernel: RecordingKernel, mode: str
) -> None:
    module = _module(learnable=mode == "learnable")
    if mode == "eval":
        module.eval()
    elif mode == "observer-off":
        module.observer_enabled = False
    elif mode == "fake-quant-off":
        module.fake_quant_enabled = False

    module(torch.tensor([-1.0, 3.0]))

    assert recording_kernel.calls == 0


def test_kernel_skipped_in_compiled_graph(recording_kernel: RecordingKernel) -> None:
    module = _module()
    compiled = torch.compile(module, fullgraph=True, backend="eager")

    out = compiled(torch.tensor([-1.0, 3.0]))

    assert recording_kernel.calls == 0
    assert module.observer.max_val.item() == 3.0
    assert out.shape == (2,)


def test_pickled_module_looks_kernel_up_again(recording_kernel: RecordingKernel) -> None:
    import pickle

    module = _module()
    module(torch.tensor([1.0]))
    restored = pickle.loads(pickle.dumps(module))

    restored(torch.tensor([1.0]))

    assert recording_kernel.calls == 2
