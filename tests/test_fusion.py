"""Automatic fusion from the traced forward, on the blocks of common architectures."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import qatcore

pytest.importorskip("qatcore_conv")
pytest.importorskip("qatcore_observers")
pytest.importorskip("qatcore_x86")


@pytest.fixture
def x86() -> qatcore.QConfig:
    return qatcore.get_qconfig("x86")


def _fused_groups(decisions: qatcore.Plan) -> set[tuple[str, ...]]:
    return {entry.members for entry in decisions if entry.action == "fuse"}


def _swapped(decisions: qatcore.Plan) -> set[str]:
    return {entry.name for entry in decisions if entry.action == "swap"}


class BasicBlock(nn.Module):
    """ResNet basic block: the second BN's output meets the shortcut before the ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.out_relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.out_relu(y + x)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand, depthwise, project; ReLU6 is not a fusion pattern."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(8, 32, 1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU6(),
            nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU6(),
            nn.Conv2d(32, 8, 1, bias=False),
            nn.BatchNorm2d(8),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class AudioStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, 8, 9, stride=2)
        self.bn1 = nn.BatchNorm1d(8)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv1d(8, 8, 5)
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.conv2(self.act1(self.bn1(self.conv1(x)))))


class VideoStem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(3, 8, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
            nn.BatchNorm3d(8),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)


class UNetDecoder(nn.Module):
    """Upsample with transposed conv-BN-ReLU, concatenate the skip, then conv-BN-ReLU twice."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2, bias=False)
        self.up_bn = nn.BatchNorm2d(8)
        self.up_act = nn.ReLU()
        self.conv = nn.Conv2d(16, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.refine = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.head = nn.ConvTranspose2d(8, 2, 3, padding=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.up_act(self.up_bn(self.up(x))), skip], dim=1)
        return self.head(self.refine(self.act(self.bn(self.conv(y)))))


class ReusedIntermediate(nn.Module):
    """The conv output feeds the BN and a side branch, so they cannot fuse."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class ReusedNormalized(nn.Module):
    """The BN output feeds the ReLU and a side branch: conv and BN fuse, the ReLU cannot."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return torch.cat([self.act(y), y], dim=1)


class CalledTwice(nn.Module):
    """One conv-ReLU pair applied to two inputs: a fused module cannot stand for both calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x)) + self.act(self.conv(y))


