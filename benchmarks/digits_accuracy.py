"""Print the digits demo's QAT accuracy by bit width and range method, as a Markdown table.

Each cell runs ``qatcore demo`` (the same data, model, epochs and preset)
for several seeds. The weights and outputs have the row's bit width, and the
column's method chooses their ranges. A cell gives the mean QAT test
accuracy, with the lowest and highest seed's in parentheses. The float model of a seed is the
same in every cell, so the first row gives its accuracy once.

Run from the repository root after the Quick start install::

    python benchmarks/digits_accuracy.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import qatcore
from qatcore._config import MAX_BITS, MIN_BITS
from qatcore._demo import run_demo

METHODS = {
    "min/max": {"observer": "minmax"},
    "histogram": {"observer": "histogram"},
    "LSQ": {"learnable": True},
}
"""Column label -> the ``run_demo`` options that select the range method."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bits",
        type=_integer(MIN_BITS, MAX_BITS),
        nargs="+",
        default=[8, 4, 3],
        help=f"bit widths, {MIN_BITS} to {MAX_BITS} (default: 8 4 3)",
    )
    parser.add_argument(
        "--seeds", type=_integer(1, None), default=3, help="seeds per cell, from 0 (default: 3)"
    )
    parser.add_argument("--qconfig", default="x86", help="preset QConfig (default: x86)")
    args = parser.parse_args()
    try:
        qatcore.get_qconfig(args.qconfig)
    except KeyError as error:
        parser.error(f"unknown --qconfig {args.qconfig!r}: {error.args[0]}")

    print(
        f"torch {torch.__version__}, qatcore {qatcore.__version__}, preset {args.qconfig}, "
        f"seeds 0 to {args.seeds - 1}"
    )
    started = time.perf_counter()
    float_accuracies: list[float] = []
    rows = []
    for bits in args.bits:
        cells = []
        for options in METHODS.values():
            accuracies = []
            for seed in range(args.seeds):
                result = run_demo(seed=seed, qconfig_name=args.qconfig, bits=bits, **options)
                accuracies.append(100 * result.qat_accuracy)
                if len(float_accuracies) < args.seeds:
                    float_accuracies.append(100 * result.float_accuracy)
            cells.append(_cell(accuracies))
        rows.append(f"| {bits} | " + " | ".join(cells) + " |")

    print()
    print("| bits | " + " | ".join(METHODS) + " |")
    print("|---|" + "---|" * len(METHODS))
    print("| float | " + " | ".join([_cell(float_accuracies)] * len(METHODS)) + " |")
    print("\n".join(rows))
    runs = len(args.bits) * len(METHODS) * args.seeds
    print(f"\n{runs} runs in {time.perf_counter() - started:.0f} s")


def _integer(minimum: int, maximum: int | None) -> Callable[[str], int]:
    """Return an argparse type for an integer in ``[minimum, maximum]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {value}")
        return value

    return parse


def _cell(accuracies: list[float]) -> str:
    mean = statistics.fmean(accuracies)
    return f"{mean:.2f}% ({min(accuracies):.2f} to {max(accuracies):.2f})"


if __name__ == "__main__":
    main()
