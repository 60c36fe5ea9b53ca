"""Module swap, plan and to_float on real models, with the first-party plugins."""

from __future__ import annotations

import copy
import gc
import pickle
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatcore

qatcore_conv = pytest.importorskip("qatcore_conv")
pytest.importorskip("qatcore_observers")
pytest.importorskip("qatcore_x86")

DIMS = [1, 2, 3]
DIM_IDS = ["conv1d", "conv2d", "conv3d"]
CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SPATIAL = {1: (12,), 2: (7, 9), 3: (5, 6, 4)}


@pytest.fixture
def x86() -> qatcore.QConfig:
    return qatcore.get_qconfig("x86")


def _train_steps(model: nn.Module, inputs: torch.Tensor, steps: int = 3) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        model(inputs * (step + 1)).square().mean().backward()
        optimizer.step()


class MixedConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.audio = nn.Conv1d(2, 4, 3)
        self.audio_block = nn.Sequential(nn.Conv1d(4, 4, 3), nn.ReLU())
        self.image = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.video = nn.Conv3d(1, 2, 3)


# -- coverage: every conv swapped, the rest listed with a reason ----------------


def test_swap_covers_every_conv_dimension(x86: qatcore.QConfig) -> None:
    model = MixedConvNet()

    qat = qatcore.swap_modules(model, x86)

    assert type(qat.audio) is qatcore_conv.Conv1d
    assert type(qat.audio_block[0]) is qatcore_conv.ConvReLU1d
    assert type(qat.audio_block[1]) is qatcore.FusedAway
    assert type(qat.image) is qatcore_conv.Conv2d
    assert type(qat.video) is qatcore_conv.Conv3d
    assert type(qat.norm) is nn.BatchNorm2d


def test_plan_lists_every_leaf_with_reason(x86: qatcore.QConfig) -> None:
    decisions = qatcore.plan(MixedConvNet(), x86)

    by_name = {entry.name: entry for entry in decisions}
    assert set(by_name) == {"audio", "audio_block.0", "image", "norm", "video"}
    assert by_name["audio_block.0"].action == "fuse"
    assert by_name["audio_block.0"].members == ("audio_block.0", "audio_block.1")
    assert by_name["norm"].action == "keep"
    assert "no QAT mapping for torch.nn.BatchNorm2d" in by_name["norm"].reason
    assert decisions.summary() == "3 swapped, 1 fused group, 1 kept float"
    table = decisions.table()
    assert "audio_block.0" in table
    assert "no QAT mapping for torch.nn.BatchNorm2d" in table


def test_plan_explains_unmapped_subclass(x86: qatcore.QConfig) -> None:
    class MyConv(nn.Conv2d):
        pass

    decisions = qatcore.plan(nn.Sequential(MyConv(1, 1, 1)), x86)

    assert decisions[0].action == "keep"
    assert "a subclass of torch.nn.Conv2d" in decisions[0].reason
    assert "register a mapping" in decisions[0].reason


# -- the root module itself -------------------------------------------------------


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_swap_returns_qat_root(dim: int, x86: qatcore.QConfig) -> None:
    conv = CONV_TYPES[dim](3, 4, 3)

    qat = qatcore.swap_modules(conv, x86)

    assert isinstance(qat, qatcore.QATConvNd)
    assert type(conv) is CONV_TYPES[dim]
    assert qat.weight is not conv.weight


def test_swap_inplace_root_raises(x86: qatcore.QConfig) -> None:
    conv = nn.Conv2d(3, 4, 3)

    with pytest.raises(qatcore.SwapError, match="use the returned module"):
        qatcore.swap_modules(conv, x86, inplace=True)
    assert type(conv) is nn.Conv2d


def test_swap_inplace_changes_children_only(x86: qatcore.QConfig) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    weight = model[0].weight

    result = qatcore.swap_modules(model, x86, inplace=True)

    assert result is model
    assert isinstance(model[0], qatcore.QATConvNd)
    assert model[0].weight is weight


def test_swap_leaves_caller_model_alone(x86: qatcore.QConfig) -> None:
    model = MixedConvNet()
    before = copy.deepcopy(model.state_dict())

    qat = qatcore.swap_modules(model, x86)
    _train_steps(qat.image, torch.randn(2, 3, 8, 8))

    assert type(model.image) is nn.Conv2d
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def _conv_bn_relu_blocks(count: int) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        *[
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
            for _ in range(count)
        ]
    )
    for block in model:
        block[1].running_mean.uniform_(-1.0, 1.0)
        block[1].running_var.uniform_(0.5, 2.0)
        block[1].num_batches_tracked.fill_(7)
    return model