class DataDependent(nn.Module):
    """A forward whose control flow depends on values, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.conv = nn.Conv2d(4, 4, 1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        if y.sum() > 0:
            y = y * 2
        return self.act(self.conv(y))


def test_resnet_basic_block(x86: qatcore.QConfig) -> None:
    decisions = qatcore.plan(BasicBlock(), x86)

    assert _fused_groups(decisions) == {("conv1", "bn1", "relu"), ("conv2", "bn2")}
    assert decisions.notes == []
    qat = qatcore.swap_modules(BasicBlock(), x86)
    assert type(qat.conv1).__name__ == "ConvBnReLU2d"
    assert type(qat.conv2).__name__ == "ConvBn2d"
    assert type(qat.out_relu) is nn.ReLU


def test_mobilenet_inverted_residual(x86: qatcore.QConfig) -> None:
    decisions = qatcore.plan(InvertedResidual(), x86)

    assert _fused_groups(decisions) == {
        ("block.0", "block.1"),
        ("block.3", "block.4"),
        ("block.6", "block.7"),
    }
    kept = {entry.name for entry in decisions if entry.action == "keep"}
    assert kept == {"block.2", "block.5"}


def test_conv1d_audio_stack(x86: qatcore.QConfig) -> None:
    decisions = qatcore.plan(AudioStack(), x86)

    assert _fused_groups(decisions) == {("conv1", "bn1", "act1"), ("conv2", "act2")}


def test_conv3d_video_stem(x86: qatcore.QConfig) -> None:
    decisions = qatcore.plan(VideoStem(), x86)

    assert _fused_groups(decisions) == {("stem.0", "stem.1", "stem.2")}


def test_unet_decoder_with_transposed_conv(x86: qatcore.QConfig) -> None:
    decisions = qatcore.plan(UNetDecoder(), x86)

    assert _fused_groups(decisions) == {
        ("up", "up_bn", "up_act"),
        ("conv", "bn", "act"),
        ("refine.0", "refine.1", "refine.2"),
    }
    assert _swapped(decisions) == {"head"}


def test_unet_decoder_trains_and_returns_to_float(x86: qatcore.QConfig) -> None:
    torch.manual_seed(0)
    model = UNetDecoder()
    qat = qatcore.swap_modules(model, x86)
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.01)
    x, skip = torch.randn(2, 16, 4, 4), torch.randn(2, 8, 8, 8)

    for _ in range(3):
        loss = qat(x, skip).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    float_model = qatcore.to_float(qat).eval()
    qatcore.enable_fake_quant(qat, False)
    qat.eval()

    assert type(qat.up).__name__ == "ConvTransposeBnReLU2d"
    assert qat.up.weight_fake_quant.scale.shape == (8,)
    assert torch.allclose(float_model(x, skip), qat(x, skip), atol=1e-5)


def _reasons(decisions: qatcore.Plan) -> dict[str, str]:
    return {entry.name: entry.reason for entry in decisions}


def test_reused_intermediate_blocks_fusion(x86: qatcore.QConfig) -> None:
    decisions = qatcore.plan(ReusedIntermediate(), x86)

    assert _fused_groups(decisions) == set()
    assert _swapped(decisions) == {"conv"}
    why = "not fused as conv + bn: the output of conv also feeds add"
    assert _reasons(decisions)["conv"] == why
    assert _reasons(decisions)["bn"] == f"no QAT mapping for torch.nn.BatchNorm2d; {why}"


def test_reused_bn_output_fuses_conv_and_bn_only(x86: qatcore.QConfig) -> None:
    decisions = qatcore.plan(ReusedNormalized(), x86)

    assert _fused_groups(decisions) == {("conv", "bn")}
    assert _reasons(decisions)["act"] == (
        "no QAT mapping for torch.nn.ReLU; "
        "not fused as conv + bn + act: the output of bn also feeds cat"
    )


def test_module_called_twice_is_not_fused(x86: qatcore.QConfig) -> None:
    decisions = qatcore.plan(CalledTwice(), x86)

    assert _fused_groups(decisions) == set()
    assert _reasons(decisions)["conv"] == (
        "not fused as conv + act: the forward calls conv 2 times, and one fused module "
        "cannot stand for several calls"
    )


def test_untraceable_model_falls_back_to_containers(x86: qatcore.QConfig) -> None:
    decisions = qatcore.plan(DataDependent(), x86)

    assert _fused_groups(decisions) == {("block.0", "block.1")}
    assert _swapped(decisions) == {"conv"}
    assert len(decisions.notes) == 1
    assert "torch.fx could not trace the model" in decisions.notes[0]
    assert "nn.Sequential" in decisions.notes[0]
    assert f"note: {decisions.notes[0]}" in decisions.table()


@pytest.mark.parametrize(
    ("model", "inputs"),
    [
        (BasicBlock(), (torch.randn(2, 8, 6, 6),)),
        (AudioStack(), (torch.randn(2, 1, 64),)),
        (VideoStem(), (torch.randn(1, 3, 4, 16, 16),)),
    ],
    ids=["resnet-block", "audio", "video"],
)
def test_fused_model_matches_float_without_fake_quant(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], x86: qatcore.QConfig
) -> None:
    model.eval()
    expected = model(*inputs)
    qat = qatcore.swap_modules(model, x86).eval()
    qatcore.enable_fake_quant(qat, enabled=False)

    assert (qat(*inputs) - expected).abs().max().item() <= 1e-5
    restored = qatcore.to_float(qat).eval()
    assert (restored(*inputs) - expected).abs().max().item() <= 1e-5


def test_fused_block_trains(x86: qatcore.QConfig) -> None:
    qat = qatcore.swap_modules(BasicBlock(), x86)
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.01)

    for step in range(3):
        loss = qat(torch.randn(4, 8, 6, 6) * (step + 1)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        assert torch.isfinite(loss)


def test_freeze_bn_stats_reaches_fused_modules(x86: qatcore.QConfig) -> None:
    qat = qatcore.swap_modules(BasicBlock(), x86)
    before = qat.conv1.bn.running_mean.clone()

    qatcore.freeze_bn_stats(qat)
    qat(torch.randn(2, 8, 6, 6) + 3)

    assert torch.equal(qat.conv1.bn.running_mean, before)
    qatcore.freeze_bn_stats(qat, frozen=False)
    qat(torch.randn(2, 8, 6, 6) + 3)
    assert not torch.equal(qat.conv1.bn.running_mean, before)


# -- what the traced forward allows ----------------------------------------------


class SubclassedNorm(nn.BatchNorm2d):
    """A user BatchNorm subclass: its forward branches on the input's rank."""


