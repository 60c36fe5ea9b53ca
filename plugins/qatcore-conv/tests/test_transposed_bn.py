"""Fused QAT transposed convs: ReLU fusion, BN folding against torch.ao, gamma = 0, to_float, swap.

The parity oracle rests on an identity: a transposed conv with stride 1 and
groups 1, padding p, dilation d and kernel k computes the conv whose weight
is ``w.transpose(0, 1).flip(spatial dims)`` with padding ``d * (k - 1) - p``.
torch.ao's ConvBn modules built from that conv, on their slow path, are the
reference for the BN fold.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.quantization as tq
import torch.nn.functional as F
from torch import nn

import qatcore

qatcore_conv = pytest.importorskip("qatcore_conv")
pytest.importorskip("qatcore_observers")

DIMS = (1, 2, 3)
DIM_IDS = ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
FLOAT_TYPES = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN_TYPES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
FUNCTIONAL = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
SPATIAL = {1: (9,), 2: (6, 5), 3: (4, 5, 3)}
OURS = {
    (dim, relu): getattr(qatcore_conv, f"ConvTransposeBn{'ReLU' if relu else ''}{dim}d")
    for dim, relu in itertools.product(DIMS, (False, True))
}
RELU_FUSED = {dim: getattr(qatcore_conv, f"ConvTransposeReLU{dim}d") for dim in DIMS}
THEIRS = {
    (1, False): (nni.ConvBn1d, nniqat.ConvBn1d),
    (2, False): (nni.ConvBn2d, nniqat.ConvBn2d),
    (3, False): (nni.ConvBn3d, nniqat.ConvBn3d),
    (1, True): (nni.ConvBnReLU1d, nniqat.ConvBnReLU1d),
    (2, True): (nni.ConvBnReLU2d, nniqat.ConvBnReLU2d),
    (3, True): (nni.ConvBnReLU3d, nniqat.ConvBnReLU3d),
}

CHANNELS = 4
KERNEL = 3
GAMMA = [0.0, 1.0, 0.5, 2.0]
WEIGHT_SPEC = qatcore.QuantSpec(bits=8, signed=True, symmetric=True, axis=qatcore.OUTPUT_CHANNELS)
OUTPUT_SPEC = qatcore.QuantSpec(bits=8, signed=False, symmetric=False)
QCONFIG = qatcore.QConfig(weight=WEIGHT_SPEC)
AO_QCONFIG = tq.QConfig(
    activation=tq.NoopObserver,
    weight=tq.FakeQuantize.with_args(
        observer=tq.MovingAveragePerChannelMinMaxObserver,
        quant_min=-128,
        quant_max=127,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
    ),
)

# conv and conv_transpose kernels sum in different orders, so the oracle
# matches up to float32 rounding. Errors are relative to the largest value
# of the reference tensor. Measured worst case on torch 2.13 CPU: 4.7e-6
# (gamma gradient), 3e-7 (running statistics), 9.4e-6 per-channel relative
# (weight scales after the first SGD step).
PARITY_TOLERANCE = 1e-5
STATISTICS_TOLERANCE = 1e-6
SCALE_RTOL = 2e-5
# The fold rescales the output instead of normalizing it, so with fake
# quantization off it equals conv_transpose -> BN up to float32 rounding.
FLOAT_TOLERANCE = 1e-5

# Transposed conv geometries for the gamma = 0 and frozen-BN cases. Each one
# runs for 1d, 2d and 3d.
GEOMETRIES = {
    "stride-2": {"stride": 2},
    "output-padding": {"stride": 2, "output_padding": 1},
    "groups-2": {"groups": 2},
    "dilation": {"dilation": 2, "padding": 2},
    "all": {"stride": 2, "padding": 1, "output_padding": 1, "dilation": 2, "groups": 2},
}


def _members(
    dim: int, relu: bool, bias: bool = True, dtype: torch.dtype = torch.float32, **conv_kwargs
) -> tuple[nn.Module, ...]:
    """Return float (ConvTranspose, BatchNorm[, ReLU]) with GAMMA and set running statistics."""
    torch.manual_seed(0)
    conv = FLOAT_TYPES[dim](CHANNELS, CHANNELS, KERNEL, bias=bias, dtype=dtype, **conv_kwargs)
    bn = BN_TYPES[dim](CHANNELS, dtype=dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(GAMMA))
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return (conv, bn, nn.ReLU()) if relu else (conv, bn)


def _ours(members: tuple[nn.Module, ...], qconfig: qatcore.QConfig = QCONFIG) -> nn.Module:
    dim = members[0].weight.dim() - 2
    relu = len(members) == 3
    return OURS[(dim, relu)].from_float(copy.deepcopy(members), qconfig)


def _float_reference(members: tuple[nn.Module, ...]) -> nn.Sequential:
    return nn.Sequential(*copy.deepcopy(members))


def _batch(dim: int, step: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(2, CHANNELS, *SPATIAL[dim], generator=generator, dtype=dtype) * (1 + step)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Return max |actual - expected| over max(1, max |expected|)."""
    assert actual.shape == expected.shape
    scale = max(1.0, expected.abs().max().item())
    return (actual.double() - expected.double()).abs().max().item() / scale


