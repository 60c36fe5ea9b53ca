"""QAT transposed convs: per-output-channel weight quantization, parity, swap and round trips.

The parity oracle is a float transposed conv whose weight passes through
torch.ao's FakeQuantize with MovingAveragePerChannelMinMaxObserver along
axis 1 (the output channels of a transposed conv weight) and whose output
passes through FakeQuantize with MovingAverageMinMaxObserver.
"""

from __future__ import annotations

import copy
import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.ao.quantization as tq
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import qatcore

qatcore_conv = pytest.importorskip("qatcore_conv")
pytest.importorskip("qatcore_observers")

STEPS = 5
TOLERANCE = 1e-6

DIMS = (1, 2, 3)
DIM_IDS = ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
FLOAT_TYPES = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
QAT_TYPES = {
    1: qatcore_conv.ConvTranspose1d,
    2: qatcore_conv.ConvTranspose2d,
    3: qatcore_conv.ConvTranspose3d,
}
CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
FUNCTIONAL = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
SPATIAL = {1: (7,), 2: (5, 4), 3: (3, 4, 3)}

WEIGHT_SPEC = qatcore.QuantSpec(bits=8, signed=True, symmetric=True, axis=1)
OUTPUT_SPEC = qatcore.QuantSpec(bits=8, signed=False, symmetric=False)
QCONFIG = qatcore.QConfig(weight=WEIGHT_SPEC, activation=OUTPUT_SPEC)

# (id, transposed conv keyword arguments, output_size or None); every case
# runs for 1d, 2d and 3d. output_size is given per spatial axis of SPATIAL.
PARITY_CASES = [
    ("plain", {}, None),
    ("stride-padding", {"stride": 2, "padding": 1}, None),
    ("output-padding", {"stride": 2, "output_padding": 1}, None),
    ("dilation", {"dilation": 2, "padding": 1}, None),
    ("no-bias", {"bias": False}, None),
    ("output-size", {"stride": 2}, "largest"),
]


def _output_size(dim: int, stride: int, kernel: int) -> list[int]:
    """Return the largest spatial output size that ``stride`` allows for SPATIAL[dim]."""
    return [(size - 1) * stride + kernel + stride - 1 for size in SPATIAL[dim]]


def _ao_fake_quants(ch_axis: int = 1) -> tuple[nn.Module, nn.Module]:
    weight = tq.FakeQuantize(
        observer=tq.MovingAveragePerChannelMinMaxObserver,
        quant_min=-128,
        quant_max=127,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=ch_axis,
    )
    output = tq.FakeQuantize(
        observer=tq.MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
    )
    return weight, output


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, label: str, step: int) -> None:
    assert actual.shape == expected.shape, f"{label} has shape {actual.shape} at step {step}"
    difference = (actual.double() - expected.double()).abs().max().item()
    assert difference <= TOLERANCE, f"{label} differs by {difference} at step {step}"


