"""An agent loop on k15's actors: multi-turn episodes with a tool, then one training step.

    python examples/agent_loop.py [--turns 2] [key=value ...]     (any `k15 train` override)

Each episode: the policy answers; a calculator "tool" checks the arithmetic it can find and its
result is appended as environment tokens (in the sequence, never trained on); the policy takes its
next turn after it. Finished episodes are scored by k15's verifiers, go to the replay buffer, and
one mirror-descent step trains on the policy's tokens only.
"""

from __future__ import annotations

import argparse
import re

from k15.embed import Session
from k15.schema import append_environment, trained_mask

PROBLEMS = [{"prompt_id": "add", "prompt": "Compute 17 + 25. Put the answer in \\boxed{}.", "answer": "42"},
            {"prompt_id": "mul", "prompt": "Compute 6 * 7. Put the answer in \\boxed{}.", "answer": "42"}]


def calculator(text: str) -> str:
    """The tool: evaluates the last `a op b` in the text, or says it found none."""
    found = re.findall(r"(-?\d+)\s*([-+*])\s*(-?\d+)", text)
    if not found:
        return "\n[calculator: no expression found]\n"
    a, op, b = found[-1]
    value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    return f"\n[calculator: {a} {op} {b} = {value}]\n"


def run(turns: int, overrides: list[str]) -> dict:
    session = Session.start("logger=none", "algo.samples_per_prompt=2", "data.train_size=64", "data.eval_size=8",
                            *overrides, run_dir="runs/agent-loop")
    try:
        rows = session.new_rows(PROBLEMS)
        for turn in range(turns):
            rows = session.generate(rows, max_new_tokens=16)
            if turn < turns - 1:  # the tool answers between the policy's turns
                rows = [append_environment(r, session.encode(calculator(session.decode(r["response_tokens"]))))
                        for r in rows]
        rows = session.score(session.end_episodes(rows))
        added = session.add(rows)
        stats = session.train_step(groups=len(PROBLEMS))
        policy_tokens = sum(sum(trained_mask(r["versions"])) for r in rows)
        env_tokens = sum(len(r["versions"]) for r in rows) - policy_tokens
        print(f"{len(rows)} episodes of {turns} turns: {policy_tokens} policy tokens (trained), {env_tokens} tool "
              f"tokens (not trained); buffer: {added['groups_completed']} groups; trained on "
              f"{stats['trained_tokens']} tokens, loss {stats['loss']:.4f}, policy version {stats['version']}")
        return {"rows": rows, "stats": stats, "policy_tokens": policy_tokens, "env_tokens": env_tokens}
    finally:
        session.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=2)
    args, overrides = ap.parse_known_args()
    run(args.turns, overrides)
