"""Time the fake-quant kernels alone against a plain out-of-place copy of the same tensor.

Two tensors, each with its own qparams:

- per-tensor, uint8 range ``[0, 255]``, on a 64x64x56x56 float32 activation;
- per-channel along axis 0, int8 range ``[-128, 127]``, on a 512x512x3x3
  float32 weight.

Each is fake-quantized by these implementations, side by side:

- ``clone``: ``x.clone()``, the cost of reading the input and writing one
  new output of the same size;
- ``copy_ into an existing tensor``: ``out.copy_(x)`` into a tensor
  allocated once, forward only. It costs the same memory traffic as
  ``clone`` without allocating, so the gap between the two rows is what
  fresh output memory costs: the allocator's work and the page faults of
  its first writes;
- ``reference``: ``qatcore.fake_quantize_reference``;
- ``registered CPU kernel``: the kernel that qatcore resolves for
  ``("default", "cpu")``, which is ``qatcore-cpu``'s when that plugin is
  installed (left out when it is the reference);
- ``torch.fake_quantize_*``: ``torch.fake_quantize_per_tensor_affine`` or
  ``torch.fake_quantize_per_channel_affine``;
- ``reference compiled``: the reference under ``torch.compile``;
- ``qatcore FakeQuantize``: a ``qatcore.FakeQuantize`` with the ``x86``
  preset's spec in training mode, which observes the tensor, computes the
  qparams and fake-quantizes, as in a QAT step;
- ``torch.ao FakeQuantize``: the same for the fake quantizer that
  ``get_default_qat_qconfig("x86")`` builds.

"forward" calls the implementation on a leaf that requires grad, so it
saves what the backward pass needs, as in training. "forward+backward" adds
``torch.autograd.grad`` with a fixed output gradient, which returns the
input gradient without accumulating it anywhere. Each row's ratio divides
by the ``clone`` row of the same pass. Rounds run every case once, in an
order that rotates each round.

Run from the repository root after the Quick start install::

    python benchmarks/bench_kernels.py

This is a measurement, not a test: it asserts nothing, and its numbers
depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import NamedTuple

import _harness
import torch
import torch.ao.quantization as tq
from torch import nn

import qatcore
from qatcore._fake_quantize import resolve_kernel

FakeQuant = Callable[[torch.Tensor], torch.Tensor]

COPY_INTO_EXISTING = "copy_ into an existing tensor"


class Setup(NamedTuple):
    """A tensor to fake-quantize and the qparams that the kernels take."""

    title: str
    x: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    quant_min: int
    quant_max: int
    axis: int | None


def make_setups() -> list[Setup]:
    generator = torch.Generator().manual_seed(2)
    activation = torch.randn(64, 64, 56, 56, generator=generator)
    weight = torch.randn(512, 512, 3, 3, generator=generator) * 0.05
    return [
        Setup(
            "per-tensor, activation 64x64x56x56 float32",
            activation,
            torch.tensor(0.02),
            torch.tensor(128, dtype=torch.int32),
            0,
            255,
            None,
        ),
        Setup(
            "per-channel axis 0, weight 512x512x3x3 float32",
            weight,
            weight.abs().amax(dim=(1, 2, 3)) / 127.5,
            torch.zeros(512, dtype=torch.int32),
            -128,
            127,
            0,
        ),
    ]


def implementations(setup: Setup) -> tuple[dict[str, FakeQuant], float]:
    """Return the implementations to time on ``setup``, and the seconds spent compiling.

    Every implementation takes the input tensor and returns its fake-quantized
    copy; ``clone`` returns a plain copy.
    """
    qparams = (setup.scale, setup.zero_point, setup.quant_min, setup.quant_max, setup.axis)
    registered = resolve_kernel("default", "cpu")
    # Static shapes, because the second tensor's shape would otherwise make
    # dynamo recompile the reference with dynamic shapes.
    compiled_reference = torch.compile(
        qatcore.fake_quantize_reference, fullgraph=True, dynamic=False
    )

    def torch_op(x: torch.Tensor) -> torch.Tensor:
        if setup.axis is None:
            return torch.fake_quantize_per_tensor_affine(
                x, setup.scale, setup.zero_point, setup.quant_min, setup.quant_max
            )
        return torch.fake_quantize_per_channel_affine(
            x, setup.scale, setup.zero_point, setup.axis, setup.quant_min, setup.quant_max
        )

    torch_name = (
        "torch.fake_quantize_per_tensor_affine"
        if setup.axis is None
        else "torch.fake_quantize_per_channel_affine"
    )
    cases: dict[str, FakeQuant] = {
        "clone": torch.clone,
        "reference": lambda x: qatcore.fake_quantize_reference(x, *qparams),
    }
    if registered is not qatcore.fake_quantize_reference:
        cases["registered CPU kernel"] = lambda x: registered(x, *qparams)
    cases[torch_name] = torch_op
    cases["reference compiled"] = lambda x: compiled_reference(x, *qparams)
    cases["qatcore FakeQuantize"] = qatcore_fake_quantize(setup)
    cases["torch.ao FakeQuantize"] = torch_ao_fake_quantize(setup)

    # The first call traces and compiles the forward and backward graphs.
    leaf = setup.x.detach().requires_grad_()
    begin = time.perf_counter()
    torch.autograd.grad(cases["reference compiled"](leaf), leaf, torch.ones_like(leaf))
    return cases, time.perf_counter() - begin


def qatcore_fake_quantize(setup: Setup) -> nn.Module:
    """Return a ``qatcore.FakeQuantize`` in training mode with the x86 preset's spec."""
    qconfig = qatcore.get_qconfig("x86")
    if setup.axis is None:
        return qatcore.FakeQuantize(qconfig.activation).train()
    spec = qconfig.weight.resolve_axis(setup.axis)
    return qatcore.FakeQuantize(spec, channels=setup.x.shape[setup.axis]).train()


