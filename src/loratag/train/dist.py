"""Data-parallel training under torchrun / accelerate launch (PyTorch DDP); a no-op in a single process.

We do not build a distributed layer: the launcher sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR, we join
the process group (gloo on CPU, nccl on CUDA), shard each global batch across ranks, and let DDP average the
gradients of the trainable (LoRA) parameters only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started_here: bool = False
    comm: str = "cpu"  # device of the tensors used in collectives (cuda for nccl)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls, device: str | None) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        started = False
        if not dist.is_initialized():
            if use_cuda:
                torch.cuda.set_device(local)
            dist.init_process_group("nccl" if use_cuda else "gloo")
            started = True
        comm = "cuda" if dist.get_backend() == "nccl" else "cpu"
        return cls(dist.get_rank(), dist.get_world_size(), local, started, comm)

    def device(self, requested: str | None) -> torch.device:
        if self.active and torch.cuda.is_available() and (requested is None or requested.startswith("cuda")):
            return torch.device("cuda", self.local_rank)
        return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank (so that all ranks take collective steps together: a
        deadline one rank has passed stops every rank)."""
        if not self.active:
            return flag
        t = torch.tensor([1 if flag else 0], device=self.comm)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def close(self) -> None:
        if self.started_here:
            torch.distributed.destroy_process_group()
