"""Weight broadcast from the trainer (rank 0) to every rollout actor, without files.

Three backends behind one interface (a sender with send(named_tensors) -> bytes, receivers with
receive(meta, load) -> bytes): NCCL through CuPy between GPUs (k15/sync/nccl.py), CUDA IPC when the
engines share the trainer's GPU (k15/sync/ipc.py), gloo through the CPU otherwise (k15/sync/gloo.py).
`rollout.sync_backend: auto` picks NCCL when the trainer and the engines are on CUDA and CuPy is
installed; the controller then turns it into ipc where they share one GPU (k15/controller.py).
"""

from __future__ import annotations

import importlib.util


def choose_backend(backend: str, trainer_device: str, rollout_device: str) -> str:
    if backend == "auto":
        on_gpu = str(trainer_device).startswith("cuda") and str(rollout_device).startswith("cuda")
        return "nccl" if on_gpu and importlib.util.find_spec("cupy") is not None else "gloo"
    if backend not in ("nccl", "ipc", "gloo"):
        raise ValueError(f"rollout.sync_backend must be auto, nccl, ipc or gloo, got {backend!r}")
    return backend


def new_group(backend: str, world_size: int):
    """Group info for a sender and world_size - 1 receivers; call it on the sender's process."""
    if backend == "nccl":
        from k15.sync.nccl import new_nccl_group

        return new_nccl_group(world_size)
    if backend == "ipc":
        from k15.sync.ipc import new_ipc_group

        return new_ipc_group(world_size)
    from k15.sync.gloo import new_group_info

    return new_group_info(world_size)


def make_sender(info, bucket_bytes: int, device=None):
    from k15.sync.nccl import NcclGroupInfo, NcclWeightSender

    if isinstance(info, NcclGroupInfo):
        return NcclWeightSender(info, bucket_bytes, device)
    from k15.sync.ipc import IpcGroupInfo, IpcWeightSender

    if isinstance(info, IpcGroupInfo):
        return IpcWeightSender(info, bucket_bytes)
    from k15.sync.gloo import WeightSender

    return WeightSender(info, bucket_bytes)


def make_receiver(info, rank: int, bucket_bytes: int, device=None):
    from k15.sync.nccl import NcclGroupInfo, NcclWeightReceiver

    if isinstance(info, NcclGroupInfo):
        return NcclWeightReceiver(info, rank, bucket_bytes, device)
    from k15.sync.ipc import IpcGroupInfo, IpcWeightReceiver

    if isinstance(info, IpcGroupInfo):
        return IpcWeightReceiver(info, rank, bucket_bytes)
    from k15.sync.gloo import WeightReceiver

    return WeightReceiver(info, rank, bucket_bytes)


def gpu_identity(device) -> str | None:
    """'<node id>/<GPU UUID>' of a CUDA device, None elsewhere: two processes share a GPU when these
    are equal (NCCL refuses such pairs)."""
    import torch

    if device is None or torch.device(device).type != "cuda":
        return None
    import ray

    index = torch.device(device).index
    uuid = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index).uuid
    return f"{ray.get_runtime_context().get_node_id()}/{uuid}"
