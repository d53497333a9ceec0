"""The RolloutEngine contract that the PyTorch engine (embedded default) and the vLLM engine share.

An engine generates continuations for a batch of requests under a token budget. A request may carry
a prefix of response tokens from an earlier segment (partial rollouts, paper 2.6.2); generation
continues after it. Every new token comes back with its log-prob under the sampling distribution
(logits / temperature, before top-p truncation) and the policy version that produced it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_response_tokens: int = 64  # cap on the whole response, earlier segments included
    token_budget: int | None = None  # cap on new tokens summed over the batch in this call
    repeat_ngram: int = 0  # 0 turns repeat detection off
    repeat_times: int = 4
    seed: int | None = None


@dataclass
class GenerationRequest:
    prompt_tokens: list[int]
    prefix_tokens: list[int] = field(default_factory=list)  # response so far, from earlier segments


@dataclass
class GenerationResult:
    tokens: list[int]  # new tokens only
    logprobs: list[float]
    versions: list[int]  # policy version of each new token
    finished: bool
    finish_reason: str  # eos | length | repeat | budget (unfinished)


class RolloutEngine(ABC):
    @abstractmethod
    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[GenerationResult]:
        """Continue every request; results are in request order."""

    @abstractmethod
    def update_weights(self, named_tensors, version: int) -> None:
        """Load new weights (name -> tensor) and tag later tokens with `version`. Safe to call from
        another thread while `generate` runs: the swap happens between two decoding steps."""

    @property
    @abstractmethod
    def version(self) -> int:
        """Policy version of the weights in use."""

    def named_parameters_meta(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, shape, dtype) of every weight, for setting up a broadcast."""
        raise NotImplementedError

    # -- weight broadcast (k15/sync): receivers are made inside the engine's own process ----------
    def join_weight_group(self, info, rank: int, bucket_bytes: int) -> None:
        """Join the trainer's broadcast group as `rank` (a new group replaces an old one)."""
        from k15.sync import make_receiver

        if getattr(self, "_receiver", None) is not None:
            self._receiver.close()
        self._receiver = make_receiver(info, rank, bucket_bytes, self.weight_device)

    def receive_weights(self, meta, version: int) -> int:
        """Take part in one broadcast and use the weights from then on; returns the bytes received.
        This default collects copies and hands them to update_weights; engines override it to load
        straight into their live parameters."""
        tensors = {}
        received = self._receiver.receive(meta, load=lambda named: tensors.update((n, t.clone()) for n, t in named))
        self.update_weights(tensors, version)
        return received

    @property
    def weight_device(self):
        """Where received weights land (the NCCL backend needs a CUDA device)."""
        return None

    def sleep(self) -> None:
        """Free accelerator memory for a colocated trainer (no-op on CPU)."""

    def wake(self) -> None:
        """Take memory back after sleep()."""


def find_repeat(tokens: list[int], max_ngram: int, times: int) -> bool:
    """True if `tokens` ends with one n-gram (n <= max_ngram) repeated `times` times in a row."""
    if max_ngram <= 0 or times < 2:
        return False
    for n in range(1, max_ngram + 1):
        span = n * times
        if len(tokens) < span:
            break
        # Cheap test first: the last token must equal the one n places back.
        if tokens[-1] != tokens[-1 - n]:
            continue
        tail = tokens[-span:]
        if tail == tail[:n] * times:
            return True
    return False
