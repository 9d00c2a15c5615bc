"""The processes of one run (``accelerate launch`` / ``torchrun``): rank, world size, and a gather.

Evaluation and ``tune`` split a stream's windows over the processes round by round (window
``r * world + rank`` in round r) and gather, every round, what each process found, so that every
process makes the same decisions and the merged result is the one a single process would give.
Without a launcher (or with one process) the group is ``Group()``: rank 0 of 1, and ``gather``
returns its own object.
"""
from __future__ import annotations

from typing import Any


class Group:
    """One process alone."""

    rank: int = 0
    world: int = 1

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (here: just this one)."""
        return [obj]


class TorchGroup(Group):
    """The processes of an initialised ``torch.distributed`` group (gloo on CPU, nccl on GPUs)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        self._dist.all_gather_object(out, obj)
        return out


def current_group() -> Group:
    """The launched processes when ``torch.distributed`` is initialised with more than one, else ``Group()``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchGroup()
    return Group()
