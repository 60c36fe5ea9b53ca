"""Time plan, swap_modules and to_float on a wide model and on a deeply nested one.

The wide model has 2,000 conv-BN-ReLU blocks in one ``nn.Sequential``. The
deep one is a conv inside 2,000 nested ``nn.Sequential`` containers, which
is deeper than a recursive walk can go under Python's default recursion
limit.

Run from the repository root after the Quick start install::

    python benchmarks/bench_swap.py
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import qatcore


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


def median_seconds(action: Callable[[], object], rounds: int) -> float:
    """Return the median wall time of ``rounds`` calls of ``action``."""
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2000, help="blocks of the wide model")
    parser.add_argument("--depth", type=int, default=2000, help="nesting of the deep model")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per row")
    args = parser.parse_args()

    qconfig = qatcore.get_qconfig("x86")
    print(
        f"torch {torch.__version__}, qatcore {qatcore.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"medians of {args.rounds}"
    )
    for label, model in (
        (f"{args.blocks} conv-BN-ReLU blocks", wide_model(args.blocks)),
        (f"conv nested {args.depth} deep", deep_model(args.depth)),
    ):
        qat = qatcore.swap_modules(model, qconfig)
        rows = {
            "plan": lambda m=model: qatcore.plan(m, qconfig),
            "swap_modules": lambda m=model: qatcore.swap_modules(m, qconfig),
            "to_float": lambda q=qat: qatcore.to_float(q),
        }
        print(f"\n{label}:")
        for name, action in rows.items():
            print(f"  {name:<14} {median_seconds(action, args.rounds):7.3f} s")


if __name__ == "__main__":
    main()
