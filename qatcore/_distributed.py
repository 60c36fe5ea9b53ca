"""Observer statistics shared across the ranks of a torch.distributed job."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["all_reduce_range", "sync_group"]


def sync_group(observer: nn.Module) -> tuple[bool, Any]:
    """Return whether ``observer`` reduces its statistics across ranks now, and the group.

    It does when its ``sync`` switch is on (the default), torch.distributed is
    initialised, and the group has more than one rank.
    """
    if not getattr(observer, "sync", True):
        return False, None
    if not dist.is_available() or not dist.is_initialized():
        return False, None
    group = getattr(observer, "process_group", None)
    return dist.get_world_size(group) > 1, group


def all_reduce_range(
    batch_min: torch.Tensor, batch_max: torch.Tensor, group: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the smallest min and largest max over every rank, with one collective.

    A rank whose batch held no finite value contributes ``+inf`` and
    ``-inf``, which leave the others' range unchanged.
    """
    count = batch_min.numel()
    packed = torch.cat([-batch_min.reshape(-1), batch_max.reshape(-1)])
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    return -packed[:count].reshape(batch_min.shape), packed[count:].reshape(batch_max.shape)