def _spatial_dims(dim: int) -> list[int]:
    return list(range(2, 2 + dim))


def _equivalent_conv(conv_transpose: nn.Module) -> nn.Module:
    """Return the conv that computes ``conv_transpose`` (stride 1, groups 1)."""
    dim = conv_transpose.weight.dim() - 2
    (padding,) = set(conv_transpose.padding)
    (dilation,) = set(conv_transpose.dilation)
    conv = CONV_TYPES[dim](
        conv_transpose.in_channels,
        conv_transpose.out_channels,
        KERNEL,
        padding=dilation * (KERNEL - 1) - padding,
        dilation=dilation,
        bias=conv_transpose.bias is not None,
    )
    with torch.no_grad():
        conv.weight.copy_(conv_transpose.weight.transpose(0, 1).flip(_spatial_dims(dim)))
        if conv.bias is not None:
            conv.bias.copy_(conv_transpose.bias)
    return conv


def _theirs(members: tuple[nn.Module, ...]) -> nn.Module:
    dim = members[0].weight.dim() - 2
    relu = len(members) == 3
    float_type, qat_type = THEIRS[(dim, relu)]
    conv = _equivalent_conv(members[0])
    fused = float_type(conv, *copy.deepcopy(members[1:]))
    fused.qconfig = AO_QCONFIG
    qat = qat_type.from_float(fused)
    qat._enable_slow_path_for_better_numerical_stability = True
    return qat


