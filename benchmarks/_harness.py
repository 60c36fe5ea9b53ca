"""Helpers shared by the benchmark scripts: the header, interleaved timing and Markdown tables.

The scripts import this module as a sibling, which works when they run as
``python benchmarks/<script>.py`` because Python puts the script's folder
first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence

import torch

import qatcore


def cpu_model() -> str:
    """Return the CPU's model name from ``/proc/cpuinfo``, or what ``platform`` reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def add_thread_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads", type=int, default=2, help="torch intra-op threads (default: 2)"
    )


def start(args: argparse.Namespace) -> None:
    """Set the thread count, silence warnings and print the versions, threads and CPU.

    torch.ao's eager QAT warns about ``reduce_range`` and deprecated APIs on
    every prepare, and the numbers are the point of a run.
    """
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    print(
        f"torch {torch.__version__}, qatcore {qatcore.__version__}, "
        f"{torch.get_num_threads()} threads, CPU: {cpu_model()}\n"
    )


def time_interleaved(
    cases: dict[str, Callable[[], object]], rounds: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Call every case once per round, in an order that rotates each round.

    Returns:
        The seconds of the timed rounds and of the warm-up rounds, by case name.
    """
    names = list(cases)
    timed: dict[str, list[float]] = {name: [] for name in names}
    untimed: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            begin = time.perf_counter()
            cases[name]()
            elapsed = time.perf_counter() - begin
            (timed if index >= warmup else untimed)[name].append(elapsed)
    return timed, untimed


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def format_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def format_ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Return a Markdown pipe table with the first column left-aligned and the rest right."""
    align = [":---"] + ["---:"] * (len(header) - 1)
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(align) + " |",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def print_section(title: str, table: str, note: str = "") -> None:
    """Print a level-3 heading, an optional note and a table, each followed by a blank line."""
    print(f"### {title}\n")
    if note:
        print(f"{note}\n")
    print(f"{table}\n", flush=True)