class SubclassHead(nn.Module):
    """A conv-BN-ReLU block, then a head whose BN is a user subclass."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.head_conv = nn.Conv2d(4, 4, 1)
        self.head_bn = SubclassedNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_bn(self.head_conv(self.act(self.bn(self.conv(x)))))


def test_user_subclass_does_not_stop_tracing(x86: qatcore.QConfig) -> None:
    decisions = qatcore.plan(SubclassHead(), x86)

    assert _fused_groups(decisions) == {("conv", "bn", "act")}
    assert decisions.notes == []


class SubclassedReLU(nn.ReLU):
    """A user ReLU subclass after a conv."""


def test_subclass_member_blocks_fusion_with_reason(x86: qatcore.QConfig) -> None:
    decisions = qatcore.plan(nn.Sequential(nn.Conv2d(3, 4, 3), SubclassedReLU()), x86)

    why = (
        f"not fused as 0 + 1: 1 is a {__name__}.SubclassedReLU, a subclass of torch.nn.ReLU, "
        "and only exact types fuse; register a fusion pattern with the subclass to fuse it"
    )
    assert _fused_groups(decisions) == set()
    assert _reasons(decisions)["0"] == why
    assert _reasons(decisions)["1"].endswith(why)


class KeywordCall(nn.Module):
    """The ReLU takes the conv output as a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(input=self.conv(x))


def test_keyword_argument_call_fuses(x86: qatcore.QConfig) -> None:
    decisions = qatcore.plan(KeywordCall(), x86)

    assert _fused_groups(decisions) == {("conv", "act")}


def test_bn_without_running_stats_stays_unfused(x86: qatcore.QConfig) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.BatchNorm2d(4),
    )

    decisions = qatcore.plan(model, x86)
    qat = qatcore.swap_modules(model, x86)

    assert _fused_groups(decisions) == {("3", "4")}
    assert "track_running_stats=False" in _reasons(decisions)["0"]
    assert _reasons(decisions)["0"].startswith("not fused as 0 + 1")
    assert type(qat[0]).__name__ == "Conv2d"
    assert type(qat[1]) is nn.BatchNorm2d


def test_type_keyed_qconfig_fuses_unconfigured_members(x86: qatcore.QConfig) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())

    decisions = qatcore.plan(model, {nn.Conv2d: x86})

    assert _fused_groups(decisions) == {("0", "1", "2")}
    assert _reasons(decisions)["3"] == "the qconfig maps it to None"


def test_member_mapped_to_none_blocks_fusion(x86: qatcore.QConfig) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    decisions = qatcore.plan(model, {nn.Conv2d: x86, nn.BatchNorm2d: None})

    assert _fused_groups(decisions) == set()
    assert _reasons(decisions)["0"] == (
        "not fused as 0 + 1: the qconfig maps 1 to None, while 0 is quantized"
    )


def test_table_lists_every_member_of_a_group(x86: qatcore.QConfig) -> None:
    table = qatcore.plan(BasicBlock(), x86).table()

    assert "conv1 + bn1 + relu  fuse" in table
    assert "conv2 + bn2" in table


