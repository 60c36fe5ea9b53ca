"""The x86 preset: its specs, its discovery, and the range the int8 x86 engine runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qatcore
from qatcore_x86 import X86_QCONFIG

pytest.importorskip("qatcore_observers")


def test_preset_is_registered_by_the_plugin() -> None:
    qconfigs = qatcore.plugin_manager().registry.qconfigs

    assert qatcore.get_qconfig("x86") is X86_QCONFIG
    assert qconfigs.entry("x86").plugin == "x86"
    x86_plugin = next(info for info in qatcore.plugin_manager().plugins() if info.name == "x86")
    assert x86_plugin.distribution == "qatcore-x86"
    assert x86_plugin.registrations == {"qconfigs": ["x86"], "converters": ["x86"]}
    assert qatcore.plugin_manager().registry.converters.entry("x86").plugin == "x86"


def test_weights_are_seven_bit_symmetric_per_channel() -> None:
    weight = X86_QCONFIG.weight

    # 255 * 63 * 2 = 32,130: a pair of products fits in int16 without VNNI.
    assert (weight.quant_min, weight.quant_max) == (-63, 63)
    assert weight.symmetric
    assert weight.axis == qatcore.OUTPUT_CHANNELS
    assert weight.observer == "moving_average_minmax"


@pytest.mark.parametrize(
    ("float_module", "axis", "channels"),
    [
        pytest.param(nn.Conv2d(4, 6, 3), 0, 6, id="conv2d"),
        pytest.param(nn.ConvTranspose2d(4, 6, 3), 1, 6, id="conv-transpose2d"),
        pytest.param(nn.ConvTranspose1d(4, 6, 3, groups=2), 1, 6, id="grouped-conv-transpose1d"),
    ],
)
def test_weights_get_one_scale_per_output_channel(
    float_module: nn.Module, axis: int, channels: int
) -> None:
    pytest.importorskip("qatcore_conv")

    qat = qatcore.swap_modules(float_module, X86_QCONFIG)

    assert qat.weight_fake_quant.spec.axis == axis
    assert qat.weight_fake_quant.scale.shape == (channels,)


def test_activations_use_the_full_uint8_range() -> None:
    activation = X86_QCONFIG.activation

    assert (activation.quant_min, activation.quant_max) == (0, 255)
    assert not activation.symmetric
    assert activation.axis is None


@pytest.mark.skipif(
    "x86" not in torch.backends.quantized.supported_engines,
    reason="this torch build has no x86 quantized engine",
)
def test_qat_and_int8_saturate_at_the_same_code() -> None:
    pytest.importorskip("qatcore_conv")
    torch.manual_seed(0)
    qat = qatcore.swap_modules(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1)), X86_QCONFIG)
    with torch.no_grad():
        qat[0].weight.abs_()  # positive weights: large inputs give large outputs
    for _ in range(20):
        qat(torch.rand(4, 2, 6, 6))
    qat.eval()
    int8 = qatcore.convert(qat, "x86")
    scale, zero_point = qat[0].output_fake_quant.qparams()

    # Inputs far outside the calibrated [0, 1] saturate the input quantizer,
    # then the output quantizer, at code 255 in both models.
    x = torch.rand(2, 2, 6, 6) * 50
    with torch.no_grad():
        qat_codes = torch.round(qat(x) / scale) + zero_point
        int8_codes = torch.round(int8(x) / scale) + zero_point

    assert qat_codes.max().item() == 255
    assert int8_codes.max().item() == 255
    assert (qat_codes - int8_codes).abs().max().item() <= 1
