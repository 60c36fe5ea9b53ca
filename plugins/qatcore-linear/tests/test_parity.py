"""Parity of the QAT linear layers with torch.ao's QAT Linear and unfused FakeQuantize.

The oracle is ``torch.ao.nn.qat.Linear`` whose weight passes through
torch.ao's FakeQuantize with MovingAveragePerChannelMinMaxObserver, and
whose output (after a ReLU for the fused layer) passes through FakeQuantize
with MovingAverageMinMaxObserver: the eager workflow whose numerics
qatcore keeps.
"""

from __future__ import annotations

import pytest
import torch
import torch.ao.nn.qat as nnqat
import torch.ao.quantization as tq
from torch import nn

import qatcore

pytest.importorskip("qatcore_observers")

STEPS = 5
TOLERANCE = 1e-6
IN_FEATURES = 6
OUT_FEATURES = 5

# (batch, features) and (batch, tokens, features).
INPUT_SHAPES = [(4, IN_FEATURES), (2, 7, IN_FEATURES)]
INPUT_IDS = ["2d", "3d"]


def _qconfig(per_channel_output: bool) -> qatcore.QConfig:
    return qatcore.QConfig(
        weight=qatcore.QuantSpec(bits=8, signed=True, symmetric=True, axis=0),
        activation=qatcore.QuantSpec(
            bits=8, signed=False, symmetric=False, axis=1 if per_channel_output else None
        ),
    )


def _ao_qconfig(per_channel_output: bool, output_axis: int) -> tq.QConfig:
    weight = tq.FakeQuantize.with_args(
        observer=tq.MovingAveragePerChannelMinMaxObserver,
        quant_min=-128,
        quant_max=127,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
    )
    if per_channel_output:
        activation = tq.FakeQuantize.with_args(
            observer=tq.MovingAveragePerChannelMinMaxObserver,
            quant_min=0,
            quant_max=255,
            dtype=torch.quint8,
            qscheme=torch.per_channel_affine,
            ch_axis=output_axis,
        )
    else:
        activation = tq.FakeQuantize.with_args(
            observer=tq.MovingAverageMinMaxObserver,
            quant_min=0,
            quant_max=255,
            dtype=torch.quint8,
            qscheme=torch.per_tensor_affine,
        )
    return tq.QConfig(activation=activation, weight=weight)


def _difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, quantity: str, step: int) -> None:
    difference = _difference(actual, expected)
    assert difference <= TOLERANCE, f"{quantity} differs by {difference} at step {step}"


def run_parity(
    fused: bool, bias: bool, input_shape: tuple[int, ...], per_channel_output: bool = False
) -> float:
    """Train the QAT layer and the oracle side by side; return the largest difference seen."""
    torch.manual_seed(0)
    linear = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=bias)
    members = (linear, nn.ReLU()) if fused else (linear,)
    qat = qatcore.swap_modules(
        nn.Sequential(*members), _qconfig(per_channel_output), quantize_inputs=False
    )[0]

    ao_qconfig = _ao_qconfig(per_channel_output, output_axis=len(input_shape) - 1)
    oracle = nnqat.Linear(IN_FEATURES, OUT_FEATURES, bias=bias, qconfig=ao_qconfig)
    with torch.no_grad():
        oracle.weight.copy_(linear.weight)
        if bias:
            oracle.bias.copy_(linear.bias)
    output_fq = ao_qconfig.activation()

    qat_optimizer = torch.optim.SGD(qat.parameters(), lr=0.05)
    oracle_optimizer = torch.optim.SGD(oracle.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    largest = 0.0
    for step in range(STEPS):
        # The input range grows each step, so the moving averages really move.
        x = torch.randn(input_shape, generator=generator) * (1 + step) + 0.3 * step
        x_qat = x.clone().requires_grad_()
        x_oracle = x.clone().requires_grad_()

        y_qat = qat(x_qat)
        y_oracle = oracle(x_oracle)
        if fused:
            y_oracle = torch.relu(y_oracle)
        y_oracle = output_fq(y_oracle)

        upstream = torch.randn(y_qat.shape, generator=generator)
        (y_qat * upstream).sum().backward()
        (y_oracle * upstream).sum().backward()

        pairs = [
            ("output", y_qat, y_oracle),
            ("input gradient", x_qat.grad, x_oracle.grad),
            ("weight gradient", qat.weight.grad, oracle.weight.grad),
            ("weight scale", qat.weight_fake_quant.scale, oracle.weight_fake_quant.scale),
            ("output scale", qat.output_fake_quant.scale.reshape(-1), output_fq.scale),
        ]
        if bias:
            pairs.append(("bias gradient", qat.bias.grad, oracle.bias.grad))
        for quantity, actual, expected in pairs:
            _assert_close(actual, expected, quantity, step)
            largest = max(largest, _difference(actual, expected))
        assert torch.equal(
            qat.weight_fake_quant.zero_point, oracle.weight_fake_quant.zero_point.int()
        ), f"weight zero point differs at step {step}"
        assert torch.equal(
            qat.output_fake_quant.zero_point.reshape(-1), output_fq.zero_point.int()
        ), f"output zero point differs at step {step}"

        qat_optimizer.step()
        oracle_optimizer.step()
        qat_optimizer.zero_grad()
        oracle_optimizer.zero_grad()

    _assert_close(qat.weight, oracle.weight, "trained weight", STEPS)
    return largest


@pytest.mark.parametrize("input_shape", INPUT_SHAPES, ids=INPUT_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("fused", [False, True], ids=["linear", "linear-relu"])
def test_matches_torch_ao(fused: bool, bias: bool, input_shape: tuple[int, ...]) -> None:
    run_parity(fused, bias, input_shape)


@pytest.mark.parametrize("input_shape", INPUT_SHAPES, ids=INPUT_IDS)
def test_per_channel_output_matches_torch_ao(
    input_shape: tuple[int, ...],
) -> None:
    run_parity(fused=False, bias=True, input_shape=input_shape, per_channel_output=True)