# -- explicit groups ---------------------------------------------------------------


class HeadAfterReLU(nn.Module):
    """conv -> relu -> head: the pair (head, relu) is not a chain of the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.conv(x)))


def test_explicit_group_must_be_a_chain(x86: qatcore.QConfig) -> None:
    with pytest.raises(
        qatcore.SwapError,
        match=r"fuse group \('head', 'relu'\) cannot be fused: the forward does not pass "
        r"the output of each member straight to the next \(head -> relu\)",
    ):
        qatcore.swap_modules(HeadAfterReLU(), x86, fuse=[("head", "relu")])


def test_explicit_group_with_reused_output_raises(x86: qatcore.QConfig) -> None:
    with pytest.raises(
        qatcore.SwapError, match=r"cannot be fused: the output of conv also feeds add"
    ):
        qatcore.swap_modules(ReusedIntermediate(), x86, fuse=[("conv", "bn")])


def test_explicit_group_in_untraceable_model_is_noted(x86: qatcore.QConfig) -> None:
    decisions = qatcore.plan(DataDependent(), x86, fuse=[("conv", "act")])

    assert _fused_groups(decisions) == {("conv", "act")}
    assert len(decisions.notes) == 1
    assert (
        "the fuse group ('conv', 'act') is not checked against the forward" in (decisions.notes[0])
    )


# -- modules registered under two names ----------------------------------------------


class SharedLayer(nn.Module):
    """One Linear registered under two names of one parent, and called through both."""

    def __init__(self) -> None:
        super().__init__()
        self.first = self.second = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def test_shared_module_gets_one_qat_module(x86: qatcore.QConfig) -> None:
    decisions = qatcore.plan(SharedLayer(), x86)
    qat = qatcore.swap_modules(SharedLayer(), x86)
    float_model = qatcore.to_float(qat)

    assert [(entry.name, entry.action) for entry in decisions] == [
        ("first", "swap"),
        ("second", "swap"),
    ]
    assert _reasons(decisions)["second"] == "the same module as first, so it is planned with it"
    assert type(qat.second).__name__ == "Linear"
    assert qat.second is qat.first
    assert type(float_model.second) is nn.Linear
    assert float_model.second is float_model.first


def test_shared_module_across_parents(x86: qatcore.QConfig) -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Sequential(shared), nn.Sequential(shared))

    qat = qatcore.swap_modules(model, x86)
    float_model = qatcore.to_float(qat)

    assert qat[0][0] is qat[1][0]
    assert float_model[0][0] is float_model[1][0]


class TiedHead(nn.Module):
    """A language-model head whose weight is the embedding's."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


def test_to_float_keeps_weight_tied_to_embedding(x86: qatcore.QConfig) -> None:
    qat = qatcore.swap_modules(TiedHead(), x86)

    float_model = qatcore.to_float(qat)

    assert qat.head.weight is qat.embed.weight
    assert float_model.head.weight is float_model.embed.weight
    assert float_model.head.weight is not qat.head.weight


class AliasedActivation(nn.Module):
    """A conv-ReLU pair whose ReLU is also registered under a second name."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.alias = self.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


def test_shared_member_blocks_fusion(x86: qatcore.QConfig) -> None:
    decisions = qatcore.plan(AliasedActivation(), x86)

    assert _fused_groups(decisions) == set()
    assert _reasons(decisions)["conv"] == (
        "not fused as conv + act: act is also registered as alias, and a fused module can "
        "take only one place"
    )


def test_shared_module_called_twice_is_not_fused(x86: qatcore.QConfig) -> None:
    relu = nn.ReLU()
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), relu), nn.Sequential(relu))

    decisions = qatcore.plan(model, x86)

    assert _fused_groups(decisions) == set()
    assert "the forward calls 0.1 2 times" in _reasons(decisions)["0.0"]


class SharedHead(nn.Module):
    """One Linear registered as ``a`` and as ``head.fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.head = nn.Sequential()
        self.head.fc = self.a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.a(x))


