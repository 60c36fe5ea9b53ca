"""The ``tensorrt`` QConfig: symmetric int8 everywhere, as TensorRT's explicit quantization."""

from __future__ import annotations

from qatcore import OUTPUT_CHANNELS, QConfig, QuantSpec

__all__ = ["TENSORRT_QCONFIG"]

# TensorRT reads scales from QuantizeLinear/DequantizeLinear nodes, takes
# only zero points of 0, and its int8 QuantizeLinear clamps codes to
# [-128, 127] (its own calibration picks scale = amax / 127). narrow_range
# stays False so that QAT clamps at -128 as the engine does: with [-127, 127]
# a value below -127 scales would saturate one code apart. The scale the
# observer picks, amax / 127.5 over [-128, 127], is the one exported, so the
# engine computes with the trained scale either way.
_WEIGHT = QuantSpec(
    bits=8,
    signed=True,
    symmetric=True,
    axis=OUTPUT_CHANNELS,
    narrow_range=False,
    observer="moving_average_minmax",
)

# Activations: one scale per tensor, as TensorRT takes for activations.
_ACTIVATION = QuantSpec(
    bits=8, signed=True, symmetric=True, narrow_range=False, observer="moving_average_minmax"
)

TENSORRT_QCONFIG = QConfig(weight=_WEIGHT, activation=_ACTIVATION)