def test_fused_modules_hold_the_float_values(x86: qatcore.QConfig) -> None:
    model = _conv_bn_relu_blocks(3)

    qat = qatcore.swap_modules(model, x86)

    for block, fused in zip(model, qat):
        assert type(fused[0]) is qatcore_conv.ConvBnReLU2d
        assert torch.equal(fused[0].weight, block[0].weight)
        assert torch.equal(fused[0].bias, block[0].bias)
        for name, tensor in block[1].state_dict().items():
            assert torch.equal(fused[0].bn.state_dict()[name], tensor), name


def test_swap_shares_no_tensor_with_the_float_model(x86: qatcore.QConfig) -> None:
    model = _conv_bn_relu_blocks(3)
    model[0][0].register_forward_hook(lambda module, args, output: output)

    qat = qatcore.swap_modules(model, x86)

    float_tensors = [*model.parameters(), *model.buffers()]
    qat_tensors = [*qat.parameters(), *qat.buffers()]
    assert not {id(t) for t in float_tensors}.intersection(id(t) for t in qat_tensors)
    float_storages = {t.untyped_storage().data_ptr() for t in float_tensors}
    assert not float_storages.intersection(t.untyped_storage().data_ptr() for t in qat_tensors)
    assert len(model[0][0]._forward_hooks) == 1
    assert qat[0][0]._forward_hooks is not model[0][0]._forward_hooks


def test_swap_leaves_float_blocks_unchanged(x86: qatcore.QConfig) -> None:
    model = _conv_bn_relu_blocks(3)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 4, 5, 5)
    expected = model.eval()(x)
    model.train()

    qat = qatcore.swap_modules(model, x86)
    _train_steps(qat, torch.randn(2, 4, 5, 5))

    assert [type(module) for module in model[0]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(model.eval()(x), expected)


def test_swap_leaves_the_random_state_alone(x86: qatcore.QConfig) -> None:
    model = _conv_bn_relu_blocks(2)
    model.append(nn.Conv2d(4, 4, 1))
    state = torch.random.get_rng_state()

    qatcore.swap_modules(model, x86)

    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("enabled", [True, False], ids=["enabled", "disabled"])
def test_swap_restores_garbage_collector_state(enabled: bool, x86: qatcore.QConfig) -> None:
    was_enabled = gc.isenabled()
    if not enabled:
        gc.disable()
    try:
        qatcore.swap_modules(_conv_bn_relu_blocks(2), x86)
        assert gc.isenabled() is enabled
        with pytest.raises(qatcore.SwapError):
            qatcore.swap_modules(nn.Conv2d(3, 4, 3), x86, inplace=True)
        assert gc.isenabled() is enabled
    finally:
        if was_enabled:
            gc.enable()


def test_swap_rejects_qat_model(x86: qatcore.QConfig) -> None:
    qat = qatcore.swap_modules(nn.Sequential(nn.Conv2d(1, 1, 1)), x86)

    with pytest.raises(qatcore.SwapError, match=r"0 \(Conv2d\) is already a QAT module"):
        qatcore.swap_modules(qat, x86)


# -- padding modes survive the swap -------------------------------------------


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_mode_applies_before_conv(dim: int, mode: str, x86: qatcore.QConfig) -> None:
    padding = (1, 2, 1)[:dim]
    conv = CONV_TYPES[dim](3, 4, 3, padding=padding, padding_mode=mode)
    qat = qatcore.swap_modules(conv, x86)
    qat.eval()
    x = torch.randn(2, 3, *SPATIAL[dim])

    output = qat(x)

    fq_weight = qat.weight_fake_quant(qat.weight)
    pad = [side for amount in reversed(padding) for side in (amount, amount)]
    conv_fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dim]
    expected = qat.output_fake_quant(conv_fn(F.pad(x, pad, mode=mode), fq_weight, qat.bias))
    assert torch.equal(output, expected)
    assert qat.padding_mode == mode
    assert qatcore.to_float(qat).padding_mode == mode


# -- checkpoints -------------------------------------------------------------


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_state_dict_loads_into_fresh_swap(dim: int, x86: qatcore.QConfig) -> None:
    conv_type = CONV_TYPES[dim]
    torch.manual_seed(0)
    model = nn.Sequential(conv_type(3, 5, 3), nn.ReLU(), conv_type(5, 6, 1))
    trained = qatcore.swap_modules(model, x86)
    x = torch.randn(2, 3, *SPATIAL[dim])
    _train_steps(trained, x)
    fresh = qatcore.swap_modules(copy.deepcopy(model), x86)

    fresh.load_state_dict(trained.state_dict(), strict=True)

    assert fresh[0].weight_fake_quant.scale.shape == (5,)
    assert fresh[2].weight_fake_quant.zero_point.shape == (6,)
    for qat in (trained, fresh):
        qat.eval()
        qatcore.freeze_observers(qat)
    assert torch.equal(fresh(x), trained(x))