def test_shared_module_with_two_configs_raises(x86: qatcore.QConfig) -> None:
    with pytest.raises(
        qatcore.SwapError,
        match=r"head\.fc \(Linear\) is the same module as a, but the qconfig configures the "
        r"two names differently",
    ):
        qatcore.plan(SharedHead(), {"": x86, "head": None})


class SharedBlock(nn.Module):
    """A conv-ReLU container registered as ``block`` and as ``alias``."""

    def __init__(self) -> None:
        super().__init__()
        self.block = self.alias = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def test_shared_container_fuses_under_first_name(x86: qatcore.QConfig) -> None:
    decisions = qatcore.plan(SharedBlock(), x86)
    qat = qatcore.swap_modules(SharedBlock(), x86)

    assert _fused_groups(decisions) == {("block.0", "block.1")}
    assert qat.alias is qat.block
    assert type(qat.alias[0]).__name__ == "ConvReLU2d"


def test_shared_container_with_two_configs_raises(x86: qatcore.QConfig) -> None:
    with pytest.raises(qatcore.SwapError, match=r"alias\.0 \(Conv2d\) is the same module as"):
        qatcore.plan(SharedBlock(), {"": x86, "alias.0": None})


class TiedConvs(nn.Module):
    """Two convs sharing one weight; the first is followed by BN."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2.weight = self.c1.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.bn(self.c1(x)))


def test_tied_weight_is_not_folded(x86: qatcore.QConfig) -> None:
    decisions = qatcore.plan(TiedConvs(), x86)
    float_model = qatcore.to_float(qatcore.swap_modules(TiedConvs(), x86))

    assert _fused_groups(decisions) == set()
    assert _reasons(decisions)["c1"] == (
        "not fused as c1 + bn: c1.weight is tied to c2.weight, and folding BatchNorm into "
        "it would untie them in the float model"
    )
    assert float_model.c1.weight is float_model.c2.weight


class TwoActivations(nn.Module):
    """The conv output feeds two ReLUs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.ra = nn.ReLU()
        self.rb = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.ra(y) + self.rb(y)


def test_each_follower_gets_a_reason(x86: qatcore.QConfig) -> None:
    reasons = _reasons(qatcore.plan(TwoActivations(), x86))

    assert reasons["ra"].endswith("not fused as conv + ra: the output of conv also feeds rb")
    assert reasons["rb"].endswith("not fused as conv + rb: the output of conv also feeds ra")


def test_explicit_group_names_the_other_user(x86: qatcore.QConfig) -> None:
    with pytest.raises(
        qatcore.SwapError, match=r"cannot be fused: the output of conv also feeds ra$"
    ):
        qatcore.swap_modules(TwoActivations(), x86, fuse=[("conv", "rb")])


def test_unchecked_explicit_group_warns(x86: qatcore.QConfig) -> None:
    with pytest.warns(qatcore.QatcoreWarning, match=r"the fuse group \('conv', 'act'\) is not"):
        qatcore.swap_modules(DataDependent(), x86, fuse=[("conv", "act")])


def test_to_float_restores_a_swapped_submodule(x86: qatcore.QConfig) -> None:
    model = nn.Sequential()
    model.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model.head = nn.Flatten()
    keys = set(model.state_dict())

    qatcore.swap_modules(model.backbone, x86, inplace=True)
    float_model = qatcore.to_float(model)

    assert [type(module) for module in float_model.backbone] == [nn.Conv2d, nn.Identity, nn.ReLU]
    assert set(float_model.state_dict()) == {key for key in keys if ".1." not in key} | {
        "backbone.0.bias"
    }


def test_placeholders_take_the_member_mode(x86: qatcore.QConfig) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()

    qat = qatcore.swap_modules(model, x86)

    assert not qat[1].training


# -- nn.Sequential trees: the call graph built from the tree, without tracing ---


def _conv_block() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU())


