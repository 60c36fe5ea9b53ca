"""The observing kernel: a FakeQuantize training step in native calls, bit for bit the ATen steps.

The oracle is the same module with ``QuantSpec(kernel="reference")``: no
observing kernel is registered under that name, so it observes with the
observer module's ATen code, computes qparams with
``qatcore.qparams_from_min_max`` and fake-quantizes with the reference
kernel.
"""

from __future__ import annotations

import copy
import itertools

import attrs
import pytest
import torch
from torch import nn

import qatcore
import qatcore_cpu.native
from qatcore_cpu.observing import observe_and_fake_quantize_cpu

pytest.importorskip("qatcore_observers")

pytestmark = pytest.mark.skipif(
    not qatcore_cpu.native.available(),
    reason=qatcore_cpu.native.status() or "the native loops are not loaded",
)

SHAPE = (4, 6, 5, 7)


def _batches() -> list[torch.Tensor]:
    """Return batches whose ranges grow, shift, turn non-finite, vanish and turn huge."""
    generator = torch.Generator().manual_seed(7)
    batches = []
    for step in range(4):
        batch = torch.randn(SHAPE, generator=generator) * (step + 1) + step - 1.5
        batches.append(batch)
    with_nonfinite = torch.randn(SHAPE, generator=generator)
    with_nonfinite[0, 1, 0, 0] = float("nan")
    with_nonfinite[1, 2, 3, 4] = float("inf")
    with_nonfinite[2, 3, 1, 1] = -float("inf")
    batches.append(with_nonfinite)
    no_finite_in_channel = torch.randn(SHAPE, generator=generator)
    no_finite_in_channel[:, 4] = float("nan")
    no_finite_in_channel[3] = float("inf")
    batches.append(no_finite_in_channel)
    batches.append(torch.zeros(SHAPE))
    batches.append(torch.full(SHAPE, -0.0))
    huge = torch.randn(SHAPE, generator=generator) * 3e38
    batches.append(huge.clamp(-3.4e38, 3.4e38))
    tiny = torch.randn(SHAPE, generator=generator) * 1e-30
    batches.append(tiny)
    return batches


SPECS = [
    pytest.param(
        qatcore.QuantSpec(
            bits=bits,
            signed=signed,
            symmetric=symmetric,
            axis=axis,
            observer=observer,
            power_of_two=power_of_two,
        ),
        id=f"{observer}-{'sym' if symmetric else 'affine'}-{'s' if signed else 'u'}{bits}"
        f"-{'pow2' if power_of_two else 'float'}-axis{axis}",
    )
    for observer, symmetric, signed, power_of_two, bits, axis in itertools.product(
        ["minmax", "moving_average_minmax"],
        [False, True],
        [False, True],
        [False, True],
        [4, 8],
        [None, 1, 3],
    )
]


def _pair(spec: qatcore.QuantSpec) -> tuple[qatcore.FakeQuantize, qatcore.FakeQuantize]:
    channels = None if spec.axis is None else SHAPE[spec.axis]
    native = qatcore.FakeQuantize(spec, channels=channels)
    reference = qatcore.FakeQuantize(attrs.evolve(spec, kernel="reference"), channels=channels)
    reference.load_state_dict(native.state_dict())
    return native, reference


def _assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, what
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(actual.nan_to_num(), expected.nan_to_num()), f"{what}: values differ"


@pytest.mark.parametrize("spec", SPECS)
def test_training_steps_match_aten_steps(spec: qatcore.QuantSpec) -> None:
    native, reference = _pair(spec)
    assert native.observing_kernel("cpu") is observe_and_fake_quantize_cpu
    assert reference.observing_kernel("cpu") is None

    for step, batch in enumerate(_batches()):
        outputs, gradients = [], []
        for module in (native, reference):
            x = batch.clone().requires_grad_()
            out = module(x * 1)  # a non-leaf input, as an activation is
            out.backward(torch.ones_like(out))
            outputs.append(out.detach())
            gradients.append(x.grad)
        _assert_same(outputs[0], outputs[1], f"step {step} output")
        _assert_same(gradients[0], gradients[1], f"step {step} input gradient")
        expected_state = reference.state_dict()
        for name, value in native.state_dict().items():
            _assert_same(value, expected_state[name], f"step {step} {name}")


