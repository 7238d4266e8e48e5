"""This process's place under torchrun (RANK, WORLD_SIZE, LOCAL_RANK), or a world of one."""
from __future__ import annotations

import os

__all__ = ["World"]

class World:
    """This process's place under torchrun (RANK, WORLD_SIZE, LOCAL_RANK), or a world of one."""

    def __init__(self):
        import torch
        import torch.distributed as dist
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self):
        return self.rank == 0

    def all_reduce(self, tensor):
        import torch.distributed as dist
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self):
        import torch.distributed as dist
        if self.size > 1:
            dist.barrier()

    def close(self):
        import torch.distributed as dist
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()
