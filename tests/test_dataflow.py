"""Which QAT module quantized each QAT module's input, and the qparams that deployment reads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatcore
from qatcore._dataflow import input_producers, qat_modules

pytest.importorskip("qatcore_conv")
pytest.importorskip("qatcore_observers")

ACTIVATION = qatcore.QuantSpec(bits=8, signed=False, symmetric=False)
WEIGHT = qatcore.QuantSpec(axis=qatcore.OUTPUT_CHANNELS)
QCONFIG = qatcore.QConfig(weight=WEIGHT, activation=ACTIVATION)


def swapped(model: nn.Module, qconfig: object = QCONFIG) -> nn.Module:
    return qatcore.swap_modules(model, qconfig, quantize_inputs=False)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.stem(x))
        return self.head(self.body(y) + y)


class Pooled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(1, 4, 3)
        self.second = nn.Conv2d(4, 4, 1)
        self.third = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.max_pool2d(self.first(x), 2).contiguous()
        z = self.second(y)
        return self.third(F.avg_pool2d(z, 1))


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 2, 1)
        self.b = nn.Conv2d(2, 2, 1)
        self.shared = nn.Conv2d(2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(self.a(x)) + self.shared(self.b(x))


class Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.tail = nn.Conv2d(2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # a branch on a value, which torch.fx cannot trace
            x = x * 2
        return self.tail(self.conv(x))


def test_sequential_chain_through_grid_ops() -> None:
    model = swapped(
        nn.Sequential(
            nn.Conv2d(1, 4, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 1),
            nn.Dropout(),
            nn.Flatten(),
            nn.Linear(4, 2),
        )
    )

    producers = input_producers(model)

    assert producers == {"0": None, "3": "0", "6": "3"}


def test_functional_ops_keep_producer() -> None:
    producers = input_producers(swapped(Pooled()))

    assert producers["first"] is None
    assert producers["second"] == "first"


def test_average_pool_breaks_grid() -> None:
    assert input_producers(swapped(Pooled()))["third"] is None


def test_addition_breaks_grid() -> None:
    producers = input_producers(swapped(Residual()))

    assert producers == {"stem": None, "body": "stem", "head": None}


def test_per_channel_output_is_no_producer() -> None:
    per_channel = qatcore.QConfig(weight=WEIGHT, activation=qatcore.QuantSpec(axis=1))
    model = swapped(nn.Sequential(nn.Conv2d(1, 2, 1), nn.Conv2d(2, 2, 1)), per_channel)

    assert input_producers(model) == {"0": None, "1": None}


def test_weight_only_producer_is_none() -> None:
    model = swapped(
        nn.Sequential(nn.Conv2d(1, 2, 1), nn.Conv2d(2, 2, 1)), qatcore.QConfig(weight=WEIGHT)
    )

    assert input_producers(model) == {"0": None, "1": None}


def test_float_module_breaks_grid() -> None:
    qconfig = {nn.Conv2d: QCONFIG, nn.BatchNorm2d: None}
    model = swapped(nn.Sequential(nn.Conv2d(1, 2, 1), nn.Tanh(), nn.Conv2d(2, 2, 1)), qconfig)

    assert input_producers(model) == {"0": None, "2": None}


def test_module_called_on_two_producers() -> None:
    producers = input_producers(swapped(Shared()))

    assert producers["shared"] is None
    assert producers["a"] is None


def test_untraceable_model_gives_none() -> None:
    assert input_producers(swapped(Branching())) is None


def test_qat_modules_skip_inside_qat_modules() -> None:
    model = swapped(nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1)))

    names = [name for name, _ in qat_modules(model)]

    assert names == ["0", "2"]


def test_codes_break_ties_to_even() -> None:
    # 0.25 / 0.5 = 0.5 rounds to 0, so the code is the zero point 3.
    # torch.quantize_per_tensor rounds 0.5 + 3 = 3.5 to 4 instead.
    params = qatcore.QuantParams(
        scale=torch.tensor(0.5),
        zero_point=torch.tensor(3, dtype=torch.int32),
        quant_min=0,
        quant_max=255,
    )

    codes = params.codes(torch.tensor([0.25, 0.75, -10.0, 1000.0]))

    assert codes.tolist() == [3, 5, 0, 255]


def test_codes_per_channel() -> None:
    params = qatcore.QuantParams(
        scale=torch.tensor([0.1, 1.0]),
        zero_point=torch.zeros(2, dtype=torch.int32),
        quant_min=-128,
        quant_max=127,
        axis=0,
    )

    codes = params.codes(torch.tensor([[0.3, -0.15], [3.0, -500.0]]))

    assert codes.tolist() == [[3, -2], [3, -128]]


class InPlace(nn.Module):
    def __init__(self, method: str) -> None:
        super().__init__()
        self.first = nn.Conv2d(1, 2, 1)
        self.second = nn.Conv2d(2, 2, 1)
        self.leaky = nn.LeakyReLU(0.1, inplace=True)
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.first(x)
        if self.method == "mul_":
            y.mul_(3)
        elif self.method == "view mul_":
            y.view(-1).mul_(3)
        elif self.method == "setitem":
            y[:, 0] = 0.5
        elif self.method == "relu_":
            y.relu_()
        elif self.method == "out=":
            torch.mul(y, 3, out=y)
        elif self.method == "chunk mul_":
            y.chunk(2, dim=1)[0].mul_(3)
        elif self.method == "data mul_":
            y.data.mul_(3)
        elif self.method == "LeakyReLU(inplace=True)":
            self.leaky(y)
        return self.second(y)


@pytest.mark.parametrize(
    "method", ["mul_", "view mul_", "out=", "chunk mul_", "data mul_", "LeakyReLU(inplace=True)"]
)
def test_in_place_change_breaks_grid(method: str) -> None:
    assert input_producers(swapped(InPlace(method)))["second"] is None


def test_item_assignment_gets_input_quantizer() -> None:
    # torch.fx cannot trace item assignment, so every swapped layer gets one.
    qat = qatcore.swap_modules(InPlace("setitem"), QCONFIG)

    assert qat.second.input_quantizer() is not None


def test_in_place_relu_keeps_producer() -> None:
    assert input_producers(swapped(InPlace("relu_")))["second"] == "first"


def test_in_place_relu_module_keeps_producer() -> None:
    model = swapped(nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(inplace=True), nn.Conv2d(2, 2, 1)))

    assert input_producers(model) == {"0": None, "2": "0"}


def test_forward_hook_on_producer_breaks_grid() -> None:
    model = swapped(nn.Sequential(nn.Conv2d(1, 2, 1), nn.Conv2d(2, 2, 1)))
    model[0].register_forward_hook(lambda module, args, output: output * 3)

    assert input_producers(model) == {"0": None, "1": None}


def test_forward_hook_on_grid_module_breaks_grid() -> None:
    model = swapped(nn.Sequential(nn.Conv2d(1, 2, 1), nn.MaxPool2d(1), nn.Conv2d(2, 2, 1)))
    model[1].register_forward_hook(lambda module, args, output: output + 0.1)

    assert input_producers(model)["2"] is None


def test_pre_hook_on_consumer_breaks_grid() -> None:
    model = swapped(nn.Sequential(nn.Conv2d(1, 2, 1), nn.Conv2d(2, 2, 1)))
    model[1].register_forward_pre_hook(lambda module, args: (args[0] * 2,))

    assert input_producers(model)["1"] is None


def test_global_forward_hook_breaks_grid() -> None:
    model = swapped(nn.Sequential(nn.Conv2d(1, 2, 1), nn.Conv2d(2, 2, 1)))
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
    try:
        producers = input_producers(model)
    finally:
        handle.remove()

    assert producers == {"0": None, "1": None}
