"""The PyTorch rollout engine: batched generation with a KV cache on any Hugging Face causal LM.

The embedded default on CPU and the engine for GPU tests. Finished rows leave the batch (their
KV-cache rows are dropped), so short answers do not pay for long ones.
"""

from __future__ import annotations

import math
import threading

import torch

from k15.rollout.engine import (GenerationRequest, GenerationResult, RolloutEngine, SamplingParams,
                                find_repeat)


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row. Returns (tokens [B], log-probs [B]) where the log-prob is taken under
    softmax(logits / temperature) before top-p truncation, which is what the trainer recomputes."""
    logits = logits.float()
    if temperature <= 0:
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
        return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    probs = logprobs.exp()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


class TorchEngine(RolloutEngine):
    def __init__(self, model, eos_token_id: int, pad_token_id: int | None = None,
                 device: str | torch.device = "cpu", version: int = 0):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.eos_token_id = eos_token_id
        self.pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
        self._version = version
        self._pending: tuple[dict, int] | None = None
        self._lock = threading.Lock()
        self._step_lock = threading.Lock()  # held by each forward pass; an in-place weight load waits for it

    # -- weights -----------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self._version

    def named_parameters_meta(self):
        return [(n, tuple(p.shape), str(p.dtype).removeprefix("torch.")) for n, p in self.model.named_parameters()]

    def update_weights(self, named_tensors, version: int) -> None:
        with self._lock:
            self._pending = (dict(named_tensors), version)

    def _apply_pending_weights(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        tensors, version = pending
        params = self._parameters_named(tensors)
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor, non_blocking=True)
        self._version = version

    def _parameters_named(self, names) -> dict[str, torch.Tensor]:
        """The model's parameters by name, after checking that every name in `names` is one."""
        params = dict(self.model.named_parameters())
        unknown = set(names) - set(params)
        if unknown:
            raise KeyError(f"weight update names unknown parameters: {sorted(unknown)[:5]}")
        return params

    @property
    def weight_device(self):
        return self.device

    def receive_weights(self, meta, version: int) -> int:
        """On CUDA the broadcast lands in the live parameters (no second copy of the model); decoding
        pauses between two steps while it does. On CPU the tensors are swapped in between steps."""
        if self.device.type != "cuda":
            tensors = {}
            received = self._receiver.receive(meta, load=lambda named: tensors.update(named))  # fresh buffers
            self.update_weights(tensors, version)
            return received
        params = self._parameters_named(name for name, _, _ in meta)

        def load(named):
            for name, tensor in named:
                params[name].data.copy_(tensor, non_blocking=True)

        with self._step_lock, torch.no_grad():
            received = self._receiver.receive(meta, load, target=lambda name: params[name].data)
            self._version = version
        return received

    def sleep(self) -> None:
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def wake(self) -> None:
        if self.device.type == "cuda":
            self.model.to(self.device)

    # -- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[GenerationResult]:
        from transformers import DynamicCache

        self._apply_pending_weights()
        results = [GenerationResult([], [], [], False, "budget") for _ in requests]
        histories = [list(r.prefix_tokens) for r in requests]  # whole response so far, for repeat checks
        caps = [params.max_response_tokens - len(r.prefix_tokens) for r in requests]
        rows = [i for i, cap in enumerate(caps) if cap > 0]  # request index of each batch row
        for i, cap in enumerate(caps):
            if cap <= 0:
                results[i].finished, results[i].finish_reason = True, "length"
        if not rows:
            return results

        contexts = [requests[i].prompt_tokens + requests[i].prefix_tokens for i in rows]
        width = max(len(c) for c in contexts)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, c in enumerate(contexts):  # left padding keeps every row's next token in the last column
            input_ids[b, width - len(c):] = torch.tensor(c)
            mask[b, width - len(c):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)

        cache = DynamicCache()
        with self._step_lock:  # the version read with the forward pass that used those weights
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True)
            step_version = self._version
        logits, next_pos = out.logits[:, -1], positions[:, -1] + 1
        budget = params.token_budget if params.token_budget is not None else math.inf
        while True:
            tokens, logprobs = sample_tokens(logits, params.temperature, params.top_p, generator)
            token_list, logprob_list = tokens.tolist(), logprobs.tolist()
            keep = []
            for b, i in enumerate(rows):
                res, tok = results[i], token_list[b]
                res.tokens.append(tok)
                res.logprobs.append(logprob_list[b])
                res.versions.append(step_version)
                histories[i].append(tok)
                if tok == self.eos_token_id:
                    res.finished, res.finish_reason = True, "eos"
                elif len(res.tokens) >= caps[i]:
                    res.finished, res.finish_reason = True, "length"
                elif params.repeat_ngram and find_repeat(histories[i], params.repeat_ngram, params.repeat_times):
                    res.finished, res.finish_reason = True, "repeat"
                else:
                    keep.append(b)
            budget -= len(rows)
            if not keep or budget <= 0:
                break  # rows still going stay unfinished: "budget"
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, next_pos, tokens = mask[index], next_pos[index], tokens[index]
                rows = [rows[b] for b in keep]
            self._apply_pending_weights()  # new weights take effect between decoding steps
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            with self._step_lock:
                out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                                 past_key_values=cache, use_cache=True)
                step_version = self._version
            logits, next_pos = out.logits[:, -1], next_pos + 1
        return results