def test_state_dict_channel_mismatch_names_key(x86: qatcore.QConfig) -> None:
    trained = qatcore.swap_modules(nn.Sequential(nn.Conv2d(3, 5, 3)), x86)
    other = qatcore.swap_modules(nn.Sequential(nn.Conv2d(3, 4, 3)), x86)

    with pytest.raises(RuntimeError, match=r"0\.weight_fake_quant\.scale"):
        other.load_state_dict(trained.state_dict())


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_state_dict_loads_with_weights_only(dim: int, tmp_path, x86: qatcore.QConfig) -> None:
    model = nn.Sequential(CONV_TYPES[dim](2, 3, 1), nn.ReLU())
    trained = qatcore.swap_modules(model, x86)
    _train_steps(trained, torch.randn(2, 2, *SPATIAL[dim]))
    path = tmp_path / "qat.pt"
    torch.save(trained.state_dict(), path)

    state = torch.load(path, weights_only=True)
    fresh = qatcore.swap_modules(model, x86)
    fresh.load_state_dict(state, strict=True)

    assert torch.equal(fresh[0].output_fake_quant.scale, trained[0].output_fake_quant.scale)


# -- pickle and deepcopy ------------------------------------------------------


class TiedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 3, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())
        self.block[0].weight = self.first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.first(x))


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_qat_model_round_trips(how: str, x86: qatcore.QConfig) -> None:
    qat = qatcore.swap_modules(TiedNet(), x86)
    x = torch.randn(2, 3, 6, 6)
    _train_steps(qat, x)

    clone = pickle.loads(pickle.dumps(qat)) if how == "pickle" else copy.deepcopy(qat)

    assert clone.block[0].weight is clone.first.weight
    for key, value in qat.state_dict().items():
        assert torch.equal(clone.state_dict()[key], value), key
    qat.eval()
    clone.eval()
    assert torch.equal(clone(x), qat(x))
    _train_steps(clone, x, steps=1)
    assert torch.equal(clone.block[0].weight, clone.first.weight)


def test_tied_weights_stay_tied_after_swap(x86: qatcore.QConfig) -> None:
    qat = qatcore.swap_modules(TiedNet(), x86)

    assert qat.block[0].weight is qat.first.weight


# -- hooks -----------------------------------------------------------------------


def test_forward_hooks_survive_swap(x86: qatcore.QConfig) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    seen = []
    model[0].register_forward_pre_hook(lambda module, args: seen.append(("pre", type(module))))
    model[0].register_forward_hook(lambda module, args, out: seen.append(("post", out.shape)))

    qat = qatcore.swap_modules(model, x86)
    qat(torch.randn(1, 3, 5, 5))

    assert seen == [("pre", qatcore_conv.Conv2d), ("post", torch.Size([1, 4, 3, 3]))]


def test_forward_hook_on_conv_blocks_fusion(x86: qatcore.QConfig) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    outputs = []
    model[0].register_forward_hook(lambda module, args, out: outputs.append(out))

    decisions = qatcore.plan(model, x86)
    qat = qatcore.swap_modules(model, x86)
    qat(torch.randn(1, 3, 5, 5))

    assert decisions[0].action == "swap"
    assert "not fused as 0 + 1: 0 has forward hooks" in decisions[0].reason
    assert "not fused as 0 + 1: 0 has forward hooks" in decisions[1].reason
    assert type(qat[0]) is qatcore_conv.Conv2d
    assert type(qat[1]) is nn.ReLU
    assert outputs[0].min() < 0, "the hook must see the conv output before the ReLU"


# -- qconfig mappings -----------------------------------------------------------


def test_qconfig_mapping_by_prefix_and_type(x86: qatcore.QConfig) -> None:
    weight_only = qatcore.QConfig(weight=x86.weight)
    mapping = {"": x86, "audio_block": None, nn.Conv3d: weight_only, "video": x86}

    decisions = {entry.name: entry for entry in qatcore.plan(MixedConvNet(), mapping)}

    assert decisions["audio"].qconfig == x86
    assert decisions["audio_block.0"].action == "keep"
    assert decisions["audio_block.0"].reason == "the qconfig maps it to None"
    assert decisions["video"].qconfig == x86, "a name key wins over a type key"


def test_qconfig_type_key_applies_without_global(x86: qatcore.QConfig) -> None:
    decisions = {entry.name: entry for entry in qatcore.plan(MixedConvNet(), {nn.Conv2d: x86})}

    assert decisions["image"].action == "swap"
    assert decisions["audio"].action == "keep"


def test_qconfig_unknown_name_raises(x86: qatcore.QConfig) -> None:
    with pytest.raises(qatcore.SwapError, match="'imag' matches no module"):
        qatcore.plan(MixedConvNet(), {"imag": x86})


@pytest.mark.parametrize(
    "bad",
    [42, {"image": 3}, {3: None}],
    ids=["not-a-mapping", "bad-value", "bad-key"],
)
def test_qconfig_bad_type_raises(bad: object) -> None:
    with pytest.raises(TypeError, match="qconfig"):
        qatcore.plan(MixedConvNet(), bad)


