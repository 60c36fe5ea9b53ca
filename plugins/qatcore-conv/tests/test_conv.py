"""QAT convs: per-channel axes of the weight and output specs, and the default fusion check."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import qatcore

qatcore_conv = pytest.importorskip("qatcore_conv")
pytest.importorskip("qatcore_observers")

DIMS = (1, 2, 3)
DIM_IDS = ("conv1d", "conv2d", "conv3d")
FLOAT_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SPATIAL = {1: (9,), 2: (6, 5), 3: (4, 5, 3)}
WEIGHT_FIX = (
    "set QuantSpec(axis=qatcore.OUTPUT_CHANNELS) or axis=0, or axis=None for one scale per tensor"
)
OUTPUT_FIX = "set QuantSpec(axis=1) in QConfig.activation, or axis=None for one scale per tensor"


def _model(dim: int) -> nn.Sequential:
    """Return a model whose conv, with 3 inputs and 4 outputs, is at ``0.1``."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Identity(), FLOAT_TYPES[dim](3, 4, 3)))


def _weight_spec(axis: int | str) -> qatcore.QuantSpec:
    return qatcore.QuantSpec(bits=8, signed=True, symmetric=True, axis=axis)


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
@pytest.mark.parametrize("axis", [0, qatcore.OUTPUT_CHANNELS], ids=["axis-0", "output-channels"])
def test_weight_axis_0_scales_per_output_channel(dim: int, axis: int | str) -> None:
    model = _model(dim)

    qat = qatcore.swap_modules(model, qatcore.QConfig(weight=_weight_spec(axis)))
    conv = qat[0][1]
    conv(torch.randn(2, 3, *SPATIAL[dim]))

    assert conv.weight_fake_quant.spec.axis == 0
    assert conv.weight_fake_quant.scale.shape == (4,)


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
@pytest.mark.parametrize("axis", [1, 2], ids=["axis-1", "axis-2"])
def test_weight_other_axis_raises_with_fix(dim: int, axis: int) -> None:
    model = _model(dim)
    shape = (4, 3, *([3] * dim))

    with pytest.raises(qatcore.SwapError) as error:
        qatcore.swap_modules(model, qatcore.QConfig(weight=_weight_spec(axis)))

    message = str(error.value)
    conv_type = FLOAT_TYPES[dim].__name__
    assert message.startswith(f"0.1 ({conv_type}): ")
    assert f"per channel along axis {axis}," in message
    assert f"along axis 0 of its shape {shape}" in message
    assert message.endswith(WEIGHT_FIX)


def test_weight_axis_out_of_range_raises_with_fix() -> None:
    qconfig = qatcore.QConfig(weight=_weight_spec(4))

    with pytest.raises(qatcore.SwapError, match=re.escape(WEIGHT_FIX)):
        qatcore_conv.ConvReLU2d.from_float((nn.Conv2d(3, 4, 3), nn.ReLU()), qconfig, name="stem")


def test_constructor_rejects_weight_axis_1() -> None:
    qconfig = qatcore.QConfig(weight=_weight_spec(1))

    with pytest.raises(qatcore.SwapError, match=r"^<root> \(Conv2d\): .*along axis 1,"):
        qatcore_conv.Conv2d(3, 4, 3, qconfig=qconfig)


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_output_axis_other_than_1_raises_with_fix(dim: int) -> None:
    model = _model(dim)
    qconfig = qatcore.QConfig(activation=qatcore.QuantSpec(axis=2))

    with pytest.raises(qatcore.SwapError) as error:
        qatcore.swap_modules(model, qconfig)

    message = str(error.value)
    assert message.startswith(f"0.1 ({FLOAT_TYPES[dim].__name__}): ")
    assert "needs axis=1 (the output channels), got axis=2" in message
    assert message.endswith(OUTPUT_FIX)


@pytest.mark.parametrize(
    ("qat_type", "members"),
    [
        pytest.param(qatcore_conv.Conv2d, (nn.Conv2d(3, 4, 3),), id="conv"),
        pytest.param(qatcore_conv.ConvReLU2d, (nn.Conv2d(3, 4, 3), nn.ReLU()), id="conv-relu"),
    ],
)
def test_fusion_problem_default_is_empty(
    qat_type: type[qatcore.QATModule], members: tuple[nn.Module, ...]
) -> None:
    assert qat_type.fusion_problem(members) == ""


@pytest.mark.parametrize("dim", DIMS, ids=DIM_IDS)
def test_direct_build_initialises_like_torch(dim: int) -> None:
    torch.manual_seed(0)
    expected = FLOAT_TYPES[dim](3, 4, 3)
    state_after_float = torch.random.get_rng_state()
    torch.manual_seed(0)

    qat = getattr(qatcore_conv, f"Conv{dim}d")(3, 4, 3)

    assert torch.equal(qat.weight, expected.weight)
    assert torch.equal(qat.bias, expected.bias)
    assert torch.equal(torch.random.get_rng_state(), state_after_float)


def test_meta_build_skips_initialisation(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.nn.init was called")

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", fail)
    monkeypatch.setattr(torch.nn.init, "uniform_", fail)

    qat = qatcore_conv.ConvBnReLU2d(3, 4, 3, device="meta")
    qat.reset_parameters()

    assert qat.weight.device.type == "meta"
    assert qat.bn.weight.device.type == "meta"
    with pytest.raises(AssertionError, match=r"torch\.nn\.init was called"):
        qatcore_conv.Conv2d(3, 4, 3)