def _train(qat: nn.Module, dim: int, steps: int = 3) -> None:
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.05)
    for step in range(steps):
        qat(_batch(dim, step, qat.weight.dtype)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


# -- parity with torch.ao ----------------------------------------------------------


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(
    ("padding", "dilation"), [(1, 1), (0, 1), (1, 2)], ids=["padding", "no-padding", "dilation"]
)
def test_bn_fold_matches_torch_ao_slow_path(
    dim: int, relu: bool, bias: bool, padding: int, dilation: int
) -> None:
    members = _members(dim, relu, bias, padding=padding, dilation=dilation)
    ours, theirs = _ours(members), _theirs(members)
    ours_optimizer = torch.optim.SGD(ours.parameters(), lr=0.05)
    theirs_optimizer = torch.optim.SGD(theirs.parameters(), lr=0.05)
    spatial = _spatial_dims(dim)

    for step in range(5):
        if step == 3:
            ours.freeze_bn_stats()
            theirs.freeze_bn_stats()
        x = _batch(dim, step)
        x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
        upstream = torch.randn(y_ours.shape, generator=torch.Generator().manual_seed(99))
        (y_ours * upstream).sum().backward()
        (y_theirs * upstream).sum().backward()

        their_weight_grad = theirs.weight.grad.transpose(0, 1).flip(spatial)
        assert _relative_error(y_ours, y_theirs) <= PARITY_TOLERANCE, step
        assert _relative_error(x_ours.grad, x_theirs.grad) <= PARITY_TOLERANCE, step
        assert _relative_error(ours.weight.grad, their_weight_grad) <= PARITY_TOLERANCE, step
        assert _relative_error(ours.bn.weight.grad, theirs.bn.weight.grad) <= PARITY_TOLERANCE
        assert _relative_error(ours.bn.running_mean, theirs.bn.running_mean) <= (
            STATISTICS_TOLERANCE
        ), step
        assert _relative_error(ours.bn.running_var, theirs.bn.running_var) <= (
            STATISTICS_TOLERANCE
        ), step
        if step == 0:
            # Both fold the same weight, so the folded weights are a permutation
            # of each other when the running variances are equal.
            # NOTE: those come from conv and conv_transpose outputs and were
            # bit for bit equal after one batch in every case on torch 2.13 CPU.
            assert torch.equal(ours.weight_fake_quant.scale, theirs.weight_fake_quant.scale)
        else:
            torch.testing.assert_close(
                ours.weight_fake_quant.scale,
                theirs.weight_fake_quant.scale,
                rtol=SCALE_RTOL,
                atol=0,
            )

        ours_optimizer.step()
        theirs_optimizer.step()
        ours_optimizer.zero_grad()
        theirs_optimizer.zero_grad()

    their_weight = theirs.weight.detach().transpose(0, 1).flip(spatial)
    assert _relative_error(ours.weight.detach(), their_weight) <= PARITY_TOLERANCE


# -- gamma = 0 and BN statistics ---------------------------------------------------


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_zero_gamma_matches_float_without_fake_quant(dim: int, geometry: dict) -> None:
    members = _members(dim, relu=False, **geometry)
    qat = _ours(members)
    qatcore.enable_fake_quant(qat, enabled=False)
    reference = _float_reference(members)
    x = _batch(dim, 1)
    x_qat, x_reference = x.clone().requires_grad_(), x.clone().requires_grad_()

    output = qat(x_qat)
    expected = reference(x_reference)

    assert _relative_error(output, expected) <= FLOAT_TOLERANCE
    beta = reference[1].bias.detach()[0]
    assert torch.equal(output[:, 0], beta.expand_as(output[:, 0]))
    torch.testing.assert_close(qat.bn.running_mean, reference[1].running_mean, rtol=0, atol=0)
    torch.testing.assert_close(qat.bn.running_var, reference[1].running_var, rtol=0, atol=0)
    assert int(qat.bn.num_batches_tracked) == 1
    output.square().sum().backward()
    assert torch.isfinite(x_qat.grad).all()
    assert torch.isfinite(qat.weight.grad).all()
    assert torch.isfinite(qat.bn.weight.grad).all()


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_zero_gamma_stays_finite_with_fake_quant(dim: int, geometry: dict) -> None:
    qat = _ours(_members(dim, relu=True, **geometry))
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.05)

    for step in range(4):
        x = _batch(dim, step).requires_grad_()
        output = qat(x)
        output.square().mean().backward()

        assert torch.isfinite(output).all(), step
        assert torch.isfinite(x.grad).all(), step
        assert torch.isfinite(qat.weight.grad).all(), step
        assert torch.isfinite(qat.bn.weight.grad).all(), step
        assert torch.isfinite(qat.weight_fake_quant.scale).all(), step
        assert torch.isfinite(qat.bn.running_var).all(), step
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
@pytest.mark.parametrize("mode", ["frozen", "eval"])
def test_frozen_or_eval_matches_eval_batchnorm(dim: int, relu: bool, mode: str) -> None:
    members = _members(dim, relu, **GEOMETRIES["all"])
    qat = _ours(members)
    qatcore.enable_fake_quant(qat, enabled=False)
    reference = _float_reference(members).eval()
    if mode == "frozen":
        qatcore.freeze_bn_stats(qat)
    else:
        qat.eval()
    running_mean = qat.bn.running_mean.clone()
    running_var = qat.bn.running_var.clone()
    x = _batch(dim, 2)

    output = qat(x)

    assert qat.training == (mode == "frozen")
    assert not qat.bn.training
    assert _relative_error(output, reference(x)) <= FLOAT_TOLERANCE
    assert torch.equal(qat.bn.running_mean, running_mean)
    assert torch.equal(qat.bn.running_var, running_var)


def test_train_keeps_frozen_bn_in_eval() -> None:
    qat = _ours(_members(2, relu=True))

    qat.freeze_bn_stats()
    qat.train()

    assert qat.training
    assert not qat.bn.training
    qat.freeze_bn_stats(frozen=False)
    assert qat.bn.training