def _node_calls(graph: object) -> list[tuple[str, str, list[str], list[str], dict[str, str]]]:
    """Return each node's op, target, the targets of its arguments and users, and its kwargs."""
    return [
        (
            node.op,
            str(node.target),
            [str(arg.target) for arg in node.args],
            [str(user.target) for user in node.users],
            {key: str(value) for key, value in node.kwargs.items()},
        )
        for node in graph.nodes  # type: ignore[attr-defined]
    ]


def _sequential_models() -> dict[str, nn.Module]:
    nested = nn.Sequential(
        nn.Sequential(nn.Conv2d(2, 2, 1)),
        nn.Sequential(nn.BatchNorm2d(2), nn.Sequential(nn.ReLU())),
        nn.Sequential(),
        nn.Identity(),
    )
    torch_leaves = nn.Sequential(
        nn.Linear(4, 4), nn.TransformerEncoderLayer(4, 2), nn.ModuleList([nn.ReLU()])
    )
    return {
        "blocks": nn.Sequential(*[_conv_block() for _ in range(3)]),
        "nested": nested,
        "torch-leaves": torch_leaves,
        "empty": nn.Sequential(),
    }


@pytest.mark.parametrize("name", list(_sequential_models()))
def test_sequential_graph_matches_trace(name: str) -> None:
    from qatcore._graph_fusion import _LeafTracer, sequential_graph

    model = _sequential_models()[name]

    graph = sequential_graph(model)

    assert graph is not None
    assert _node_calls(graph) == _node_calls(_LeafTracer().trace(model))


def _hooked_container() -> nn.Module:
    model = nn.Sequential(_conv_block(), _conv_block())
    model[0].register_forward_hook(lambda module, args, output: output * 2)
    return model


def _shared_member() -> nn.Module:
    relu = nn.ReLU()
    return nn.Sequential(nn.Sequential(nn.Conv2d(2, 2, 1), relu), relu)


def _none_child() -> nn.Module:
    model = nn.Sequential(_conv_block())
    model[0].register_module("unused", None)
    return model


def _own_forward() -> nn.Module:
    model = nn.Sequential(_conv_block(), _conv_block())
    model[1].forward = lambda x: x  # type: ignore[method-assign]
    return model


def _deep() -> nn.Module:
    model: nn.Module = _conv_block()
    for _ in range(60):
        model = nn.Sequential(model)
    return model


class _Subclass(nn.Sequential):
    pass


@pytest.mark.parametrize(
    "build",
    [_hooked_container, _shared_member, _none_child, _own_forward, _deep, BasicBlock],
    ids=["container-hook", "shared", "none-child", "own-forward", "deep", "custom-root"],
)
def test_other_models_need_tracing(build: Callable[[], nn.Module]) -> None:
    from qatcore._graph_fusion import sequential_graph

    assert sequential_graph(build()) is None


def test_sequential_subclass_needs_tracing() -> None:
    from qatcore._graph_fusion import sequential_graph

    assert sequential_graph(nn.Sequential(_Subclass(nn.Conv2d(2, 2, 1)))) is None
    assert sequential_graph(_Subclass(nn.Conv2d(2, 2, 1))) is None


def test_global_hook_needs_tracing() -> None:
    from qatcore._graph_fusion import sequential_graph

    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: out)
    try:
        assert sequential_graph(nn.Sequential(_conv_block())) is None
    finally:
        handle.remove()
    assert sequential_graph(nn.Sequential(_conv_block())) is not None


def test_container_hook_between_blocks_stops_fusion(x86: qatcore.QConfig) -> None:
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(2, 2, 1)), nn.Sequential(nn.BatchNorm2d(2), nn.ReLU())
    )
    model[0].register_forward_hook(lambda module, args, output: output * 2)

    decisions = qatcore.plan(model, x86)

    assert _fused_groups(decisions) == set()
    assert _swapped(decisions) == {"0.0"}


def test_chain_across_containers_fuses(x86: qatcore.QConfig) -> None:
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(2, 2, 1)), nn.Sequential(nn.BatchNorm2d(2), nn.ReLU())
    )

    decisions = qatcore.plan(model, x86)

    assert _fused_groups(decisions) == {("0.0", "1.0", "1.1")}
