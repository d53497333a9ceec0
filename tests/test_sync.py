"""Bucketed gloo weight broadcast between real processes: bit-exact, any bucket size."""

import io
import multiprocessing as mp

import pytest
import torch

from k15.sync.broadcast import GroupInfo, WeightReceiver, WeightSender, free_port, meta_of, plan_buckets


def _receive(info, rank, meta, bucket, queue):
    receiver = WeightReceiver(info, rank, bucket)
    buf = io.BytesIO()  # plain bytes: tensors passed as shared-memory handles would die with this process
    torch.save({n: t.clone() for n, t in receiver.receive(meta)}, buf)
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
    got = [torch.load(io.BytesIO(queue.get(timeout=60))) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert sent == sum(t.numel() * t.element_size() for t in tensors.values())
    for received in got:
        assert received.keys() == tensors.keys()
        for name, t in tensors.items():
            assert received[name].dtype == t.dtype and torch.equal(received[name], t)


def test_bucket_plan_splits_by_size_and_dtype():
    meta = [("a", (10,), "float32"), ("b", (10,), "float32"), ("c", (10,), "bfloat16"), ("d", (100,), "float32")]
    plan = plan_buckets(meta, bucket_bytes=80)
    assert [[m[0] for m in b] for b in plan] == [["a", "b"], ["c"], ["d"]]
