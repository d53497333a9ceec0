"""A 500-problem prompt file for timing `k15 curate` and `k15 eval` (issue 6, acceptance 4):
built-in problems of 2-6 operations plus rows no verifier can check, so every drop reason shows.

    python benchmarks/curation_set.py runs/p500.jsonl
    time k15 curate curate.source=runs/p500.jsonl model.path=<run>/checkpoint
    time k15 eval eval.source=runs/p500.curated.parquet model.path=<run>/checkpoint
"""

import json
import random
import sys

from k15.data.arithmetic import generate_problems

UNVERIFIABLE = [
    {"prompt": "What is the answer?", "answer": "???"},
    {"prompt": "True or false: 7 is odd.", "answer": "True"},
    {"prompt": "Is 12 divisible by 4?", "answer": "yes"},
    {"prompt": "Q: 2+2=?\nA. 3\nB. 4\nC. 5", "answer": "B"},
    {"prompt": "Which is prime? (A) 4 (B) 6 (C) 7 (D) 9", "answer": "C"},
    {"prompt": "Prove that there are infinitely many primes.", "answer": "See proof."},
    {"prompt": "Show that the square root of 2 is irrational.", "answer": "QED"},
    {"prompt": "Write a function.", "answer": json.dumps({"tests": []}), "task": "code"},
]


def main(path: str, n: int = 500, seed: int = 11) -> None:
    rows = [p.as_record() for p in generate_problems(n - len(UNVERIFIABLE), seed, min_ops=2, max_ops=6)]
    rows = [{k: r[k] for k in ("prompt", "answer", "difficulty", "task")} for r in rows] + UNVERIFIABLE
    random.Random(seed).shuffle(rows)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{path}: {len(rows)} rows ({len(UNVERIFIABLE)} not verifiable)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/p500.jsonl")