def test_out_of_range_weight_axis_raises_at_swap() -> None:
    qconfig = qatcore.QConfig(weight=qatcore.QuantSpec(axis=4))
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3)))

    with pytest.raises(qatcore.SwapError, match=r"0\.0 \(Conv2d\).*axis 4.*shape \(4, 3, 3, 3\)"):
        qatcore.swap_modules(model, {"0": qconfig})


# -- back to float -------------------------------------------------------------


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_to_float_matches_qat_without_fake_quant(dim: int, x86: qatcore.QConfig) -> None:
    conv_type = CONV_TYPES[dim]
    model = nn.Sequential(conv_type(3, 4, 3, padding="same"), nn.ReLU(), conv_type(4, 2, 1))
    qat = qatcore.swap_modules(model, x86)
    x = torch.randn(2, 3, *SPATIAL[dim])
    _train_steps(qat, x)

    restored = qatcore.to_float(qat)

    assert [type(module) for module in restored] == [conv_type, nn.ReLU, conv_type]
    qatcore.enable_fake_quant(qat, enabled=False)
    assert torch.equal(restored(x), qat(x))
    qat_pointers = {tensor.data_ptr() for tensor in qat.state_dict().values()}
    assert not any(tensor.data_ptr() in qat_pointers for tensor in restored.state_dict().values())


def test_to_float_of_root_returns_float_conv(x86: qatcore.QConfig) -> None:
    qat = qatcore.swap_modules(nn.Conv2d(3, 4, 3, bias=False), x86)

    restored = qatcore.to_float(qat)

    assert type(restored) is nn.Conv2d
    assert restored.bias is None
    assert torch.equal(restored.weight, qat.weight)
    assert restored.weight.data_ptr() != qat.weight.data_ptr()


def test_freeze_observers_keeps_qparams(x86: qatcore.QConfig) -> None:
    qat = qatcore.swap_modules(nn.Sequential(nn.Conv2d(3, 4, 3)), x86)
    _train_steps(qat, torch.randn(2, 3, 6, 6))
    scale = qat[0].output_fake_quant.scale.clone()

    qatcore.freeze_observers(qat)
    _train_steps(qat, torch.randn(2, 3, 6, 6) * 100)

    assert torch.equal(qat[0].output_fake_quant.scale, scale)


def test_eval_mode_does_not_observe(x86: qatcore.QConfig) -> None:
    qat = qatcore.swap_modules(nn.Sequential(nn.Conv2d(3, 4, 3)), x86)
    _train_steps(qat, torch.randn(2, 3, 6, 6))
    scale = qat[0].output_fake_quant.scale.clone()

    qat.eval()
    qat(torch.randn(2, 3, 6, 6) * 100)

    assert torch.equal(qat[0].output_fake_quant.scale, scale)


# -- edge cases a new user meets ------------------------------------------------


def test_fused_relu_hook_runs_once(x86: qatcore.QConfig) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    calls = []
    model[1].register_forward_hook(lambda module, args, out: calls.append(type(module).__name__))

    qat = qatcore.swap_modules(model, x86)
    qat(torch.randn(1, 3, 5, 5))

    assert calls == ["ConvReLU2d"]


@pytest.mark.parametrize("relu_qconfig", ["none", "other"])
def test_relu_with_own_qconfig_not_fused(relu_qconfig: str, x86: qatcore.QConfig) -> None:
    other = qatcore.QConfig(activation=qatcore.QuantSpec(bits=4, signed=False, symmetric=False))
    mapping = {"": x86, "1": None if relu_qconfig == "none" else other}

    decisions = qatcore.plan(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), mapping)

    why = {
        "none": "the qconfig maps 1 to None, while 0 is quantized",
        "other": "1 has a qconfig other than 0's",
    }[relu_qconfig]
    assert decisions[0].action == "swap"
    assert decisions[0].reason == f"not fused as 0 + 1: {why}"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (qatcore.QuantSpec(observer="nope"), "no observer registered for 'nope'"),
        (qatcore.QuantSpec(kernel="nope"), r"no kernel registered for \('nope', 'cpu'\)"),
    ],
    ids=["observer", "kernel"],
)
def test_plan_rejects_unregistered_names(spec: qatcore.QuantSpec, message: str) -> None:
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3)))

    with pytest.raises(qatcore.SwapError, match=rf"0\.0 \(Conv2d\): the weight spec .*{message}"):
        qatcore.plan(model, qatcore.QConfig(weight=spec))


def test_bad_observer_options_name_module() -> None:
    spec = qatcore.QuantSpec(observer="minmax", observer_options={"averaging_constant": 0.1})

    with pytest.raises(qatcore.SwapError, match=r"0 \(Conv2d\).*observer_options"):
        qatcore.swap_modules(nn.Sequential(nn.Conv2d(3, 4, 3)), qatcore.QConfig(weight=spec))


