"""Time qatcore's plan, swap_modules and to_float against torch.ao's prepare_qat.

Two models, built the same way for each library:

- ``wide``: 2,000 conv-BN-ReLU blocks, each an ``nn.Sequential``, in one
  ``nn.Sequential`` (``--blocks``);
- ``deep``: a conv nested in 2,000 single-child ``nn.Sequential``
  containers (``--depth``), deeper than a recursive walk can go under
  Python's default recursion limit of 1,000.

The rows, each of which leaves the input model unchanged:

- ``qatcore.plan(model, x86)``: the decisions alone;
- ``qatcore.swap_modules(model, x86)``: a copy with conv-BN-ReLU fused, BN folded;
- ``torch.ao fuse_modules_qat + prepare_qat``: ``fuse_modules_qat`` on the
  groups qatcore fuses, then ``prepare_qat`` with
  ``get_default_qat_qconfig("x86")``, which gives the same fused modules;
- ``qatcore.swap_modules(model, x86, fuse=False)``: a copy with every conv swapped;
- ``torch.ao prepare_qat``: ``prepare_qat(model, inplace=False)`` with that
  qconfig on the whole model, which swaps the convs and puts observers on
  the outputs of the BatchNorms and ReLUs too;
- ``qatcore.to_float(qat_model)``: back to float from the fused QAT model.

Every row runs once untimed first. A row that raises ``RecursionError``
there is reported as failed and left out of the timed rounds. Rounds then
run every remaining row once, in an order that rotates each round.

Run from the repository root after the Quick start install::

    python benchmarks/bench_swap.py

This is a measurement, not a test: it asserts nothing, and its numbers
depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import _harness
import torch.ao.quantization as tq
from torch import nn

import qatcore

COUNTERPARTS = {
    "`qatcore.swap_modules`, fused": "torch.ao `fuse_modules_qat` + `prepare_qat`",
    "`qatcore.swap_modules`, `fuse=False`": "torch.ao `prepare_qat`",
}
"""qatcore row -> the torch.ao row that produces the same QAT modules."""


def wide_model(blocks: int) -> nn.Module:
    """Return ``blocks`` conv-BN-ReLU blocks in one ``nn.Sequential``."""
    return nn.Sequential(
        *[
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            for _ in range(blocks)
        ]
    )


def deep_model(depth: int) -> nn.Module:
    """Return a conv nested in ``depth`` single-child ``nn.Sequential`` containers."""
    model: nn.Module = nn.Conv2d(3, 3, 1)
    for _ in range(depth):
        model = nn.Sequential(model)
    return model


def torch_ao_fuse_and_prepare(model: nn.Module, groups: list[list[str]]) -> nn.Module:
    fused = tq.fuse_modules_qat(model, groups)
    return tq.prepare_qat(fused, inplace=True)


def swap_rows(build: Callable[[], nn.Module]) -> dict[str, Callable[[], object]]:
    """Return the rows' calls on models from ``build``; each library gets its own model."""
    x86 = qatcore.get_qconfig("x86")
    model = build()
    qat_model = qatcore.swap_modules(model, x86)
    groups = [list(entry.members) for entry in qatcore.plan(model, x86) if entry.action == "fuse"]
    ao_model = build()
    ao_model.qconfig = tq.get_default_qat_qconfig("x86")
    return {
        "`qatcore.plan`": lambda: qatcore.plan(model, x86),
        "`qatcore.swap_modules`, fused": lambda: qatcore.swap_modules(model, x86),
        "torch.ao `fuse_modules_qat` + `prepare_qat`": lambda: torch_ao_fuse_and_prepare(
            ao_model, groups
        ),
        "`qatcore.swap_modules`, `fuse=False`": lambda: qatcore.swap_modules(
            model, x86, fuse=False
        ),
        "torch.ao `prepare_qat`": lambda: tq.prepare_qat(ao_model, inplace=False),
        "`qatcore.to_float`": lambda: qatcore.to_float(qat_model),
    }


def time_rows(
    rows: dict[str, Callable[[], object]], rounds: int
) -> tuple[dict[str, float], dict[str, str]]:
    """Return each row's median seconds, and the error of each row that failed its first call."""
    failures: dict[str, str] = {}
    for name, action in rows.items():
        try:
            action()
        except RecursionError as error:
            failures[name] = f"failed: RecursionError: {error}"
    working = {name: action for name, action in rows.items() if name not in failures}
    timed, _ = _harness.time_interleaved(working, rounds, warmup=0)
    return {name: _harness.median(samples) for name, samples in timed.items()}, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--blocks", type=int, default=2000, help="blocks of the wide model (default: 2000)"
    )
    parser.add_argument(
        "--depth", type=int, default=2000, help="nesting of the deep model (default: 2000)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per row (default: 3)")
    _harness.add_thread_option(parser)
    args = parser.parse_args()
    _harness.start(args)

    models = {
        f"{args.blocks:,} conv-BN-ReLU blocks": lambda: wide_model(args.blocks),
        f"conv nested {args.depth:,} deep": lambda: deep_model(args.depth),
    }
    results = {}
    names: list[str] = []
    for label, build in models.items():
        rows = swap_rows(build)
        names = list(rows)
        results[label] = time_rows(rows, args.rounds)

    header = ["operation"]
    for label in models:
        header += [f"{label}, s", "vs torch.ao"]
    table_rows = []
    for name in names:
        row: list[object] = [name]
        for medians, failures in results.values():
            counterpart = COUNTERPARTS.get(name)
            if name in failures:
                row += [failures[name], ""]
            elif counterpart in medians:
                row += [
                    f"{medians[name]:.3f}",
                    _harness.format_ratio(medians[name], medians[counterpart]),
                ]
            else:
                row += [f"{medians[name]:.3f}", ""]
        table_rows.append(row)
    note = (
        f"Median of {args.rounds} interleaved rounds after one untimed call per row. "
        "`vs torch.ao` divides by the torch.ao row that produces the same QAT modules."
    )
    _harness.print_section(
        "`swap_modules` and `prepare_qat`", _harness.markdown_table(header, table_rows), note
    )


if __name__ == "__main__":
    main()
