"""Learnable scale and zero point (LSQ and LSQ+): the reference kernel, FakeQuantize, registry.

``torch.ao``'s learnable fake-quant ops are the oracle for outputs and all
three gradients. Two of their behaviours are not copied, and tests below
pin each one down: the per-tensor backward rounds a float zero point half
up where its forward rounds half to even, and at an exact tie
``x / s = k + 0.5`` both backward ops round ``x / s + z`` where the forward
rounds ``x / s`` and then adds ``z``. qatcore's gradients always belong to
the output that the forward pass computed.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import qatcore
from qatcore._fake_quantize import resolve_kernel

learnable_reference = qatcore.fake_quantize_learnable_reference

# (quant_min, quant_max, zero points cycled over the channels). The affine
# zero points are float and include those that round half to even (2.5 to 2,
# 3.5 to 4) and clamp (-0.7 to 0, 300 to 255).
SCHEMES = {
    "symmetric-int8": (-128, 127, [0.0]),
    "affine-uint8": (0, 255, [2.7, 3.5, -0.7, 300.0, 2.5, 17.0]),
}
AXES = {"per-tensor": None, "axis-0": 0, "axis-1": 1, "axis-3": 3}
SHAPE = (6, 5, 4, 7)


def _random_case(
    axis: int | None, zero_points: list[float], seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=generator) * 3
    channels = 1 if axis is None else SHAPE[axis]
    scale = torch.rand(channels, generator=generator) * 0.05 + 0.02
    zero_point = torch.tensor([zero_points[c % len(zero_points)] for c in range(channels)])
    grad_output = torch.randn(SHAPE, generator=generator)
    return x, scale, zero_point, grad_output


def _run(
    kernel: str,
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_range: tuple[int, int],
    axis: int | None,
    grad_factor: float,
    grad_output: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    zero_point = zero_point.detach().clone().requires_grad_()
    if kernel == "torch.ao" and axis is None:
        out = torch._fake_quantize_learnable_per_tensor_affine(
            x, scale, zero_point, *quant_range, grad_factor
        )
    elif kernel == "torch.ao":
        out = torch._fake_quantize_learnable_per_channel_affine(
            x, scale, zero_point, axis, *quant_range, grad_factor
        )
    else:
        out = learnable_reference(x, scale, zero_point, *quant_range, axis, grad_factor)
    out.backward(grad_output)
    return out.detach(), x.grad, scale.grad, zero_point.grad


def _has_tie(x: torch.Tensor, scale: torch.Tensor, axis: int | None) -> bool:
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    scaled = x * torch.reciprocal(scale).reshape(shape)
    return bool((scaled - scaled.floor() == 0.5).any())


# -- parity with torch.ao ---------------------------------------------------------


@pytest.mark.parametrize("grad_factor", [1.0, 0.37], ids=["factor-1", "factor-0.37"])
@pytest.mark.parametrize("axis", list(AXES.values()), ids=list(AXES))
@pytest.mark.parametrize("scheme", list(SCHEMES), ids=list(SCHEMES))
def test_reference_matches_torch_ao_bit_for_bit(
    scheme: str, axis: int | None, grad_factor: float
) -> None:
    quant_min, quant_max, zero_points = SCHEMES[scheme]
    if axis is None:
        # torch.ao's per-tensor backward rounds 2.5 half up; see below.
        zero_points = [zero_points[-1]]
    x, scale, zero_point, grad_output = _random_case(axis, zero_points, seed=len(scheme))
    assert not _has_tie(x, scale, axis)
    quant_range = (quant_min, quant_max)

    expected = _run("torch.ao", x, scale, zero_point, quant_range, axis, grad_factor, grad_output)
    actual = _run("reference", x, scale, zero_point, quant_range, axis, grad_factor, grad_output)

    for name, got, want in zip(
        ("output", "x grad", "scale grad", "zero-point grad"), actual, expected
    ):
        assert got.dtype == want.dtype, name
        assert torch.equal(got, want), f"{name} differs from torch.ao"


@pytest.mark.parametrize(
    "zero_point", [2.7, 3.5, -0.7, 300.0], ids=["up", "tie-up", "neg", "above"]
)
def test_per_tensor_float_zero_point_matches_torch_ao(zero_point: float) -> None:
    x, scale, _, grad_output = _random_case(None, [0.0], seed=5)
    args = (x, scale, torch.tensor([zero_point]), (0, 255), None, 1.0, grad_output)

    expected = _run("torch.ao", *args)
    actual = _run("reference", *args)

    for got, want in zip(actual, expected):
        assert torch.equal(got, want)


def test_zero_point_tie_follows_forward() -> None:
    # The forward rounds 2.5 half to even, to 2. torch.ao's per-tensor
    # backward adds 0.5 and truncates, to 3, and so differs from both its
    # own forward and its per-channel backward.
    x, scale, _, grad_output = _random_case(None, [0.0], seed=6)
    quant_range = (0, 255)

    ours = _run("reference", x, scale, torch.tensor([2.5]), quant_range, None, 1.0, grad_output)
    as_two = _run("reference", x, scale, torch.tensor([2.0]), quant_range, None, 1.0, grad_output)
    ao_tensor = _run("torch.ao", x, scale, torch.tensor([2.5]), quant_range, None, 1.0, grad_output)
    ao_channel = _run(
        "torch.ao",
        x.unsqueeze(0),
        scale,
        torch.tensor([2.5]),
        quant_range,
        0,
        1.0,
        grad_output.unsqueeze(0),
    )

    for name, got, want in zip(("output", "x", "scale", "zero point"), ours, as_two):
        assert torch.equal(got, want), name
    assert torch.equal(ours[0], ao_tensor[0])
    assert not torch.equal(ours[2], ao_tensor[2])
    assert torch.equal(ours[2], ao_channel[2])
    assert torch.equal(ours[3], ao_channel[3])


def test_tie_with_odd_zero_point_follows_forward() -> None:
    # x / s = 95.5 rounds half to even to 96, so the code is 96 + 3 = 99 and
    # the output is 96 * s. torch.ao's backward rounds 95.5 + 3 = 98.5 to 98,
    # the code of 95 * s, and so gets the sign of the scale gradient wrong.
    scale = torch.tensor([2.0**-5])
    x = torch.tensor([95.5 * 2.0**-5])
    zero_point = torch.tensor([3.0])
    grad_output = torch.ones(1)

    ours = _run("reference", x, scale, zero_point, (0, 255), None, 1.0, grad_output)
    theirs = _run("torch.ao", x, scale, zero_point, (0, 255), None, 1.0, grad_output)

    assert ours[0].item() == 96 * 2.0**-5
    assert torch.equal(ours[0], theirs[0])
    assert ours[2].item() == 0.5  # round(95.5) - 95.5
    assert theirs[2].item() == -0.5


# -- hand-computed gradients --------------------------------------------------------

# Finite differences say nothing about a straight-through estimator: the
# output is a step function of x, s and z inside the range, so its true
# derivative is 0 almost everywhere. The tests below compare against sums
# worked out by hand on a few elements instead, and use finite differences
# only outside the range, where the output (quant_min - z) * s or
# (quant_max - z) * s is linear in s.


def test_gradients_match_hand_computed_sums() -> None:
    # s = 0.5, z = 1, range [0, 7]. x / s = -4, 0.6, 2.2, 10, so the codes
    # are -3 (below), 2 and 3 (inside) and 11 (above).
    x = torch.tensor([-2.0, 0.3, 1.1, 5.0], requires_grad=True)
    scale = torch.tensor(0.5, requires_grad=True)
    zero_point = torch.tensor(1.0, requires_grad=True)

    out = learnable_reference(x, scale, zero_point, 0, 7, None, 0.25)
    out.backward(torch.tensor([1.0, 2.0, -1.0, 3.0]))

    assert out.tolist() == [-0.5, 0.5, 1.0, 3.0]
    assert x.grad is not None
    assert scale.grad is not None
    assert zero_point.grad is not None
    assert x.grad.tolist() == [0.0, 2.0, -1.0, 0.0]
    # Below: 1 * (0 - 1); inside: 2 * (1 - 0.6) and -1 * (2 - 2.2); above: 3 * (7 - 1).
    expected_scale = 0.25 * (-1.0 + 2 * 0.4 + 0.2 + 3 * 6.0)
    assert scale.grad.item() == pytest.approx(expected_scale, rel=1e-6)
    # Outside only: -grad * s for the first and the last element.
    assert zero_point.grad.item() == pytest.approx(0.25 * (-0.5 - 1.5), rel=1e-6)


@pytest.mark.parametrize("side", ["below", "above"])
def test_scale_gradient_outside_range_matches_finite_difference(side: str) -> None:
    sign = -1.0 if side == "below" else 1.0
    x = sign * torch.linspace(20.0, 30.0, 11, dtype=torch.float64)
    scale = torch.tensor(0.05, dtype=torch.float32)
    zero_point = torch.tensor(3.0)
    step = 1e-4

    def loss(s: torch.Tensor) -> torch.Tensor:
        return learnable_reference(x, s, zero_point, -8, 7, None).sum()

    leaf = scale.clone().requires_grad_()
    loss(leaf).backward()
    difference = (loss(scale + step) - loss(scale - step)) / (2 * step)

    assert leaf.grad is not None
    assert leaf.grad.item() == pytest.approx(difference.item(), rel=1e-3)
    assert leaf.grad.item() == 11 * ((-8 if side == "below" else 7) - 3)


def test_gradient_mask_follows_rounded_code() -> None:
    codes = torch.tensor([-9, -8.6, -8.4, -8, -1, 0, 7, 7.4, 7.6, 9])
    x = (codes * 0.1).requires_grad_()

    learnable_reference(x, torch.tensor(0.1), torch.tensor(0.0), -8, 7).sum().backward()

    assert x.grad is not None
    assert x.grad.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]


@pytest.mark.parametrize(
    ("zero_point", "expected"),
    [(2.7, 3), (2.5, 2), (3.5, 4), (-0.7, 0), (300.0, 255)],
    ids=["up", "tie-down", "tie-up", "negative", "above-range"],
)
def test_float_zero_point_acts_as_rounded_clamped_integer(zero_point: float, expected: int) -> None:
    x = torch.linspace(-2, 14, 41)
    scale = torch.tensor(0.05)
    grad_output = torch.randn(41, generator=torch.Generator().manual_seed(0))

    as_float = _run(
        "reference", x, scale, torch.tensor(zero_point), (0, 255), None, 1.0, grad_output
    )
    as_integer = _run(
        "reference", x, scale, torch.tensor(float(expected)), (0, 255), None, 1.0, grad_output
    )
    per_channel = _run(
        "reference",
        x.repeat(3, 1),
        scale.repeat(3),
        torch.full((3,), zero_point),
        (0, 255),
        0,
        1.0,
        grad_output.repeat(3, 1),
    )
    plain = qatcore.fake_quantize_reference(
        x, scale, torch.tensor(expected, dtype=torch.int32), 0, 255
    )

    assert torch.equal(as_float[0], plain)
    for got, want in zip(as_float, as_integer):
        assert torch.equal(got, want)
    for channel in range(3):
        assert torch.equal(per_channel[0][channel], as_float[0])
        assert torch.equal(per_channel[2][channel], as_float[2])
        assert torch.equal(per_channel[3][channel], as_float[3])


def test_nan_input_adds_nothing_to_qparam_gradients() -> None:
    x = torch.tensor([0.3, math.nan, -math.inf, math.inf])
    scale = torch.tensor(0.1, requires_grad=True)
    zero_point = torch.tensor(0.0, requires_grad=True)

    learnable_reference(x, scale, zero_point, -8, 7).backward(torch.ones(4))
    finite = torch.tensor([0.3, 1e9, -1e9])  # inf counts as below and above the range
    expected = _run(
        "reference", finite, torch.tensor(0.1), torch.tensor(0.0), (-8, 7), None, 1.0, torch.ones(3)
    )

    assert scale.grad is not None and zero_point.grad is not None
    assert torch.equal(scale.grad, expected[2])
    assert torch.equal(zero_point.grad, expected[3])


@pytest.mark.parametrize("value", [0.0, -0.3], ids=["zero", "negative"])
def test_scale_below_eps_is_clamped_and_still_trained(value: float) -> None:
    eps = torch.finfo(torch.float32).eps
    x = torch.tensor([1e-7, -2e-7, 5e-6])
    scale = torch.tensor(value, requires_grad=True)

    out = learnable_reference(x, scale, torch.tensor(0.0), -128, 127)
    out.backward(torch.ones(3))

    expected = qatcore.fake_quantize_reference(x, torch.tensor(eps), torch.tensor(0), -128, 127)
    assert torch.equal(out.detach(), expected)
    assert scale.grad is not None
    assert scale.grad.item() != 0.0


def test_non_finite_scale_raises() -> None:
    with pytest.raises(ValueError, match="learnable fake quantization needs finite scales"):
        learnable_reference(torch.randn(4), torch.tensor(math.nan), torch.tensor(0.0), -8, 7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_input_dtypes_keep_float32_qparam_gradients(dtype: torch.dtype) -> None:
    x = (torch.randn(4, 6, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    x.requires_grad_()
    scale = torch.full((4,), 0.05, requires_grad=True)
    zero_point = torch.full((4,), 3.0, requires_grad=True)

    out = learnable_reference(x, scale, zero_point, 0, 255, 0)
    out.sum().backward()

    assert out.dtype == dtype
    assert x.grad is not None and x.grad.dtype == dtype
    assert scale.grad is not None and scale.grad.dtype == torch.float32
    assert zero_point.grad is not None and zero_point.grad.dtype == torch.float32


def test_empty_input_gives_zero_gradients() -> None:
    scale = torch.full((3,), 0.1, requires_grad=True)
    zero_point = torch.zeros(3, requires_grad=True)

    out = learnable_reference(torch.empty(0, 3), scale, zero_point, -8, 7, 1)
    out.sum().backward()

    assert out.shape == (0, 3)
    assert scale.grad is not None and scale.grad.tolist() == [0.0, 0.0, 0.0]
    assert zero_point.grad is not None and zero_point.grad.tolist() == [0.0, 0.0, 0.0]


# -- FakeQuantize -------------------------------------------------------------------

pytest.importorskip("qatcore_observers")

AFFINE = qatcore.QuantSpec(signed=False, symmetric=False, learnable=True)
SYMMETRIC_PER_CHANNEL = qatcore.QuantSpec(axis=0, learnable=True)


def test_learnable_qparams_are_float32_parameters() -> None:
    affine = qatcore.FakeQuantize(AFFINE)
    symmetric = qatcore.FakeQuantize(SYMMETRIC_PER_CHANNEL, channels=4)
    unsigned = qatcore.FakeQuantize(qatcore.QuantSpec(signed=False, learnable=True))

    assert dict(affine.named_parameters()).keys() == {"scale", "zero_point"}
    assert affine.zero_point.dtype == torch.float32
    assert dict(symmetric.named_parameters()).keys() == {"scale"}
    assert symmetric.scale.shape == (4,)
    assert "zero_point" in dict(symmetric.named_buffers())
    assert symmetric.zero_point.tolist() == [0.0] * 4
    assert unsigned.zero_point.item() == 128.0


def test_plain_spec_keeps_buffers() -> None:
    fake_quant = qatcore.FakeQuantize(qatcore.QuantSpec())

    assert list(fake_quant.parameters()) == []
    assert fake_quant.zero_point.dtype == torch.int32


def test_observer_sets_qparams_until_frozen() -> None:
    fake_quant = qatcore.FakeQuantize(AFFINE)
    optimizer = torch.optim.SGD(fake_quant.parameters(), lr=0.1)
    x = torch.linspace(-1.0, 3.0, 50)

    fake_quant(x).square().sum().backward()
    observed = fake_quant.scale.detach().clone()
    assert observed.item() == pytest.approx(4.0 / 255)
    optimizer.step()
    fake_quant(x)
    assert torch.equal(fake_quant.scale.detach(), observed)

    qatcore.freeze_observers(fake_quant)
    optimizer.zero_grad()
    fake_quant(x).square().sum().backward()
    optimizer.step()
    fake_quant(x)
    assert not torch.equal(fake_quant.scale.detach(), observed)


def test_qparams_are_clamped_and_rounded() -> None:
    fake_quant = qatcore.FakeQuantize(AFFINE)
    with torch.no_grad():
        fake_quant.scale.fill_(-1.0)
        fake_quant.zero_point.fill_(2.5)

    scale, zero_point = fake_quant.qparams()

    assert scale.dtype == torch.float32
    assert scale.item() == torch.finfo(torch.float32).eps
    assert zero_point.dtype == torch.int32
    assert zero_point.item() == 2


@pytest.mark.parametrize(
    ("spec", "shape", "numel_per_scale"),
    [(AFFINE, (8, 10), 80), (SYMMETRIC_PER_CHANNEL, (4, 3, 5), 15), (AFFINE, (0, 2), 1)],
    ids=["per-tensor", "per-channel", "empty"],
)
def test_grad_factor_follows_lsq(
    spec: qatcore.QuantSpec, shape: tuple[int, ...], numel_per_scale: int
) -> None:
    fake_quant = qatcore.FakeQuantize(spec, channels=shape[0] if spec.per_channel else None)

    factor = fake_quant.grad_factor(torch.empty(shape))

    assert factor == 1 / math.sqrt(numel_per_scale * spec.quant_max)


def test_half_cast_keeps_float32_qparams() -> None:
    learnable = qatcore.FakeQuantize(AFFINE)
    plain = qatcore.FakeQuantize(qatcore.QuantSpec())
    with torch.no_grad():
        learnable.scale.fill_(0.1234567)
        plain.scale.fill_(0.1234567)
    scale = learnable.scale

    learnable.half()
    plain.to(torch.bfloat16)

    assert learnable.scale is scale
    assert learnable.scale.dtype == torch.float32
    assert learnable.zero_point.dtype == torch.float32
    assert learnable.scale.item() == torch.tensor(0.1234567).item()
    assert plain.scale.item() == torch.tensor(0.1234567).item()
    assert plain.zero_point.dtype == torch.int32


# -- registry -------------------------------------------------------------------------


def test_learnable_kernel_has_its_own_table() -> None:
    registry = qatcore.Registry(plugin="test")

    def plain(*args: object) -> torch.Tensor:
        raise NotImplementedError

    def learnable(*args: object) -> torch.Tensor:
        raise NotImplementedError

    registry.register_kernel("fast", "cpu", plain)
    registry.register_kernel("fast", "cpu", learnable, learnable=True)

    assert registry.kernels[("fast", "cpu")] is plain
    assert registry.learnable_kernels[("fast", "cpu")] is learnable
    assert registry.registrations("test") == {
        "kernels": [("fast", "cpu")],
        "learnable_kernels": [("fast", "cpu")],
    }
    with pytest.raises(qatcore.RegistryError, match="conflicts"):
        registry.register_kernel("fast", "cpu", learnable, learnable=True)
    with pytest.raises(qatcore.RegistryError, match="reference"):
        registry.register_kernel("reference", "cpu", learnable, learnable=True)


def test_resolve_learnable_kernel() -> None:
    assert resolve_kernel("reference", "cpu", learnable=True) is learnable_reference
    assert resolve_kernel("default", "meta", learnable=True) is learnable_reference
    with pytest.raises(KeyError, match="no learnable kernel registered for \\('nowhere', 'cpu'\\)"):
        resolve_kernel("nowhere", "cpu", learnable=True)


def test_user_learnable_kernel_is_used(fresh_plugin_manager: object) -> None:
    calls = []

    def counting(*args: object) -> torch.Tensor:
        calls.append(len(args))
        return learnable_reference(*args)  # type: ignore[arg-type]

    qatcore.register_kernel("counting", "cpu", counting, learnable=True)
    spec = qatcore.QuantSpec(kernel="counting", learnable=True)
    qatcore.FakeQuantize(spec)(torch.randn(5))

    assert calls == [7]


# -- training through swap_modules ----------------------------------------------------

pytest.importorskip("qatcore_conv")

LEARNABLE_QCONFIG = qatcore.QConfig(
    weight=qatcore.QuantSpec(axis=qatcore.OUTPUT_CHANNELS, learnable=True),
    activation=qatcore.QuantSpec(signed=False, symmetric=False, learnable=True),
)


def _conv_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 1, 3))


def test_swapped_conv_trains_scales_and_loss_drops() -> None:
    float_model = _conv_model()
    inputs = torch.randn(16, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = 0.5 * float_model(inputs)
    model = qatcore.swap_modules(float_model, LEARNABLE_QCONFIG)
    model.train()
    model(inputs)  # one observed batch initialises the qparams
    qatcore.freeze_observers(model)
    scale = model[0].weight_fake_quant.scale
    initial_scale = scale.detach().clone()
    qparams = [p for name, p in model.named_parameters() if "fake_quant" in name]
    weights = [p for name, p in model.named_parameters() if "fake_quant" not in name]
    # Scales are a few thousandths, so they take a far smaller step than the weights.
    optimizer = torch.optim.Adam([{"params": weights}, {"params": qparams, "lr": 1e-5}], lr=1e-2)

    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = (model(inputs) - target).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert scale.grad is not None
    assert not torch.equal(scale.detach(), initial_scale)
    assert bool((scale > 0).all())
    assert losses[-1] < 0.5 * losses[0]


def test_state_dict_round_trip_into_fresh_model() -> None:
    model = qatcore.swap_modules(_conv_model(), LEARNABLE_QCONFIG)
    inputs = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    model.train()
    model(inputs)
    with torch.no_grad():
        model[0].weight_fake_quant.scale.mul_(1.5)
        model[0].output_fake_quant.zero_point.add_(0.4)
    model.eval()

    restored = qatcore.swap_modules(_conv_model(), LEARNABLE_QCONFIG)
    restored.load_state_dict(model.state_dict(), strict=True)
    restored.eval()

    assert "0.weight_fake_quant.scale" in dict(model.named_parameters())
    assert torch.equal(restored(inputs), model(inputs))
    assert torch.equal(
        restored[0].output_fake_quant.zero_point, model[0].output_fake_quant.zero_point
    )
