"""Swapping, discovery, conversion back to float, checkpoints and dtypes of the QAT linears."""

from __future__ import annotations

import copy
import importlib.metadata
import io
import pickle

import pytest
import torch
from torch import nn

import qatcore

qatcore_linear = pytest.importorskip("qatcore_linear")
pytest.importorskip("qatcore_x86")

# Whether the Linear is followed by a ReLU that fuses with it.
FUSED = [pytest.param(False, id="linear"), pytest.param(True, id="linear-relu")]


@pytest.fixture
def x86() -> qatcore.QConfig:
    return qatcore.get_qconfig("x86")


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def single(fused: bool) -> nn.Sequential:
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    return nn.Sequential(linear, nn.ReLU()) if fused else nn.Sequential(linear)


def train(model: nn.Module, steps: int = 3, shape: tuple[int, ...] = (5, 6)) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    generator = torch.Generator().manual_seed(2)
    for step in range(steps):
        x = torch.randn(shape, generator=generator) * (step + 1)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def tensor_storages(module: nn.Module) -> set[int]:
    return {tensor.untyped_storage().data_ptr() for tensor in module.state_dict().values()}


# -- swap, plan and discovery -------------------------------------------------


def test_swap_fuses_first_pair_and_swaps_second_linear(x86: qatcore.QConfig) -> None:
    qat = qatcore.swap_modules(mlp(), x86)

    assert type(qat[0]) is qatcore_linear.LinearReLU
    assert isinstance(qat[1], qatcore.FusedAway)
    assert type(qat[2]) is qatcore_linear.Linear
    assert qat(torch.randn(5, 6)).shape == (5, 3)


def test_plan_lists_fusion_and_swap(x86: qatcore.QConfig) -> None:
    decisions = qatcore.plan(mlp(), x86)

    rows = [(entry.name, entry.action, entry.qat_type, entry.members) for entry in decisions]
    assert rows == [
        ("0", "fuse", qatcore_linear.LinearReLU, ("0", "1")),
        ("2", "swap", qatcore_linear.Linear, ()),
    ]


def test_swap_in_place_shares_the_float_parameters(x86: qatcore.QConfig) -> None:
    model = mlp()
    weights = [model[0].weight, model[0].bias, model[2].weight, model[2].bias]

    qat = qatcore.swap_modules(model, x86, inplace=True)

    shared = [qat[0].weight, qat[0].bias, qat[2].weight, qat[2].bias]
    assert all(
        qat_parameter is float_parameter for qat_parameter, float_parameter in zip(shared, weights)
    )


def test_discovered_through_the_distribution_entry_point() -> None:
    entry_points = importlib.metadata.entry_points(group="qatcore", name="linear")
    infos = {info.name: info for info in qatcore.plugin_manager().plugins()}

    assert [entry.dist.name for entry in entry_points] == ["qatcore-linear"]
    assert infos["linear"].distribution == "qatcore-linear"
    assert infos["linear"].registrations == {
        "modules": [nn.Linear],
        "fusions": [
            (nn.Linear, nn.ReLU),
            (nn.Linear, nn.BatchNorm1d),
            (nn.Linear, nn.BatchNorm1d, nn.ReLU),
        ],
    }


# -- building directly and from float -----------------------------------------


def test_direct_construction_without_qconfig_is_float_linear() -> None:
    torch.manual_seed(0)
    qat = qatcore_linear.Linear(6, 4)
    x = torch.randn(3, 6)

    assert qat.weight_fake_quant is None
    assert qat.output_fake_quant is None
    assert torch.equal(qat(x), nn.functional.linear(x, qat.weight, qat.bias))


@pytest.mark.parametrize("fused", FUSED)
def test_direct_construction_with_qconfig_quantizes(fused: bool, x86: qatcore.QConfig) -> None:
    qat_type = qatcore_linear.LinearReLU if fused else qatcore_linear.Linear

    qat = qat_type(6, 4, bias=False, qconfig=x86)
    output = qat(torch.randn(3, 6))

    assert isinstance(qat.activation, nn.ReLU) == fused
    assert qat.weight_fake_quant.scale.shape == (4,)
    assert qat.output_fake_quant.zero_point.shape == ()
    if fused:
        assert (output >= 0).all()


WRONG_AXES = [
    pytest.param(
        {"weight": qatcore.QuantSpec(bits=8, signed=True, symmetric=True, axis=1)},
        r"0\.1 \(Linear\): per-channel weight quantization of a linear layer needs axis=0 "
        r"\(out_features\), got axis=1; set QuantSpec\(axis=0\) in QConfig\.weight",
        id="weight-axis-1",
    ),
    pytest.param(
        {"activation": qatcore.QuantSpec(axis=2)},
        r"0\.1 \(Linear\): per-channel output quantization of a linear layer needs axis=1 "
        r"\(out_features, the last axis of the output.*got axis=2; "
        r"set QuantSpec\(axis=1\) in QConfig\.activation",
        id="output-axis-2",
    ),
]


@pytest.mark.parametrize(("specs", "message"), WRONG_AXES)
def test_wrong_axis_raises_with_fix(specs: dict, message: str) -> None:
    model = nn.Sequential(nn.Sequential(nn.Identity(), nn.Linear(6, 4)))

    with pytest.raises(qatcore.SwapError, match=message):
        qatcore.swap_modules(model, qatcore.QConfig(**specs))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")
def test_no_out_features_rejects_per_channel_spec(x86: qatcore.QConfig) -> None:
    model = nn.Sequential(nn.Linear(6, 0))

    with pytest.raises(qatcore.SwapError, match=r"0 \(Linear\): cannot build the weight fake"):
        qatcore.swap_modules(model, x86)


