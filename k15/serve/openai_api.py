"""Request checking and response shapes of the OpenAI-compatible API (`k15 serve`), apart from
Serve so that they can be tested alone. A bad request raises RequestError, which names the field."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status

    def body(self) -> dict:
        kind = "not_found_error" if self.status == 404 else "invalid_request_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": None}}


@dataclass
class Request:
    prompt: str | None  # completions
    messages: list[dict] | None  # chat completions
    max_tokens: int
    temperature: float
    top_p: float
    stream: bool
    seed: int | None


def parse(body, *, chat: bool, model_name: str, max_tokens_limit: int) -> Request:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError("'model' must be a string", "model")
    if model != model_name:
        raise RequestError(f"model '{model}' does not exist; this server has '{model_name}'", "model", 404)
    prompt = messages = None
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
                raise RequestError(f"'messages[{i}].role' must be system, user, assistant or tool", f"messages[{i}].role")
            if not isinstance(m.get("content"), str):
                raise RequestError(f"'messages[{i}].content' must be a string", f"messages[{i}].content")
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("'prompt' must be a non-empty string (or a list of one)", "prompt")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 16))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= max_tokens_limit:
        raise RequestError(f"'max_tokens' must be an integer from 1 to {max_tokens_limit}, got {max_tokens!r}",
                           "max_tokens")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 1e-9, 1.0)
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", "stream")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError("'seed' must be an integer", "seed")
    return Request(prompt, messages, max_tokens, temperature, top_p, stream, seed)


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(f"'{key}' must be a number in [{low:g}, {high:g}], got {value!r}", key)
    return float(value)


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The model's chat template if it has one, else plain "role: content" lines."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def completion(model: str, text: str, finish: str, usage: dict, *, chat: bool) -> dict:
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
              if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
    return {"id": _id(chat), "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage}


def chunk(model: str, ident: str, text: str | None, finish: str | None, *, chat: bool) -> dict:
    if chat:
        delta = {} if text is None else {"content": text}
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice]}


def _id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def finish_reason(engine_reason: str) -> str:
    return "length" if engine_reason in ("length", "budget") else "stop"
