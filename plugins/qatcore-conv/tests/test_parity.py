"""Parity of the QAT convs with torch.ao's unfused FakeQuantize and observers.

The oracle is a float conv whose weight passes through torch.ao's
FakeQuantize with MovingAveragePerChannelMinMaxObserver and whose output
passes through FakeQuantize with MovingAverageMinMaxObserver: the eager
workflow that qatcore keeps the numerics of.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.ao.quantization as tq
from torch import nn

import qatcore

pytest.importorskip("qatcore_observers")

STEPS = 6
TOLERANCE = 1e-6

CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SPATIAL = {1: (15,), 2: (9, 8), 3: (5, 6, 7)}

# (id, conv keyword arguments); every case runs for 1d, 2d and 3d.
CONV_CASES = [
    ("plain", {}),
    ("stride-padding", {"stride": 2, "padding": 1}),
    ("dilation", {"dilation": 2, "padding": 2}),
    ("groups", {"groups": 2}),
    ("depthwise", {"groups": 4}),
    ("no-bias", {"bias": False}),
    ("same", {"padding": "same"}),
    ("same-dilation", {"padding": "same", "dilation": 2}),
    ("reflect", {"padding": 1, "padding_mode": "reflect"}),
    ("replicate", {"padding": 1, "padding_mode": "replicate"}),
    ("circular", {"padding": 1, "padding_mode": "circular"}),
]


def _x86_like_qconfig(activation_symmetric: bool = False) -> qatcore.QConfig:
    return qatcore.QConfig(
        weight=qatcore.QuantSpec(bits=8, signed=True, symmetric=True, axis=0),
        activation=qatcore.QuantSpec(
            bits=8, signed=activation_symmetric, symmetric=activation_symmetric
        ),
    )


def _ao_fake_quants(activation_symmetric: bool = False) -> tuple[nn.Module, nn.Module]:
    weight = tq.FakeQuantize(
        observer=tq.MovingAveragePerChannelMinMaxObserver,
        quant_min=-128,
        quant_max=127,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
    )
    if activation_symmetric:
        activation = tq.FakeQuantize(
            observer=tq.MovingAverageMinMaxObserver,
            quant_min=-128,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=torch.per_tensor_symmetric,
        )
    else:
        activation = tq.FakeQuantize(
            observer=tq.MovingAverageMinMaxObserver,
            quant_min=0,
            quant_max=255,
            dtype=torch.quint8,
            qscheme=torch.per_tensor_affine,
        )
    return weight, activation


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, step: int) -> None:
    difference = (actual.double() - expected.double()).abs().max().item()
    assert difference <= TOLERANCE, f"{what} differs by {difference} at step {step}"


def _run_parity(
    float_modules: tuple[nn.Module, ...],
    input_shape: tuple[int, ...],
    activation_symmetric: bool = False,
) -> None:
    conv = float_modules[0]
    qconfig = _x86_like_qconfig(activation_symmetric)
    model = nn.Sequential(*float_modules)
    qat = qatcore.swap_modules(model, qconfig, quantize_inputs=False)[0]
    oracle_conv = copy.deepcopy(conv)
    weight_fq, output_fq = _ao_fake_quants(activation_symmetric)
    fused = len(float_modules) > 1

    qat_optimizer = torch.optim.SGD(qat.parameters(), lr=0.05)
    oracle_optimizer = torch.optim.SGD(oracle_conv.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        # The input range grows each step, so the moving averages really move.
        x = torch.randn(input_shape, generator=generator) * (1 + step) + 0.3 * step
        x_qat = x.clone().requires_grad_()
        x_oracle = x.clone().requires_grad_()

        y_qat = qat(x_qat)
        y_oracle = oracle_conv._conv_forward(
            x_oracle, weight_fq(oracle_conv.weight), oracle_conv.bias
        )
        if fused:
            y_oracle = torch.relu(y_oracle)
        y_oracle = output_fq(y_oracle)

        upstream = torch.randn(y_qat.shape, generator=generator)
        (y_qat * upstream).sum().backward()
        (y_oracle * upstream).sum().backward()

        _assert_close(y_qat, y_oracle, "output", step)
        _assert_close(x_qat.grad, x_oracle.grad, "input gradient", step)
        _assert_close(qat.weight.grad, oracle_conv.weight.grad, "weight gradient", step)
        if conv.bias is not None:
            _assert_close(qat.bias.grad, oracle_conv.bias.grad, "bias gradient", step)
        _assert_close(qat.weight_fake_quant.scale, weight_fq.scale, "weight scale", step)
        _assert_close(qat.output_fake_quant.scale.reshape(1), output_fq.scale, "output scale", step)
        assert torch.equal(qat.weight_fake_quant.zero_point, weight_fq.zero_point.int())
        assert torch.equal(qat.output_fake_quant.zero_point.reshape(1), output_fq.zero_point.int())

        qat_optimizer.step()
        oracle_optimizer.step()
        qat_optimizer.zero_grad()
        oracle_optimizer.zero_grad()

    _assert_close(qat.weight, oracle_conv.weight, "trained weight", STEPS)


@pytest.mark.parametrize("dim", [1, 2, 3], ids=["conv1d", "conv2d", "conv3d"])
@pytest.mark.parametrize(("case", "kwargs"), CONV_CASES, ids=[case for case, _ in CONV_CASES])
def test_conv_matches_torch_ao(dim: int, case: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    conv = CONV_TYPES[dim](4, 8, 3, **kwargs)
    _run_parity((conv,), (2, 4, *SPATIAL[dim]))


@pytest.mark.parametrize("dim", [1, 2, 3], ids=["conv1d", "conv2d", "conv3d"])
def test_conv_relu_matches_torch_ao(dim: int) -> None:
    torch.manual_seed(0)
    conv = CONV_TYPES[dim](4, 6, 3, padding=1)
    _run_parity((conv, nn.ReLU()), (2, 4, *SPATIAL[dim]))


@pytest.mark.parametrize("dim", [1, 2, 3], ids=["conv1d", "conv2d", "conv3d"])
def test_symmetric_activation_matches_torch_ao(dim: int) -> None:
    torch.manual_seed(0)
    conv = CONV_TYPES[dim](3, 5, 3, stride=2, bias=False)
    _run_parity((conv,), (2, 3, *SPATIAL[dim]), activation_symmetric=True)
