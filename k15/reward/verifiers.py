"""The verifier registry and a Scorer that owns the verifiers' resources.

`VERIFIERS` maps a row's `task` to `fn(response, answer) -> RewardResult`; add your own. The two
built-in ones get batched paths inside `Scorer`: "math" pipelines its symbolic checks through one
math-verify worker, "code" runs programs in a sandbox with `code_concurrency` runs in flight.
A Scorer is what a reward actor or a Serve replica holds; `RewardConfig.from_dict` takes the
`reward:` section of a run's config (plain dict or OmegaConf) and names any unknown key.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from k15.reward.code import CodeTests, parse_code_tests, score_code
from k15.reward.math import score_math, score_math_many
from k15.reward.result import RewardResult
from k15.reward.sandbox import Limits, SandboxConfig

VERIFIERS: dict[str, Callable[[str, str], RewardResult]] = {"math": score_math, "code": score_code}


@dataclass(frozen=True)
class RewardConfig:
    math_timeout_s: float = 3.0  # per answer, in the math-verify worker
    math_memory_mb: int = 2048  # address-space cap of the math-verify worker
    code_concurrency: int = 2  # sandbox runs in flight per Scorer
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)

    def __post_init__(self):
        if not self.code_concurrency >= 1:
            raise ValueError(f"reward 'code_concurrency' must be >= 1, got {self.code_concurrency!r}")
        if not self.math_timeout_s > 0:
            raise ValueError(f"reward 'math_timeout_s' must be > 0, got {self.math_timeout_s!r}")

    @classmethod
    def from_dict(cls, d) -> "RewardConfig":
        if d is None:
            return cls()
        if isinstance(d, RewardConfig):
            return d
        try:  # OmegaConf DictConfig -> dict
            from omegaconf import OmegaConf

            if OmegaConf.is_config(d):
                d = OmegaConf.to_container(d, resolve=True)
        except ImportError:
            pass
        d = dict(d)
        _check_keys("reward", d, cls)
        sb = dict(d.pop("sandbox", None) or {})
        _check_keys("reward.sandbox", sb, SandboxConfig)
        lim = sb.pop("limits", None) or {}
        sandbox = SandboxConfig(**sb, limits=lim if isinstance(lim, Limits) else Limits.from_dict(lim))
        return cls(**d, sandbox=sandbox)


def _check_keys(where: str, d: dict, cls) -> None:
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {where} option(s) {sorted(unknown)}")


@functools.lru_cache(maxsize=2048)
def _parse_tests_cached(answer: str) -> CodeTests:
    return parse_code_tests(answer)


class Scorer:
    """Scores (task, response, answer) items. Thread-safe; `close()` stops its worker and sandbox.

    Never raises on a response. Raises ValueError for an unknown task or a malformed `answer`
    (dataset errors should be loud; the message names the field).
    """

    def __init__(self, config: RewardConfig | dict | None = None):
        self.config = RewardConfig.from_dict(config)
        self._lock = threading.Lock()
        self._math = None
        self._sandbox = None
        self._pool = None

    # resources, created on first use: a math-only run never needs bubblewrap
    def math_verifier(self):
        with self._lock:
            if self._math is None:
                from k15.reward.math_worker import MathVerifier

                self._math = MathVerifier(self.config.math_timeout_s, self.config.math_memory_mb)
            return self._math

    def sandbox(self):
        with self._lock:
            if self._sandbox is None:
                from k15.reward.sandbox import Sandbox

                cfg = self.config.sandbox
                if cfg.prestart < self.config.code_concurrency:  # one warm container per worker
                    cfg = dataclasses.replace(cfg, prestart=self.config.code_concurrency)
                sandbox = Sandbox(cfg)
                try:  # a sandbox that cannot run anything must fail loudly, not score every program 0
                    sandbox.selftest()
                except Exception:
                    sandbox.close()
                    raise
                self._sandbox = sandbox
                self._pool = ThreadPoolExecutor(self.config.code_concurrency, thread_name_prefix="k15-code")
            return self._sandbox

    def score(self, task: str, response: str, answer: str) -> RewardResult:
        return self.score_many([(task, response, answer)])[0]

    def score_many(self, items) -> list[RewardResult]:
        items = list(items)
        out: list[RewardResult | None] = [None] * len(items)
        math_idx, code_idx = [], []
        for i, (task, response, answer) in enumerate(items):
            fn = VERIFIERS.get(task)
            if fn is None:
                raise ValueError(f"no verifier for task '{task}' (known: {sorted(VERIFIERS)})")
            if fn is score_math:
                math_idx.append(i)
            elif fn is score_code:
                if not isinstance(answer, str):
                    raise ValueError(f"code 'answer' must be a JSON string, got {type(answer).__name__}")
                _parse_tests_cached(answer)  # malformed tests raise here, naming the field
                code_idx.append(i)
            else:
                out[i] = _guarded(fn, response, answer)
        if math_idx:
            results = score_math_many([(items[i][1], items[i][2]) for i in math_idx],
                                      verifier=_LazyMath(self))
            for i, r in zip(math_idx, results):
                out[i] = r
        if code_idx:
            sandbox = self.sandbox()
            futures = [self._pool.submit(score_code, items[i][1], _parse_tests_cached(items[i][2]), sandbox)
                       for i in code_idx]
            for i, f in zip(code_idx, futures):
                out[i] = f.result()
        return out  # type: ignore[return-value]

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            if self._sandbox is not None:
                self._sandbox.close()
            if self._math is not None:
                self._math.close()
            self._math = self._sandbox = self._pool = None


class _LazyMath:
    """Starts the math worker only if some answer needs the symbolic checker."""

    def __init__(self, scorer: Scorer):
        self._scorer = scorer

    def verify_many(self, pairs):
        return self._scorer.math_verifier().verify_many(pairs)


def _guarded(fn, response, answer) -> RewardResult:
    try:
        r = fn(response, answer)
        if not isinstance(r, RewardResult):
            return RewardResult(float(r), "custom")
        return r
    except Exception as e:  # a custom verifier tripping over model output
        return RewardResult(0.0, f"error: {type(e).__name__}")
