"""NCCL weight broadcast through CuPy between two GPUs: bit-exact into live tensors, any bucket
size, tensors larger than a bucket, mixed dtypes, and a receiver whose dtype differs."""

import importlib.util
import io
import multiprocessing as mp

import pytest
import torch

needs_two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2 or importlib.util.find_spec("cupy") is None,
    reason="needs 2 CUDA GPUs and CuPy (NCCL refuses two ranks on one GPU)")
pytestmark = [pytest.mark.gpu, needs_two_gpus]


def _weights(seed: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {f"layer{i}.w": torch.randn(37, 53, generator=g) for i in range(5)}
    w["norm"] = torch.randn(11, generator=g).to(torch.bfloat16)
    w["embed"] = torch.randn(300, 64, generator=g).to(torch.bfloat16)  # larger than the small buckets
    w["odd"] = torch.randint(0, 255, (13,), generator=g, dtype=torch.uint8)
    return {n: t.to(device) for n, t in w.items()}


def _end(rank: int, info, bucket_bytes: int, queue):
    from k15.sync.nccl import NcclWeightReceiver, NcclWeightSender

    torch.cuda.set_device(rank)
    device = f"cuda:{rank}"
    mine = _weights(seed=rank, device=device)  # the two ends start different
    if rank == 0:
        sender = NcclWeightSender(info, bucket_bytes, device)
        queue.put(("sent", sender.send(mine.items())))
        sender.close()
        return
    receiver = NcclWeightReceiver(info, 1, bucket_bytes, device)
    loads = []

    def load(named):
        loads.append([n for n, _ in named])
        for n, t in named:
            mine[n].copy_(t)
    received = receiver.receive([(n, tuple(t.shape), str(t.dtype)[6:]) for n, t in _weights(0, "cpu").items()],
                                load, target=lambda n: mine[n])
    receiver.close()
    buf = io.BytesIO()  # plain bytes: tensors passed as shared-memory handles would die with this process
    torch.save({n: t.cpu() for n, t in mine.items()}, buf)
    queue.put(("received", received, buf.getvalue(), loads))


def _result(queue, procs, timeout_s: float = 120.0):
    """The next result, failing at once if a process died (its peer would wait on NCCL forever)."""
    import queue as queues
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return queue.get(timeout=1.0)
        except queues.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.kill()
                pytest.fail(f"a broadcast process died (exit code {dead[0].exitcode}); see its traceback above")
    pytest.fail(f"no result within {timeout_s} s")


@pytest.mark.parametrize("bucket_bytes", [1 << 12, 1 << 24])
def test_nccl_broadcast_is_bit_exact_into_live_tensors(bucket_bytes):
    from k15.sync.nccl import new_nccl_group

    info = new_nccl_group(2)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_end, args=(r, info, bucket_bytes, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = {m[0]: m[1:] for m in (_result(queue, procs), _result(queue, procs))}
    for p in procs:
        p.join(timeout=30)
    expected = _weights(0, "cpu")
    nbytes = sum(t.numel() * t.element_size() for t in expected.values())
    (sent,), (received, tensors, loads) = got["sent"], got["received"]
    tensors = torch.load(io.BytesIO(tensors))
    assert sent == received == nbytes
    for name, t in expected.items():
        assert tensors[name].dtype == t.dtype and torch.equal(tensors[name], t), name
    loaded = {n for names in loads for n in names}
    if bucket_bytes < expected["embed"].numel() * 2:
        assert "embed" not in loaded  # received straight into the live tensor, no staging copy
    else:
        assert loaded == set(expected)