def torch_ao_fake_quantize(setup: Setup) -> nn.Module:
    """Return the fake quantizer that torch.ao's x86 QAT qconfig builds for ``setup``."""
    qconfig = tq.get_default_qat_qconfig("x86")
    factory = qconfig.activation if setup.axis is None else qconfig.weight
    return factory().train()


def timing_cases(
    setup: Setup, fake_quants: dict[str, FakeQuant]
) -> dict[str, Callable[[], object]]:
    """Return a forward and a forward+backward call of every implementation, by case name.

    The case ``copy_ into an existing tensor forward`` has no backward.
    """
    leaf = setup.x.detach().requires_grad_()
    grad_output = torch.randn_like(setup.x)
    out = torch.empty_like(setup.x)
    cases: dict[str, Callable[[], object]] = {
        f"{COPY_INTO_EXISTING} forward": lambda: out.copy_(setup.x)
    }
    for name, fake_quant in fake_quants.items():
        cases[f"{name} forward"] = lambda f=fake_quant: f(leaf)
        cases[f"{name} forward+backward"] = lambda f=fake_quant: torch.autograd.grad(
            f(leaf), leaf, grad_output
        )
    return cases


def bench_setup(setup: Setup, args: argparse.Namespace) -> None:
    """Time every implementation on ``setup`` and print a table of medians and ratios to clone."""
    fake_quants, compile_seconds = implementations(setup)
    timed, _ = _harness.time_interleaved(timing_cases(setup, fake_quants), args.rounds, args.warmup)
    medians = {name: _harness.median(samples) for name, samples in timed.items()}

    copy_seconds = medians[f"{COPY_INTO_EXISTING} forward"]
    rows: list[list[object]] = [
        [
            f"`{COPY_INTO_EXISTING}`",
            _harness.format_ms(copy_seconds),
            _harness.format_ratio(copy_seconds, medians["clone forward"]),
            "",
            "",
        ]
    ]
    for name in fake_quants:
        row: list[object] = [f"`{name}`"]
        for passes in ("forward", "forward+backward"):
            seconds = medians[f"{name} {passes}"]
            clone = medians[f"clone {passes}"]
            row += [_harness.format_ms(seconds), _harness.format_ratio(seconds, clone)]
        rows.append(row)
    header = ["implementation", "forward ms", "vs clone", "forward+backward ms", "vs clone"]
    note = (
        f"Median of {args.rounds} interleaved rounds after {args.warmup} warm-up rounds. "
        f"`reference compiled` took {compile_seconds:.1f} s to compile, not counted."
    )
    _harness.print_section(
        f"Fake-quant kernels, {setup.title}", _harness.markdown_table(header, rows), note
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds", type=int, default=15, help="timed rounds per tensor (default: 15)"
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed rounds before timing (default: 3)"
    )
    _harness.add_thread_option(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    _harness.start(args)
    registered = resolve_kernel("default", "cpu")
    print(f"Registered CPU kernel: `{registered.__module__}.{registered.__name__}`\n")
    for setup in make_setups():
        bench_setup(setup, args)


if __name__ == "__main__":
    main()
