"""QAT linear-BatchNorm1d: parity with torch.ao, gamma = 0, frozen statistics, folding, swap."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.quantization as tq
from torch import nn

import qatcore

qatcore_linear = pytest.importorskip("qatcore_linear")
pytest.importorskip("qatcore_observers")

IN_FEATURES = 6
OUT_FEATURES = 4
BATCH = 8
STEPS = 5
FREEZE_STEP = 3
GAMMA = [0.0, 1.0, 0.5, 2.0]
NONZERO_GAMMA = [0.25, 1.0, 0.5, 2.0]

# Whether a ReLU follows the BatchNorm1d.
RELU = [pytest.param(False, id="linear-bn"), pytest.param(True, id="linear-bn-relu")]
BIAS = [pytest.param(True, id="bias"), pytest.param(False, id="no-bias")]

WEIGHT_SPEC = qatcore.QuantSpec(bits=8, signed=True, symmetric=True, axis=0)
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

# Largest difference from the oracle, relative to the oracle tensor's largest
# magnitude (or to 1 where that is smaller). A comment in each oracle test
# explains why the results are not bit-exact.
CONV_ORACLE_TOLERANCE = 1e-6
LINEAR_ORACLE_TOLERANCE = 1e-5
# Fold versus the float Linear -> BatchNorm1d, in float32.
FLOAT_TOLERANCE = 1e-6


def _float_members(
    relu: bool, bias: bool = True, gamma: list[float] = GAMMA
) -> tuple[nn.Module, ...]:
    torch.manual_seed(0)
    linear = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=bias)
    bn = nn.BatchNorm1d(OUT_FEATURES)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(gamma))
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return (linear, bn, nn.ReLU()) if relu else (linear, bn)


def _ours(members: tuple[nn.Module, ...]) -> qatcore_linear.QATLinearBnBase:
    fused_type = qatcore_linear.LinearBnReLU1d if len(members) == 3 else qatcore_linear.LinearBn1d
    return fused_type.from_float(copy.deepcopy(members), qatcore.QConfig(weight=WEIGHT_SPEC))


def _batch(step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, IN_FEATURES, generator=generator) * (1 + step)


def _relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    difference = (actual.double() - expected.double()).abs().max().item()
    return difference / max(1.0, expected.abs().max().item())


def _assert_near(
    actual: torch.Tensor, expected: torch.Tensor, tolerance: float, quantity: str, step: int
) -> None:
    difference = _relative_difference(actual, expected)
    assert difference <= tolerance, f"{quantity} differs by {difference:.3g} at step {step}"


# -- parity with torch.ao ---------------------------------------------------------------


def _conv_bn_oracle(members: tuple[nn.Module, ...]) -> nn.Module:
    """Return torch.ao's ConvBn1d (or ConvBnReLU1d) with kernel size 1 computing ``members``.

    A Linear on ``(N, in)`` equals a Conv1d of kernel size 1 on ``(N, in, 1)``
    whose weight is the linear weight with a trailing axis, and BatchNorm1d
    computes the same statistics over ``(N, out, 1)`` as over ``(N, out)``.
    """
    linear, bn, *activation = copy.deepcopy(members)
    conv = nn.Conv1d(IN_FEATURES, OUT_FEATURES, 1, bias=linear.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(linear.weight[:, :, None])
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    float_type, qat_type = (
        (nni.ConvBnReLU1d, nniqat.ConvBnReLU1d) if activation else (nni.ConvBn1d, nniqat.ConvBn1d)
    )
    fused = float_type(conv, bn, *activation)
    fused.qconfig = AO_QCONFIG
    oracle = qat_type.from_float(fused)
    oracle._enable_slow_path_for_better_numerical_stability = True
    return oracle


@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("relu", RELU)
def test_linear_bn_matches_ao_conv_bn(relu: bool, bias: bool) -> None:
    # Not bit-exact: F.linear runs a matrix product and the oracle a
    # convolution kernel, which sum the products in different orders. On
    # torch 2.13 CPU the largest relative difference is below 4e-7 for these
    # inputs. Gamma gradients are sums with cancellation: over 30 other seeds
    # of this setup they differed by up to 2e-5 relative to their largest entry.
    members = _float_members(relu, bias)
    ours, oracle = _ours(members), _conv_bn_oracle(members)
    ours_optimizer = torch.optim.SGD(ours.parameters(), lr=0.05)
    oracle_optimizer = torch.optim.SGD(oracle.parameters(), lr=0.05)
    upstream = torch.randn(BATCH, OUT_FEATURES, generator=torch.Generator().manual_seed(99))

    for step in range(STEPS):
        if step == FREEZE_STEP:
            ours.freeze_bn_stats()
            oracle.freeze_bn_stats()
        x = _batch(step)
        x_ours, x_oracle = x.clone().requires_grad_(), x[:, :, None].clone().requires_grad_()
        y_ours, y_oracle = ours(x_ours), oracle(x_oracle).squeeze(-1)
        (y_ours * upstream).sum().backward()
        (y_oracle * upstream).sum().backward()

        pairs = {
            "output": (y_ours, y_oracle),
            "input grad": (x_ours.grad, x_oracle.grad.squeeze(-1)),
            "weight grad": (ours.weight.grad, oracle.weight.grad.squeeze(-1)),
            "gamma grad": (ours.bn.weight.grad, oracle.bn.weight.grad),
            "running mean": (ours.bn.running_mean, oracle.bn.running_mean),
            "running var": (ours.bn.running_var, oracle.bn.running_var),
            "weight scale": (ours.weight_fake_quant.scale, oracle.weight_fake_quant.scale),
        }
        if bias:
            pairs["bias grad"] = (ours.bias.grad, oracle.bias.grad)
        for quantity, (actual, expected) in pairs.items():
            _assert_near(actual, expected, CONV_ORACLE_TOLERANCE, quantity, step)
        assert torch.isfinite(y_ours).all()

        ours_optimizer.step()
        oracle_optimizer.step()
        ours_optimizer.zero_grad()
        oracle_optimizer.zero_grad()


@pytest.mark.parametrize("bias", BIAS)
def test_matches_ao_linear_bn_unquantized(bias: bool) -> None:
    # torch.ao's LinearBn1d divides the quantized output by gamma / running_std
    # and passes it through BatchNorm, so its batch statistics come from the
    # fake-quantized output. The stable fold takes them from a float pass.
    # With weight fake quantization on, the two therefore differ by the
    # quantization error; with it off, only by float rounding.
    members = _float_members(relu=False, bias=bias, gamma=NONZERO_GAMMA)
    ours = _ours(members)
    fused = nni.LinearBn1d(*copy.deepcopy(members))
    fused.qconfig = AO_QCONFIG
    oracle = nniqat.LinearBn1d.from_float(fused)
    qatcore.enable_fake_quant(ours, enabled=False)
    oracle.weight_fake_quant.disable_fake_quant()
    ours_optimizer = torch.optim.SGD(ours.parameters(), lr=0.05)
    oracle_optimizer = torch.optim.SGD(oracle.parameters(), lr=0.05)

    for step in range(STEPS):
        x = _batch(step)
        y_ours, y_oracle = ours(x), oracle(x)
        y_ours.square().sum().backward()
        y_oracle.square().sum().backward()

        _assert_near(y_ours, y_oracle, LINEAR_ORACLE_TOLERANCE, "output", step)
        _assert_near(
            ours.bn.running_mean,
            oracle.bn.running_mean,
            LINEAR_ORACLE_TOLERANCE,
            "running mean",
            step,
        )
        _assert_near(
            ours.bn.running_var, oracle.bn.running_var, LINEAR_ORACLE_TOLERANCE, "running var", step
        )

        ours_optimizer.step()
        oracle_optimizer.step()
        ours_optimizer.zero_grad()
        oracle_optimizer.zero_grad()


# -- gamma = 0 --------------------------------------------------------------------------


def test_zero_gamma_outputs_beta_without_fake_quant() -> None:
    linear, bn = _float_members(relu=False)
    qat = _ours((linear, bn))
    qatcore.enable_fake_quant(qat, enabled=False)
    reference_linear, reference_bn = copy.deepcopy(linear), copy.deepcopy(bn)
    x = _batch(0).requires_grad_()

    output = qat(x)
    expected = reference_bn(reference_linear(x))

    assert _relative_difference(output, expected) <= FLOAT_TOLERANCE
    assert torch.equal(output[:, 0], bn.bias[0].expand(BATCH))
    # The BN module itself updates the statistics, from the same float
    # output, so they match bit for bit (torch 2.13 CPU).
    assert torch.equal(qat.bn.running_mean, reference_bn.running_mean)
    assert torch.equal(qat.bn.running_var, reference_bn.running_var)
    assert int(qat.bn.num_batches_tracked) == int(reference_bn.num_batches_tracked) == 1
    output.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(qat.weight.grad).all()
    assert torch.isfinite(qat.bn.weight.grad).all()


def test_zero_gamma_stays_finite_with_fake_quant() -> None:
    members = _float_members(relu=True)
    qat = _ours(members)
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.05)

    for step in range(4):
        x = _batch(step).requires_grad_()
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


def test_ao_linear_bn_nan_for_zero_gamma() -> None:
    # The contrast to the test above: torch.ao's LinearBn1d divides its output
    # by gamma / running_std, so a zero gamma gives 0 / 0 in that channel.
    linear, bn = _float_members(relu=False)
    fused = nni.LinearBn1d(linear, bn)
    fused.qconfig = AO_QCONFIG
    oracle = nniqat.LinearBn1d.from_float(fused)

    output = oracle(_batch(0))

    assert torch.isnan(output[:, 0]).all()


# -- BN statistics ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["training", "frozen", "eval"])
def test_bn_statistics_follow_batchnorm(mode: str) -> None:
    linear, bn, relu = _float_members(relu=True)
    qat = _ours((linear, bn, relu))
    qatcore.enable_fake_quant(qat, enabled=False)
    reference_linear, reference_bn = copy.deepcopy(linear), copy.deepcopy(bn)
    if mode == "frozen":
        qat.freeze_bn_stats()
        reference_bn.eval()
    elif mode == "eval":
        qat.eval()
        reference_bn.eval()
    mean_before = qat.bn.running_mean.clone()
    var_before = qat.bn.running_var.clone()
    x = _batch(1)

    output = qat(x)
    expected = torch.relu(reference_bn(reference_linear(x)))

    assert _relative_difference(output, expected) <= FLOAT_TOLERANCE
    assert torch.equal(qat.bn.running_mean, reference_bn.running_mean)
    assert torch.equal(qat.bn.running_var, reference_bn.running_var)
    assert (not torch.equal(qat.bn.running_mean, mean_before)) == (mode == "training")
    assert (not torch.equal(qat.bn.running_var, var_before)) == (mode == "training")


def test_train_keeps_frozen_bn_in_eval() -> None:
    qat = _ours(_float_members(relu=False))

    qat.freeze_bn_stats()
    qat.train()

    assert qat.training
    assert not qat.bn.training
    qat.freeze_bn_stats(frozen=False)
    assert qat.bn.training


def test_freeze_bn_stats_reaches_fused_module() -> None:
    model = nn.Sequential(*_float_members(relu=True))
    qat = qatcore.swap_modules(model, qatcore.QConfig(weight=WEIGHT_SPEC))
    before = qat[0].bn.running_mean.clone()

    returned = qatcore.freeze_bn_stats(qat)
    qat(_batch(0))

    assert returned is qat
    assert qat[0].freeze_bn
    assert not qat[0].bn.training
    assert torch.equal(qat[0].bn.running_mean, before)


# -- folding back to float --------------------------------------------------------------


@pytest.mark.parametrize("relu", RELU)
def test_to_float_folds_bn(relu: bool) -> None:
    qat = _ours(_float_members(relu))
    for step in range(3):
        qat(_batch(step))
    qat.eval()
    qatcore.enable_fake_quant(qat, enabled=False)
    x = _batch(7)

    folded = qat.to_float()

    expected_types = [nn.Linear, nn.Identity] + ([nn.ReLU] if relu else [])
    assert [type(module) for module in folded] == expected_types
    assert not folded.training
    assert folded[0].bias is not None
    assert _relative_difference(folded(x), qat(x)) <= FLOAT_TOLERANCE
    assert folded[0].weight.data_ptr() != qat.weight.data_ptr()


def test_to_float_keeps_training_mode() -> None:
    qat = _ours(_float_members(relu=True))

    folded = qat.to_float()

    assert folded.training
    assert all(module.training for module in folded)


def test_linear_bn_float64() -> None:
    members = tuple(module.double() for module in _float_members(relu=True))
    qat = _ours(members)
    x = _batch(0).double().requires_grad_()

    output = qat(x)
    output.square().mean().backward()
    qat.eval()
    qatcore.enable_fake_quant(qat, enabled=False)
    folded = qat.to_float()

    assert output.dtype == torch.float64
    assert qat.weight_fake_quant.scale.dtype == torch.float32
    assert torch.isfinite(output).all()
    assert x.grad.dtype == torch.float64
    assert torch.isfinite(qat.weight.grad).all()
    assert folded[0].weight.dtype == torch.float64
    assert (folded(x) - qat(x)).abs().max().item() <= 1e-12


# -- swap through the registry ------------------------------------------------------------


class Head(nn.Module):
    """A classifier head whose forward, not an nn.Sequential, wires Linear into BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2 * 4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.bn(self.fc(x.flatten(1))))