def _by_output_channel(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Return the weight as (out_channels, in_channels // groups, *kernel), channel by channel."""
    rows = weight.shape[0] // groups
    columns = weight.shape[1]
    channels = []
    for group in range(groups):
        for column in range(columns):
            channels.append(weight[group * rows : (group + 1) * rows, column])
    return torch.stack(channels)


def _from_output_channels(channels: torch.Tensor, groups: int) -> torch.Tensor:
    """Invert :func:`_by_output_channel`."""
    columns = channels.shape[0] // groups
    blocks = []
    for group in range(groups):
        block = channels[group * columns : (group + 1) * columns]
        blocks.append(torch.stack(list(block), dim=1))
    return torch.cat(blocks, dim=0)


def _run_parity(
    conv: nn.Module, input_shape: tuple[int, ...], output_size: list[int] | None
) -> None:
    # torch.ao's eager QAT modules have no input fake quantizer.
    qat = qatcore.swap_modules(nn.Sequential(conv), QCONFIG, quantize_inputs=False)[0]
    oracle = copy.deepcopy(conv)
    groups = conv.groups
    # With groups > 1 no axis of the weight contains all output channels, so
    # torch.ao observes a copy regrouped by output channel along axis 0.
    weight_fq, output_fq = _ao_fake_quants(ch_axis=1 if groups == 1 else 0)

    qat_optimizer = torch.optim.SGD(qat.parameters(), lr=0.05)
    oracle_optimizer = torch.optim.SGD(oracle.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        # The input range grows each step, so the moving averages really move.
        x = torch.randn(input_shape, generator=generator, dtype=conv.weight.dtype)
        x = x * (1 + step) + 0.3 * step
        x_qat = x.clone().requires_grad_()
        x_oracle = x.clone().requires_grad_()

        y_qat = qat(x_qat, output_size=output_size)
        if groups == 1:
            oracle_weight = weight_fq(oracle.weight)
        else:
            regrouped = weight_fq(_by_output_channel(oracle.weight, groups))
            oracle_weight = _from_output_channels(regrouped, groups)
        parameters = {"weight": oracle_weight, "bias": oracle.bias}
        y_oracle = output_fq(functional_call(oracle, parameters, (x_oracle, output_size)))

        upstream = torch.randn(y_qat.shape, generator=generator, dtype=y_qat.dtype)
        (y_qat * upstream).sum().backward()
        (y_oracle * upstream).sum().backward()

        _assert_close(y_qat, y_oracle, "output", step)
        _assert_close(x_qat.grad, x_oracle.grad, "input gradient", step)
        _assert_close(qat.weight.grad, oracle.weight.grad, "weight gradient", step)
        if conv.bias is not None:
            _assert_close(qat.bias.grad, oracle.bias.grad, "bias gradient", step)
        _assert_close(qat.weight_fake_quant.scale, weight_fq.scale, "weight scale", step)
        _assert_close(qat.output_fake_quant.scale.reshape(1), output_fq.scale, "output scale", step)

        qat_optimizer.step()
        oracle_optimizer.step()
        qat_optimizer.zero_grad()
        oracle_optimizer.zero_grad()

    _assert_close(qat.weight, oracle.weight, "trained weight", STEPS)


# -- per-output-channel weight quantization ------------------------------------


def test_weight_scales_along_axis_1() -> None:
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(3, 5, 2)
    qat = qatcore.swap_modules(conv, qatcore.QConfig(weight=WEIGHT_SPEC))
    weight = qat.weight.detach().clone()
    assert weight.shape == (3, 5, 2, 2)

    qat(torch.randn(1, 3, 4, 4))
    qat.eval()
    quantized = qat.fake_quantized_weight()

    scales = torch.stack([weight[:, channel].abs().max() / 127.5 for channel in range(5)])
    zeros = torch.zeros(5, dtype=torch.int32)
    expected = qatcore.fake_quantize_reference(weight, scales, zeros, -128, 127, axis=1)
    assert qat.weight_fake_quant.scale.shape == (5,)
    torch.testing.assert_close(qat.weight_fake_quant.scale, scales, rtol=0, atol=0)
    assert torch.equal(quantized, expected)


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
@pytest.mark.parametrize(
    ("in_channels", "out_channels", "groups"),
    [(4, 6, 2), (6, 3, 3), (4, 4, 4)],
    ids=["groups-2", "groups-3", "depthwise"],
)
def test_grouped_scales_per_output_channel(
    dim: int, in_channels: int, out_channels: int, groups: int
) -> None:
    torch.manual_seed(0)
    conv = FLOAT_TYPES[dim](in_channels, out_channels, 2, groups=groups)
    qat = qatcore.swap_modules(conv, qatcore.QConfig(weight=WEIGHT_SPEC))
    weight = qat.weight.detach().clone()

    qat(torch.randn(2, in_channels, *SPATIAL[dim]))
    qat.eval()
    quantized = qat.fake_quantized_weight()

    rows = in_channels // groups
    columns = out_channels // groups
    assert qat.weight_fake_quant.scale.shape == (out_channels,)
    expected = torch.empty_like(weight)
    for channel in range(out_channels):
        group, column = divmod(channel, columns)
        block = weight[group * rows : (group + 1) * rows, column]
        scale = block.abs().max() / 127.5
        assert qat.weight_fake_quant.scale[channel] == scale, f"output channel {channel}"
        zero = torch.zeros((), dtype=torch.int32)
        expected[group * rows : (group + 1) * rows, column] = qatcore.fake_quantize_reference(
            block, scale, zero, -128, 127
        )
    assert torch.equal(quantized, expected)


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_grouped_forward_uses_quantized_weight(dim: int) -> None:
    torch.manual_seed(0)
    conv = FLOAT_TYPES[dim](4, 6, 3, stride=2, groups=2)
    qat = qatcore.swap_modules(conv, QCONFIG)
    x = torch.randn(2, 4, *SPATIAL[dim])
    qat(x)
    qat.eval()

    output = qat(x)

    # The swapped module is the whole model, so nothing quantized its input before it.
    input_quantizer = qat.input_quantizer()
    assert input_quantizer is not None
    weight = qat.fake_quantized_weight()
    raw = FUNCTIONAL[dim](input_quantizer(x), weight, qat.bias, stride=2, groups=2)
    assert torch.equal(output, qat.output_fake_quant(raw))


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_per_tensor_weight_spec_accepted(dim: int) -> None:
    spec = qatcore.QuantSpec(bits=8, signed=True, symmetric=True)
    conv = FLOAT_TYPES[dim](4, 6, 2, groups=2)

    qat = qatcore.swap_modules(conv, qatcore.QConfig(weight=spec))
    qat(torch.randn(1, 4, *SPATIAL[dim]))

    assert qat.weight_fake_quant.scale.shape == ()
    assert qat.weight_fake_quant.scale == qat.weight.detach().abs().max() / 127.5


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
@pytest.mark.parametrize("axis", [0, 2, 7], ids=["input-axis", "kernel-axis", "out-of-range"])
def test_wrong_weight_axis_raises_at_swap(dim: int, axis: int) -> None:
    qconfig = qatcore.QConfig(weight=qatcore.QuantSpec(axis=axis))
    model = nn.Sequential(nn.Sequential(FLOAT_TYPES[dim](3, 5, 2)))
    name = FLOAT_TYPES[dim].__name__

    with pytest.raises(
        qatcore.SwapError,
        match=rf"0\.0 \({name}\): .*along axis {axis}.*output channels along axis 1; "
        r"set QuantSpec\(axis=qatcore\.OUTPUT_CHANNELS\)",
    ):
        qatcore.swap_modules(model, qconfig)


def test_readme_x86_example_runs() -> None:
    pytest.importorskip("qatcore_x86")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (example,) = re.findall(r"^```python\n(.*?)^```$", readme, re.MULTILINE | re.DOTALL)
    namespace: dict[str, object] = {}

    exec(compile(example, "README.md", "exec"), namespace)

    qat = namespace["qat"]
    assert type(qat[1]) is qatcore_conv.ConvTranspose2d
    assert qat[1].weight_fake_quant.spec.axis == 1
    assert qat[0].weight_fake_quant.spec.axis == 0


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
@pytest.mark.parametrize("groups", [1, 2], ids=["groups-1", "groups-2"])
def test_output_channels_axis_scales_each_channel(dim: int, groups: int) -> None:
    torch.manual_seed(0)
    conv = FLOAT_TYPES[dim](4, 6, 2, groups=groups)
    spec = qatcore.QuantSpec(bits=8, signed=True, symmetric=True, axis=qatcore.OUTPUT_CHANNELS)
    qat = qatcore.swap_modules(conv, qatcore.QConfig(weight=spec))

    qat(torch.randn(2, 4, *(3,) * dim))

    # Output channel g * 3 + j is column j of the rows of group g.
    columns = conv.weight.detach().reshape(groups, 4 // groups, 6 // groups, -1)
    per_channel_max = columns.abs().amax(dim=(1, 3)).reshape(6)
    assert qat.weight_fake_quant.spec.axis == 1
    assert torch.equal(qat.weight_fake_quant.scale, per_channel_max / 127.5)


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_wrong_output_axis_raises_at_swap(dim: int) -> None:
    qconfig = qatcore.QConfig(activation=qatcore.QuantSpec(axis=0))
    model = nn.Sequential(FLOAT_TYPES[dim](3, 5, 2))

    with pytest.raises(
        qatcore.SwapError,
        match=r"0 \(ConvTranspose\dd\): .*got axis=0; set QuantSpec\(axis=1\) in "
        r"QConfig\.activation, or axis=None",
    ):
        qatcore.swap_modules(model, qconfig)


# -- parity with torch.ao ---------------------------------------------------------


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
@pytest.mark.parametrize(
    ("case", "kwargs", "size"), PARITY_CASES, ids=[case for case, _, _ in PARITY_CASES]
)
def test_conv_transpose_matches_torch_ao(
    dim: int, case: str, kwargs: dict, size: str | None
) -> None:
    torch.manual_seed(0)
    conv = FLOAT_TYPES[dim](4, 6, 3, **kwargs)
    output_size = _output_size(dim, kwargs.get("stride", 1), 3) if size else None

    _run_parity(conv, (2, 4, *SPATIAL[dim]), output_size)


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
@pytest.mark.parametrize("groups", [2, 4], ids=["groups-2", "depthwise"])
def test_grouped_matches_regrouped_torch_ao(dim: int, groups: int) -> None:
    torch.manual_seed(0)
    conv = FLOAT_TYPES[dim](4, 8, 3, stride=2, groups=groups)

    _run_parity(conv, (2, 4, *SPATIAL[dim]), None)


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_float64_matches_torch_ao(dim: int) -> None:
    torch.manual_seed(0)
    conv = FLOAT_TYPES[dim](4, 6, 3, stride=2, dtype=torch.float64)

    _run_parity(conv, (2, 4, *SPATIAL[dim]), None)

    qat = qatcore.swap_modules(conv, QCONFIG)
    assert qat.weight.dtype == torch.float64
    assert qat(torch.randn(1, 4, *SPATIAL[dim], dtype=torch.float64)).dtype == torch.float64


# -- forward arguments --------------------------------------------------------------


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_output_size_sets_output_shape(dim: int) -> None:
    conv = FLOAT_TYPES[dim](3, 4, 3, stride=2)
    qat = qatcore.swap_modules(conv, QCONFIG)
    x = torch.randn(2, 3, *SPATIAL[dim])
    size = _output_size(dim, 2, 3)

    assert qat(x, output_size=size).shape[2:] == tuple(size)
    assert qat(x, output_size=[2, 4, *size]).shape[2:] == tuple(size)
    with pytest.raises(ValueError, match="requested an output size"):
        qat(x, output_size=[extent + 1 for extent in size])


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
@pytest.mark.parametrize("axis", [None, 1], ids=["per-tensor-output", "per-channel-output"])
def test_unbatched_input_matches_batch_of_one(dim: int, axis: int | None) -> None:
    output_spec = qatcore.QuantSpec(axis=axis, observer="minmax")
    qconfig = qatcore.QConfig(weight=WEIGHT_SPEC, activation=output_spec)
    qat = qatcore.swap_modules(FLOAT_TYPES[dim](3, 4, 3, stride=2), qconfig)
    x = torch.randn(1, 3, *SPATIAL[dim])
    batched = qat(x)
    qat.eval()

    unbatched = qat(x[0], output_size=list(batched.shape[2:]))

    assert torch.equal(unbatched, qat(x)[0])
    assert qat.output_fake_quant.scale.shape == (() if axis is None else (4,))


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_from_float_shares_parameters(dim: int) -> None:
    conv = FLOAT_TYPES[dim](
        4, 6, 3, stride=2, padding=1, output_padding=1, dilation=2, groups=2, bias=False
    )

    qat = QAT_TYPES[dim].from_float(conv, QCONFIG, name="up")

    assert type(qat) is QAT_TYPES[dim]
    assert qat.weight is conv.weight
    assert qat.bias is None
    for attribute in ("stride", "padding", "output_padding", "dilation", "groups"):
        assert getattr(qat, attribute) == getattr(conv, attribute), attribute
    assert qat.padding_mode == "zeros"


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_from_float_rejects_other_types(dim: int) -> None:
    with pytest.raises(qatcore.SwapError, match=r"up \(Conv\dd\): ConvTranspose\dd is built from"):
        QAT_TYPES[dim].from_float(CONV_TYPES[dim](3, 4, 3), QCONFIG, name="up")


def test_constructor_builds_fake_quantizers() -> None:
    qat = qatcore_conv.ConvTranspose2d(4, 6, 3, groups=2, qconfig=QCONFIG)

    assert qat.weight_fake_quant.scale.shape == (6,)
    assert qat(torch.randn(1, 4, 5, 5)).shape == (1, 6, 7, 7)


def test_hook_spectral_norm_raises_with_path() -> None:
    model = nn.Sequential(nn.utils.spectral_norm(nn.ConvTranspose2d(3, 4, 3)))

    with pytest.raises(qatcore.SwapError, match=r"0 \(ConvTranspose2d\): its weight is a computed"):
        qatcore.swap_modules(model, QCONFIG)


# -- models ----------------------------------------------------------------------------


class Decoder(nn.Module):
    """A U-Net-style decoder step: conv, upsampling transposed conv, conv on the skip concat."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduce = CONV_TYPES[dim](8, 4, 3, padding=1)
        self.up = FLOAT_TYPES[dim](4, 4, 2, stride=2)
        self.merge = CONV_TYPES[dim](8, 2, 3, padding=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        upsampled = self.up(self.reduce(x), output_size=skip.shape[2:])
        return self.merge(torch.cat([upsampled, skip], dim=1))


def _decoder_qconfig(dim: int) -> dict[object, qatcore.QConfig]:
    conv_weight = qatcore.QuantSpec(bits=8, signed=True, symmetric=True, axis=0)
    return {
        "": qatcore.QConfig(weight=conv_weight, activation=OUTPUT_SPEC),
        FLOAT_TYPES[dim]: QCONFIG,
    }


def _decoder_inputs(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    small = (3, 2, 3)[:dim]
    # The skip size is odd along the first axis, so only output_size recovers it.
    large = tuple(2 * extent + (1 if axis == 0 else 0) for axis, extent in enumerate(small))
    return torch.randn(2, 8, *small, generator=generator), torch.randn(
        2, 4, *large, generator=generator
    )


def _train_steps(model: nn.Module, inputs: tuple[torch.Tensor, ...], steps: int = 3) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        model(*(tensor * (step + 1) for tensor in inputs)).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_decoder_swaps_all_three_convs(dim: int) -> None:
    model = Decoder(dim)

    decisions = qatcore.plan(model, _decoder_qconfig(dim))
    qat = qatcore.swap_modules(model, _decoder_qconfig(dim))
    _train_steps(qat, _decoder_inputs(dim))

    assert [entry.action for entry in decisions] == ["swap", "swap", "swap"]
    assert type(qat.reduce) is getattr(qatcore_conv, f"Conv{dim}d")
    assert type(qat.up) is QAT_TYPES[dim]
    assert type(qat.merge) is getattr(qatcore_conv, f"Conv{dim}d")
    assert qat.up.weight_fake_quant.spec.axis == 1


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_to_float_matches_qat_without_fake_quant(dim: int) -> None:
    qat = qatcore.swap_modules(Decoder(dim), _decoder_qconfig(dim))
    inputs = _decoder_inputs(dim)
    _train_steps(qat, inputs)

    restored = qatcore.to_float(qat)

    assert type(restored.up) is FLOAT_TYPES[dim]
    qatcore.enable_fake_quant(qat, enabled=False)
    assert torch.equal(restored(*inputs), qat(*inputs))
    qat_pointers = {tensor.data_ptr() for tensor in qat.state_dict().values()}
    assert not any(tensor.data_ptr() in qat_pointers for tensor in restored.state_dict().values())


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_to_float_keeps_arguments(dim: int) -> None:
    conv = FLOAT_TYPES[dim](
        4, 6, 3, stride=2, padding=1, output_padding=1, dilation=2, groups=2, bias=False
    )
    qat = qatcore.swap_modules(conv, QCONFIG)

    restored = qat.to_float()

    assert type(restored) is FLOAT_TYPES[dim]
    assert restored.bias is None
    assert torch.equal(restored.weight, qat.weight)
    for attribute in ("kernel_size", "stride", "padding", "output_padding", "dilation", "groups"):
        assert getattr(restored, attribute) == getattr(conv, attribute), attribute


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
@pytest.mark.parametrize("groups", [1, 2], ids=["groups-1", "groups-2"])
def test_state_dict_loads_into_fresh_swap(dim: int, groups: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(FLOAT_TYPES[dim](4, 6, 3, stride=2, groups=groups), nn.ReLU())
    trained = qatcore.swap_modules(model, QCONFIG)
    x = torch.randn(2, 4, *SPATIAL[dim])
    _train_steps(trained, (x,))
    fresh = qatcore.swap_modules(copy.deepcopy(model), QCONFIG)

    fresh.load_state_dict(trained.state_dict(), strict=True)

    assert fresh[0].weight_fake_quant.scale.shape == (6,)
    for qat in (trained, fresh):
        qat.eval()
        qatcore.freeze_observers(qat)
    assert torch.equal(fresh(x), trained(x))


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_qat_decoder_round_trips(how: str) -> None:
    qat = qatcore.swap_modules(Decoder(2), _decoder_qconfig(2))
    inputs = _decoder_inputs(2)
    _train_steps(qat, inputs)

    clone = pickle.loads(pickle.dumps(qat)) if how == "pickle" else copy.deepcopy(qat)

    assert type(clone.up) is qatcore_conv.ConvTranspose2d
    for key, value in qat.state_dict().items():
        assert torch.equal(clone.state_dict()[key], value), key
    qat.eval()
    clone.eval()
    assert torch.equal(clone(*inputs), qat(*inputs))
