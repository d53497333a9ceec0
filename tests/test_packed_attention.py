"""k15/models/attention.py: a packed row through the model equals each document through it alone,
forward and backward (CPU: causal SDPA per document; CUDA bf16: cuDNN's or FlashAttention's varlen
kernel)."""

import importlib.util

import pytest
import torch

from k15.models.attention import _cudnn_bounds, cudnn_varlen, flash_varlen, resolve_backend, use_packed_attention
from k15.trainer.packing import document_bounds

HAS_CUDNN = importlib.util.find_spec("cudnn") is not None
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_cudnn = pytest.mark.skipif(not HAS_CUDNN, reason="needs cudnn-frontend (pip install nvidia-cudnn-frontend)")
# (device, CUDA attention kernel); on CPU the kernel is not used
DEVICES = [("cpu", "auto"), pytest.param(("cuda", "flash"), marks=needs_cuda),
           pytest.param(("cuda", "cudnn"), marks=[needs_cuda, needs_cudnn])]  # "auto" picks one of the two


def small_model(device, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=256, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype)


def test_document_bounds():
    bounds, longest = document_bounds([3, 1, 4])
    assert bounds.tolist() == [0, 3, 4, 8] and bounds.dtype == torch.int32 and longest == 4


@pytest.mark.parametrize("device_kernel", DEVICES)
def test_packed_row_equals_documents_alone(device_kernel):
    device, kernel = device_kernel
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = small_model(device, dtype)
    g = torch.Generator().manual_seed(1)
    lengths = [7, 33, 1, 130, 12]
    docs = [torch.randint(0, 256, (n,), generator=g).to(device) for n in lengths]

    probe = torch.randn(128, generator=g).to(device)  # a loss whose gradient reaches every weight
    alone, alone_grads = [], []
    for d in docs:  # the reference: plain SDPA on each document by itself
        model.zero_grad()
        h = model.model(input_ids=d[None], use_cache=False).last_hidden_state[0]
        (h.float() @ probe).sum().backward()
        alone.append(h.detach().float())
        alone_grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.float().clone())

    use_packed_attention(model, kernel)
    model.zero_grad()
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    bounds, longest = document_bounds(lengths)
    bounds = bounds.to(device)
    h = model.model(input_ids=ids, position_ids=pos, use_cache=False, cu_seqlens=bounds,
                    max_seqlen=longest).last_hidden_state[0]
    loss = (h.float() @ probe).sum()
    loss.backward()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for (a, b), want in zip(zip(bounds.tolist(), bounds.tolist()[1:]), alone):
        torch.testing.assert_close(h[a:b].detach().float(), want, **tol)
    got = model.model.layers[0].self_attn.q_proj.weight.grad.float()
    want = sum(alone_grads)
    assert (got - want).norm() <= (3e-2 if dtype == torch.bfloat16 else 1e-4) * want.norm()


def test_missing_bounds_is_a_clear_error():
    model = small_model("cpu", torch.float32)
    use_packed_attention(model)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model.model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False)


def test_no_mask_is_built_for_a_packed_row(monkeypatch):
    """transformers neither builds a mask nor scans the position ids for documents: that scan made
    the host wait for the GPU at every forward."""
    import transformers.masking_utils as masking

    def scan(*args, **kwargs):
        raise AssertionError("transformers scanned the position ids for packed documents")

    monkeypatch.setattr(masking, "find_packed_sequence_indices", scan)
    model = small_model("cpu", torch.float32)
    use_packed_attention(model)
    bounds, longest = document_bounds([2, 3])
    h = model.model(input_ids=torch.tensor([[5, 6, 7, 8, 9]]), position_ids=torch.tensor([[0, 1, 0, 1, 2]]),
                    use_cache=False, cu_seqlens=bounds, max_seqlen=longest).last_hidden_state
    assert h.shape == (1, 5, 128) and h.isfinite().all()


def test_attention_backend_names():
    with pytest.raises(ValueError, match="trainer.attention must be one of auto, cudnn, flash, got 'fa3'"):
        resolve_backend("fa3")
    assert resolve_backend("flash") == "flash"
    assert resolve_backend("auto") == ("auto" if HAS_CUDNN else "flash")
    if not HAS_CUDNN:
        with pytest.raises(ValueError, match="pip install nvidia-cudnn-frontend"):
            resolve_backend("cudnn")


def test_cudnn_bounds_pad_documents_and_round_the_longest():
    cu, longest = _cudnn_bounds(torch.tensor([0, 5, 300, 310], dtype=torch.int32), 295, 310)
    assert cu.tolist() == [0, 5, 300, 310] + [310] * 13 and cu.dtype == torch.int32  # 16 documents, 13 empty
    assert longest == 512
    cu, longest = _cudnn_bounds(torch.arange(0, 17 * 4, 4, dtype=torch.int32), 4, 64)
    assert cu.numel() == 17 and longest == 256  # already 16 documents; at least 256


@needs_cuda
@needs_cudnn
def test_cudnn_equals_flash_on_many_documents():
    """Both kernels on one packed row of 40 documents (grouped-query heads): same output and gradients."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 300, (40,), generator=g).tolist()
    bounds, longest = document_bounds(lengths)
    bounds, total = bounds.cuda(), sum(lengths)
    q, k, v, grad = (torch.randn(total, h, 64, generator=g).cuda().bfloat16() for h in (14, 2, 2, 14))
    results = []
    for varlen in (flash_varlen, cudnn_varlen):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = varlen(qq, kk, vv, bounds, longest, 0.125)
        out.backward(grad)
        results.append([out, qq.grad, kk.grad, vv.grad])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert err < 1e-2, f"{name}: relative error {err:.1e}"