@pytest.fixture
def x86() -> qatcore.QConfig:
    pytest.importorskip("qatcore_x86")
    return qatcore.get_qconfig("x86")


def _assert_round_trip(qat: nn.Module, x: torch.Tensor) -> nn.Module:
    qat.eval()
    float_model = qatcore.to_float(qat)
    qatcore.enable_fake_quant(qat, enabled=False)

    assert _relative_difference(float_model(x), qat(x)) <= FLOAT_TOLERANCE
    return float_model


def test_swap_fuses_linear_bn_relu_in_sequential(x86: qatcore.QConfig) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.ReLU())

    qat = qatcore.swap_modules(model, x86)
    qat(torch.randn(5, 8))

    assert type(qat[0]) is qatcore_linear.LinearBnReLU1d
    assert isinstance(qat[1], qatcore.FusedAway)
    assert isinstance(qat[2], qatcore.FusedAway)
    assert qat[0].weight_fake_quant.scale.shape == (4,)
    float_model = _assert_round_trip(qat, torch.randn(5, 8))
    assert [type(module) for module in float_model] == [nn.Linear, nn.Identity, nn.ReLU]


def test_swap_fuses_linear_bn_wired_in_forward(x86: qatcore.QConfig) -> None:
    torch.manual_seed(0)
    model = Head()

    rows = [(entry.name, entry.action, entry.qat_type) for entry in qatcore.plan(model, x86)]
    qat = qatcore.swap_modules(model, x86)
    qat(torch.randn(5, 2, 4))

    assert ("fc", "fuse", qatcore_linear.LinearBn1d) in rows
    assert type(qat.fc) is qatcore_linear.LinearBn1d
    assert isinstance(qat.bn, qatcore.FusedAway)
    assert type(qat.out) is qatcore_linear.Linear
    float_model = _assert_round_trip(qat, torch.randn(5, 2, 4))
    assert type(float_model.fc) is nn.Linear
    assert type(float_model.bn) is nn.Identity


