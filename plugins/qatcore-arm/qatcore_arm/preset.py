"""The ``arm`` QConfig: what PyTorch's int8 qnnpack engine runs, simulated exactly in training."""

from __future__ import annotations

from qatcore import OUTPUT_CHANNELS, QConfig, QuantSpec

__all__ = ["ARM_QCONFIG"]

# Weights: int8, symmetric (zero point 0), one scale per output channel. The
# output channels are axis 0 of a conv or linear weight and axis 1 of a
# transposed conv weight, and each QAT module resolves OUTPUT_CHANNELS to its own.
#
# The range is the full [-128, 127]. torch.ao's symmetric qnnpack qconfigs
# narrow weights to [-127, 127] because XNNPACK requires it, but ATen's
# qnnpack engine calls XNNPACK only for qint8 (signed) activations. With the
# uint8 activations below it runs PyTorch's QNNPACK kernels, which shift the
# int8 weight codes by 128 into uint8 and so take every int8 code: in torch
# 2.13 a conv with weight code -128 matched the integer reference exactly.
_WEIGHT = QuantSpec(
    bits=8,
    signed=True,
    symmetric=True,
    axis=OUTPUT_CHANNELS,
    narrow_range=False,
    observer="moving_average_minmax",
)

# Activations: uint8 affine per tensor over the full [0, 255], the activation
# type of the QNNPACK kernels (builds without XNNPACK reject qint8 input with
# "Expected activation data type QUInt8"). The quantized tensors they return
# span all 256 codes, so an output saturates at the same code in QAT as after
# conversion.
_ACTIVATION = QuantSpec(bits=8, signed=False, symmetric=False, observer="moving_average_minmax")

ARM_QCONFIG = QConfig(weight=_WEIGHT, activation=_ACTIVATION)
