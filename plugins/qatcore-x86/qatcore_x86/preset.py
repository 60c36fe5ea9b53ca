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

# Activations: uint8 affine per tensor over the full [0, 255]. The quantized
# tensors that the x86 engine produces span all 256 codes, so training on the
# same range makes an activation saturate at the same code in QAT and after
# conversion. torch.ao's default x86 QAT config instead observes with
# reduce_range=True: it trains on [0, 127] but deploys on [0, 255].
# NOTE: torch.ao reduces the range to keep uint8 x int8 pair sums inside
# int16 on CPUs without VNNI. Whether the full range loses accuracy there is
# not measured, because int8 conversion is not part of qatcore yet.
_ACTIVATION = QuantSpec(bits=8, signed=False, symmetric=False, observer="moving_average_minmax")

X86_QCONFIG = QConfig(weight=_WEIGHT, activation=_ACTIVATION)
