"""The native loops: what the backward pass keeps, threads, forks, and the ATen fallback."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import textwrap

import pytest
import torch

import qatcore
import qatcore_cpu.native
from qatcore_cpu import fake_quantize_cpu

pytestmark = pytest.mark.skipif(
    not qatcore_cpu.native.available(),
    reason=qatcore_cpu.native.status() or "the native loops are not loaded",
)

SCALE = torch.tensor(0.05)
ZERO_POINT = torch.tensor(3, dtype=torch.int32)


def _saved_tensors(output: torch.Tensor) -> list[torch.Tensor]:
    """Return what the kernel's autograd node keeps for the backward pass."""
    node = output.grad_fn
    assert node is not None
    return list(node.saved_tensors)


def test_leaf_input_is_kept_instead_of_a_mask() -> None:
    weight = torch.randn(8, 4, 3, 3, requires_grad=True)

    out = fake_quantize_cpu(
        weight, torch.full((8,), 0.02), torch.zeros(8, dtype=torch.int32), -128, 127, 0
    )

    saved = _saved_tensors(out)
    assert len(saved) == 1
    assert saved[0].dtype == torch.float32
    assert saved[0].data_ptr() == weight.data_ptr()


def test_intermediate_input_keeps_a_bool_mask() -> None:
    leaf = torch.randn(4, 6, 5, 5, requires_grad=True)
    activation = leaf * 2

    out = fake_quantize_cpu(activation, SCALE, ZERO_POINT, 0, 255)

    saved = _saved_tensors(out)
    assert [tensor.dtype for tensor in saved] == [torch.bool]
    assert saved[0].shape == activation.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(
    "grad_layout",
    ["same", "channels-last", "transposed", "expanded", "other-dtype"],
)
def test_recomputed_mask_gradient_matches_reference(dtype: torch.dtype, grad_layout: str) -> None:
    generator = torch.Generator().manual_seed(4)
    x = (torch.randn(3, 4, 5, 6, generator=generator, dtype=torch.float64) * 0.3).to(dtype)
    x[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    grad = torch.randn(x.shape, generator=generator, dtype=dtype)
    if grad_layout == "channels-last":
        grad = grad.contiguous(memory_format=torch.channels_last)
    elif grad_layout == "transposed":
        grad = grad.transpose(0, 3).contiguous().transpose(0, 3)
    elif grad_layout == "expanded":
        grad = grad[:1].expand(x.shape)
    results = []
    for kernel in (fake_quantize_cpu, qatcore.fake_quantize_reference):
        leaf = x.clone().requires_grad_()
        out = kernel(leaf, SCALE, ZERO_POINT, -8, 7, None)
        if grad_layout == "other-dtype":
            # The output's dtype changes before the loss, so the gradient
            # reaches the kernel in the output's dtype again.
            out.to(torch.float16).backward(grad.to(torch.float16))
        else:
            out.backward(grad)
        results.append(leaf.grad)

    actual, expected = results
    assert actual is not None and expected is not None
    assert torch.equal(actual.isnan(), expected.isnan())
    assert torch.equal(actual.nan_to_num(), expected.nan_to_num())
    assert torch.equal(actual.signbit(), expected.signbit())


def test_ranges_split_over_threads_match_one_range(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(5, 7, 11, 13, generator=generator)
    scale = torch.rand(7, generator=generator) * 0.05 + 0.01
    zero_point = torch.randint(-4, 4, (7,), generator=generator, dtype=torch.int32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        whole = fake_quantize_cpu(x, scale, zero_point, -8, 7, 1)
        monkeypatch.setattr(qatcore_cpu.native, "MIN_ELEMENTS_PER_THREAD", 1)
        monkeypatch.setattr(qatcore_cpu.native, "ALIGNMENT", 3)
        torch.set_num_threads(4)
        split = fake_quantize_cpu(x, scale, zero_point, -8, 7, 1)
    finally:
        torch.set_num_threads(threads)

    assert torch.equal(split, whole)


def _quantize_in_child(queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    # Below ATen's parallel grain size, so that only the kernel's own pool
    # runs threads here: torch's OpenMP pool is not safe to use after a fork.
    x = torch.arange(-200.0, 200.0).repeat(20)
    out = fake_quantize_cpu(x, torch.tensor(0.5), torch.tensor(0, dtype=torch.int32), -128, 127)
    queue.put(float(out.abs().max()))


def test_kernel_runs_in_forked_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(qatcore_cpu.native, "MIN_ELEMENTS_PER_THREAD", 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # The parent's pool has a worker thread now; the child inherits the
        # pool but not the thread, and must make its own.
        fake_quantize_cpu(torch.randn(8000), SCALE, ZERO_POINT, 0, 255)
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_quantize_in_child, args=(queue,))
        child.start()
        child.join(timeout=60)
        exit_code = child.exitcode
        if child.is_alive():
            child.kill()
    finally:
        torch.set_num_threads(threads)

    assert exit_code == 0, "the forked child hung or failed in the kernel"
    # -200 / 0.5 clamps to the code -128, which is -64.0.
    assert queue.get(timeout=5) == 64.0


def test_missing_extension_falls_back_to_aten() -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["qatcore_cpu._native"] = None  # an install without a C compiler
        import torch
        import qatcore
        from qatcore_cpu import fake_quantize_cpu, native

        assert not native.available()
        print(native.status())
        x = torch.randn(4, 3, 9, 9, requires_grad=True)
        scale, zero_point = torch.tensor(0.03), torch.tensor(0, dtype=torch.int32)
        out = fake_quantize_cpu(x * 1, scale, zero_point, -8, 7)
        expected = qatcore.fake_quantize_reference(x * 1, scale, zero_point, -8, 7)
        assert torch.equal(out, expected)
        print("identical")

        from qatcore._cli import main
        main(["plugins"])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )

    assert result.returncode == 0, result.stderr
    reason, verdict, *plugins_output = result.stdout.strip().splitlines()
    assert "the native loops are not built" in reason
    assert "C compiler" in reason
    assert verdict == "identical"
    notes = [line.strip() for line in plugins_output if line.strip().startswith("note:")]
    assert notes == [f"note: {reason}"]
