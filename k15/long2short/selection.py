"""Which sampled responses teach "shorter" (paper 2.4): pure functions over one problem's samples.

A sample is a dict with `reward` (>= 1 means correct), `length` (response tokens) and
`finish_reason`; only a response that ended by itself ("eos") is worth imitating, so a correct but
truncated one is never chosen.
"""

from __future__ import annotations


def is_correct(sample: dict) -> bool:
    return sample["reward"] >= 1.0


def shortest_correct(samples: list[dict]) -> dict | None:
    """Shortest rejection sampling: the shortest correct, complete response (first one on a tie)."""
    correct = [s for s in samples if is_correct(s) and s["finish_reason"] == "eos"]
    return min(correct, key=lambda s: s["length"]) if correct else None


def preference_pairs(samples: list[dict], longer_factor: float = 1.5, max_pairs: int | None = None
                     ) -> list[tuple[dict, dict]]:
    """DPO pairs: the shortest correct response as chosen; as rejected, every wrong response and
    every correct one at least `longer_factor` times longer (in sample order, at most `max_pairs`)."""
    if longer_factor < 1.0:
        raise ValueError(f"longer_factor must be >= 1, got {longer_factor}")
    chosen = shortest_correct(samples)
    if chosen is None:
        return []
    rejected = [s for s in samples if s is not chosen
                and (not is_correct(s) or s["length"] >= longer_factor * chosen["length"])]
    return [(chosen, r) for r in rejected[:max_pairs]]