# -- grouped fold ----------------------------------------------------------------------


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
def test_grouped_fold_scales_per_output_channel(dim: int, relu: bool) -> None:
    qat = _ours(_members(dim, relu, groups=2, stride=2))
    weight = qat.weight.detach().clone()

    qat(_batch(dim, 0))

    # Output channel c = g * columns + j is column j of the rows of group g.
    bn = qat.bn
    factor = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    rows = CHANNELS // 2
    columns = CHANNELS // 2
    eps = torch.finfo(torch.float32).eps
    scale = qat.weight_fake_quant.scale
    assert scale.shape == (CHANNELS,)
    for channel in range(CHANNELS):
        group, column = divmod(channel, columns)
        folded = weight[group * rows : (group + 1) * rows, column] * factor[channel]
        expected = max(folded.abs().max().item() / 127.5, eps)
        assert scale[channel].item() == pytest.approx(expected, rel=1e-6), f"channel {channel}"
    # A gamma of 0 makes the folded channel all zero, so its scale is the eps floor.
    assert scale[0].item() == eps


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_grouped_fold_matches_float_for_every_channel(dim: int) -> None:
    members = _members(dim, relu=False, groups=2)
    qat = _ours(members)
    qatcore.enable_fake_quant(qat, enabled=False)
    qat.eval()
    reference = _float_reference(members).eval()
    x = _batch(dim, 3)

    output = qat(x)

    expected = reference(x)
    for channel in range(CHANNELS):
        error = _relative_error(output[:, channel], expected[:, channel])
        assert error <= FLOAT_TOLERANCE, f"channel {channel}"


