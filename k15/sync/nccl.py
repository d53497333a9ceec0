"""The GPU weight broadcast: NCCL through CuPy, from the trainer's rank 0 to every rollout actor.

The communicator is CuPy's (not torch.distributed), so it lives beside any process group the
trainer uses for FSDP and needs no rendezvous store: the unique id travels in NcclGroupInfo through
Ray. Bytes move as uint8 in buckets planned identically on both ends (k15/sync/buckets.py).

Pipelining, with two staging buffers per end:
  sender:   pack stream fills buffer i%2 (waiting until bucket i-2 left it) -> comm stream sends it
  receiver: comm stream fills buffer i%2 (waiting until bucket i-2 was loaded) -> `load` copies it
            into the live parameters on the caller's stream
so packing bucket i+1 and unpacking bucket i-1 overlap sending bucket i. A tensor larger than a
bucket skips the staging buffers: it is sent from its own memory and, where the receiver names
its live tensor, received straight into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from k15.sync.buckets import TensorMeta, bucket_bytes_of, dtype_of, full_tensor, meta_of, plan_buckets, split_views

Load = Callable[[list[tuple[str, torch.Tensor]]], None]
Target = Callable[[str], "torch.Tensor | None"]


@dataclass
class NcclGroupInfo:
    unique_id: bytes | tuple  # as cupy.cuda.nccl.get_unique_id() gives it (bytes in CuPy 14, a tuple before)
    world_size: int

    @property
    def group_id(self) -> str:
        return "nccl:" + bytes(b & 0xFF for b in self.unique_id).hex()


def new_nccl_group(world_size: int) -> NcclGroupInfo:
    from cupy.cuda import nccl

    return NcclGroupInfo(nccl.get_unique_id(), world_size)


class _NcclEnd:
    def __init__(self, info: NcclGroupInfo, rank: int, bucket_bytes: int, device):
        import cupy
        from cupy.cuda import nccl

        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"the NCCL weight broadcast needs a CUDA device, got {self.device}")
        self.bucket_bytes = bucket_bytes
        self._nccl = nccl
        with cupy.cuda.Device(self.device.index):  # joins when every rank has called this
            self.comm = nccl.NcclCommunicator(info.world_size, info.unique_id, rank)
        self.comm_stream = torch.cuda.Stream(self.device)
        self.side_stream = torch.cuda.Stream(self.device)  # sender: packing; receiver: unused
        self._staging: list[torch.Tensor] | None = None

    def staging(self, i: int) -> torch.Tensor:
        if self._staging is None:  # allocated on first use, kept for the next broadcasts
            self._staging = [torch.empty(self.bucket_bytes, dtype=torch.uint8, device=self.device) for _ in range(2)]
        return self._staging[i % 2]

    def broadcast(self, buffer: torch.Tensor, nbytes: int) -> None:
        """Broadcast the first `nbytes` of `buffer` from rank 0, enqueued on the comm stream."""
        ptr = buffer.data_ptr()
        self.comm.broadcast(ptr, ptr, nbytes, self._nccl.NCCL_UINT8, 0, self.comm_stream.cuda_stream)

    def close(self) -> None:
        if getattr(self, "comm", None) is not None:
            self.comm.destroy()
            self.comm = None


def _event(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _own_memory(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> bool:
    return (t.device == device and t.dtype == dtype and t.is_contiguous() and not hasattr(t, "full_tensor"))


class NcclWeightSender(_NcclEnd):
    """Rank 0: the trainer."""

    def __init__(self, info: NcclGroupInfo, bucket_bytes: int = 64 << 20, device=None):
        super().__init__(info, 0, bucket_bytes, device)

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Broadcast every tensor (a DTensor is gathered when its bucket is packed); returns the bytes
        sent once the last bucket has left."""
        tensors = dict(named_tensors)
        caller = torch.cuda.current_stream(self.device)
        written = _event(caller)  # the trainer's last writes to its parameters
        self.side_stream.wait_event(written)
        self.comm_stream.wait_event(written)
        left: list[torch.cuda.Event | None] = [None, None]  # bucket i-2 has left staging buffer i%2
        sent = 0
        for i, bucket in enumerate(plan_buckets(meta_of(tensors.items()), self.bucket_bytes)):
            nbytes = bucket_bytes_of(bucket)
            if nbytes > self.bucket_bytes:  # one tensor larger than a bucket: sent from its own memory
                with torch.cuda.stream(self.side_stream):
                    whole = full_tensor(tensors[bucket[0][0]]).to(self.device).reshape(-1).contiguous()
                self.comm_stream.wait_event(_event(self.side_stream))
                self.broadcast(whole, nbytes)
                whole.record_stream(self.comm_stream)
            else:
                buffer = self.staging(i)
                with torch.cuda.stream(self.side_stream):
                    if left[i % 2] is not None:
                        self.side_stream.wait_event(left[i % 2])
                    flat = buffer[:nbytes].view(dtype_of(bucket[0][2]))
                    torch.cat([full_tensor(tensors[name]).to(self.device).reshape(-1) for name, _, _ in bucket], out=flat)
                self.comm_stream.wait_event(_event(self.side_stream))
                self.broadcast(buffer, nbytes)
                left[i % 2] = _event(self.comm_stream)
            sent += nbytes
        self.comm_stream.synchronize()
        return sent


