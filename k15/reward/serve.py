"""The reward service as a Ray Serve deployment, callable over HTTP and through a handle.

    POST /reward  {"task": "math", "response": "... \\boxed{3}", "answer": "3"}
               or {"items": [{"task", "response", "answer"}, ...]}
    -> 200 {"results": [{"reward": 1.0, "reason": "correct"}, ...]}
    -> 400 {"error": "field 'items[2].response' must be a string"} on a malformed request

`start(port=...)` brings it up locally (Serve's HTTP proxy on 127.0.0.1 by default);
`build_app(...)` gives the application for `serve.run` or a Serve config file.

Each replica holds a Scorer. max_ongoing_requests is set deliberately: Serve's default of 5 would
serialise a burst of small requests; the replica itself bounds the work in flight with
`max_concurrency` threads (math checks share one worker process, code runs one sandbox each).
Autoscaling adds replicas when the ongoing requests per replica exceed target_ongoing_requests.
"""

from __future__ import annotations

import asyncio

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from k15.reward.verifiers import Scorer

MAX_ITEMS = 4096
_FIELDS = ("task", "response", "answer")


def parse_request(body) -> list[tuple[str, str, str]]:
    """Validate a request body; ValueError names the offending field."""
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    if "items" in body:
        items, prefix = body["items"], "items"
        if not isinstance(items, list) or not items:
            raise ValueError("field 'items' must be a non-empty list")
        if len(items) > MAX_ITEMS:
            raise ValueError(f"field 'items' has {len(items)} entries; at most {MAX_ITEMS}")
    else:
        items, prefix = [body], None
    out = []
    for i, item in enumerate(items):
        where = f"{prefix}[{i}]." if prefix else ""
        if not isinstance(item, dict):
            raise ValueError(f"field '{prefix}[{i}]' must be an object")
        for name in _FIELDS:
            if not isinstance(item.get(name), str):
                raise ValueError(f"field '{where}{name}' must be a string")
        out.append((item["task"], item["response"], item["answer"]))
    return out


class RewardService:
    def __init__(self, config: dict | None = None, max_concurrency: int = 4):
        self._scorer = Scorer(config)
        self._slots = asyncio.Semaphore(max_concurrency)

    async def score(self, items: list[tuple[str, str, str]]) -> list[dict]:
        """Handle entry point: [(task, response, answer)] -> [{"reward", "reason"}]."""
        async with self._slots:
            results = await asyncio.to_thread(self._scorer.score_many, items)
        return [{"reward": r.reward, "reason": r.reason} for r in results]

    async def __call__(self, request: Request):
        try:
            items = parse_request(await request.json())
            return {"results": await self.score(items)}
        except ValueError as e:  # malformed JSON, bad fields, unknown task, malformed tests
            return JSONResponse({"error": str(e)}, status_code=400)

    def __del__(self):
        try:
            self._scorer.close()
        except Exception:
            pass


def build_app(config: dict | None = None, *, min_replicas: int = 1, max_replicas: int = 2,
              target_ongoing_requests: float = 16, max_ongoing_requests: int = 64,
              max_concurrency: int = 4, replica_cpus: float = 1.0, autoscaling: dict | None = None):
    """The Serve application; replicas autoscale between min_replicas and max_replicas.

    autoscaling: further AutoscalingConfig fields (upscale_delay_s, downscale_delay_s, ...)."""
    if not 1 <= min_replicas <= max_replicas:
        raise ValueError(f"reward serve needs 1 <= min_replicas <= max_replicas, got {min_replicas}, {max_replicas}")
    deployment = serve.deployment(
        RewardService,
        name="k15-reward",
        max_ongoing_requests=max_ongoing_requests,
        autoscaling_config={
            "min_replicas": min_replicas,
            "max_replicas": max_replicas,
            "target_ongoing_requests": target_ongoing_requests,
            **(autoscaling or {}),
        },
        ray_actor_options={"num_cpus": replica_cpus},
    )
    return deployment.bind(config, max_concurrency)


def start(config: dict | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          route_prefix: str = "/reward", **app_options):
    """Start Serve's HTTP proxy and the reward app; returns a DeploymentHandle."""
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_app(config, **app_options), name="k15-reward", route_prefix=route_prefix)
