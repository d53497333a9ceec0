"""The bucket plan both ends of a weight broadcast derive from the weights' (name, shape, dtype) list,
so that only payload bytes cross the wire."""

from __future__ import annotations

from typing import Iterable

import torch

TensorMeta = tuple[str, tuple[int, ...], str]  # (name, shape, dtype name e.g. "bfloat16")


def meta_of(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[TensorMeta]:
    """(name, shape, dtype) of each tensor; a sharded (DTensor) parameter gives its full shape."""
    return [(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in named_tensors]


def plan_buckets(meta: list[TensorMeta], bucket_bytes: int) -> list[list[TensorMeta]]:
    """Group consecutive tensors of one dtype into buckets of at most `bucket_bytes` (a tensor larger
    than that gets a bucket of its own)."""
    buckets: list[list[TensorMeta]] = []
    size = 0
    for name, shape, dtype in meta:
        nbytes = numel(shape) * dtype_of(dtype).itemsize
        if not buckets or buckets[-1][0][2] != dtype or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append((name, tuple(shape), dtype))
        size += nbytes
    return buckets


def bucket_bytes_of(bucket: list[TensorMeta]) -> int:
    return sum(numel(shape) * dtype_of(dtype).itemsize for _, shape, dtype in bucket)


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded (FSDP2 DTensor) parameter is all-gathered here, one tensor at a
    time, so a sender never holds the whole unsharded model."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def split_views(flat: torch.Tensor, bucket: list[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    """(name, view) of each tensor packed in `flat` (a 1-D buffer of the bucket's dtype)."""
    views, offset = [], 0
    for name, shape, _ in bucket:
        n = numel(shape)
        views.append((name, flat[offset:offset + n].view(shape)))
        offset += n
    return views


def gather_along(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> None:
    """On the other ranks of a sharded trainer while rank 0 sends: take part in the same all-gathers,
    in the same order (the bucket plan's), and drop the results."""
    tensors = dict(named_tensors)
    for bucket in plan_buckets(meta_of(tensors.items()), bucket_bytes):
        for name, _, _ in bucket:
            full_tensor(tensors[name])
