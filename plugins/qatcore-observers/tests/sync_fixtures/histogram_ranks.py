"""What each rank runs in the histogram sync test.

Spawned processes import this module by name, so it lives outside the test
module, whose import name depends on how pytest was started.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import qatcore
from qatcore_observers import HistogramObserver

SPEC = qatcore.QuantSpec(bits=8, signed=True, symmetric=True, observer="histogram")


def run_rank(rank: int, world: int, port: int, results: dict) -> None:
    """Feed three batches with sync on, then off; put each state_dict in ``results``."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for sync in (True, False):
            observer = HistogramObserver(SPEC, None, method="mse", bins=64)
            observer.sync = sync
            high = 1.0 if rank == 0 else 8.0
            for step in range(3):
                observer(torch.linspace(0.0, high, 101) * (step + 1) / 3)
            state = {name: value.clone() for name, value in observer.state_dict().items()}
            results[(sync, rank)] = state
    finally:
        dist.destroy_process_group()
