"""The native loops: what the backward pass keeps, threads, forks, and the ATen fallback."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import textwrap
import threading

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


def test_concurrent_callers_share_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two Python threads whose tensors split into different numbers of
    # ranges; each result must equal the single-threaded one.
    monkeypatch.setattr(qatcore_cpu.native, "MIN_ELEMENTS_PER_THREAD", 256)
    generator = torch.Generator().manual_seed(6)
    inputs = [torch.randn(size, generator=generator) for size in (700, 5000)]
    expected = [qatcore.fake_quantize_reference(x, SCALE, ZERO_POINT, 0, 255) for x in inputs]
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    failures: list[str] = []

    def work(index: int) -> None:
        for _ in range(200):
            out = fake_quantize_cpu(inputs[index], SCALE, ZERO_POINT, 0, 255)
            if not torch.equal(out, expected[index]):
                failures.append(f"input {index} differs")
                return

    try:
        workers = [threading.Thread(target=work, args=(index,)) for index in (0, 1)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
    finally:
        torch.set_num_threads(threads)

    assert not any(worker.is_alive() for worker in workers)
    assert failures == []


@pytest.mark.parametrize("scale", [1e39, 1e-50], ids=["above-float32", "below-float32"])
def test_float64_scale_outside_float32_on_leaf(scale: float) -> None:
    # The reference checks the scale in float64, where it is valid, and then
    # computes with it in float32, where it is inf or 0.
    x = torch.tensor([-3.0, 0.0, 2.0, 5.0])
    results = []
    for kernel in (fake_quantize_cpu, qatcore.fake_quantize_reference):
        leaf = x.clone().requires_grad_()
        out = kernel(leaf, torch.tensor(scale, dtype=torch.float64), ZERO_POINT, -128, 127)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), leaf.grad))

    (out, grad), (expected_out, expected_grad) = results
    assert torch.equal(out.isnan(), expected_out.isnan())
    assert torch.equal(out.nan_to_num(), expected_out.nan_to_num())
    assert torch.equal(grad, expected_grad)


@pytest.mark.parametrize(
    ("quant_range", "value"),
    [((-(2**31), 2**31 - 1), 2.0**31), ((0, 2**24 + 1), 16777217.0)],
    ids=["int32-range", "beyond-float32-integers"],
)
def test_float64_input_keeps_wide_range_exact(quant_range: tuple[int, int], value: float) -> None:
    x = torch.tensor([value, -value, 3.0], dtype=torch.float64)
    scale, zero_point = torch.tensor(1.0), torch.tensor(0, dtype=torch.int32)

    out = fake_quantize_cpu(x, scale, zero_point, *quant_range)

    expected = qatcore.fake_quantize_reference(x, scale, zero_point, *quant_range)
    assert torch.equal(out, expected)
    # Hand-computed: the codes clamp to the range, which float64 represents exactly.
    assert out[0].item() == min(value, quant_range[1])


def test_input_without_gradient_keeps_nothing() -> None:
    x = torch.randn(6, 5)
    scale = torch.tensor(0.05, requires_grad=True)

    out = fake_quantize_cpu(x, scale, ZERO_POINT, 0, 255)

    assert _saved_tensors(out) == []
    with torch.no_grad():
        x.mul_(2)  # changing x after the forward pass is allowed then
    out.sum().backward()
    assert scale.grad is None


def test_leaf_changed_in_place_before_backward_raises() -> None:
    # The kernel keeps a leaf input for the backward pass, as a float conv
    # keeps its weight, so autograd detects the change.
    weight = torch.randn(4, 3, requires_grad=True)
    out = fake_quantize_cpu(weight, SCALE, ZERO_POINT, -8, 7)
    with torch.no_grad():
        weight.mul_(0.9)

    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
