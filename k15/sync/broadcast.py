"""Bucketed weight broadcast from the trainer (rank 0) to every rollout actor.

Both sides derive the same bucket plan from the weights' (name, shape, dtype) list, so only
payload bytes cross the wire. The sender packs bucket i+1 while bucket i is in flight. This module
is the CPU path (a gloo process group of its own, separate from any training group); the GPU path
(NCCL through CuPy) implements the same WeightSender / WeightReceiver interface.
"""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

TensorMeta = tuple[str, tuple[int, ...], str]  # (name, shape, dtype name e.g. "float32")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def plan_buckets(meta: list[TensorMeta], bucket_bytes: int) -> list[list[TensorMeta]]:
    """Group consecutive tensors of one dtype into buckets of at most `bucket_bytes` (a tensor larger
    than that gets a bucket of its own)."""
    buckets: list[list[TensorMeta]] = []
    size = 0
    for name, shape, dtype in meta:
        nbytes = _numel(shape) * _dtype(dtype).itemsize
        if not buckets or buckets[-1][0][2] != dtype or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append((name, tuple(shape), dtype))
        size += nbytes
    return buckets


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


@dataclass
class GroupInfo:
    master_addr: str
    master_port: int
    world_size: int


def new_group_info(world_size: int) -> GroupInfo:
    import ray.util

    return GroupInfo(ray.util.get_node_ip_address(), free_port(), world_size)


def _gloo_group(info: GroupInfo, rank: int, timeout_s: float) -> dist.ProcessGroupGloo:
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(info.master_addr, info.master_port, info.world_size, is_master=(rank == 0),
                          timeout=timeout, wait_for_workers=False)
    # A process group of its own: it never touches the default group a trainer may use for FSDP.
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
        """Broadcast every tensor; returns the bytes sent. Receivers must call receive() with the
        same meta (see meta_of)."""
        tensors = dict(named_tensors)
        plan = plan_buckets(meta_of(tensors.items()), self.bucket_bytes)
        sent, in_flight = 0, None
        for bucket in plan:
            flat = torch.cat([tensors[name].detach().reshape(-1).cpu() for name, _, _ in bucket])
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

    def receive(self, meta: list[TensorMeta]) -> Iterator[tuple[str, torch.Tensor]]:
        """Receive every bucket; yields (name, tensor) as views into fresh bucket buffers."""
        for bucket in plan_buckets(meta, self.bucket_bytes):
            flat = torch.empty(sum(_numel(s) for _, s, _ in bucket), dtype=_dtype(bucket[0][2]))
            _broadcast(self.group, flat).wait()
            offset = 0
            for name, shape, _ in bucket:
                n = _numel(shape)
                yield name, flat[offset:offset + n].view(shape)
                offset += n

    def close(self) -> None:
        self.group = None


def meta_of(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[TensorMeta]:
    return [(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in named_tensors]
