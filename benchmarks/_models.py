"""The four benchmark nets, their float and QAT variants, and one SGD training step.

Every variant of a net starts from the same float weights, made from one
seed, so that the variants differ only in what they fake-quantize and how.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.ao.nn.qat as nnqat
import torch.ao.quantization as tq
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization.quantization_mappings import get_default_qat_module_mappings

import qatcore

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

# -- the nets -------------------------------------------------------------------------


def conv_bn_relu(
    dims: int, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Return a bias-free conv, its BatchNorm and a ReLU in one ``nn.Sequential``."""
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    norm = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    return nn.Sequential(
        conv(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        norm(out_channels),
        nn.ReLU(),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs with a ReLU between them and a residual connection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR-sized ResNet: a 3x3 stem and three stages of two basic blocks each."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn_relu(2, 3, widths[0], 3)
        stages = []
        in_channels = widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            stages.append(BasicBlock(in_channels, width, stride))
            stages.append(BasicBlock(width, width, 1))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


class AudioNet(nn.Module):
    """A raw-waveform keyword spotter: a wide stride-4 stem and three conv1d-BN-ReLU stages.

    The stem and the first two stages are each followed by a max pool of 4,
    so the stem's 4,000 steps shrink to 62 before the average pool and the
    linear classifier.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 32, 64, 64), classes: int = 12) -> None:
        super().__init__()
        layers: list[nn.Module] = [*conv_bn_relu(1, 1, widths[0], 79, stride=4), nn.MaxPool1d(4)]
        for in_channels, out_channels in itertools.pairwise(widths):
            layers += [*conv_bn_relu(1, in_channels, out_channels, 3), nn.MaxPool1d(4)]
        self.features = nn.Sequential(*layers[:-1])
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class VideoNet(nn.Module):
    """A small clip classifier: three conv3d-BN-ReLU blocks, the later two strided."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu(3, 3, widths[0], 3),
            *conv_bn_relu(3, widths[0], widths[1], 3, stride=2),
            *conv_bn_relu(3, widths[1], widths[2], 3, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class DepthwiseSeparableNet(nn.Module):
    """A MobileNet-style net: a 3x3 stem, then depthwise 3x3 and pointwise 1x1 pairs.

    Every depthwise and pointwise conv has its own BatchNorm and ReLU.
    """

    BLOCKS = ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1))
    """(input channels, output channels, depthwise stride) of each block."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [*conv_bn_relu(2, 3, 32, 3)]
        for in_channels, out_channels, stride in self.BLOCKS:
            layers += conv_bn_relu(2, in_channels, in_channels, 3, stride, groups=in_channels)
            layers += conv_bn_relu(2, in_channels, out_channels, 1)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.BLOCKS[-1][1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class Net(NamedTuple):
    """A benchmark net: how to build it, the shape of one input, and the defaults of a step."""

    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    classes: int
    batch: int
    description: str


NETS = {
    "resnet": Net(
        SmallResNet,
        (3, 32, 32),
        10,
        32,
        "ResNet-style Conv2d net: 3x3 stem and three stages of two basic blocks "
        "(32, 64, 128 channels) on 3x32x32 images",
    ),
    "audio": Net(
        AudioNet,
        (1, 16000),
        12,
        32,
        "Conv1d audio net: a 79-tap stride-4 stem and three conv1d-BN-ReLU stages "
        "(32, 64, 64 channels) with max pooling, on 1x16000 waveforms",
    ),
    "video": Net(
        VideoNet,
        (3, 8, 32, 32),
        10,
        16,
        "Conv3d video net: three conv3d-BN-ReLU blocks (16, 32, 64 channels), "
        "the last two with stride 2, on 3x8x32x32 clips",
    ),
    "depthwise": Net(
        DepthwiseSeparableNet,
        (3, 32, 32),
        10,
        32,
        "depthwise-separable Conv2d net: a 3x3 stem and five depthwise 3x3 plus "
        "pointwise 1x1 blocks (64 to 256 channels) on 3x32x32 images",
    ),
}
"""The nets by the name that ``--nets`` takes."""


def make_batch(net: Net, batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Return one batch of random inputs and class targets for ``net``."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, *net.input_shape, generator=generator)
    targets = torch.randint(0, net.classes, (batch,), generator=generator)
    return inputs, targets


# -- the variants -------------------------------------------------------------------------

EAGER_VARIANTS = (
    "float",
    "qatcore",
    "torch.ao",
    "torch.ao convs",
    "qatcore BN folded",
    "torch.ao BN folded",
    "torch.ao BN folded, stable",
)
"""The eager variants, in the order the tables list them."""

COMPILED_VARIANTS = {
    "float compiled": "float",
    "qatcore compiled": "qatcore",
    "qatcore BN folded compiled": "qatcore BN folded",
}
"""Compiled variant -> the eager variant whose copy ``torch.compile`` wraps."""


def torch_ao_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    """Return torch.ao's default QAT module mapping plus ``nn.Conv1d``.

    The default mapping of torch 2.13 has no entry for ``nn.Conv1d``, so
    ``prepare_qat`` would leave the audio net's convs without weight fake
    quantization although ``torch.ao.nn.qat.Conv1d`` exists.
    """
    return {**get_default_qat_module_mappings(), nn.Conv1d: nnqat.Conv1d}


def prepare_torch_ao(model: nn.Module) -> nn.Module:
    tq.prepare_qat(model, mapping=torch_ao_mapping(), inplace=True)
    return model


def build_eager_variants(net: Net, seed: int = 0) -> dict[str, nn.Module]:
    """Return the float model of ``net`` and its eager QAT versions, in training mode.

    The variants are:

    - ``qatcore``: every conv swapped with ``fuse=False``, so weights (int8
      per channel) and conv outputs (uint8 per tensor) are fake-quantized and
      BatchNorm, ReLU and the linear layer stay float.
    - ``torch.ao``: ``prepare_qat`` with the x86 default QAT qconfig on the
      whole model, which also quantizes the linear layer and the outputs of
      BatchNorm and ReLU where torch.ao puts observers.
    - ``torch.ao convs``: the same qconfig on the convs only, the tensors
      ``qatcore`` quantizes.
    - ``qatcore BN folded``: the x86 preset with its default fusion, so
      conv-BN(-ReLU) groups train with BN folded into the weights.
    - ``torch.ao BN folded``: ``fuse_modules_qat`` on the groups qatcore's
      plan fuses, then ``prepare_qat``; torch.ao's default fold divides by
      the BN weight.
    - ``torch.ao BN folded, stable``: the same with torch.ao's slower,
      numerically stable fold, the one qatcore computes.
    """
    torch.manual_seed(seed)
    base = net.build().train()
    x86 = qatcore.get_qconfig("x86")

    qatcore_convs = qatcore.swap_modules(
        copy.deepcopy(base), dict.fromkeys(CONV_TYPES, x86), fuse=False
    )

    ao_model = copy.deepcopy(base)
    ao_model.qconfig = tq.get_default_qat_qconfig("x86")
    prepare_torch_ao(ao_model)

    ao_convs = copy.deepcopy(base)
    for module in ao_convs.modules():
        if isinstance(module, CONV_TYPES):
            module.qconfig = tq.get_default_qat_qconfig("x86")
    prepare_torch_ao(ao_convs)

    qatcore_fused = qatcore.swap_modules(copy.deepcopy(base), x86)
    groups = [list(entry.members) for entry in qatcore.plan(base, x86) if entry.action == "fuse"]
    ao_fused = tq.fuse_modules_qat(copy.deepcopy(base), groups)
    ao_fused.qconfig = tq.get_default_qat_qconfig("x86")
    prepare_torch_ao(ao_fused)
    ao_stable = copy.deepcopy(ao_fused)
    for module in ao_stable.modules():
        if hasattr(module, "_enable_slow_path_for_better_numerical_stability"):
            module._enable_slow_path_for_better_numerical_stability = True

    models = {
        "float": base,
        "qatcore": qatcore_convs,
        "torch.ao": ao_model,
        "torch.ao convs": ao_convs,
        "qatcore BN folded": qatcore_fused,
        "torch.ao BN folded": ao_fused,
        "torch.ao BN folded, stable": ao_stable,
    }
    return {name: models[name].train() for name in EAGER_VARIANTS}


def count_fake_quants(model: nn.Module) -> int:
    """Count the fake-quant modules of either library in ``model``."""
    kinds = (qatcore.FakeQuantize, tq.FakeQuantizeBase)
    return sum(isinstance(module, kinds) for module in model.modules())


# -- the step -------------------------------------------------------------------------------


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def training_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor
) -> None:
    """Run one SGD step: forward, cross-entropy loss, backward and the optimizer's update."""
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(inputs), targets)
    loss.backward()
    optimizer.step()