def test_parametrized_conv_kept_with_reason(x86: qatcore.QConfig) -> None:
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3)))

    decisions = qatcore.plan(model, x86)

    assert decisions[0].name == "0"
    assert decisions[0].action == "keep"
    assert "remove_parametrizations" in decisions[0].reason


def test_hook_spectral_norm_raises_with_path(x86: qatcore.QConfig) -> None:
    model = nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(3, 4, 3)))

    with pytest.raises(qatcore.SwapError, match=r"0 \(Conv2d\): its weight is a computed"):
        qatcore.swap_modules(model, x86)


def test_nothing_swapped_warns(x86: qatcore.QConfig) -> None:
    with pytest.warns(qatcore.CoverageWarning, match="nothing was swapped.*Embedding"):
        qatcore.swap_modules(nn.Sequential(nn.Embedding(3, 4)), x86)


def test_unmapped_subclass_warns_and_stays_float(x86: qatcore.QConfig) -> None:
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(MyConv(1, 2, 1), nn.Conv2d(2, 2, 1))

    with pytest.warns(qatcore.CoverageWarning, match=r"0 \(MyConv\).*register a QAT mapping"):
        qat = qatcore.swap_modules(model, x86)

    assert type(qat[0]) is MyConv
    assert isinstance(qat[1], qatcore.QATConvNd)
    assert qatcore.plan(model, x86)[0].subclass_of == "torch.nn.Conv2d"


@pytest.mark.usefixtures("fresh_plugin_manager")
def test_mapped_subclass_swaps(x86: qatcore.QConfig) -> None:
    class MyConv(nn.Conv2d):
        pass

    class QATMyConv(qatcore_conv.Conv2d):
        float_types = (MyConv,)

    qatcore.register_module(MyConv, QATMyConv)
    qat = qatcore.swap_modules(nn.Sequential(MyConv(1, 2, 1)), x86)

    assert type(qat[0]) is QATMyConv


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_per_channel_output_accepts_unbatched_input(dim: int) -> None:
    qconfig = qatcore.QConfig(activation=qatcore.QuantSpec(axis=1, observer="minmax"))
    qat = qatcore.swap_modules(CONV_TYPES[dim](3, 4, 3), qconfig)
    x = torch.randn(1, 3, *SPATIAL[dim])

    unbatched = qat(x[0])

    assert unbatched.shape == qat(x).shape[1:]
    assert qat.output_fake_quant.scale.shape == (4,)


# -- fusion switches -------------------------------------------------------------


