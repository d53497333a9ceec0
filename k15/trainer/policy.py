"""The policy as the trainer runs it: packed micro-batches in, per-token log-probs out, sharded by
FSDP2 with mixed precision and activation checkpointing. Attention stays inside each document of a
packed row (k15/models/attention.py: cuDNN's or FlashAttention's varlen kernel on CUDA).

`PackedPolicy` wraps the Hugging Face causal LM so that the LM head's log-probs (k15.kernels: never
the [tokens x vocab] logits on CUDA) run inside the FSDP root module's forward, where the root's
parameters (embedding, tied LM head, final norm) are gathered.
"""

from __future__ import annotations

import torch
from torch import nn

from k15.trainer.packing import IGNORE, PackedBatch


class PackedPolicy(nn.Module):
    def __init__(self, hf_model: nn.Module, logprob_impl: str = "torch", attention: str = "auto"):
        from k15.models.attention import use_packed_attention

        super().__init__()
        if logprob_impl not in ("torch", "fused"):
            raise ValueError(f"trainer.logprob_impl must be 'torch' or 'fused', got {logprob_impl!r}")
        self.attention = use_packed_attention(hf_model, attention)  # on CUDA: cudnn, flash or auto (both)
        self.hf = hf_model
        # "torch": the kernels' PyTorch reference (materialised fp32 logits); "fused": the Triton
        # kernels on CUDA, the same reference on CPU.
        self.impl = "reference" if logprob_impl == "torch" else "auto"

    def forward(self, batch: PackedBatch, temperature: float) -> torch.Tensor:
        """logp[t] of batch.targets[t] given the document up to t, fp32 [T]; 0 where ignored."""
        from k15.kernels import fused_logprobs

        hidden = self.hf.model(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None],
                               use_cache=False, cu_seqlens=batch.cu_seqlens,
                               max_seqlen=batch.max_seqlen).last_hidden_state[0]
        return fused_logprobs(hidden, self.hf.lm_head.weight, batch.targets, ignore_index=IGNORE,
                              temperature=temperature if temperature > 0 else 1.0, impl=self.impl,
                              valid_rows=batch.trained_rows)


def shard(policy: PackedPolicy, mixed_precision: bool, activation_checkpointing: bool,
          compile_layers: bool = False) -> PackedPolicy:
    """FSDP2 on every decoder layer and on the root, one process or many (the process group is
    Ray Train's). Parameters stay fp32 and sharded (the master weights); with mixed_precision each
    layer is gathered in bf16 and gradients are reduced in fp32. compile_layers compiles each
    decoder layer's forward in place (parameter names and FSDP's hooks unchanged): norms, rotary
    embedding, residual adds and the MLP's activation fuse around the matrix products and the
    attention custom ops. The layers share one compiled graph; the documents' bounds are
    dynamic, so new document lengths do not recompile it (CPU: the per-document attention is a graph
    break)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # the mesh on the parameters' device: without one, FSDP takes the GPU whenever the host has one,
    # and moves a CPU trainer's weights there
    mesh = init_device_mesh(next(policy.parameters()).device.type, (dist.get_world_size(),))

    if activation_checkpointing:  # keep each layer's input only; recompute the rest in backward
        hf, kwargs = policy.hf, {"use_reentrant": False}
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.18's name
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    for layer in policy.hf.model.layers:
        if compile_layers:
            layer.forward = torch.compile(layer.forward)
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    # The root (embedding, tied LM head, final norm) is re-gathered for every forward too, as the
    # layers are: a root left gathered between steps gave a resumed run gradients that differed
    # from the uninterrupted run's in the last bit, which Adam then grew.
    fully_shard(policy, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    return policy
