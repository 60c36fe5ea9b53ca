"""What each rank of the tests in tests/test_distributed.py runs, in a process of its own.

``torch.multiprocessing.spawn`` imports this module in every child process,
so it must be importable by name: the test puts this folder on ``sys.path``.
Each rank joins a gloo process group on loopback, runs every scenario, and
saves what it observed with ``torch.save`` as ``rank<N>.pt`` in the output
folder. Rank 0 also saves the QAT ``state_dict`` of the first run. The test
then compares the ranks' results in the parent process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import qatcore

WORLD_SIZE = 2
STEPS = 20
BATCH = 4
# The upper bound of the inputs each rank feeds: rank 0 in [0, 1], rank 1 in [0, 8].
INPUT_MAX = (1.0, 8.0)
# Collectives an observer might call. DistributedDataParallel broadcasts
# buffers and reduces gradients through private functions, which are not counted.
COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_reduce",
    "all_reduce_coalesced",
    "broadcast",
    "reduce",
    "reduce_scatter_tensor",
)
STATE_DICT_FILE = "qat_state_dict.pt"


def build_model() -> nn.Module:
    """Build the same QAT model on every call: an input fake quantizer, then conv-ReLU and conv.

    The input fake quantizer uses the x86 preset's activation spec (uint8
    affine), so its range follows directly from the inputs.
    """
    torch.manual_seed(0)
    qconfig = qatcore.get_qconfig("x86")
    body = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 2, 3, padding=1),
    )
    return nn.Sequential(
        qatcore.FakeQuantize(qconfig.activation),
        qatcore.swap_modules(body, qconfig),
    )


def eval_input() -> torch.Tensor:
    """Return the input that the checkpoint test evaluates, the same on every call."""
    generator = torch.Generator().manual_seed(1234)
    return torch.rand(2, 3, 8, 8, generator=generator) * 8


def observer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return a copy of every fake quantizer's qparams and its observer's buffers, by name."""
    state = {}
    for name, module in model.named_modules():
        if not isinstance(module, qatcore.FakeQuantize):
            continue
        prefix = f"{name}." if name else ""
        state[f"{prefix}scale"] = module.scale.clone()
        state[f"{prefix}zero_point"] = module.zero_point.clone()
        for buffer_name, buffer in module.observer.named_buffers():
            state[f"{prefix}observer.{buffer_name}"] = buffer.clone()
    return state


def _batch(rank: int, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * rank + step)
    return torch.rand(BATCH, 3, 8, 8, generator=generator) * INPUT_MAX[rank]


@contextmanager
def _count_collectives() -> Iterator[list[str]]:
    """Record the name of every public torch.distributed collective called inside the block."""
    calls: list[str] = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def collective(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return original(*args, **kwargs)

        return collective

    for name, original in originals.items():
        setattr(dist, name, counting(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _observer_calls(
    model: nn.Module, collectives: list[str]
) -> tuple[list[int], Callable[[], None]]:
    """Record, for every observer call in ``model``, how many collectives it made.

    Returns the list that fills as observers run, and a function that
    removes the hooks.
    """
    per_call: list[int] = []
    start = [0]

    def before(module: nn.Module, args: Any) -> None:
        start[0] = len(collectives)

    def after(module: nn.Module, args: Any, output: Any) -> None:
        per_call.append(len(collectives) - start[0])

    handles = []
    for module in model.modules():
        if isinstance(module, qatcore.Observer):
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return per_call, remove


def _train(rank: int, *, sync: bool, broadcast_buffers: bool, group: Any = None) -> dict[str, Any]:
    """Train a fresh model for ``STEPS`` SGD steps under DDP; return what the ranks compare.

    The forward of the last step runs with every public collective counted,
    in total and per observer call.
    """
    model = build_model()
    ddp = DistributedDataParallel(model, broadcast_buffers=broadcast_buffers)
    qatcore.set_observer_sync(ddp, sync, group=group)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)

    forward_collectives: list[str] = []
    per_observer_call: list[int] = []
    for step in range(STEPS):
        optimizer.zero_grad()
        batch = _batch(rank, step)
        if step == STEPS - 1:
            with _count_collectives() as calls:
                per_call, remove_hooks = _observer_calls(model, calls)
                output = ddp(batch)
                remove_hooks()
            forward_collectives = list(calls)
            per_observer_call = per_call
        else:
            output = ddp(batch)
        output.square().mean().backward()
        optimizer.step()

    model.eval()
    with torch.no_grad():
        eval_output = model(eval_input())
    return {
        "observers": observer_state(model),
        "forward_collectives": forward_collectives,
        "per_observer_call": per_observer_call,
        "eval_output": eval_output,
        "state_dict": model.state_dict(),
    }


def _train_fully_sharded(rank: int) -> dict[str, Any]:
    """Train a fresh model with FSDP2, every QAT module sharded on its own; return its observers.

    The fake quantizers' qparams are Parameters of no module but their own,
    and stay whole on every rank, as buffers do.
    """
    from torch.distributed.fsdp import fully_shard

    model = build_model()
    for module in model.modules():
        if isinstance(module, qatcore.QATModule):
            fully_shard(module)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(STEPS):
        optimizer.zero_grad()
        model(_batch(rank, step)).square().mean().backward()
        optimizer.step()
    return {"observers": observer_state(model)}


def _per_channel_with_nan(rank: int) -> dict[str, torch.Tensor]:
    """Observe per-channel ranges where rank 0's first batch is all NaN.

    Rank 1's first batch alone sets the range; the second batch takes each
    channel's min over both ranks and max over both ranks.
    """
    spec = qatcore.QuantSpec(bits=8, signed=False, symmetric=False, axis=1, observer="minmax")
    fake_quant = qatcore.FakeQuantize(spec, channels=3)
    channel = torch.arange(1.0, 4.0).reshape(1, 3, 1)

    if rank == 0:
        first = torch.full((2, 3, 5), float("nan"))
    else:
        first = torch.linspace(-1, 1, 5).expand(2, 3, 5) * channel
    fake_quant(first)
    after_first = observer_state(fake_quant)

    # Rank r spans [-(r + 1) * c, (2 - r) * c] on channel c = 1, 2, 3.
    second = torch.linspace(-(rank + 1), 2 - rank, 5).expand(2, 3, 5) * channel
    fake_quant(second)
    return {
        **{f"first.{key}": value for key, value in after_first.items()},
        **{f"second.{key}": value for key, value in observer_state(fake_quant).items()},
    }


def run_rank(rank: int, port: int, output_dir: str) -> None:
    """Join the loopback gloo group as ``rank``, run every scenario and save the results."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # Gloo would otherwise pick the interface that the host name resolves to.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    try:
        # Every rank must create every group, in the same order.
        single_rank_groups = [dist.new_group([index]) for index in range(WORLD_SIZE)]
        results = {
            "synced": _train(rank, sync=True, broadcast_buffers=True),
            "synced_without_buffer_broadcast": _train(rank, sync=True, broadcast_buffers=False),
            "unsynced": _train(rank, sync=False, broadcast_buffers=False),
            "single_rank_group": _train(
                rank, sync=True, broadcast_buffers=False, group=single_rank_groups[rank]
            ),
            "per_channel_with_nan": _per_channel_with_nan(rank),
            "fully_sharded": _train_fully_sharded(rank),
        }
        output = Path(output_dir)
        if rank == 0:
            torch.save(results["synced"]["state_dict"], output / STATE_DICT_FILE)
        for run in results.values():
            run.pop("state_dict", None)
        torch.save(results, output / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
