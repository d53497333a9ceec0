"""Bucketed gloo weight broadcast between real processes: bit-exact, any bucket size."""

import io
import multiprocessing as mp

import pytest
import torch

from k15.sync.buckets import meta_of, plan_buckets
from k15.sync.gloo import GroupInfo, WeightReceiver, WeightSender, free_port


def _receive(info, rank, meta, bucket, queue):
    receiver = WeightReceiver(info, rank, bucket)
    buf = io.BytesIO()  # plain bytes: tensors passed as shared-memory handles would die with this process
    got = {}
    received = receiver.receive(meta, load=got.update)  # gloo: fresh buffers, the views may be kept
    torch.save((received, got), buf)
    queue.put(buf.getvalue())


@pytest.mark.parametrize("bucket_bytes", [1 << 10, 1 << 22])
def test_broadcast_is_bit_exact(bucket_bytes):
    g = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.w": torch.randn(37, 53, generator=g) for i in range(5)}
    tensors["norm"] = torch.randn(11, generator=g).to(torch.bfloat16)
    tensors["big"] = torch.randn(4096, generator=g)
    meta = meta_of(tensors.items())
    info = GroupInfo("127.0.0.1", free_port(), 3)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_receive, args=(info, r, meta, bucket_bytes, queue)) for r in (1, 2)]
    for p in procs:
        p.start()
    sent = WeightSender(info, bucket_bytes).send(tensors.items())
    results = [torch.load(io.BytesIO(queue.get(timeout=60))) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert sent == sum(t.numel() * t.element_size() for t in tensors.values())
    for nbytes, received in results:
        assert nbytes == sent
        assert received.keys() == tensors.keys()
        for name, t in tensors.items():
            assert received[name].dtype == t.dtype and torch.equal(received[name], t)


def test_bucket_plan_splits_by_size_and_dtype():
    meta = [("a", (10,), "float32"), ("b", (10,), "float32"), ("c", (10,), "bfloat16"), ("d", (100,), "float32")]
    plan = plan_buckets(meta, bucket_bytes=80)
    assert [[m[0] for m in b] for b in plan] == [["a", "b"], ["c"], ["d"]]


def _sharded_trainer(rank, port, info, bucket, queue):
    """Trainer rank `rank` of 2 holding every weight as a DTensor sharded on dim 0; rank 0 sends."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    from k15.sync.buckets import gather_along

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    sharded = {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in _full_weights().items()}
    if rank == 0:
        sender = WeightSender(info, bucket)
        queue.put(("local_rows", {n: t.to_local().shape[0] for n, t in sharded.items()}))
        queue.put(("sent", sender.send(sharded.items())))
    else:
        gather_along(sharded.items(), bucket)
    dist.destroy_process_group()


def _full_weights():
    g = torch.Generator().manual_seed(1)
    return {"embed": torch.randn(64, 16, generator=g), "layer.w": torch.randn(10, 7, generator=g),
            "norm": torch.randn(6, generator=g).to(torch.bfloat16)}


def test_sharded_trainer_sends_full_tensors_bucket_by_bucket():
    full = _full_weights()
    meta = meta_of(full.items())
    info = GroupInfo("127.0.0.1", free_port(), 2)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    trainers = [ctx.Process(target=_sharded_trainer, args=(r, port, info, 256, queue)) for r in (0, 1)]
    receiver = ctx.Process(target=_receive, args=(info, 1, meta, 256, queue))
    for p in trainers + [receiver]:
        p.start()
    got = {}
    for _ in range(3):
        item = queue.get(timeout=120)
        if isinstance(item, bytes):
            got["received"] = torch.load(io.BytesIO(item))
        else:
            got[item[0]] = item[1]
    for p in trainers + [receiver]:
        p.join(timeout=30)
    assert got["local_rows"]["embed"] == 32  # each rank held half: the full tensors were gathered
    nbytes, received = got["received"]
    assert nbytes == got["sent"] == sum(t.numel() * t.element_size() for t in full.values())
    for name, t in full.items():
        assert received[name].dtype == t.dtype and torch.equal(received[name], t), name
