"""The ``x86`` QConfig: what PyTorch's int8 x86 engine runs, simulated exactly in training."""

from __future__ import annotations

from qatcore import OUTPUT_CHANNELS, QConfig, QuantSpec

__all__ = ["X86_QCONFIG"]

# Weights: int8, symmetric, one scale per output channel, as the x86 engine's
# quantized kernels take them. The output channels are axis 0 of a conv or
# linear weight and axis 1 of a transposed conv weight, and each QAT module
# resolves OUTPUT_CHANNELS to its own.
_WEIGHT = QuantSpec(
    bits=8, signed=True, symmetric=True, axis=OUTPUT_CHANNELS, observer="moving_average_minmax"
)

# Activations: unsigned affine per tensor over [0, 127], in training and in
# the int8 model alike. On CPUs without VNNI instructions FBGEMM multiplies
# uint8 inputs by int8 weights with AVX2's vpmaddubsw, which adds each pair
# of products in int16 and saturates at 32767: an input code of 255 times a
# weight code of 127, twice, is 64,770. Codes up to 127 keep every pair sum
# at most 32,512. With the full [0, 255], converted layers measured up to
# 51 output steps away from the QAT model when FBGEMM was limited to AVX2
# (FBGEMM_ENABLE_INSTRUCTIONS=AVX2, torch 2.13.0). torch.ao's default x86
# config reduces the range in the same way for training, but converts to
# [0, 255].
_ACTIVATION = QuantSpec(bits=7, signed=False, symmetric=False, observer="moving_average_minmax")

X86_QCONFIG = QConfig(weight=_WEIGHT, activation=_ACTIVATION)
