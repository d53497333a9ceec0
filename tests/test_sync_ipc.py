"""CUDA IPC weight sync between two processes on one GPU (a colocated trainer and engine): the
engine copies the trainer's parameters bit-exactly, every broadcast sees the trainer's latest
weights, and a dtype cast on the way (fp32 trainer, bf16 engine) is what `load` makes of it."""

import io
import multiprocessing as mp

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _weights(device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.w": torch.randn(37, 53, generator=g).to(device), "b.w": torch.randn(300, 64, generator=g).to(device),
            "norm": torch.randn(11, generator=g).to(torch.bfloat16).to(device)}


def _engine(info, meta, queue):
    from k15.sync.ipc import IpcWeightReceiver

    receiver = IpcWeightReceiver(info, 1, bucket_bytes=1 << 12)
    live = {n: torch.zeros(s, dtype=torch.bfloat16 if n == "norm" else torch.float32, device="cuda")
            for n, s, _ in meta}
    rounds = []
    for _ in range(2):  # two broadcasts: the second must see the trainer's update in between
        receiver.receive(meta, lambda named: [live[n].copy_(t) for n, t in named])
        rounds.append({n: t.cpu() for n, t in live.items()})
    buf = io.BytesIO()
    torch.save(rounds, buf)
    queue.put(buf.getvalue())


def test_ipc_sync_copies_the_trainers_latest_weights():
    from k15.sync.buckets import meta_of
    from k15.sync.gloo import free_port
    from k15.sync.ipc import IpcGroupInfo, IpcWeightSender

    weights = _weights("cuda")
    meta = meta_of(weights.items())
    info = IpcGroupInfo("127.0.0.1", free_port(), 2)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_engine, args=(info, meta, queue))
    proc.start()
    sender = IpcWeightSender(info)
    expected = []
    for step in range(2):
        if step:
            with torch.no_grad():  # an optimizer step: in place, same storage
                for t in weights.values():
                    t.mul_(-2).add_(1)
        expected.append({n: t.cpu().clone() for n, t in weights.items()})
        assert sender.send(weights.items()) == sum(t.numel() * t.element_size() for t in weights.values())
    rounds = torch.load(io.BytesIO(queue.get(timeout=120)))
    proc.join(timeout=30)
    for got, want in zip(rounds, expected):
        for name, t in want.items():
            assert torch.equal(got[name], t), name
    assert not torch.equal(rounds[0]["a.w"], rounds[1]["a.w"])
