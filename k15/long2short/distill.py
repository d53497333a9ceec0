"""Shortest rejection sampling and DPO (paper 2.4): sample the long-CoT policy, pick what is short
and right, and fine-tune the long policy on it.

    sample_long_policy  n samples per training problem (with their tokens), on the rollout actors
    shortest_examples   the shortest correct response per problem -> SFT data
    dpo_examples        (shortest correct, wrong or >= 1.5x longer correct) pairs -> DPO data
    fine_tune           SFT or DPO on a trainer actor starting from the long policy; saves it
"""

from __future__ import annotations

import json
from pathlib import Path

import ray

from k15.atomic import atomic_write_text
from k15.long2short.selection import preference_pairs, shortest_correct


def sample_long_policy(cfg, records: list[dict]) -> list[list[dict]]:
    """`long2short.samples` scored samples per record from the policy at model.path."""
    from k15.rollout.batch import BatchSampler

    l2s = cfg.long2short
    sampler = BatchSampler(cfg)
    try:
        params = sampler.params(l2s.temperature, cfg.rollout.max_response_tokens)
        return sampler.sample(records, l2s.samples, params, desc="sampling the long policy", with_tokens=True)
    finally:
        sampler.close()


def shortest_examples(records: list[dict], samples: list[list[dict]], tokenizer, path: Path) -> list[tuple]:
    """(prompt tokens, response tokens) of each problem's shortest correct response, also written to
    `path` (JSONL, readable) for inspection and reuse."""
    examples, lines = [], []
    for rec, rows in zip(records, samples):
        best = shortest_correct(rows)
        if best is None:
            continue
        examples.append((best["prompt_tokens"], best["response_tokens"]))
        lines.append({"prompt_id": rec["prompt_id"], "prompt": rec["prompt"], "answer": rec["answer"],
                      "response": _text(tokenizer, best["response_tokens"]), "length": best["length"],
                      "correct_of_n": f"{sum(r['reward'] >= 1.0 for r in rows)}/{len(rows)}"})
    atomic_write_text(path, "".join(json.dumps(line) + "\n" for line in lines))
    return examples


def dpo_examples(records: list[dict], samples: list[list[dict]], tokenizer, path: Path, longer_factor: float,
                 max_pairs: int) -> list[tuple]:
    """(prompt, chosen, rejected) token triples, also written to `path` (JSONL)."""
    triples, lines = [], []
    for rec, rows in zip(records, samples):
        for chosen, rejected in preference_pairs(rows, longer_factor, max_pairs):
            triples.append((chosen["prompt_tokens"], chosen["response_tokens"], rejected["response_tokens"]))
            lines.append({"prompt_id": rec["prompt_id"], "prompt": rec["prompt"], "answer": rec["answer"],
                          "chosen": _text(tokenizer, chosen["response_tokens"]), "chosen_length": chosen["length"],
                          "rejected": _text(tokenizer, rejected["response_tokens"]),
                          "rejected_length": rejected["length"], "rejected_correct": rejected["reward"] >= 1.0})
    atomic_write_text(path, "".join(json.dumps(line) + "\n" for line in lines))
    return triples


def _text(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def fine_tune(cfg, method: str, data: list[tuple], checkpoint: Path) -> dict:
    """SFT (method "shortest") or DPO (method "dpo") of the policy at model.path on `data`, on one
    trainer actor; the result is saved to `checkpoint` (a Hugging Face directory)."""
    from k15.trainer.group import TrainerGroup

    l2s, t = cfg.long2short, cfg.trainer
    trainer = TrainerGroup(cfg.model, t, cfg.algo, 1.0, cfg.seed, num_workers=cfg.cluster.trainer_workers,
                           resources=cfg.cluster.trainer_resources, device=t.device,
                           storage_path=str(checkpoint.parent.resolve() / "ray_train"))
    try:
        if method == "shortest":
            stats = ray.get(trainer.sft.remote(data, l2s.steps, l2s.batch_size, l2s.lr, t.warmup_threads))
        else:
            stats = ray.get(trainer.dpo.remote(data, l2s.steps, l2s.batch_size, l2s.lr, l2s.beta, t.warmup_threads))
        ray.get(trainer.save.remote(str(checkpoint.resolve())))  # the workers' cwd is not ours
    finally:
        trainer.shutdown()
    return stats
