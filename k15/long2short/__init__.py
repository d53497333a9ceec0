"""long2short (paper 2.4): short chain-of-thought policies from a long one, `k15 long2short method=...`.

    merge     average the long policy (model.path) with a short one (long2short.short_model)
    shortest  sample each problem n times, fine-tune on the shortest correct response (SFT);
              long2short.rounds > 1 repeats that from each round's policy
    dpo       DPO with the shortest correct response as chosen, wrong or >= 1.5x longer ones rejected
    rl        more RL with the length penalty on and a smaller maximum response length (the `k15
              train` loop itself; its settings are conf/method/rl.yaml)

Every method writes <output>/checkpoint, a Hugging Face directory that `model.path=` loads (k15
eval, k15 train, serving), and <output>/long2short.json with what it did.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

METHODS = ("merge", "shortest", "dpo", "rl")


class NothingToLearn(RuntimeError):
    """The long policy gave no usable (correct, complete) response to learn from."""


def run_method(cfg, out_dir: Path) -> dict:
    """merge, shortest or dpo (rl runs through the training loop, see k15.cli)."""
    from k15.atomic import atomic_write_text

    l2s = cfg.long2short
    start = time.perf_counter()
    checkpoint = out_dir / "checkpoint"
    summary = {"method": l2s.method, "long_model": cfg.model.path, "checkpoint": str(checkpoint)}
    if l2s.method == "merge":
        from k15.long2short.merge import merge_checkpoints

        merge_checkpoints([cfg.model.path, l2s.short_model], list(l2s.merge_weights), checkpoint)
        summary.update(short_model=l2s.short_model, weights=list(l2s.merge_weights))
    else:
        summary.update(_distill(cfg, out_dir, checkpoint))
    summary["seconds"] = time.perf_counter() - start
    atomic_write_text(out_dir / "long2short.json", json.dumps(summary, indent=1))
    return summary


def _distill(cfg, out_dir: Path, checkpoint: Path) -> dict:
    """shortest or dpo. shortest with long2short.rounds > 1 repeats itself: each round samples the
    policy the last round fine-tuned (round r's data and policy in <out>/round<r>/)."""
    import copy

    l2s = cfg.long2short
    rounds = l2s.rounds if l2s.method == "shortest" else 1
    if rounds == 1:
        return _distill_once(cfg, out_dir, checkpoint)
    per_round, step_cfg = [], copy.deepcopy(cfg)
    for r in range(1, rounds + 1):
        where = out_dir / f"round{r}"
        where.mkdir(parents=True, exist_ok=True)
        policy = checkpoint if r == rounds else where / "checkpoint"
        info = _distill_once(step_cfg, where, policy)
        per_round.append({"round": r, "policy_sampled": step_cfg.model.path, "checkpoint": str(policy), **info})
        step_cfg.model.path = str(policy.resolve())
    return {**per_round[-1], "rounds": per_round}


def _distill_once(cfg, out_dir: Path, checkpoint: Path) -> dict:
    from k15.data.dataset import load_datasets
    from k15.long2short.distill import dpo_examples, fine_tune, sample_long_policy, shortest_examples
    from k15.metrics import console
    from k15.models import load_policy_tokenizer

    l2s = cfg.long2short
    records = load_datasets(cfg.data, cfg.seed)[0][:l2s.problems]
    samples = sample_long_policy(cfg, records)
    tokenizer = load_policy_tokenizer(cfg.model)
    correct = sum(s["reward"] >= 1.0 for rows in samples for s in rows)
    info = {"problems": len(records), "samples": l2s.samples * len(records), "correct_samples": correct,
            "mean_sampled_length": sum(s["length"] for rows in samples for s in rows) / max(1, l2s.samples * len(records))}
    if l2s.method == "shortest":
        data = shortest_examples(records, samples, tokenizer, out_dir / "sft.jsonl")
        info.update(sft_examples=len(data), sft_data=str(out_dir / "sft.jsonl"),
                    mean_target_length=sum(len(r) for _, r in data) / max(1, len(data)))
    else:
        data = dpo_examples(records, samples, tokenizer, out_dir / "dpo_pairs.jsonl", l2s.longer_factor,
                            l2s.max_pairs_per_problem)
        info.update(dpo_pairs=len(data), dpo_data=str(out_dir / "dpo_pairs.jsonl"))
    if not data:
        raise NothingToLearn(f"long2short {l2s.method}: none of the {len(records)} problems has a correct, complete "
                           f"response in {l2s.samples} samples of {cfg.model.path}; nothing to learn from")
    console.print(f"long2short {l2s.method}: {len(data)} {'examples' if l2s.method == 'shortest' else 'pairs'} "
                  f"from {len(records)} problems x {l2s.samples} samples; fine-tuning {l2s.steps} steps")
    info.update(fine_tune(cfg, l2s.method, data, checkpoint))
    return info


def held_out_greedy(cfg, model_path: str) -> dict:
    """Greedy accuracy and mean response length of the policy at `model_path` on the held-out set
    (the numbers `k15 train` prints before and after RL)."""
    from omegaconf import OmegaConf

    from k15.data.dataset import load_datasets
    from k15.evaluate import evaluate
    from k15.rollout.batch import BatchSampler

    cfg = OmegaConf.merge(cfg, {"model": {"path": str(model_path)}})
    held_out = load_datasets(cfg.data, cfg.seed)[1]
    sampler = BatchSampler(cfg)
    try:
        tokens = [sampler.encode(r["prompt"]) for r in held_out]
        return evaluate(sampler.actors, sampler.reward_pool, held_out, tokens, cfg.rollout.max_response_tokens)
    finally:
        sampler.close()