class NcclWeightReceiver(_NcclEnd):
    """Ranks 1..n: rollout actors (or the workers of an inference engine)."""

    def __init__(self, info: NcclGroupInfo, rank: int, bucket_bytes: int = 64 << 20, device=None):
        if rank < 1:
            raise ValueError("receivers have ranks 1..world_size-1")
        super().__init__(info, rank, bucket_bytes, device)

    def receive(self, meta: list[TensorMeta], load: Load, target: Target | None = None) -> int:
        """Receive every bucket. `load(named_views)` runs on the caller's stream, once per bucket, and
        must copy out: the staging buffer is reused after it. `target(name)`, if given, may return the
        live tensor a large tensor is received into directly (then it skips `load`). Returns the bytes
        received, once everything is loaded."""
        caller = torch.cuda.current_stream(self.device)
        self.comm_stream.wait_event(_event(caller))  # nothing may still read the live tensors' old values
        loaded: list[torch.cuda.Event | None] = [None, None]  # bucket i-2 was copied out of buffer i%2
        received = 0
        for i, bucket in enumerate(plan_buckets(meta, self.bucket_bytes)):
            nbytes = bucket_bytes_of(bucket)
            name, shape, dtype = bucket[0]
            if nbytes > self.bucket_bytes:  # one tensor larger than a bucket
                live = target(name) if target is not None else None
                if live is not None and tuple(live.shape) == tuple(shape) and _own_memory(live, self.device, dtype_of(dtype)):
                    self.broadcast(live, nbytes)  # straight into the live parameter
                    received += nbytes
                    continue
                buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                buffer.record_stream(self.comm_stream)
                self.broadcast(buffer, nbytes)
            else:
                buffer = self.staging(i)
                if loaded[i % 2] is not None:
                    self.comm_stream.wait_event(loaded[i % 2])
                self.broadcast(buffer, nbytes)
            caller.wait_event(_event(self.comm_stream))
            load(split_views(buffer[:nbytes].view(dtype_of(dtype)), bucket))
            if nbytes <= self.bucket_bytes:
                loaded[i % 2] = _event(caller)
            received += nbytes
        caller.wait_event(_event(self.comm_stream))
        caller.synchronize()
        return received


def tensors_checksum(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, tuple[int, int]]:
    """Per tensor (sum, position-weighted sum) of its raw bits as integers (wrapping int64 sums,
    which are exact and order-independent): equal on two ends only if the bytes are (for practical
    purposes) identical. Computed where the tensors live."""
    out = {}
    for name, t in named_tensors:
        raw = t.detach().contiguous().view(-1).view(torch.uint8)
        bits = (raw.view(torch.int32) if raw.numel() % 4 == 0 else raw).to(torch.int64)
        weights = torch.arange(bits.numel(), device=bits.device) % 65521 + 1
        out[name] = (int(bits.sum()), int((bits * weights).sum()))
    return out
