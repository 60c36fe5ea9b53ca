"""Automatic fusion from the traced forward, on the blocks of common architectures."""

from __future__ import annotations

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