def test_fuse_false_keeps_batchnorm_float(x86: qatcore.QConfig) -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.ReLU())

    qat = qatcore.swap_modules(model, x86, fuse=False)

    assert type(qat[0]) is qatcore_linear.Linear
    assert type(qat[1]) is nn.BatchNorm1d


def test_direct_construction_folds_fresh_bn(x86: qatcore.QConfig) -> None:
    qat = qatcore_linear.LinearBnReLU1d(6, 4, bias=False, eps=1e-3, momentum=0.2, qconfig=x86)

    output = qat(_batch(0))

    assert isinstance(qat.bn, nn.BatchNorm1d)
    assert qat.bn.eps == 1e-3
    assert qat.bn.momentum == 0.2
    assert int(qat.bn.num_batches_tracked) == 1
    assert (output >= 0).all()


def test_weight_output_channels_axis_is_rows() -> None:
    spec = qatcore.QuantSpec(bits=8, signed=True, symmetric=True, axis=qatcore.OUTPUT_CHANNELS)
    qconfig = qatcore.QConfig(weight=spec, activation=qatcore.QuantSpec(axis=1))
    qat = qatcore_linear.LinearBn1d.from_float(_float_members(relu=False), qconfig)

    qat(_batch(0))

    assert qat.weight_fake_quant.spec.axis == 0
    assert qat.weight_fake_quant.scale.shape == (OUT_FEATURES,)
    assert qat.output_fake_quant.scale.shape == (OUT_FEATURES,)