# -- to_float --------------------------------------------------------------------------


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
@pytest.mark.parametrize("groups", [1, 2], ids=["groups-1", "groups-2"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_to_float_matches_eval_without_fake_quant(
    dim: int, relu: bool, groups: int, bias: bool
) -> None:
    qat = _ours(_members(dim, relu, bias, groups=groups, stride=2, output_padding=1))
    _train(qat, dim)
    qat.eval()
    qatcore.enable_fake_quant(qat, enabled=False)
    x = _batch(dim, 7)

    folded = qat.to_float()

    expected_types = [FLOAT_TYPES[dim], nn.Identity] + ([nn.ReLU] if relu else [])
    assert [type(module) for module in folded] == expected_types
    assert not folded.training
    conv = folded[0]
    assert conv.bias is not None
    for attribute in ("kernel_size", "stride", "padding", "output_padding", "dilation", "groups"):
        assert getattr(conv, attribute) == getattr(qat, attribute), attribute
    assert conv.weight.data_ptr() != qat.weight.data_ptr()
    output, expected = folded(x), qat(x)
    assert (output - expected).abs().max().item() <= 1e-6 * expected.abs().max().item()


def test_to_float_keeps_training_mode() -> None:
    qat = _ours(_members(2, relu=True))

    folded = qat.to_float()

    assert folded.training
    assert all(module.training for module in folded)


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_float64_end_to_end(dim: int) -> None:
    members = _members(dim, relu=True, dtype=torch.float64, stride=2, groups=2)
    qat = _ours(members)
    _train(qat, dim)
    x = _batch(dim, 5, torch.float64)

    output = qat(x)
    qat.eval()
    qatcore.enable_fake_quant(qat, enabled=False)
    folded = qat.to_float()

    assert output.dtype == torch.float64
    assert torch.isfinite(output).all()
    assert qat.weight_fake_quant.scale.dtype == torch.float32
    assert folded[0].weight.dtype == torch.float64
    assert folded[0].bias.dtype == torch.float64
    assert (folded(x) - qat(x)).abs().max().item() <= 1e-12


# -- output_size -----------------------------------------------------------------------


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
@pytest.mark.parametrize("mode", ["training", "eval"])
def test_output_size_through_bn_fold(dim: int, mode: str) -> None:
    members = _members(dim, relu=True, stride=2)
    qat = _ours(members)
    qatcore.enable_fake_quant(qat, enabled=False)
    conv, bn, relu = _float_reference(members)
    if mode == "eval":
        qat.eval()
        bn.eval()
    x = _batch(dim, 1)
    # The largest size stride 2 allows: one more than the default along every axis.
    size = [(extent - 1) * 2 + KERNEL + 1 for extent in SPATIAL[dim]]

    output = qat(x, output_size=size)

    assert output.shape == (2, CHANNELS, *size)
    expected = relu(bn(conv(x, output_size=size)))
    assert _relative_error(output, expected) <= FLOAT_TOLERANCE
    assert torch.allclose(qat.bn.running_mean, bn.running_mean, rtol=1e-6, atol=1e-7)
    assert qat(x).shape[2:] == conv(x).shape[2:]
    with pytest.raises(ValueError, match="requested an output size"):
        qat(x, output_size=[extent + 1 for extent in size])


# -- ReLU fusion -------------------------------------------------------------------------


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_relu_runs_before_output_fake_quant(dim: int) -> None:
    torch.manual_seed(0)
    members = (FLOAT_TYPES[dim](CHANNELS, 6, KERNEL, stride=2, groups=2), nn.ReLU())
    qconfig = qatcore.QConfig(weight=WEIGHT_SPEC, activation=OUTPUT_SPEC)
    qat = RELU_FUSED[dim].from_float(members, qconfig, name="up")
    x = _batch(dim, 0)
    qat(x)
    qat.eval()

    output = qat(x, output_size=None)

    weight = qat.fake_quantized_weight()
    raw = FUNCTIONAL[dim](x, weight, qat.bias, stride=2, groups=2)
    assert qat.weight is members[0].weight
    assert qat.activation is members[1]
    assert qat.weight_fake_quant.scale.shape == (6,)
    assert torch.equal(output, qat.output_fake_quant(torch.relu(raw)))
    assert output.min().item() >= 0


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_relu_fused_accepts_unbatched_input(dim: int) -> None:
    qconfig = qatcore.QConfig(weight=WEIGHT_SPEC, activation=OUTPUT_SPEC)
    qat = RELU_FUSED[dim](CHANNELS, 6, KERNEL, stride=2, qconfig=qconfig)
    x = _batch(dim, 0)[:1]
    qat(x)
    qat.eval()

    assert torch.equal(qat(x[0]), qat(x)[0])


def test_relu_fused_to_float() -> None:
    members = (nn.ConvTranspose2d(CHANNELS, 6, KERNEL), nn.ReLU())
    qat = RELU_FUSED[2].from_float(members, qatcore.QConfig(weight=WEIGHT_SPEC))

    restored = qat.to_float()

    assert [type(module) for module in restored] == [nn.ConvTranspose2d, nn.ReLU]
    assert torch.equal(restored[0].weight, members[0].weight)
    assert restored[0].weight.data_ptr() != members[0].weight.data_ptr()
    assert restored[1] is not members[1]


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
def test_from_float_adopts_members(dim: int, relu: bool) -> None:
    members = _members(dim, relu, **GEOMETRIES["all"])
    members[1].eval()

    qat = OURS[(dim, relu)].from_float(members, QCONFIG, name="up")

    assert qat.weight is members[0].weight
    assert qat.bias is members[0].bias
    assert qat.bn is members[1]
    assert qat.activation is (members[2] if relu else None)
    # The BN keeps the eval mode it had, but only freeze_bn_stats() freezes it.
    assert qat.training
    assert not qat.bn.training
    assert not qat.freeze_bn
    for attribute in ("stride", "padding", "output_padding", "dilation", "groups"):
        assert getattr(qat, attribute) == getattr(members[0], attribute), attribute


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
def test_constructor_builds_members(dim: int, relu: bool) -> None:
    qat = OURS[(dim, relu)](CHANNELS, 6, KERNEL, stride=2, groups=2, qconfig=QCONFIG)

    output = qat(_batch(dim, 0))

    assert type(qat.bn) is BN_TYPES[dim]
    assert qat.bn.num_features == 6
    assert (type(qat.activation) is nn.ReLU) == relu
    assert qat.weight_fake_quant.scale.shape == (6,)
    assert output.shape[1] == 6
    if relu:
        assert output.min().item() >= 0


# -- swap through the registry ----------------------------------------------------------


def test_swap_conv_transpose_bn_relu_with_x86_preset() -> None:
    pytest.importorskip("qatcore_x86")
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
    model = nn.Sequential(conv, nn.BatchNorm2d(6), nn.ReLU())

    qat = qatcore.swap_modules(model, qatcore.get_qconfig("x86"))
    _train(qat[0], dim=2)
    qat.eval()
    qatcore.enable_fake_quant(qat, enabled=False)
    restored = qatcore.to_float(qat)
    x = _batch(2, 6)

    assert type(qat[0]) is qatcore_conv.ConvTransposeBnReLU2d
    assert type(qat[1]) is qatcore.FusedAway
    assert type(qat[2]) is qatcore.FusedAway
    assert qat[0].weight_fake_quant.spec.axis == 1
    assert qat[0].weight_fake_quant.scale.shape == (6,)
    assert [type(module) for module in restored] == [nn.ConvTranspose2d, nn.Identity, nn.ReLU]
    expected = qat(x)
    assert (restored(x) - expected).abs().max().item() <= 1e-6 * expected.abs().max().item()


def test_swap_conv_transpose_relu_with_x86_preset() -> None:
    pytest.importorskip("qatcore_x86")
    model = nn.Sequential(nn.ConvTranspose3d(4, 6, 2, stride=2), nn.ReLU())

    qat = qatcore.swap_modules(model, qatcore.get_qconfig("x86"))
    restored = qatcore.to_float(qat)

    assert type(qat[0]) is qatcore_conv.ConvTransposeReLU3d
    assert type(qat[1]) is qatcore.FusedAway
    assert [type(module) for module in restored] == [nn.ConvTranspose3d, nn.ReLU]
    assert torch.equal(restored[0].weight, model[0].weight)


# -- invalid modules and input -----------------------------------------------------------


def test_bn_without_running_stats_raises() -> None:
    members = (nn.ConvTranspose2d(4, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))

    with pytest.raises(qatcore.SwapError, match=r"^up \(ConvTranspose2d\): .*track_running_stats"):
        qatcore_conv.ConvTransposeBn2d.from_float(members, QCONFIG, name="up")


def test_bn_with_wrong_features_raises() -> None:
    members = (nn.ConvTranspose2d(4, 6, 3), nn.BatchNorm2d(4), nn.ReLU())

    with pytest.raises(
        qatcore.SwapError, match=r"^up \(ConvTranspose2d\): .*4 features but the layer has 6"
    ):
        qatcore_conv.ConvTransposeBnReLU2d.from_float(members, QCONFIG, name="up")


def test_swap_keeps_bn_without_running_stats_unfused() -> None:
    block = nn.Sequential(nn.ConvTranspose1d(4, 4, 3), nn.BatchNorm1d(4, track_running_stats=False))
    model = nn.Sequential(nn.Sequential(block))

    decisions = {entry.name: entry for entry in qatcore.plan(model, QCONFIG)}
    qat = qatcore.swap_modules(model, QCONFIG)

    assert decisions["0.0.0"].action == "swap"
    assert "track_running_stats=False" in decisions["0.0.0"].reason
    assert decisions["0.0.1"].action == "keep"
    assert type(qat[0][0][0]) is qatcore_conv.ConvTranspose1d
    assert type(qat[0][0][1]) is nn.BatchNorm1d


NO_RUNNING_STATS = (
    "its BatchNorm2d has track_running_stats=False, so there are no running statistics to fold"
)
FUSION_CASES = [
    pytest.param(nn.BatchNorm2d(6), "", id="fusable"),
    pytest.param(nn.BatchNorm2d(6, track_running_stats=False), NO_RUNNING_STATS, id="no-stats"),
    pytest.param(
        nn.BatchNorm2d(4),
        "its BatchNorm2d has 4 features but the layer has 6 output channels",
        id="features",
    ),
]


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
@pytest.mark.parametrize(("bn", "problem"), FUSION_CASES)
def test_fusion_problem(relu: bool, bn: nn.Module, problem: str) -> None:
    # 4 input and 6 output channels, so that a BN sized for the input is caught.
    conv = nn.ConvTranspose2d(4, 6, 3, groups=2)
    members = (conv, bn, nn.ReLU()) if relu else (conv, bn)

    assert OURS[(2, relu)].fusion_problem(members) == problem


@pytest.mark.parametrize(("bn", "problem"), [case for case in FUSION_CASES if case.values[1]])
def test_from_float_raises_fusion_problem(bn: nn.Module, problem: str) -> None:
    members = (nn.ConvTranspose2d(4, 6, 3), bn)

    with pytest.raises(qatcore.SwapError) as error:
        qatcore_conv.ConvTransposeBn2d.from_float(members, QCONFIG, name="up")

    assert str(error.value) == f"up (ConvTranspose2d): {problem}; keep it unfused with fuse=False"


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_unbatched_input_raises(dim: int) -> None:
    qat = _ours(_members(dim, relu=False))
    x = _batch(dim, 0)[0]

    with pytest.raises(
        ValueError,
        match=rf"ConvTransposeBn{dim}d needs batched input of {dim + 2} dimensions, "
        rf"got shape \({CHANNELS}, ",
    ):
        qat(x)
