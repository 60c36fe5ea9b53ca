"""Time one QAT training step against the float step and torch.ao's, on four small nets.

A step is forward, cross-entropy loss, backward and an SGD update with
momentum, on one fixed batch. Each net runs in these variants, built from
the same float weights:

- ``float``: no fake quantization.
- ``qatcore``: every conv swapped with ``fuse=False``: conv weights int8 per
  channel, conv outputs uint8 per tensor; BatchNorm, ReLU and the linear
  layer stay float and unfused.
- ``torch.ao``: ``prepare_qat`` with ``get_default_qat_qconfig("x86")`` on
  the whole model.
- ``torch.ao convs``: the same qconfig on the convs only, which quantizes the
  same tensors as ``qatcore``.
- ``qatcore BN folded``: the ``x86`` preset with its default fusion, so
  conv-BN(-ReLU) groups train with BN folded, plus the linear layer.
- ``torch.ao BN folded``: ``fuse_modules_qat`` on the same groups, then
  ``prepare_qat``; torch.ao's default fold divides by the BN weight.
- ``torch.ao BN folded, stable``: the same with torch.ao's numerically
  stable fold, the one qatcore computes.
- ``float compiled``, ``qatcore compiled``, ``qatcore BN folded compiled``:
  ``torch.compile(model, fullgraph=True)`` of a copy of the eager model; the
  optimizer step stays eager.

Rounds run every variant once, in an order that rotates each round, so that
a slow spell of the machine hits every variant alike. Compiled variants
first run steps alone until a step compiles nothing new, at most
``COMPILE_STEPS``, because dynamo compiles again when a guard fails: with
torch 2.13 a swapped model compiled a second graph on its second step. The
wall time of these steps, the last of which compiles nothing, is printed as
"compile s" and kept out of the step times. The warm-up rounds follow, then
the timed rounds.

Run from the repository root after the Quick start install::

    python benchmarks/bench_training_step.py

This is a measurement, not a test: it asserts nothing, and its numbers
depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import _harness
import _models
import torch
from torch import nn
from torch._dynamo.utils import counters

COMPILE_STEPS = 5
"""Most steps a compiled variant runs alone before the rounds."""

COUNTERPARTS = {
    "qatcore": "torch.ao convs",
    "qatcore compiled": "torch.ao convs",
    "qatcore BN folded": "torch.ao BN folded, stable",
    "qatcore BN folded compiled": "torch.ao BN folded, stable",
}
"""qatcore variant -> the torch.ao variant that fake-quantizes the same tensors the same way."""


def build_variants(net: _models.Net, compile_models: bool) -> dict[str, nn.Module]:
    """Return the eager variants and, with ``compile_models``, the compiled ones."""
    models: dict[str, nn.Module] = _models.build_eager_variants(net)
    if compile_models:
        for name, source in _models.COMPILED_VARIANTS.items():
            models[name] = torch.compile(copy.deepcopy(models[source]), fullgraph=True)
    return models


def compile_steps(step: Callable[[], None]) -> float:
    """Run ``step`` until a call compiles no new graph, and return the seconds it took."""
    begin = time.perf_counter()
    for _ in range(COMPILE_STEPS):
        # AOTAutograd counts every graph that dynamo hands to the compiler.
        graphs = counters["aot_autograd"]["total"]
        step()
        if counters["aot_autograd"]["total"] == graphs:
            break
    return time.perf_counter() - begin


def baseline_of(name: str) -> str:
    return "float compiled" if name.endswith(" compiled") else "float"


def bench_net(net_name: str, args: argparse.Namespace) -> dict[str, float]:
    """Time every variant of one net, print its table and return the medians in seconds."""
    net = _models.NETS[net_name]
    batch = args.batch or net.batch
    torch._dynamo.reset()
    models = build_variants(net, compile_models=not args.no_compile)
    inputs, targets = _models.make_batch(net, batch)

    cases: dict[str, Callable[[], None]] = {}
    for name, model in models.items():
        optimizer = _models.make_optimizer(model)
        cases[name] = lambda m=model, o=optimizer: _models.training_step(m, o, inputs, targets)

    compile_seconds = {
        name: compile_steps(cases[name]) for name in models if name in _models.COMPILED_VARIANTS
    }
    timed, _ = _harness.time_interleaved(cases, args.steps, args.warmup)
    medians = {name: _harness.median(samples) for name, samples in timed.items()}

    rows = []
    for name, samples in timed.items():
        baseline = baseline_of(name)
        counterpart = COUNTERPARTS.get(name)
        row: list[object] = [
            f"`{name}`",
            _models.count_fake_quants(model_of(models[name])),
            _harness.format_ms(medians[name]),
            _harness.format_ms(min(samples)),
            _harness.format_ms(max(samples)),
            _harness.format_ratio(medians[name], medians[baseline]),
            _harness.format_ratio(medians[name], medians[counterpart]) if counterpart else "",
        ]
        if compile_seconds:
            row.append(f"{compile_seconds[name]:.1f}" if name in compile_seconds else "")
        rows.append(row)
    header = [
        "variant",
        "fake quants",
        "median ms",
        "min ms",
        "max ms",
        "vs float",
        "vs torch.ao",
    ]
    if compile_seconds:
        header.append("compile s")
    note = (
        f"{net.description}; batch {batch}; median of {args.steps} interleaved rounds after "
        f"{args.warmup} warm-up rounds. `vs float` divides by the float step's median in "
        "the same mode (eager or compiled); `vs torch.ao` divides by the torch.ao variant "
        "that fake-quantizes the same tensors the same way (`torch.ao convs`, or "
        "`torch.ao BN folded, stable` for BN folded)."
    )
    _harness.print_section(
        f"Training step, `{net_name}`", _harness.markdown_table(header, rows), note
    )

    if args.profile:
        profile_steps(cases, ["qatcore", "torch.ao convs"], args.profile_rows)
    return medians


def model_of(model: nn.Module) -> nn.Module:
    """Return the module that ``torch.compile`` wraps, or ``model`` itself."""
    return getattr(model, "_orig_mod", model)


def print_summary(results: dict[str, dict[str, float]]) -> None:
    """Print the main ratios of every net in one table."""
    columns = {
        "qatcore / float": ("qatcore", "float"),
        "qatcore BN folded / float": ("qatcore BN folded", "float"),
        "torch.ao convs / float": ("torch.ao convs", "float"),
        "qatcore / torch.ao convs": ("qatcore", "torch.ao convs"),
        "qatcore compiled / float compiled": ("qatcore compiled", "float compiled"),
        "qatcore compiled / qatcore": ("qatcore compiled", "qatcore"),
    }
    # Without the compiled variants, their columns would stay empty.
    measured = set().union(*results.values())
    columns = {title: pair for title, pair in columns.items() if measured.issuperset(pair)}
    rows = []
    for net_name, medians in results.items():
        row: list[object] = [f"`{net_name}`", _harness.format_ms(medians["float"])]
        for numerator, denominator in columns.values():
            row.append(_harness.format_ratio(medians[numerator], medians[denominator]))
        rows.append(row)
    table = _harness.markdown_table(["net", "float ms", *columns], rows)
    _harness.print_section("Training step, summary", table, "Ratios of medians.")


def profile_steps(cases: dict[str, Callable[[], object]], names: list[str], rows: int) -> None:
    """Print torch.profiler's top ops by self CPU time for five steps of each named case."""
    from torch.profiler import ProfilerActivity, profile

    for name in names:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                cases[name]()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
        print(f"Profile of 5 steps of `{name}`, sorted by self CPU time:\n")
        print(f"```text\n{table}\n```\n")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--nets",
        nargs="+",
        choices=list(_models.NETS),
        default=list(_models.NETS),
        help="nets to time, in this order (default: all)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed rounds per net (default: 20)")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed rounds before timing (default: 3)"
    )
    _harness.add_thread_option(parser)
    parser.add_argument(
        "--batch",
        type=int,
        help="inputs per step for every net (default: 16 for video, 32 for the others)",
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="leave out the torch.compile variants"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print torch.profiler tables of `qatcore` and `torch.ao convs`",
    )
    parser.add_argument(
        "--profile-rows", type=int, default=25, help="rows of each profiler table (default: 25)"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    _harness.start(args)
    results = {net_name: bench_net(net_name, args) for net_name in args.nets}
    print_summary(results)


if __name__ == "__main__":
    main()