def test_hook_spectral_norm_raises_with_qualified_path(x86: qatcore.QConfig) -> None:
    model = nn.Sequential(nn.Sequential(nn.utils.spectral_norm(nn.Linear(6, 4))))

    with pytest.raises(qatcore.SwapError, match=r"0\.0 \(Linear\): its weight is a computed"):
        qatcore.swap_modules(model, x86)


def test_fused_type_rejects_a_lone_linear(x86: qatcore.QConfig) -> None:
    with pytest.raises(qatcore.SwapError, match=r"fc \(Linear\): LinearReLU is built from"):
        qatcore_linear.LinearReLU.from_float(nn.Linear(6, 4), x86, name="fc")


@pytest.mark.parametrize("input_shape", [(6,), (5, 6), (2, 7, 6)], ids=["unbatched", "2d", "3d"])
def test_per_channel_output_scales_last_axis(input_shape: tuple[int, ...]) -> None:
    qconfig = qatcore.QConfig(activation=qatcore.QuantSpec(axis=1))
    qat = qatcore.swap_modules(nn.Linear(6, 4), qconfig)

    output = qat(torch.randn(input_shape) + torch.arange(6.0))

    assert output.shape == (*input_shape[:-1], 4)
    assert qat.output_fake_quant.scale.shape == (4,)
    assert len(set(qat.output_fake_quant.scale.tolist())) > 1


# -- back to float ------------------------------------------------------------


@pytest.mark.parametrize("fused", FUSED)
def test_to_float_equals_disabled_fake_quant(fused: bool, x86: qatcore.QConfig) -> None:
    qat = qatcore.swap_modules(single(fused), x86)
    train(qat)
    qat.eval()
    x = torch.randn(5, 6)

    float_model = qatcore.to_float(qat)
    float_layer = qat[0].to_float()
    qatcore.enable_fake_quant(qat, False)
    expected = qat(x)

    assert type(float_model[0]) is nn.Linear
    assert isinstance(float_layer, nn.Sequential if fused else nn.Linear)
    assert torch.equal(float_model(x), expected)
    assert torch.equal(float_layer(x), expected)
    assert not tensor_storages(float_model) & tensor_storages(qat)
    assert not tensor_storages(float_layer) & tensor_storages(qat)


# -- checkpoints and copies ---------------------------------------------------


def test_state_dict_round_trip_into_a_fresh_swap(x86: qatcore.QConfig) -> None:
    qat = qatcore.swap_modules(mlp(), x86)
    train(qat, shape=(5, 6))
    buffer = io.BytesIO()
    torch.save(qat.state_dict(), buffer)
    buffer.seek(0)

    fresh = qatcore.swap_modules(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), x86)
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    qat.eval()
    fresh.eval()
    x = torch.randn(4, 6)

    assert torch.equal(fresh(x), qat(x))
    for index in (0, 2):
        for role, (scale, zero_point) in qat[index].qparams().items():
            assert torch.equal(fresh[index].qparams()[role][0], scale)
            assert torch.equal(fresh[index].qparams()[role][1], zero_point)


@pytest.mark.parametrize(
    "duplicate",
    [lambda module: pickle.loads(pickle.dumps(module)), copy.deepcopy],
    ids=["pickle", "deepcopy"],
)
def test_copies_compute_the_same_and_share_nothing(duplicate, x86: qatcore.QConfig) -> None:
    qat = qatcore.swap_modules(mlp(), x86)
    train(qat)
    qat.eval()
    x = torch.randn(4, 6)

    twin = duplicate(qat)

    assert torch.equal(twin(x), qat(x))
    assert type(twin[0]) is qatcore_linear.LinearReLU
    assert not tensor_storages(twin) & tensor_storages(qat)
    train(twin)  # the copy still trains: observers and kernels work after the copy


# -- numerics -----------------------------------------------------------------


def test_zero_weight_row_stays_zero(x86: qatcore.QConfig) -> None:
    qat = qatcore.swap_modules(nn.Linear(6, 4), x86)
    with torch.no_grad():
        qat.weight[2] = 0.0

    quantized = qat.weight_fake_quant(qat.weight)
    scale = qat.weight_fake_quant.scale

    assert torch.equal(quantized[2], torch.zeros(6))
    assert torch.isfinite(quantized).all()
    assert scale[2] > 0
    assert torch.isfinite(scale).all()
    assert not torch.equal(quantized[1], torch.zeros(6))


DTYPE_CASES = [
    pytest.param(torch.float64, False, id="float64-cast-before-swap"),
    pytest.param(torch.float64, True, id="float64-cast-after-swap"),
    pytest.param(torch.bfloat16, False, id="bfloat16-cast-before-swap"),
    pytest.param(torch.bfloat16, True, id="bfloat16-cast-after-swap"),
]


@pytest.mark.parametrize(("dtype", "cast_after_swap"), DTYPE_CASES)
def test_other_dtypes_train_with_float32_qparams(
    dtype: torch.dtype, cast_after_swap: bool, x86: qatcore.QConfig
) -> None:
    model = mlp()
    if cast_after_swap:
        qat = qatcore.swap_modules(model, x86).to(dtype)
    else:
        qat = qatcore.swap_modules(model.to(dtype), x86)
    x = torch.randn(2, 5, 6, dtype=dtype)

    output = qat(x)
    output.square().mean().backward()

    assert output.dtype == dtype
    assert torch.isfinite(output.float()).all()
    for index in (0, 2):
        assert qat[index].weight.dtype == dtype
        assert qat[index].weight.grad.dtype == dtype
        assert torch.isfinite(qat[index].weight.grad.float()).all()
        for scale, zero_point in qat[index].qparams().values():
            assert scale.dtype == torch.float32
            assert zero_point.dtype == torch.int32
    assert qatcore.to_float(qat)[0].weight.dtype == dtype