# -- invalid input and modules ----------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, IN_FEATURES), (IN_FEATURES,)], ids=["3d", "unbatched"])
def test_non_2d_input_raises_with_fix(shape: tuple[int, ...]) -> None:
    qat = _ours(_float_members(relu=True))
    message = re.escape(
        f"LinearBnReLU1d needs input of shape (batch, in_features), got shape {shape}"
    )

    with pytest.raises(ValueError, match=message) as error:
        qat(torch.randn(shape))

    assert "swap_modules(..., fuse=False)" in str(error.value)


def test_bn_without_running_stats_raises_with_name() -> None:
    members = (nn.Linear(6, 4), nn.BatchNorm1d(4, track_running_stats=False))

    with pytest.raises(
        qatcore.SwapError, match=r"0\.0 \(Linear\): its BatchNorm1d has track_running_stats=False"
    ):
        qatcore_linear.LinearBn1d.from_float(
            members, qatcore.QConfig(weight=WEIGHT_SPEC), name="0.0"
        )


def test_swap_keeps_bn_without_running_stats_unfused() -> None:
    model = nn.Sequential(
        nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4, track_running_stats=False))
    )
    qconfig = qatcore.QConfig(weight=WEIGHT_SPEC)

    decisions = {entry.name: entry for entry in qatcore.plan(model, qconfig)}
    qat = qatcore.swap_modules(model, qconfig)

    assert decisions["0.0"].action == "swap"
    assert "track_running_stats=False" in decisions["0.0"].reason
    assert decisions["0.1"].action == "keep"
    assert type(qat[0][0]) is qatcore_linear.Linear
    assert type(qat[0][1]) is nn.BatchNorm1d


