"""The ``x86`` QConfig: what PyTorch's int8 x86 engine runs, simulated exactly in training."""

from __future__ import annotations

from qatcore import OUTPUT_CHANNELS, QConfig, QuantSpec

__all__ = ["X86_QCONFIG"]

# x86 int8 kernels without VNNI instructions (FBGEMM's, and ONNX Runtime's
# MLAS) multiply uint8 inputs by int8 weights with AVX2's vpmaddubsw, which
# adds each pair of products in int16 and saturates at 32,767. Input code
# 255 times weight code 127, twice, is 64,770. With FBGEMM limited to AVX2
# (FBGEMM_ENABLE_INSTRUCTIONS=AVX2, torch 2.13.0), converted layers with
# both ranges full measured up to 51 output steps away from the QAT model.
# The preset gives the weights 7-bit codes, as ONNX Runtime's reduce_range
# does: 255 * 63 * 2 = 32,130 fits. The activations keep all 256 codes, so
# that ONNX Runtime can run its QuantizeLinear/DequantizeLinear pairs as
# int8 kernels, which a narrower range would need a Clip for.

# Weights: symmetric per output channel over [-63, 63]. The output channels
# are axis 0 of a conv or linear weight and axis 1 of a transposed conv
# weight, and each QAT module resolves OUTPUT_CHANNELS to its own.
_WEIGHT = QuantSpec(
    bits=7,
    signed=True,
    symmetric=True,
    narrow_range=True,
    axis=OUTPUT_CHANNELS,
    observer="moving_average_minmax",
)

# Activations: uint8 affine per tensor over the full [0, 255], the range of
# the quantized tensors the engines produce, so an output saturates at the
# same code in QAT as after conversion.
_ACTIVATION = QuantSpec(bits=8, signed=False, symmetric=False, observer="moving_average_minmax")

X86_QCONFIG = QConfig(weight=_WEIGHT, activation=_ACTIVATION)
