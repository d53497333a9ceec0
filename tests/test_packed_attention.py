"""k15/models/attention.py: a packed row through the model equals each document through it alone,
forward and backward (CPU: causal SDPA per document; CUDA bf16: FlashAttention varlen)."""

import pytest
import torch

from k15.models.attention import use_packed_attention
from k15.trainer.packing import document_bounds

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


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


@pytest.mark.parametrize("device", DEVICES)
def test_packed_row_equals_documents_alone(device):
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

    use_packed_attention(model)
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