class WiredBlock(nn.Module):
    """A conv and its ReLU wired in forward, outside any nn.Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Module()
        self.body.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body.conv(x))


def test_fuse_false_swaps_members_alone(x86: qatcore.QConfig) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())

    qat = qatcore.swap_modules(model, x86, fuse=False)

    assert type(qat[0]) is qatcore_conv.Conv2d
    assert type(qat[1]) is nn.ReLU


def test_explicit_group_fuses_wired_modules(x86: qatcore.QConfig) -> None:
    torch.manual_seed(0)
    model = WiredBlock()
    reference = qatcore.swap_modules(nn.Sequential(model.body.conv, nn.ReLU()), x86)
    x = torch.randn(2, 3, 6, 6)

    decisions = qatcore.plan(model, x86, fuse=[("body.conv", "act")])
    qat = qatcore.swap_modules(model, x86, fuse=[("body.conv", "act")])

    assert [(entry.name, entry.action) for entry in decisions] == [("body.conv", "fuse")]
    assert decisions[0].members == ("body.conv", "act")
    assert type(qat.body.conv) is qatcore_conv.ConvReLU2d
    assert type(qat.act) is qatcore.FusedAway
    assert torch.equal(qat(x), reference(x))


def test_to_float_restores_explicit_group(x86: qatcore.QConfig) -> None:
    qat = qatcore.swap_modules(WiredBlock(), x86, fuse=[("body.conv", "act")])

    restored = qatcore.to_float(qat)

    assert type(restored.body.conv) is nn.Conv2d
    assert type(restored.act) is nn.ReLU


@pytest.mark.parametrize(
    ("fuse", "error", "message"),
    [
        ([("body.conv", "nope")], qatcore.SwapError, "the model has no module 'nope'"),
        (
            [("body.conv", "body")],
            qatcore.SwapError,
            r"no fusion registered for \(torch\.nn\.Conv2d",
        ),
        ([("body.conv", "act"), ("act", "body.conv")], qatcore.SwapError, "in another group"),
        ("body.conv", TypeError, "fuse must be True, False, or a sequence"),
        ([("body.conv",)], TypeError, "at least two qualified names"),
    ],
    ids=["missing", "unregistered", "overlap", "string", "single"],
)
def test_explicit_group_errors(
    fuse: object, error: type[Exception], message: str, x86: qatcore.QConfig
) -> None:
    with pytest.raises(error, match=message):
        qatcore.plan(WiredBlock(), x86, fuse=fuse)


def test_explicit_group_blocked_by_hook_raises(x86: qatcore.QConfig) -> None:
    model = WiredBlock()
    model.body.conv.register_forward_hook(lambda module, args, out: None)

    with pytest.raises(qatcore.SwapError, match=r"cannot be fused: body\.conv has forward hooks"):
        qatcore.plan(model, x86, fuse=[("body.conv", "act")])


def test_subclass_with_own_forward_stays_float(x86: qatcore.QConfig) -> None:
    class ScaledConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    model = nn.Sequential(ScaledConv(1, 2, 1))

    with pytest.warns(qatcore.CoverageWarning, match=r"0 \(ScaledConv\)"):
        qat = qatcore.swap_modules(model, x86)

    assert type(qat[0]) is ScaledConv
    x = torch.randn(1, 1, 3, 3)
    assert torch.equal(qat(x), model(x))


def _nested(depth: int) -> nn.Module:
    model: nn.Module = nn.Conv2d(3, 3, 1)
    for _ in range(depth):
        model = nn.Sequential(model)
    return model


def test_deeply_nested_model_swaps_and_returns(x86: qatcore.QConfig) -> None:
    model = _nested(2000)

    qat = qatcore.swap_modules(model, x86)
    float_model = qatcore.to_float(qat)

    leaf = qat.get_submodule(".".join(["0"] * 2000))
    assert type(leaf).__name__ == "Conv2d"
    assert isinstance(leaf, qatcore.QATModule)
    assert type(float_model.get_submodule(".".join(["0"] * 2000))) is nn.Conv2d
    assert type(model.get_submodule(".".join(["0"] * 2000))) is nn.Conv2d


def test_copy_keeps_shared_modules_and_ties() -> None:
    from qatcore._swap import copy_module_tree

    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Sequential(shared), nn.Sequential(shared), nn.Linear(4, 4))
    model[2].weight = shared.weight

    copied = copy_module_tree(model)

    assert copied[0][0] is copied[1][0]
    assert copied[0][0] is not shared
    assert copied[2].weight is copied[0][0].weight
    assert torch.equal(copied[2].weight, shared.weight)
    assert list(model[0]._modules) == ["0"]


# -- input fake quantizers ------------------------------------------------------


def _input_quantized(model: nn.Module) -> set[str]:
    """Return the names of the QAT modules of ``model`` that have an input fake quantizer."""
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, qatcore.QATModule) and module.input_quantizer() is not None
    }


def _qat_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, qatcore.QATModule)}


def _conv_pool_linear_chain() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 5),
    )


class ResidualNet(nn.Module):
    """A stem conv, a block whose output is added to its input, and a head conv after the add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stem(x)
        return self.head(self.block(features) + features)


class FloatInBetweenNet(nn.Module):
    """Two convs with a float average pool, which leaves the quantization grid, between them."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3)
        self.pool = nn.AvgPool2d(2)
        self.second = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.pool(self.first(x)))


class UntraceableNet(nn.Module):
    """A conv chain whose forward branches on a tensor's value, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3)
        self.second = nn.Conv2d(4, 4, 1)
        self.third = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.second(self.first(x))
        if features.sum() > 0:
            features = features.flip(1)
        return self.third(features)


def test_chain_quantizes_first_input_only(x86: qatcore.QConfig) -> None:
    pytest.importorskip("qatcore_linear")

    qat = qatcore.swap_modules(_conv_pool_linear_chain(), x86)
    qat(torch.randn(2, 3, 8, 8))

    assert type(qat[0]) is qatcore_conv.ConvBnReLU2d
    assert _qat_names(qat) == {"0", "4", "6"}
    # Max pooling and flatten keep the previous module's output codes.
    assert _input_quantized(qat) == {"0"}
    assert "input" in qat[0].qparams()
    assert "input" not in qat[4].qparams()
    assert "input" not in qat[6].qparams()


def test_input_quantizer_after_residual_add(x86: qatcore.QConfig) -> None:
    qat = qatcore.swap_modules(ResidualNet(), x86)
    qat(torch.randn(2, 3, 6, 6))

    assert _qat_names(qat) == {"stem.0", "block.0", "head"}
    # The block reads the stem's output codes, but the sum of the add is on no grid.
    assert _input_quantized(qat) == {"stem.0", "head"}


def test_input_quantizer_after_float_module(x86: qatcore.QConfig) -> None:
    qat = qatcore.swap_modules(FloatInBetweenNet(), x86)
    qat(torch.randn(2, 3, 8, 8))

    assert type(qat.pool) is nn.AvgPool2d
    assert _input_quantized(qat) == {"first", "second"}


