"""The colocated weight sync: the trainer and the rollout engines share one GPU (the paper's hybrid
deployment), so engines copy straight out of the trainer's parameters through CUDA IPC handles;
no bytes cross a link and no second copy of the model is made. (NCCL refuses two ranks on one GPU.)

A TCPStore on the trainer's node carries the handles (once; parameters keep their storage across
optimizer steps) and the hand-shake of each broadcast: the trainer says `ready/<n>` once its last
write to the weights is done and waits for every engine's `done/<n>/<rank>`, so the weights do not
change while an engine copies them.
"""

from __future__ import annotations

import datetime
import pickle
from typing import Iterable

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import reduce_tensor

from k15.sync.buckets import TensorMeta, meta_of, plan_buckets
from k15.sync.gloo import GroupInfo, Load, new_group_info


class IpcGroupInfo(GroupInfo):
    """Where the trainer's store is (the same fields as gloo's group)."""

    @property
    def group_id(self) -> str:
        return f"ipc:{self.master_addr}:{self.master_port}"


def new_ipc_group(world_size: int) -> IpcGroupInfo:
    return IpcGroupInfo(**vars(new_group_info(world_size)))


def _store(info: IpcGroupInfo, is_master: bool, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(info.master_addr, info.master_port, info.world_size, is_master=is_master,
                         timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


class IpcWeightSender:
    """Rank 0: the trainer, on the GPU its engines share."""

    def __init__(self, info: IpcGroupInfo, bucket_bytes: int = 64 << 20, timeout_s: float = 300.0):
        self.store = _store(info, True, timeout_s)
        self.receivers = range(1, info.world_size)
        self.shared: dict[str, int] = {}  # name -> data_ptr whose handle the engines hold
        self.count = 0

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        tensors = {n: t.detach() for n, t in named_tensors}
        if {n: t.data_ptr() for n, t in tensors.items()} != self.shared:  # first time, or storage moved
            handles = {n: reduce_tensor(t) for n, t in tensors.items()}
            self.store.set("handles", pickle.dumps(handles))
            self.shared = {n: t.data_ptr() for n, t in tensors.items()}
            self.tensors = tensors  # the engines map this memory: keep it alive
        self.count += 1
        torch.cuda.synchronize()  # the trainer's last writes are in memory before anyone reads
        self.store.set(f"ready/{self.count}", str(len(self.shared)))
        self.store.wait([f"done/{self.count}/{r}" for r in self.receivers])
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def close(self) -> None:
        self.store = None


class IpcWeightReceiver:
    """Ranks 1..n: rollout engines on the trainer's GPU."""

    def __init__(self, info: IpcGroupInfo, rank: int, bucket_bytes: int = 64 << 20, timeout_s: float = 300.0):
        if rank < 1:
            raise ValueError("receivers have ranks 1..world_size-1")
        self.store = _store(info, False, timeout_s)
        self.rank, self.bucket_bytes = rank, bucket_bytes
        self.count = 0
        self.handles_blob: bytes | None = None
        self.sources: dict[str, torch.Tensor] = {}

    def receive(self, meta: list[TensorMeta], load: Load, target=None) -> int:
        """Copy every tensor out of the trainer's memory: `load` gets (name, tensor) views of it, one
        bucket at a time, and must copy them (they are the trainer's live parameters)."""
        self.count += 1
        self.store.wait([f"ready/{self.count}"])
        blob = self.store.get("handles")
        if blob != self.handles_blob:  # map the trainer's tensors (once, or after they moved)
            self.sources = {n: rebuild(*args) for n, (rebuild, args) in pickle.loads(blob).items()}
            self.handles_blob = blob
        if meta_of(self.sources.items()) != [tuple(m) for m in meta]:
            raise ValueError("the trainer's shared tensors do not match the broadcast's (name, shape, dtype) list")
        received = 0
        for bucket in plan_buckets(meta, self.bucket_bytes):
            named = [(name, self.sources[name]) for name, _, _ in bucket]
            load(named)
            received += sum(t.numel() * t.element_size() for _, t in named)
        torch.cuda.synchronize()  # copied before the trainer may write again
        self.store.set(f"done/{self.count}/{self.rank}", "1")
        return received

    def close(self) -> None:
        self.sources = {}
        self.store = None
