"""QAT conv-BatchNorm: parity with torch.ao's slow path, gamma = 0, frozen statistics, folding."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.quantization as tq
from torch import nn

import qatcore
from qatcore_conv import conv_bn

pytest.importorskip("qatcore_observers")

DIMS = [1, 2, 3]
DIM_IDS = ["conv1d", "conv2d", "conv3d"]
CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN_TYPES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SPATIAL = {1: (9,), 2: (6, 5), 3: (4, 5, 3)}
OURS = {
    (1, False): conv_bn.ConvBn1d,
    (2, False): conv_bn.ConvBn2d,
    (3, False): conv_bn.ConvBn3d,
    (1, True): conv_bn.ConvBnReLU1d,
    (2, True): conv_bn.ConvBnReLU2d,
    (3, True): conv_bn.ConvBnReLU3d,
}
THEIRS = {
    (1, False): (nni.ConvBn1d, nniqat.ConvBn1d),
    (2, False): (nni.ConvBn2d, nniqat.ConvBn2d),
    (3, False): (nni.ConvBn3d, nniqat.ConvBn3d),
    (1, True): (nni.ConvBnReLU1d, nniqat.ConvBnReLU1d),
    (2, True): (nni.ConvBnReLU2d, nniqat.ConvBnReLU2d),
    (3, True): (nni.ConvBnReLU3d, nniqat.ConvBnReLU3d),
}
GAMMA = [0.0, 1.0, 0.5, 2.0]
WEIGHT_SPEC = qatcore.QuantSpec(bits=8, signed=True, symmetric=True, axis=0)
OUTPUT_SPEC = qatcore.QuantSpec(bits=8, signed=False, symmetric=False)
AO_WEIGHT = tq.FakeQuantize.with_args(
    observer=tq.MovingAveragePerChannelMinMaxObserver,
    quant_min=-128,
    quant_max=127,
    dtype=torch.qint8,
    qscheme=torch.per_channel_symmetric,
    ch_axis=0,
)
AO_OUTPUT = tq.FakeQuantize.with_args(
    observer=tq.MovingAverageMinMaxObserver,
    quant_min=0,
    quant_max=255,
    dtype=torch.quint8,
    qscheme=torch.per_tensor_affine,
)
AO_QCONFIG = tq.QConfig(activation=tq.NoopObserver, weight=AO_WEIGHT)


def _float_members(dim: int, relu: bool, bias: bool = True) -> tuple[nn.Module, ...]:
    torch.manual_seed(0)
    conv = CONV_TYPES[dim](3, 4, 3, padding=1, bias=bias)
    bn = BN_TYPES[dim](4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(GAMMA))
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return (conv, bn, nn.ReLU()) if relu else (conv, bn)


def _ours(
    members: tuple[nn.Module, ...], dim: int, relu: bool, output: bool = False
) -> conv_bn.QATConvBnNd:
    qconfig = qatcore.QConfig(weight=WEIGHT_SPEC, activation=OUTPUT_SPEC if output else None)
    return OURS[(dim, relu)].from_float(copy.deepcopy(members), qconfig)


def _theirs(
    members: tuple[nn.Module, ...], dim: int, relu: bool, output: bool = False
) -> nn.Module:
    float_type, qat_type = THEIRS[(dim, relu)]
    fused = float_type(*copy.deepcopy(members))
    fused.qconfig = AO_QCONFIG
    qat = qat_type.from_float(fused)
    qat._enable_slow_path_for_better_numerical_stability = True
    if not output:
        return qat
    # torch.ao's eager flow fake-quantizes a module's output in the next
    # module's input stub; a FakeQuantize right after the module is the same.
    return nn.Sequential(qat, AO_OUTPUT())


def _batch(dim: int, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(2, 3, *SPATIAL[dim], generator=generator) * (1 + step)


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
@pytest.mark.parametrize("relu", [False, True], ids=["conv-bn", "conv-bn-relu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("output", [False, True], ids=["float-output", "quantized-output"])
def test_conv_bn_matches_torch_ao_slow_path(dim: int, relu: bool, bias: bool, output: bool) -> None:
    members = _float_members(dim, relu, bias)
    ours = _ours(members, dim, relu, output)
    wrapped = _theirs(members, dim, relu, output)
    theirs = wrapped[0] if output else wrapped
    ours_optimizer = torch.optim.SGD(ours.parameters(), lr=0.05)
    theirs_optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.05)

    for step in range(6):
        if step == 3:
            ours.freeze_bn_stats()
            theirs.freeze_bn_stats()
        x = _batch(dim, step)
        x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ours, y_theirs = ours(x_ours), wrapped(x_theirs)
        upstream = torch.randn(y_ours.shape, generator=torch.Generator().manual_seed(99))
        (y_ours * upstream).sum().backward()
        (y_theirs * upstream).sum().backward()

        assert (y_ours - y_theirs).abs().max().item() <= 1e-6, step
        assert (x_ours.grad - x_theirs.grad).abs().max().item() <= 1e-6, step
        assert (ours.weight.grad - theirs.weight.grad).abs().max().item() <= 1e-6, step
        assert (ours.bn.weight.grad - theirs.bn.weight.grad).abs().max().item() <= 1e-6, step
        assert torch.equal(ours.bn.running_mean, theirs.bn.running_mean), step
        assert torch.equal(ours.bn.running_var, theirs.bn.running_var), step
        assert torch.equal(ours.weight_fake_quant.scale, theirs.weight_fake_quant.scale), step
        if output:
            # torch.ao keeps per-tensor qparams with shape (1,); qatcore with shape ().
            ours_qparams = ours.output_fake_quant.qparams()
            theirs_qparams = (wrapped[1].scale.reshape(()), wrapped[1].zero_point.reshape(()))
            assert torch.equal(ours_qparams[0], theirs_qparams[0]), step
            assert torch.equal(ours_qparams[1], theirs_qparams[1].to(torch.int32)), step
        assert torch.isfinite(y_ours).all()

        ours_optimizer.step()
        theirs_optimizer.step()
        ours_optimizer.zero_grad()
        theirs_optimizer.zero_grad()


# -- gamma = 0 and BN statistics --------------------------------------------------


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_zero_gamma_outputs_beta_without_fake_quant(dim: int) -> None:
    conv, bn = _float_members(dim, relu=False)
    qat = _ours((conv, bn), dim, relu=False)
    qatcore.enable_fake_quant(qat, enabled=False)
    reference_conv, reference_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    x = _batch(dim, 0).requires_grad_()

    output = qat(x)
    expected = reference_bn(reference_conv(x))

    assert (output - expected).abs().max().item() <= 1e-5
    assert torch.allclose(output[:, 0], bn.bias[0].expand_as(output[:, 0]))
    assert torch.allclose(qat.bn.running_mean, reference_bn.running_mean)
    assert torch.allclose(qat.bn.running_var, reference_bn.running_var)
    output.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(qat.weight.grad).all()


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_zero_gamma_stays_finite_with_fake_quant(dim: int) -> None:
    qat = _ours(_float_members(dim, relu=True), dim, relu=True)
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.05)

    for step in range(4):
        output = qat(_batch(dim, step))
        output.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

        assert torch.isfinite(output).all()
        assert torch.isfinite(qat.weight_fake_quant.scale).all()
        assert torch.isfinite(qat.bn.running_var).all()


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
@pytest.mark.parametrize("mode", ["training", "frozen", "eval"])
def test_bn_statistics_follow_batchnorm(dim: int, mode: str) -> None:
    conv, bn, relu = _float_members(dim, relu=True)
    qat = _ours((conv, bn, relu), dim, relu=True)
    qatcore.enable_fake_quant(qat, enabled=False)
    reference_conv, reference_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    if mode == "frozen":
        qat.freeze_bn_stats()
        reference_bn.eval()
    elif mode == "eval":
        qat.eval()
        reference_bn.eval()
    before = qat.bn.running_mean.clone()
    x = _batch(dim, 1)

    output = qat(x)
    expected = torch.relu(reference_bn(reference_conv(x)))

    assert (output - expected).abs().max().item() <= 1e-5
    assert torch.allclose(qat.bn.running_mean, reference_bn.running_mean)
    assert torch.allclose(qat.bn.running_var, reference_bn.running_var)
    changed = not torch.equal(qat.bn.running_mean, before)
    assert changed == (mode == "training")


def test_train_keeps_frozen_bn_in_eval() -> None:
    qat = _ours(_float_members(2, relu=False), 2, relu=False)

    qat.freeze_bn_stats()
    qat.train()

    assert qat.training
    assert not qat.bn.training
    qat.freeze_bn_stats(frozen=False)
    assert qat.bn.training


# -- folding back to float ------------------------------------------------------------


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
@pytest.mark.parametrize("relu", [False, True], ids=["conv-bn", "conv-bn-relu"])
def test_to_float_folds_bn(dim: int, relu: bool) -> None:
    qat = _ours(_float_members(dim, relu), dim, relu)
    for step in range(3):
        qat(_batch(dim, step))
    qat.eval()
    qatcore.enable_fake_quant(qat, enabled=False)
    x = _batch(dim, 7)

    folded = qat.to_float()

    assert [type(module) for module in folded] == [CONV_TYPES[dim], nn.Identity] + (
        [nn.ReLU] if relu else []
    )
    assert folded[0].bias is not None
    assert (folded(x) - qat(x)).abs().max().item() <= 1e-5
    assert folded[0].weight.data_ptr() != qat.weight.data_ptr()


def test_bn_without_running_stats_raises() -> None:
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)

    with pytest.raises(qatcore.SwapError, match="track_running_stats=False"):
        conv_bn.ConvBn2d.from_float((conv, bn), qatcore.QConfig(weight=WEIGHT_SPEC), name="block")


NO_RUNNING_STATS = (
    "its BatchNorm2d has track_running_stats=False, so there are no running statistics to fold"
)
FUSION_CASES = [
    pytest.param(nn.BatchNorm2d(4), "", id="fusable"),
    pytest.param(nn.BatchNorm2d(4, track_running_stats=False), NO_RUNNING_STATS, id="no-stats"),
    pytest.param(
        nn.BatchNorm2d(5),
        "its BatchNorm2d has 5 features but the layer has 4 output channels",
        id="features",
    ),
]


@pytest.mark.parametrize("relu", [False, True], ids=["conv-bn", "conv-bn-relu"])
@pytest.mark.parametrize(("bn", "problem"), FUSION_CASES)
def test_fusion_problem(relu: bool, bn: nn.Module, problem: str) -> None:
    members = (nn.Conv2d(3, 4, 3), bn, nn.ReLU()) if relu else (nn.Conv2d(3, 4, 3), bn)

    assert OURS[(2, relu)].fusion_problem(members) == problem


@pytest.mark.parametrize(("bn", "problem"), [case for case in FUSION_CASES if case.values[1]])
def test_from_float_raises_fusion_problem(bn: nn.Module, problem: str) -> None:
    members = (nn.Conv2d(3, 4, 3), bn)
    qconfig = qatcore.QConfig(weight=WEIGHT_SPEC)

    with pytest.raises(qatcore.SwapError) as error:
        conv_bn.ConvBn2d.from_float(members, qconfig, name="block")

    assert str(error.value) == f"block (Conv2d): {problem}; keep it unfused with fuse=False"


def test_unbatched_input_raises() -> None:
    qat = _ours(_float_members(2, relu=False), 2, relu=False)

    with pytest.raises(ValueError, match="needs batched input of 4 dimensions"):
        qat(torch.randn(3, 6, 5))


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
@pytest.mark.parametrize(
    "conv_kwargs",
    [
        {"padding": "same"},
        {"padding": "valid"},
        {"padding": 1, "padding_mode": "reflect"},
        {"padding": 1, "padding_mode": "circular"},
        {"padding": 1, "groups": 4},
        {"padding": "same", "dilation": 2},
    ],
    ids=["same", "valid", "reflect", "circular", "depthwise", "same-dilation"],
)
def test_conv_bn_matches_float_for_every_padding(dim: int, conv_kwargs: dict) -> None:
    torch.manual_seed(0)
    conv = CONV_TYPES[dim](4, 4, 3, **conv_kwargs)
    bn = BN_TYPES[dim](4)
    fused_type = OURS[(dim, False)]
    qat = fused_type.from_float(copy.deepcopy((conv, bn)), qatcore.QConfig(weight=WEIGHT_SPEC))
    qatcore.enable_fake_quant(qat, enabled=False)
    x = torch.randn(2, 4, *SPATIAL[dim])

    output = qat(x)

    assert (output - bn(conv(x))).abs().max().item() <= 1e-5
    qat.eval()
    bn.eval()
    assert (qat.to_float()(x) - bn(conv(x))).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_conv_bn_float64(dim: int) -> None:
    members = tuple(module.double() for module in _float_members(dim, relu=True))
    qat = _ours(members, dim, relu=True)

    output = qat(_batch(dim, 0).double())

    assert output.dtype == torch.float64
    assert qat.weight_fake_quant.scale.dtype == torch.float32
    assert torch.isfinite(output).all()