def test_input_quantizer_after_per_channel_output(x86: qatcore.QConfig) -> None:
    per_channel_output = qatcore.QConfig(
        weight=x86.weight, activation=qatcore.QuantSpec(bits=8, signed=False, axis=1)
    )
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1))

    qat = qatcore.swap_modules(model, {"": x86, "0": per_channel_output})
    qat(torch.randn(2, 3, 6, 6))

    # Codes with one scale per channel are no per-tensor input for the next layer.
    assert qat[0].output_fake_quant.spec.axis == 1
    assert _input_quantized(qat) == {"0", "1"}


def test_untraceable_model_quantizes_every_input(x86: qatcore.QConfig) -> None:
    model = UntraceableNet()
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)

    qat = qatcore.swap_modules(model, x86)
    qat(torch.randn(2, 3, 6, 6))

    assert _qat_names(qat) == {"first", "second", "third"}
    assert _input_quantized(qat) == {"first", "second", "third"}


@pytest.mark.parametrize(
    "build",
    [_conv_pool_linear_chain, ResidualNet, UntraceableNet],
    ids=["chain", "residual", "untraceable"],
)
def test_quantize_inputs_false_adds_none(
    build: Callable[[], nn.Module], x86: qatcore.QConfig
) -> None:
    pytest.importorskip("qatcore_linear")

    qat = qatcore.swap_modules(build(), x86, quantize_inputs=False)

    assert _qat_names(qat)
    assert _input_quantized(qat) == set()
    fake_quant_names = [
        name for name, module in qat.named_modules() if isinstance(module, qatcore.FakeQuantize)
    ]
    assert not any("input_fake_quant" in name for name in fake_quant_names)


def test_weight_only_qconfig_adds_no_input_quantizer(x86: qatcore.QConfig) -> None:
    weight_only = qatcore.QConfig(weight=x86.weight)

    qat = qatcore.swap_modules(ResidualNet(), weight_only)
    qat(torch.randn(2, 3, 6, 6))

    assert _qat_names(qat) == {"stem.0", "block.0", "head"}
    assert _input_quantized(qat) == set()
    assert set(qat.head.qparams()) == {"weight"}


def test_input_quantizer_is_per_tensor(x86: qatcore.QConfig) -> None:
    activation = qatcore.QuantSpec(bits=8, signed=False, symmetric=False, axis=1)
    qconfig = qatcore.QConfig(weight=x86.weight, activation=activation)

    qat = qatcore.swap_modules(nn.Sequential(nn.Conv2d(3, 4, 3)), qconfig)
    qat(torch.randn(2, 3, 6, 6))

    quantizer = qat[0].input_quantizer()
    assert quantizer is qat[0].input_fake_quant
    assert isinstance(quantizer, qatcore.FakeQuantize)
    assert quantizer.spec.axis is None
    assert (quantizer.quant_min, quantizer.quant_max) == (0, 255)
    assert quantizer.scale.shape == ()
    assert qat[0].output_fake_quant.scale.shape == (4,)
    scale, zero_point = qat[0].qparams()["input"]
    assert torch.equal(scale, quantizer.scale)
    assert torch.equal(zero_point, quantizer.zero_point)


DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_input_quantizer_on_model_device(device: str, x86: qatcore.QConfig) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1)).to(device)

    qat = qatcore.swap_modules(model, x86)
    output = qat(torch.randn(2, 3, 6, 6, device=device))

    quantizer = qat[0].input_quantizer()
    assert quantizer is not None
    assert qat[1].input_quantizer() is None
    for name, tensor in [*quantizer.named_buffers(), *quantizer.named_parameters()]:
        assert tensor.device.type == device, name
    assert output.device.type == device


def test_meta_model_input_quantizer_device(x86: qatcore.QConfig) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, device="meta"))

    qat = qatcore.swap_modules(model, x86)

    # Meta tensors have no values, so swap_modules builds every fake quantizer
    # of a meta module, the input quantizer too, on the default device.
    quantizer = qat[0].input_quantizer()
    assert quantizer is not None
    assert quantizer.scale.device == qat[0].weight_fake_quant.scale.device
    assert quantizer.scale.device == qat[0].output_fake_quant.scale.device


def test_input_quantizer_follows_train_and_eval(x86: qatcore.QConfig) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    model.eval()

    qat = qatcore.swap_modules(model, x86)
    quantizer = qat[0].input_quantizer()

    assert quantizer is not None
    assert not quantizer.training
    qat.train()
    assert quantizer.training
    _train_steps(qat, torch.randn(2, 3, 6, 6))
    scale = quantizer.scale.clone()

    qat.eval()
    assert not quantizer.training
    qat(torch.randn(2, 3, 6, 6) * 100)

    assert torch.equal(quantizer.scale, scale)


