"""The arm preset and converter: their discovery through the entry point, and their specs."""

from __future__ import annotations

import pytest

import qatcore
from qatcore_arm import ARM_QCONFIG

pytest.importorskip("qatcore_observers")


def test_preset_and_converter_are_registered() -> None:
    registry = qatcore.plugin_manager().registry

    assert qatcore.get_qconfig("arm") is ARM_QCONFIG
    assert registry.qconfigs.entry("arm").plugin == "arm"
    converter = registry.converters["arm"]
    assert isinstance(converter, qatcore.TorchEngineConverter)
    assert converter.engine == "qnnpack"
    assert converter.backend == "arm"
    arm_plugin = next(info for info in qatcore.plugin_manager().plugins() if info.name == "arm")
    assert arm_plugin.distribution == "qatcore-arm"


def test_weights_are_int8_symmetric_per_output_channel() -> None:
    weight = ARM_QCONFIG.weight

    assert (weight.quant_min, weight.quant_max) == (-128, 127)
    assert weight.symmetric
    assert weight.axis == qatcore.OUTPUT_CHANNELS


def test_activations_use_the_full_uint8_range() -> None:
    activation = ARM_QCONFIG.activation

    assert (activation.quant_min, activation.quant_max) == (0, 255)
    assert not activation.symmetric
    assert activation.axis is None
