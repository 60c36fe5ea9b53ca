"""The CPU fake-quant kernel for qatcore: the reference numerics with fewer allocations."""

from qatcore_cpu.kernel import fake_quantize_cpu

__all__ = ["fake_quantize_cpu"]