def test_leaf_weight_steps_match_aten_steps() -> None:
    spec = qatcore.get_qconfig("x86").weight.resolve_axis(0)
    generator = torch.Generator().manual_seed(8)
    weight = torch.randn(6, 4, 3, 3, generator=generator)
    native, reference = (
        qatcore.FakeQuantize(spec, channels=6),
        qatcore.FakeQuantize(attrs.evolve(spec, kernel="reference"), channels=6),
    )

    for step in range(3):
        results = []
        for module in (native, reference):
            leaf = (weight * (step + 1)).requires_grad_()
            out = module(leaf)
            out.backward(torch.full_like(out, 0.5))
            results.append((out.detach(), leaf.grad))
        _assert_same(results[0][0], results[1][0], "output")
        _assert_same(results[0][1], results[1][1], "weight gradient")
        assert torch.equal(native.scale, reference.scale)
        assert torch.equal(native.zero_point, reference.zero_point)


def _fake_quantize(observer: str = "moving_average_minmax") -> qatcore.FakeQuantize:
    return qatcore.FakeQuantize(qatcore.QuantSpec(bits=8, observer=observer))


def test_float64_input_takes_aten_steps() -> None:
    module = _fake_quantize()

    assert observe_and_fake_quantize_cpu(torch.randn(3, 4, dtype=torch.float64), module) is None


def test_observer_subclass_takes_aten_steps() -> None:
    from qatcore_observers.minmax import MinMaxObserver

    class WidenedMinMax(MinMaxObserver):
        def update(
            self, batch_min: torch.Tensor, batch_max: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return super().update(batch_min * 2, batch_max * 2)

    spec = qatcore.QuantSpec(bits=8, observer="minmax")
    module = qatcore.FakeQuantize(spec, observer=WidenedMinMax(spec))
    x = torch.tensor([-1.0, 2.0])

    assert observe_and_fake_quantize_cpu(x, module) is None
    module(x)
    assert module.observer.min_val.item() == -2.0
    assert module.observer.max_val.item() == 4.0


def test_observer_hook_runs() -> None:
    module = _fake_quantize()
    seen: list[torch.Size] = []
    module.observer.register_forward_hook(lambda observer, args, out: seen.append(args[0].shape))

    module(torch.randn(2, 3))

    assert seen == [torch.Size([2, 3])]


def test_mismatched_channels_raise_observer_error() -> None:
    spec = qatcore.QuantSpec(bits=8, axis=1, observer="minmax")
    module = qatcore.FakeQuantize(spec, channels=3)

    with pytest.raises(ValueError, match="expects 3 channels along axis 1"):
        module(torch.randn(2, 4))


def test_eval_and_disabled_modes_skip_observing_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def counting(x: torch.Tensor, module: qatcore.FakeQuantize) -> torch.Tensor | None:
        calls.append("called")
        return observe_and_fake_quantize_cpu(x, module)

    module = _fake_quantize()
    module.__dict__["_observing_kernels"] = {"cpu": counting}
    x = torch.randn(5)

    module(x)
    module.fake_quant_enabled = False
    module(x)
    module.fake_quant_enabled = True
    module.observer_enabled = False
    module(x)
    module.observer_enabled = True
    module.eval()
    module(x)

    assert calls == ["called"]


def test_model_training_matches_reference_kernel() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    qconfig = qatcore.get_qconfig("x86")
    reference_qconfig = attrs.evolve(
        qconfig,
        weight=attrs.evolve(qconfig.weight, kernel="reference"),
        activation=attrs.evolve(qconfig.activation, kernel="reference"),
    )
    native = qatcore.swap_modules(copy.deepcopy(model), qconfig)
    reference = qatcore.swap_modules(copy.deepcopy(model), reference_qconfig)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (native, reference)]

    for step in range(4):
        batch = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(step))
        outputs = []
        for module, optimizer in zip((native, reference), optimizers, strict=True):
            optimizer.zero_grad()
            out = module(batch)
            out.square().mean().backward()
            optimizer.step()
            outputs.append(out.detach())
        assert torch.equal(outputs[0], outputs[1]), f"step {step}"

    expected = reference.state_dict()
    for name, value in native.state_dict().items():
        assert torch.equal(value, expected[name]), name
