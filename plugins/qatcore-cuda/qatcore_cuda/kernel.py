"""The CUDA fake-quant kernel: Triton kernels for CUDA tensors, the reference's ATen ops elsewhere.

The forward kernel reads the input once and writes the output and, when a
gradient is needed, a one-byte mask of the elements whose code lies inside
the range. The backward kernel multiplies the output gradient by that mask.
Saving the mask costs one byte per element. Recomputing it from the input
in the backward pass would keep the input alive instead, at two to eight
bytes per element, so the mask is the smaller choice whenever nothing else
holds on to the input.

Tensors are processed in memory order, viewed as ``(outer, channels,
inner)`` with the per-channel axis in the middle, so contiguous,
channels_last and other permuted dense layouts need no copy. An expanded or
sliced input is copied with ``.contiguous()`` first.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import threading
from collections.abc import Iterator
from functools import cache
from types import ModuleType
from typing import Any

import torch

from qatcore import check_qparams, fake_quantize_reference, prepare_qparams

__all__ = [
    "BLOCK_SIZE",
    "TRITON_DTYPES",
    "fake_quantize_cuda",
    "fake_quantize_triton",
    "triton_import_error",
    "unavailable_reason",
]

BLOCK_SIZE = 1024
"""Elements per Triton program, a power of two; read at each call."""

TRITON_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16})
"""Input dtypes the Triton kernels handle; other dtypes run the reference kernel."""

_KERNEL_MODULE = "qatcore_cuda._triton_kernels"
_INT32_MAX = 2**31 - 1

_kernel_modules: dict[bool, ModuleType] = {}
_kernel_modules_lock = threading.Lock()


@cache
def triton_import_error() -> str | None:
    """Return why ``import triton`` fails, or ``None`` if it succeeds; checked once per process."""
    try:
        import triton  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name == "triton":
            return "Triton is not installed: install it with `pip install 'qatcore-cuda[triton]'`"
        return f"Triton failed to import: {type(error).__name__}: {error}"
    except ImportError as error:
        return f"Triton failed to import: {type(error).__name__}: {error}"
    return None


def unavailable_reason() -> str | None:
    """Return why the Triton kernel cannot serve CUDA tensors on this machine, or ``None``.

    Every missing requirement is named, separated by semicolons: a torch
    build without CUDA, no visible CUDA device, and Triton that does not
    import.
    """
    reasons = []
    if not torch.backends.cuda.is_built():
        reasons.append(f"torch {torch.__version__} was built without CUDA")
    elif not torch.cuda.is_available():
        reasons.append("no CUDA device: torch.cuda.is_available() is False")
    triton_error = triton_import_error()
    if triton_error is not None:
        reasons.append(triton_error)
    return "; ".join(reasons) or None


def _load_interpreted_kernels() -> ModuleType:
    """Execute the kernel module again, as a separate module, with Triton's interpreter on.

    ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a function,
    so the variable is set only while this copy is executed and restored
    afterwards. The compiled kernels and the rest of the process are left
    as they were, except that another thread decorating its own Triton
    kernels during those moments would get interpreted ones too.
    """
    spec = importlib.util.find_spec(_KERNEL_MODULE)
    if spec is None or spec.origin is None:
        raise ImportError(f"cannot find the module {_KERNEL_MODULE}")
    interpreted = importlib.util.spec_from_file_location(
        f"{_KERNEL_MODULE}_interpreted", spec.origin
    )
    if interpreted is None or interpreted.loader is None:
        raise ImportError(f"cannot load {spec.origin} as a module")
    module = importlib.util.module_from_spec(interpreted)

    # Triton decorates its own library functions, such as tl.cdiv, when it is
    # first imported. Importing it now, before the variable is set, keeps
    # them compiled for the rest of the process.
    import triton.language  # noqa: F401

    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        interpreted.loader.exec_module(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return module


def _kernels(device_type: str) -> ModuleType:
    """Return the kernel module for tensors of ``device_type``: compiled, or interpreted for CPU."""
    interpret = device_type == "cpu"
    with _kernel_modules_lock:
        module = _kernel_modules.get(interpret)
        if module is None:
            if interpret:
                module = _load_interpreted_kernels()
            else:
                module = importlib.import_module(_KERNEL_MODULE)
            _kernel_modules[interpret] = module
    return module


@contextlib.contextmanager
def _launching(device_type: str) -> Iterator[None]:
    """Silence NumPy's overflow and invalid-value warnings while the interpreter runs a kernel.

    The interpreter computes with NumPy, which warns where IEEE arithmetic
    overflows to inf or turns ``inf * 0`` into NaN. These are the results
    the kernels intend, and the compiled kernels produce them silently.
    """
    if device_type != "cpu":
        yield
        return
    import numpy

    with numpy.errstate(over="ignore", invalid="ignore"):
        yield


def _memory_order(x: torch.Tensor) -> list[int] | None:
    """Return the permutation that makes ``x`` a contiguous view, if there is one.

    The permutation sorts the dimensions by decreasing stride. A dense
    tensor in any layout (contiguous, channels_last, transposed) has one,
    but an expanded or sliced view does not.
    """
    order = sorted(range(x.dim()), key=x.stride, reverse=True)
    if x.permute(order).is_contiguous():
        return order
    return None


def _empty_in_order(
    x: torch.Tensor, order: list[int], dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Return an empty tensor of ``x``'s shape whose memory order is ``order``."""
    dense = torch.empty([x.shape[dim] for dim in order], dtype=dtype or x.dtype, device=x.device)
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return dense.permute(inverse)


