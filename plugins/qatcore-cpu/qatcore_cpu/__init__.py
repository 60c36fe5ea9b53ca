"""The CPU fake-quant kernels for qatcore: the reference numerics with fewer allocations."""

from qatcore_cpu.kernel import fake_quantize_cpu
from qatcore_cpu.learnable import fake_quantize_learnable_cpu

__all__ = ["fake_quantize_cpu", "fake_quantize_learnable_cpu"]
