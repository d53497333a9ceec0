"""The CPU weight broadcast: a gloo process group of its own (separate from any training group)
between the trainer (rank 0) and every rollout actor. The sender packs bucket i+1 while bucket i is
in flight. The GPU path (k15/sync/nccl.py) has the same interface."""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from k15.sync.buckets import TensorMeta, dtype_of, full_tensor, meta_of, numel, plan_buckets, split_views

Load = Callable[[list[tuple[str, torch.Tensor]]], None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class GroupInfo:
    master_addr: str  # the trainer's node: rank 0 hosts the rendezvous store
    master_port: int
    world_size: int

    @property
    def group_id(self) -> str:
        return f"gloo:{self.master_addr}:{self.master_port}"


def new_group_info(world_size: int) -> GroupInfo:
    """Called on the trainer (rank 0), whose node hosts the store."""
    import ray.util

    return GroupInfo(ray.util.get_node_ip_address(), free_port(), world_size)


def _gloo_group(info: GroupInfo, rank: int, timeout_s: float) -> dist.ProcessGroupGloo:
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(info.master_addr, info.master_port, info.world_size, is_master=(rank == 0),
                          timeout=timeout, wait_for_workers=False)
    return dist.ProcessGroupGloo(store, rank, info.world_size, timeout)


def _broadcast(group, tensor: torch.Tensor):
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    return group.broadcast([tensor], opts)


class WeightSender:
    """Rank 0: the trainer."""

    def __init__(self, info: GroupInfo, bucket_bytes: int = 64 << 20, timeout_s: float = 300.0):
        self.group = _gloo_group(info, 0, timeout_s)
        self.bucket_bytes = bucket_bytes

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Broadcast every tensor; returns the bytes sent. Receivers call receive() with the same meta."""
        tensors = dict(named_tensors)
        sent, in_flight = 0, None
        for bucket in plan_buckets(meta_of(tensors.items()), self.bucket_bytes):
            flat = torch.cat([full_tensor(tensors[name]).reshape(-1).cpu() for name, _, _ in bucket])
            if in_flight is not None:
                in_flight.wait()  # bucket i finishes while bucket i+1 was being packed
            in_flight = _broadcast(self.group, flat)
            sent += flat.numel() * flat.element_size()
        if in_flight is not None:
            in_flight.wait()
        return sent

    def close(self) -> None:
        self.group = None


class WeightReceiver:
    """Ranks 1..n: rollout actors."""

    def __init__(self, info: GroupInfo, rank: int, bucket_bytes: int = 64 << 20, timeout_s: float = 300.0):
        if rank < 1:
            raise ValueError("receivers have ranks 1..world_size-1")
        self.group = _gloo_group(info, rank, timeout_s)
        self.bucket_bytes = bucket_bytes

    def receive(self, meta: list[TensorMeta], load: Load, target=None) -> int:
        """Receive every bucket and hand its (name, tensor) views to `load`; each bucket has a fresh
        buffer, so `load` may keep the views. Returns the bytes received. (`target`, which lets the
        NCCL receiver write large tensors in place, does not apply to CPU buffers.)"""
        received = 0
        for bucket in plan_buckets(meta, self.bucket_bytes):
            flat = torch.empty(sum(numel(s) for _, s, _ in bucket), dtype=dtype_of(bucket[0][2]))
            _broadcast(self.group, flat).wait()
            load(split_views(flat, bucket))
            received += flat.numel() * flat.element_size()
        return received

    def close(self) -> None:
        self.group = None