def test_model_switches_reach_input_quantizer(x86: qatcore.QConfig) -> None:
    qat = qatcore.swap_modules(nn.Sequential(nn.Conv2d(3, 4, 3)), x86)
    quantizer = qat[0].input_quantizer()
    assert quantizer is not None
    _train_steps(qat, torch.randn(2, 3, 6, 6))
    scale = quantizer.scale.clone()

    qatcore.freeze_observers(qat)
    assert not quantizer.observer_enabled
    _train_steps(qat, torch.randn(2, 3, 6, 6) * 100)
    assert torch.equal(quantizer.scale, scale)
    qatcore.freeze_observers(qat, frozen=False)
    assert quantizer.observer_enabled

    qatcore.enable_fake_quant(qat, enabled=False)
    assert not quantizer.fake_quant_enabled
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(quantizer(x), x)
    qatcore.enable_fake_quant(qat)
    assert quantizer.fake_quant_enabled


def test_state_dict_with_input_quantizers_loads(x86: qatcore.QConfig) -> None:
    torch.manual_seed(0)
    model = ResidualNet()
    trained = qatcore.swap_modules(model, x86)
    x = torch.randn(2, 3, 6, 6)
    _train_steps(trained, x)
    fresh = qatcore.swap_modules(copy.deepcopy(model), x86)

    state = trained.state_dict()
    assert fresh.state_dict().keys() == state.keys()
    assert "stem.0.input_fake_quant.scale" in state
    assert "head.input_fake_quant.scale" in state
    assert "block.0.input_fake_quant.scale" not in state
    fresh.load_state_dict(state, strict=True)

    assert torch.equal(fresh.head.input_fake_quant.scale, trained.head.input_fake_quant.scale)
    for qat in (trained, fresh):
        qat.eval()
    assert torch.equal(fresh(x), trained(x))


def test_state_dict_of_other_spec_is_rejected() -> None:
    pytest.importorskip("qatcore_conv")
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    eight_bit = qatcore.QConfig(
        weight=qatcore.QuantSpec(axis=qatcore.OUTPUT_CHANNELS),
        activation=qatcore.QuantSpec(bits=8, signed=False, symmetric=False),
    )
    four_bit = qatcore.QConfig(
        weight=qatcore.QuantSpec(axis=qatcore.OUTPUT_CHANNELS),
        activation=qatcore.QuantSpec(bits=4, signed=False, symmetric=False),
    )
    saved = qatcore.swap_modules(model, eight_bit).state_dict()

    with pytest.raises(RuntimeError) as error:
        qatcore.swap_modules(model, four_bit).load_state_dict(saved)

    message = str(error.value)
    assert (
        "0.output_fake_quant: its saved qparams were trained for affine codes [0, 255]" in message
    )
    assert "this fake quantizer uses affine codes [0, 15] per tensor" in message
    assert "0.weight_fake_quant" not in message


def test_state_dict_records_each_quantizer_scheme() -> None:
    pytest.importorskip("qatcore_conv")
    qconfig = qatcore.QConfig(
        weight=qatcore.QuantSpec(axis=qatcore.OUTPUT_CHANNELS, narrow_range=True),
        activation=qatcore.QuantSpec(bits=8, signed=False, symmetric=False),
    )

    state = qatcore.swap_modules(nn.Sequential(nn.Conv2d(1, 2, 3)), qconfig).state_dict()

    assert state["0.weight_fake_quant._extra_state"].tolist() == [-127, 127, 1, 0]
    assert state["0.output_fake_quant._extra_state"].tolist() == [0, 255, 0, -1]
    assert state["0.input_fake_quant._extra_state"].tolist() == [0, 255, 0, -1]


def test_state_dict_without_schemes_needs_strict_false() -> None:
    pytest.importorskip("qatcore_conv")
    model = nn.Sequential(nn.Conv2d(1, 2, 3))
    qconfig = qatcore.QConfig(
        weight=qatcore.QuantSpec(axis=qatcore.OUTPUT_CHANNELS),
        activation=qatcore.QuantSpec(bits=8, signed=False, symmetric=False),
    )
    trained = qatcore.swap_modules(model, qconfig)
    trained(torch.rand(2, 1, 5, 5))
    older = {key: value for key, value in trained.state_dict().items() if "_extra_state" not in key}
    fresh = qatcore.swap_modules(model, qconfig)

    with pytest.raises(RuntimeError) as error:
        fresh.load_state_dict(older, strict=True)
    result = fresh.load_state_dict(older, strict=False)

    assert "Missing key(s)" in str(error.value)
    assert "0.output_fake_quant._extra_state" in str(error.value)
    assert sorted(result.missing_keys) == [
        "0.input_fake_quant._extra_state",
        "0.output_fake_quant._extra_state",
        "0.weight_fake_quant._extra_state",
    ]
    assert torch.equal(fresh[0].output_fake_quant.scale, trained[0].output_fake_quant.scale)
