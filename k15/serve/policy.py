"""`k15 serve`: the policy behind an OpenAI-compatible API on Ray Serve.

    GET  /v1/models
    POST /v1/completions        {"model", "prompt", "max_tokens", "temperature", "top_p", "stream", "seed"}
    POST /v1/chat/completions   {"model", "messages", ...}

Each replica holds the PyTorch rollout engine with the checkpoint at model.path. With `serve.follow`
set to a training run's directory, a replica loads that run's newest intact checkpoint whenever a new
one appears, so the served weights follow training. Streaming sends server-sent events. The tokens
are generated a chunk at a time by continuing the same request, in the same way that partial
rollouts continue a segment. A bad request gets a 4xx with an OpenAI-style error that names the field.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime.
import asyncio
import json
import threading
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from k15.serve import openai_api as api

app = FastAPI(title="k15 policy")


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


@serve.deployment(name="k15-policy")
@serve.ingress(app)
class PolicyServer:
    def __init__(self, model_cfg: dict, model_name: str, max_tokens_limit: int = 4096, follow: str | None = None,
                 stream_chunk: int = 8, device: str = "cpu"):
        from omegaconf import OmegaConf

        from k15.models import load_policy, load_policy_tokenizer
        from k15.rollout.torch_engine import TorchEngine

        cfg = OmegaConf.create(model_cfg)
        self.tokenizer = load_policy_tokenizer(cfg)
        self.engine = TorchEngine(load_policy(cfg, self.tokenizer, 0), self.tokenizer.eos_token_id,
                                  self.tokenizer.pad_token_id, device=device)
        self.model_name, self.max_tokens_limit, self.stream_chunk = model_name, max_tokens_limit, stream_chunk
        self.follow, self.loaded, self.checked = (Path(follow) if follow else None), None, None
        self.lock = threading.Lock()  # one generation at a time per replica; replicas scale out

    # -- endpoints ------------------------------------------------------------------------------
    @app.get("/v1/models")
    def models(self):
        """The one model; `k15_weights` says which weights are served (the followed checkpoint)."""
        with self.lock:
            self._follow_training()
        from k15.checkpoint import iteration_of

        weights = {"version": iteration_of(self.loaded) if self.loaded else self.engine.version,
                   "checkpoint": str(self.loaded) if self.loaded else None}
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "k15",
                                            "created": 0, "k15_weights": weights}]}

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, chat=True)

    async def _handle(self, request: Request, chat: bool):
        try:
            try:
                body = await request.json()
            except ValueError:
                raise api.RequestError("the request body is not valid JSON") from None
            req = api.parse(body, chat=chat, model_name=self.model_name, max_tokens_limit=self.max_tokens_limit)
        except api.RequestError as e:
            return JSONResponse(e.body(), status_code=e.status)
        text = api.chat_prompt(self.tokenizer, req.messages) if chat else req.prompt
        prompt = self.tokenizer(text)["input_ids"]
        if req.stream:
            return StreamingResponse(self._stream(prompt, req, chat), media_type="text/event-stream")
        tokens, reason = await asyncio.to_thread(self.generate, prompt, req, None)
        usage = {"prompt_tokens": len(prompt), "completion_tokens": len(tokens),
                 "total_tokens": len(prompt) + len(tokens)}
        return api.completion(self.model_name, self.decode(tokens), api.finish_reason(reason), usage, chat=chat)

    async def _stream(self, prompt: list[int], req: api.Request, chat: bool):
        ident = api.completion(self.model_name, "", "stop", {}, chat=chat)["id"]
        if chat:
            yield _event(api.chunk(self.model_name, ident, "", None, chat=True) | {"choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        tokens, sent, reason = [], "", None
        while reason is None:
            new, why = await asyncio.to_thread(self.generate, prompt, req, tokens, self.stream_chunk)
            tokens += new
            reason = None if why == "budget" else why
            text = self.decode(tokens)
            if reason is None and text.endswith("\ufffd"):  # half a UTF-8 character: wait for the rest
                continue
            if len(text) > len(sent):
                yield _event(api.chunk(self.model_name, ident, text[len(sent):], None, chat=chat))
                sent = text
        yield _event(api.chunk(self.model_name, ident, None if chat else "", api.finish_reason(reason), chat=chat))
        yield "data: [DONE]\n\n"

    # -- the engine -----------------------------------------------------------------------------
    def generate(self, prompt: list[int], req: api.Request, prefix: list[int] | None, budget: int | None = None):
        """(new tokens, finish reason) continuing after `prefix`; `budget` caps the new tokens of this
        call (the reason is then "budget" if the response is not done)."""
        from k15.rollout.engine import GenerationRequest, SamplingParams

        with self.lock:
            self._follow_training()
            params = SamplingParams(temperature=req.temperature, top_p=req.top_p, max_response_tokens=req.max_tokens,
                                    token_budget=budget, seed=req.seed)
            [result] = self.engine.generate([GenerationRequest(prompt, list(prefix or []))], params)
        return result.tokens, result.finish_reason

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _follow_training(self) -> None:
        """Load the followed run's newest checkpoint if it is new (checked against its manifest)."""
        if self.follow is None:
            return
        from k15 import checkpoint
        from k15.models.model import load_pretrained

        found = checkpoint.list_checkpoints(self.follow)
        if not found or found[-1] == self.checked:  # hashed once, intact or not
            return
        self.checked = found[-1]
        if checkpoint.problem(found[-1]) is not None:
            return
        weights = load_pretrained(found[-1] / "model").state_dict()
        self.engine.update_weights(weights, checkpoint.iteration_of(found[-1]))
        self.loaded = found[-1]


def served_name(model_cfg: dict, serve_cfg) -> str:
    """The `model` clients send: serve.model_name, else the checkpoint directory's name."""
    return serve_cfg.model_name or Path(model_cfg.get("path") or "k15-default").name


def build_app(model_cfg: dict, serve_cfg) -> serve.Application:
    """The Serve application, autoscaling between serve.min_replicas and serve.max_replicas."""
    name = served_name(model_cfg, serve_cfg)
    deployment = PolicyServer.options(
        max_ongoing_requests=serve_cfg.max_ongoing_requests,
        autoscaling_config={"min_replicas": serve_cfg.min_replicas, "max_replicas": serve_cfg.max_replicas,
                            "target_ongoing_requests": serve_cfg.target_ongoing_requests},
        ray_actor_options={"num_cpus": serve_cfg.replica_cpus, "num_gpus": serve_cfg.replica_gpus})
    return deployment.bind(model_cfg, name, serve_cfg.max_tokens_limit, serve_cfg.follow, serve_cfg.stream_chunk,
                           serve_cfg.device)
