"""The vLLM rollout engine: TorchEngine's contract on vLLM's paged attention and continuous batching.

Coded against vLLM 0.33 (V1 engine). vLLM runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
with async scheduling off, so one `LLMEngine.step()` is one schedule + forward + sample and nothing
runs ahead of us. `generate` drives that step loop and, after every step, does what vLLM is not
told: the token budget summed over the batch, repeat detection on the whole response (earlier
segments included), and the policy version of each token. Rows it stops are aborted in vLLM.

Log-probs: SamplingParams(logprobs=0) under logprobs_mode="processed_logprobs". vLLM then returns
the sampled token's log-prob under the distribution it sampled from: logits / temperature, then
top-k/top-p masking and renormalisation (vllm/v1/worker/gpu/sample/sampler.py; the V1 sampler's
TopKTopPSampler does the same). With top_p = 1 that is the contract's log_softmax(logits /
temperature) exactly; greedy gives log_softmax(logits), as TorchEngine. With top_p < 1 it is the
log-prob within the nucleus, larger than the contract's by -log(nucleus mass): no mode gives the
contract there ("raw_logprobs" drops the temperature, which matters more), so keep rollout.top_p at 1.

Weights: the worker extension k15.rollout.vllm_worker.WeightSyncExtension loads Hugging Face-named
tensors into vLLM's live parameters through collective_rpc. One lock is held around each decoding
step and each collective_rpc, so a load from another thread (the actor's sync group) lands between
two decoding steps, as in TorchEngine; a turnstile keeps it from starving behind the step loop.
Requests in flight keep the KV cache computed under the old weights (the paper's partial rollouts);
tokens sampled after the swap carry the new version. Prefix-cache entries are salted with the
version at which a request was added, so a new request never reuses KV of older weights.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from k15.rollout.engine import (GenerationRequest, GenerationResult, RolloutEngine, SamplingParams,
                                find_repeat)

log = logging.getLogger(__name__)

WORKER_EXTENSION = "k15.rollout.vllm_worker.WeightSyncExtension"
# vLLM's finish reasons for a request it ended itself; any other (abort, error) leaves the row unfinished.
VLLM_FINISH = {"stop": "eos", "length": "length", "repetition": "repeat"}


class VllmEngine(RolloutEngine):
    def __init__(self, model_path: str, *, seed: int, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.5,
                 max_model_len: int = 4096, enable_sleep_mode: bool = True, enforce_eager: bool = False,
                 tensor_parallel_size: int = 1):
        # In-process engine core: step() is one engine step, and no background process decodes
        # past a budget or repeat stop. Set before vLLM reads it (it caches its settings at start).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        self.model_path = model_path
        self.enable_sleep_mode = enable_sleep_mode
        self.llm = LLM(
            model=model_path, seed=seed, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len, enable_sleep_mode=enable_sleep_mode, enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size,
            async_scheduling=False,  # one step = one forward: exact budget, clean points for weight loads
            logprobs_mode="processed_logprobs",  # see the module docstring
            worker_extension_cls=WORKER_EXTENSION,
        )
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        self.eos_token_id = self.llm.get_tokenizer().eos_token_id
        self._device = torch.device(self.llm.collective_rpc("k15_device")[0])
        self._version = 0
        self._asleep = False
        self._weights_awake = True
        self._request_ids = itertools.count()
        self._lock = threading.Lock()  # one vLLM call at a time: vLLM is not thread-safe
        self._turnstile = threading.Lock()
        self._generating = threading.Lock()  # one generate() at a time

    @contextmanager
    def _turn(self):
        """Hold the engine for one vLLM call. Waiting at the turnstile queues callers in order: the
        step loop, which comes back at once, cannot take the engine twice while a weight load waits."""
        with self._turnstile:
            self._lock.acquire()
        try:
            yield
        finally:
            self._lock.release()

    # -- weights ---------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self._version

    @property
    def weight_device(self):
        return self._device

    def named_parameters_meta(self) -> list[tuple[str, tuple[int, ...], str]]:
        """Hugging Face names and shapes, read from the checkpoint's safetensors headers (vLLM's own
        parameters are fused, qkv_proj and gate_up_proj, so they cannot name what a trainer sends),
        with the dtype vLLM holds the weights in."""
        from safetensors import safe_open

        directory = Path(self.model_path)
        index = directory / "model.safetensors.index.json"
        if index.is_file():  # a sharded checkpoint: only the shards its index names
            files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors checkpoint in {self.model_path}")
        meta = []
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                meta += [(name, tuple(f.get_slice(name).get_shape()), self.dtype) for name in f.keys()]
        return meta

    def update_weights(self, named_tensors, version: int) -> None:
        """Load (name -> tensor) into every worker now, between two decoding steps. The tensors
        travel as collective_rpc arguments (pickled where workers are other processes)."""
        items = list(dict(named_tensors).items())
        with self._turn():
            self._wake_weights_if_asleep()
            self.llm.collective_rpc("k15_load_weights", args=(items,))
            self._version = version

    def join_weight_group(self, info, rank: int, bucket_bytes: int) -> None:
        """Every worker joins the trainer's broadcast (NCCL between GPUs; CUDA IPC or gloo work too);
        worker t of tensor parallelism takes rank `rank` + t, so the group needs
        tensor_parallel_size ranks for this engine."""
        with self._turn():
            self.llm.collective_rpc("k15_join_weight_group", args=(info, rank, bucket_bytes))

    def receive_weights(self, meta, version: int) -> int:
        """Take part in one broadcast; each worker loads the buckets straight into its live
        parameters while decoding waits between two steps. Returns the bytes one worker received."""
        with self._turn():
            self._wake_weights_if_asleep()
            received = self.llm.collective_rpc("k15_receive_weights", args=(meta,))
            self._version = version
        return received[0]

    def weights_checksum(self) -> list[dict[str, float]]:
        """Per worker, the float64 sum of each of its parameters (vLLM's names and shards)."""
        with self._turn():
            return self.llm.collective_rpc("k15_weights_checksum")

    def _wake_weights_if_asleep(self) -> None:
        # Sleeping weights are unmapped from the GPU: bring back only them (the KV cache stays
        # freed until wake()), so a colocated trainer can publish while the engine sleeps.
        if self._asleep and not self._weights_awake:
            self.llm.wake_up(tags=["weights"])
            self._weights_awake = True

    def sleep(self) -> None:
        """Level 1: weights to CPU memory, KV cache dropped. A generate() running now ends at its
        next step with its rows unfinished. No-op without enable_sleep_mode."""
        if not self.enable_sleep_mode:
            return
        with self._turn():
            if not self._asleep:
                self.llm.sleep(level=1)
                self._asleep, self._weights_awake = True, False

    def wake(self) -> None:
        with self._turn():
            if self._asleep:
                self.llm.wake_up()  # whatever is still asleep
                self._asleep, self._weights_awake = False, True

    # -- generation ------------------------------------------------------------------------
    def _sampling_params(self, params: SamplingParams, max_tokens: int, index: int):
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        greedy = params.temperature <= 0
        seed = None if params.seed is None else (params.seed * 1_000_003 + index) % (1 << 63)
        return VllmSamplingParams(
            temperature=0.0 if greedy else params.temperature, top_p=1.0 if greedy else params.top_p,
            max_tokens=max_tokens, seed=seed, logprobs=0,  # 0: the sampled token's log-prob only
            detokenize=False, output_kind=RequestOutputKind.DELTA,  # each step's new tokens only
        )

    def _stop_reason(self, token: int, new_tokens: int, cap: int, history: list[int], params: SamplingParams):
        """TorchEngine's order: eos, then the length cap, then repeats over the whole response."""
        if token == self.eos_token_id:
            return "eos"
        if new_tokens >= cap:
            return "length"
        if params.repeat_ngram and find_repeat(history, params.repeat_ngram, params.repeat_times):
            return "repeat"
        return None

    def _add_requests(self, requests, caps, params: SamplingParams, results) -> dict[str, int]:
        """Queue every row that may still grow; returns vLLM request id -> request index."""
        from vllm.inputs import tokens_input

        live = {}
        for i, (request, cap) in enumerate(zip(requests, caps)):
            context = request.prompt_tokens + request.prefix_tokens
            if cap <= 0 or len(context) >= self.max_model_len:
                results[i].finished, results[i].finish_reason = True, "length"
                continue
            request_id = f"k15-{next(self._request_ids)}"
            prompt = tokens_input(context, cache_salt=f"v{self._version}")  # no KV of other weights
            self.llm.llm_engine.add_request(request_id, prompt, self._sampling_params(params, cap, i))
            live[request_id] = i
        return live

    def _record(self, out, res: GenerationResult, history: list[int], cap: int, params: SamplingParams,
                version: int) -> tuple[str | None, int]:
        """Append one step's new tokens of a request. Returns (why the row ends, None while it goes
        on, "unfinished" where vLLM dropped it; the number of new tokens)."""
        completion, count = out.outputs[0], 0
        for token, logprobs in zip(completion.token_ids, completion.logprobs):
            res.tokens.append(token)
            res.logprobs.append(logprobs[token].logprob)
            res.versions.append(version)
            history.append(token)
            count += 1
            reason = self._stop_reason(token, len(res.tokens), cap, history, params)
            if reason:
                return reason, count
        if out.finished:  # vLLM ended it for a reason of its own (max_model_len, an abort, an error)
            return VLLM_FINISH.get(completion.finish_reason, "unfinished"), count
        return None, count

    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[GenerationResult]:
        results = [GenerationResult([], [], [], False, "budget") for _ in requests]
        histories = [list(r.prefix_tokens) for r in requests]  # whole response so far, for repeat checks
        caps = [params.max_response_tokens - len(r.prefix_tokens) for r in requests]
        engine = self.llm.llm_engine
        live: dict[str, int] = {}  # vLLM request id -> request index, for rows still going
        with self._generating:
            try:
                with self._turn():
                    if self._asleep:
                        raise RuntimeError("generate() on a sleeping vLLM engine: call wake() first")
                    live = self._add_requests(requests, caps, params, results)
                budget = params.token_budget if params.token_budget is not None else math.inf
                while live:
                    with self._turn():
                        if self._asleep:
                            break  # sleep() came between two steps: rows stay unfinished
                        outputs = engine.step()
                        version = self._version  # the weights this step's tokens were sampled with
                        if not outputs and not engine.has_unfinished_requests():
                            break
                    to_abort, new_tokens = [], 0
                    for out in outputs:
                        i = live.get(out.request_id)
                        if i is None:
                            continue
                        reason, count = self._record(out, results[i], histories[i], caps[i], params, version)
                        new_tokens += count
                        if reason is None:
                            continue
                        del live[out.request_id]
                        if reason == "unfinished":  # resumable in a later call, like a budget cut
                            log.warning("vLLM dropped request %s (%s)", out.request_id, out.outputs[0].finish_reason)
                            continue
                        results[i].finished, results[i].finish_reason = True, reason
                        if not out.finished:  # a repeat: vLLM would go on
                            to_abort.append(out.request_id)
                    budget -= new_tokens
                    if budget <= 0:  # rows still going stay unfinished: "budget"
                        to_abort += list(live)
                        live.clear()
                    if to_abort:
                        with self._turn():
                            engine.abort_request(to_abort)
            finally:
                if live:  # stopped early (sleep, an error): leave nothing running in vLLM
                    with self._turn():
                        engine.abort_request(list(live))
        return results