def _as_bits(tensor: torch.Tensor) -> torch.Tensor:
    """Return a bfloat16 tensor as a view of its int16 bits, and any other tensor unchanged."""
    return tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor


def _blocks(numel: int, block: int) -> tuple[tuple[int], bool]:
    """Return the launch grid and whether the offsets need 64-bit integers."""
    return ((numel + block - 1) // block,), numel + block > _INT32_MAX


def _fake_quantize_forward(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None,
    *,
    need_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    qparams = [
        qparam.reshape(-1).to(x.device).contiguous()
        for qparam in prepare_qparams(x, scale, zero_point, quant_min, quant_max, axis)
    ]
    order = _memory_order(x)
    if order is None:
        x = x.contiguous()
        order = list(range(x.dim()))
    out = _empty_in_order(x, order)
    mask = _empty_in_order(x, order, torch.bool) if need_mask else None
    numel = x.numel()
    if numel == 0:
        return out, mask

    if axis is None:
        channels, inner = 1, numel
    else:
        position = order.index(axis)
        channels = x.shape[axis]
        inner = math.prod(x.shape[dim] for dim in order[position + 1 :])
    block = BLOCK_SIZE
    grid, index_64 = _blocks(numel, block)
    kernel = _kernels(x.device.type).fake_quantize_kernel
    with _launching(x.device.type):
        kernel[grid](
            _as_bits(x),
            _as_bits(out),
            mask if mask is not None else out,
            *qparams,
            numel,
            channels,
            inner,
            quant_min,
            quant_max,
            PER_CHANNEL=axis is not None,
            WRITE_MASK=need_mask,
            BFLOAT16=x.dtype == torch.bfloat16,
            INDEX_64=index_64,
            BLOCK=block,
            enable_fp_fusion=False,
        )
    return out, mask


def _masked_gradient(grad_output: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Return ``grad_output * inside``, with the Triton kernel when both share a dense layout.

    Other layouts, such as the expanded gradient of ``out.sum()``, take the
    ATen product. Each element is the gradient times 0 or 1, which is exact
    in any dtype, so both give the same bits.
    """
    order = _memory_order(inside)
    same_layout = (
        order is not None
        and grad_output.shape == inside.shape
        and grad_output.stride() == inside.stride()
        and grad_output.device == inside.device
        and grad_output.dtype in TRITON_DTYPES
    )
    if not same_layout or order is None:
        return grad_output * inside
    grad_input = _empty_in_order(grad_output, order)
    numel = grad_output.numel()
    if numel == 0:
        return grad_input
    block = BLOCK_SIZE
    grid, index_64 = _blocks(numel, block)
    kernel = _kernels(grad_output.device.type).masked_gradient_kernel
    with _launching(grad_output.device.type):
        kernel[grid](
            _as_bits(grad_output),
            inside,
            _as_bits(grad_input),
            numel,
            BFLOAT16=grad_output.dtype == torch.bfloat16,
            INDEX_64=index_64,
            BLOCK=block,
            enable_fp_fusion=False,
        )
    return grad_input


class _TritonFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        quant_min: int,
        quant_max: int,
        axis: int | None,
    ) -> torch.Tensor:
        out, inside = _fake_quantize_forward(
            x, scale, zero_point, quant_min, quant_max, axis, need_mask=True
        )
        ctx.save_for_backward(inside)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (inside,) = ctx.saved_tensors
        return _masked_gradient(grad_output, inside), None, None, None, None, None


def _check_triton_input(x: torch.Tensor) -> None:
    if x.dtype not in TRITON_DTYPES:
        supported = ", ".join(sorted(str(dtype) for dtype in TRITON_DTYPES))
        raise TypeError(
            f"the Triton fake-quant kernel takes {supported} input, got {x.dtype}; "
            "call fake_quantize_cuda, which runs the reference kernel for other dtypes"
        )
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(
            f"the Triton fake-quant kernel runs on CUDA tensors, and on CPU tensors in "
            f"Triton's interpreter, got a tensor on {x.device}"
        )
    triton_error = triton_import_error()
    if triton_error is not None:
        raise ImportError(f"the Triton fake-quant kernel needs Triton: {triton_error}")


def fake_quantize_triton(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` with the Triton kernels, as :func:`qatcore.fake_quantize_reference` does.

    CUDA tensors run the compiled kernels. CPU tensors run the same kernels
    in Triton's interpreter, which is slow and meant for tests on machines
    without a GPU. The interpreter is switched on for a separate copy of the
    kernels only, so the process's environment stays as it was. When grad
    mode is off or no argument requires a gradient, no gradient mask is
    written.

    Args:
        x: Input of dtype float32, float64, float16 or bfloat16; the output
            has the same dtype and, when ``x`` is dense, the same strides.
        scale: One float scale, or one per channel along ``axis``.
        zero_point: One zero point, or one per channel; float zero points
            are rounded half to even and clamped to the range.
        quant_min: Smallest integer code.
        quant_max: Largest integer code.
        axis: ``None`` for per-tensor, else the channel axis of ``x``.

    Raises:
        ValueError: The arguments fail :func:`qatcore.check_qparams`, or
            ``x`` is on a device other than CUDA or the CPU.
        TypeError: ``x`` has a dtype the kernels do not handle.
        ImportError: Triton does not import.
    """
    check_qparams(x, scale, zero_point, quant_min, quant_max, axis)
    _check_triton_input(x)
    needs_graph = x.requires_grad or scale.requires_grad or zero_point.requires_grad
    if torch.is_grad_enabled() and needs_graph:
        return _TritonFakeQuantize.apply(x, scale, zero_point, quant_min, quant_max, axis)
    out, _ = _fake_quantize_forward(
        x, scale, zero_point, quant_min, quant_max, axis, need_mask=False
    )
    return out


def fake_quantize_cuda(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` as :func:`qatcore.fake_quantize_reference` does, with Triton on CUDA.

    CUDA tensors of dtype float32, float64, float16 or bfloat16 run
    :func:`fake_quantize_triton` when Triton imports. Every other tensor,
    and every call while ``torch.compile`` traces a graph, gets the
    reference kernel, whose ATen ops the compiler fuses itself. Outputs and
    input gradients are the reference's bit for bit either way.

    Args:
        x: Input of any floating dtype; the output has the same dtype.
        scale: One float scale, or one per channel along ``axis``.
        zero_point: One zero point, or one per channel; float zero points
            are rounded half to even and clamped to the range.
        quant_min: Smallest integer code.
        quant_max: Largest integer code.
        axis: ``None`` for per-tensor, else the channel axis of ``x``.

    Raises:
        ValueError: The range is empty, the axis does not exist, the qparams
            do not match the channel count, or a scale is not finite and
            positive (see :func:`qatcore.check_qparams`).
    """
    if torch.compiler.is_compiling():
        return fake_quantize_reference(x, scale, zero_point, quant_min, quant_max, axis)
    if x.device.type == "cuda" and x.dtype in TRITON_DTYPES and triton_import_error() is None:
        return fake_quantize_triton(x, scale, zero_point, quant_min, quant_max, axis)
    return fake_quantize_reference(x, scale, zero_point, quant_min, quant_max, axis)