def test_bn_features_mismatch_raises_with_name() -> None:
    members = (nn.Linear(6, 4), nn.BatchNorm1d(5))

    with pytest.raises(
        qatcore.SwapError, match=r"head\.fc \(Linear\): its BatchNorm1d has 5 features but"
    ):
        qatcore_linear.LinearBn1d.from_float(
            members, qatcore.QConfig(weight=WEIGHT_SPEC), name="head.fc"
        )


NO_RUNNING_STATS = (
    "its BatchNorm1d has track_running_stats=False, so there are no running statistics to fold"
)
FUSION_CASES = [
    pytest.param(nn.BatchNorm1d(OUT_FEATURES), "", id="fusable"),
    pytest.param(
        nn.BatchNorm1d(OUT_FEATURES, track_running_stats=False), NO_RUNNING_STATS, id="no-stats"
    ),
    pytest.param(
        nn.BatchNorm1d(IN_FEATURES),
        "its BatchNorm1d has 6 features but the layer has 4 output channels",
        id="features",
    ),
]


@pytest.mark.parametrize("relu", RELU)
@pytest.mark.parametrize(("bn", "problem"), FUSION_CASES)
def test_fusion_problem(relu: bool, bn: nn.Module, problem: str) -> None:
    linear = nn.Linear(IN_FEATURES, OUT_FEATURES)
    members = (linear, bn, nn.ReLU()) if relu else (linear, bn)
    fused_type = qatcore_linear.LinearBnReLU1d if relu else qatcore_linear.LinearBn1d

    assert fused_type.fusion_problem(members) == problem


@pytest.mark.parametrize(("bn", "problem"), [case for case in FUSION_CASES if case.values[1]])
def test_from_float_raises_fusion_problem(bn: nn.Module, problem: str) -> None:
    members = (nn.Linear(IN_FEATURES, OUT_FEATURES), bn)
    qconfig = qatcore.QConfig(weight=WEIGHT_SPEC)

    with pytest.raises(qatcore.SwapError) as error:
        qatcore_linear.LinearBn1d.from_float(members, qconfig, name="head.fc")

    assert str(error.value) == f"head.fc (Linear): {problem}; keep it unfused with fuse=False"
