"""The CUDA fake-quant kernel for qatcore: Triton kernels with the reference numerics."""

from qatcore_cuda.kernel import (
    fake_quantize_cuda,
    fake_quantize_triton,
    triton_import_error,
    unavailable_reason,
)

__all__ = [
    "fake_quantize_cuda",
    "fake_quantize_triton",
    "triton_import_error",
    "unavailable_reason",
]
