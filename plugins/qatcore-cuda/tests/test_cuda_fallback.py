"""``fake_quantize_cuda``: the reference kernel off CUDA, and the Triton kernels on a GPU.

On a machine without a CUDA device, every tensor takes the reference
kernel, and these tests check that fallback. The tests marked
``needs_cuda`` run the conformance suite on CUDA tensors, through the
compiled Triton kernels. They skip without a CUDA device, so the compiled
path is checked only on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

import qatcore
import qatcore.testing
from qatcore_cuda import fake_quantize_cuda, fake_quantize_triton, unavailable_reason

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device; torch.cuda.is_available() is False",
)


# -- off CUDA -----------------------------------------------------------------------


def test_cpu_tensor_takes_reference_kernel() -> None:
    x = torch.randn(6, 10, requires_grad=True)

    y = fake_quantize_cuda(x, torch.tensor(0.05), torch.tensor(3), 0, 255)

    assert y.grad_fn is not None
    assert type(y.grad_fn).__name__ == "_ReferenceFakeQuantizeBackward"


def test_cpu_fallback_passes_conformance_suite() -> None:
    qatcore.testing.check_kernel(fake_quantize_cuda)


def test_compiled_graph_takes_reference_math() -> None:
    x = torch.randn(4, 6)
    scale = torch.full((6,), 0.02)
    zero_point = torch.zeros(6, dtype=torch.int32)
    compiled = torch.compile(fake_quantize_cuda, backend="eager", fullgraph=True)

    y = compiled(x, scale, zero_point, -128, 127, 1)

    expected = qatcore.fake_quantize_reference(x, scale, zero_point, -128, 127, 1)
    qatcore.testing.assert_identical(y, expected, "compiled output")


def test_invalid_scale_raises_like_reference() -> None:
    with pytest.raises(ValueError, match="finite scales > 0"):
        fake_quantize_cuda(torch.randn(3), torch.tensor(0.0), torch.tensor(0), -8, 7)


# -- on a CUDA device ---------------------------------------------------------------


@needs_cuda
def test_cuda_kernel_requirements_met() -> None:
    assert unavailable_reason() is None


@needs_cuda
def test_cuda_tensors_pass_conformance_suite() -> None:
    qatcore.testing.check_kernel(fake_quantize_cuda, device="cuda")


@needs_cuda
def test_cuda_tensor_takes_triton_kernel() -> None:
    x = torch.randn(6, 10, device="cuda", requires_grad=True)
    scale = torch.tensor(0.05, device="cuda")
    zero_point = torch.tensor(3, device="cuda")

    y = fake_quantize_cuda(x, scale, zero_point, 0, 255)

    assert y.grad_fn is not None
    assert type(y.grad_fn).__name__ == "_TritonFakeQuantizeBackward"
    expected = fake_quantize_triton(x, scale, zero_point, 0, 255)
    qatcore.testing.assert_identical(y, expected, "output")


@needs_cuda
def test_cuda_kernel_registered_for_default_specs() -> None:
    manager = qatcore.PluginManager()

    assert manager.registry.kernels[("default", "cuda")] is fake_quantize_cuda
    assert [skip.name for skip in manager.skipped()] == []
