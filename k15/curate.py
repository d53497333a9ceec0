"""`k15 curate` (paper 2.1): keep problems whose answers can be verified and that the model cannot
answer without a chain of thought, and label each with a difficulty measured by sampling.

    1. drop non-verifiable formats (multiple choice, true/false, proofs, answers math-verify cannot
       parse, code rows with malformed tests)
    2. drop easy-to-hack problems: a direct answer (the response forced to start with
       `curate.no_cot_prefix`) is right within `curate.no_cot_attempts` tries
    3. sample the rest `curate.samples` times: pass_rate, difficulty = 1 - pass_rate
    4. write the kept rows (Parquet) and the dropped ones with their reason (JSONL)
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from pathlib import Path

from k15.atomic import atomic_write

_OPTION_LETTER = re.compile(r"^\(?\s*[A-J]\s*[).:]?$")  # "B", "(B)", "B." "B)"
_OPTIONS_IN_PROMPT = [re.compile(r"\(([A-E])\)"), re.compile(r"(?m)^\s*([A-E])[.)]\s")]  # "(A) 3" / "A. 3"
_TRUE_FALSE = {"true", "false", "yes", "no"}
_PROOF = re.compile(r"\b(prove|show that|demonstrate that)\b", re.IGNORECASE)
_TEXT_CMD = re.compile(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}")


def format_issue(rec: dict) -> str | None:
    """Why the row's answer cannot be checked by a verifier (None: it can). No model needed."""
    from k15.reward.code import parse_code_tests
    from k15.reward.verifiers import VERIFIERS

    task, prompt, answer = rec["task"], rec["prompt"], str(rec["answer"]).strip()
    if task not in VERIFIERS:
        return "unknown_task"
    if task == "code":
        try:
            parse_code_tests(answer)
        except ValueError:
            return "bad_code_tests"
        return None
    bare = _TEXT_CMD.sub(r"\1", answer).strip().strip("$").strip().rstrip(".").strip()
    if _PROOF.search(prompt):
        return "proof"
    if _OPTION_LETTER.match(bare) or any({"A", "B"} <= set(p.findall(prompt)) for p in _OPTIONS_IN_PROMPT):
        return "multiple_choice"
    if bare.lower() in _TRUE_FALSE:
        return "true_false"
    if task == "math" and not math_answer_parses(answer):
        return "unparsable_answer"
    return None


def math_answer_parses(answer: str) -> bool:
    """math-verify turns the answer into a math expression (its bare-string fallback is not enough:
    every model answer would then have to match the text exactly)."""
    from k15.reward.math import _clean, _plain_equal

    answer = _clean(answer)
    if _plain_equal(answer, answer):  # a plain number: the verifier compares it without parsing
        return True
    from math_verify import parse

    timeout = 5 if threading.current_thread() is threading.main_thread() else None  # its timer is a signal
    try:
        parsed = parse(f"${answer}$", parsing_timeout=timeout)
    except Exception:
        return False
    return any(not isinstance(p, str) for p in parsed)


def curate(cfg, records: list[dict], output: Path) -> dict:
    """Run the four steps on `records`; returns the counts and the output paths."""
    from k15.metrics import console
    from k15.rollout.batch import BatchSampler

    c = cfg.curate
    kept, dropped = [], []
    for rec in records:
        reason = format_issue(rec)
        if reason:
            dropped.append(_dropped(rec, reason))
        else:
            kept.append(rec)
    console.print(f"curate: {len(records)} problems, {len(dropped)} with a non-verifiable format")

    sampler = BatchSampler(cfg)
    if kept and c.no_cot_attempts > 0:
        prefix = sampler.encode(c.no_cot_prefix, special=False)
        params = sampler.params(c.temperature, len(prefix) + c.no_cot_max_tokens)  # the cap counts the prefix
        direct = sampler.sample(kept, c.no_cot_attempts, params, prefix, desc="direct answers (no CoT)")
        hackable = [sum(r["reward"] >= 1.0 for r in rows) for rows in direct]
        dropped += [_dropped(rec, "easy_to_hack", no_cot_correct=h, no_cot_attempts=c.no_cot_attempts)
                    for rec, h in zip(kept, hackable) if h]
        kept = [rec for rec, h in zip(kept, hackable) if not h]

    curated = []
    if kept:
        params = sampler.params(c.temperature, c.max_response_tokens or cfg.rollout.max_response_tokens)
        for rec, rows in zip(kept, sampler.sample(kept, c.samples, params, desc="difficulty (with CoT)")):
            pass_rate = sum(r["reward"] >= 1.0 for r in rows) / len(rows)
            curated.append({"prompt": rec["prompt"], "answer": rec["answer"], "task": rec["task"],
                            "difficulty": 1.0 - pass_rate, "pass_rate": pass_rate,
                            "source_prompt_id": rec["prompt_id"]})
    dropped_path = output.with_name(output.stem + ".dropped.jsonl")
    write_outputs(curated, dropped, output, dropped_path)
    return {"total": len(records), "kept": len(curated), "dropped": dict(Counter(d["reason"] for d in dropped)),
            "output": str(output), "dropped_output": str(dropped_path)}


def _dropped(rec: dict, reason: str, **extra) -> dict:
    return {"source_prompt_id": rec["prompt_id"], "prompt": rec["prompt"], "answer": rec["answer"],
            "task": rec["task"], "difficulty": rec.get("difficulty"), "reason": reason, **extra}


def write_outputs(curated: list[dict], dropped: list[dict], output: Path, dropped_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("prompt", pa.string()), ("answer", pa.string()), ("task", pa.string()),
                        ("difficulty", pa.float64()), ("pass_rate", pa.float64()), ("source_prompt_id", pa.string())])
    atomic_write(output, lambda tmp: pq.write_table(pa.Table.from_pylist(curated, schema=schema), tmp))
    atomic_write(dropped_path, lambda tmp: tmp.write_text("".join(json.dumps(d) + "\n" for d in dropped)))


def print_summary(summary: dict, console) -> None:
    from rich.table import Table

    table = Table(title="k15 curate")
    table.add_column("problems")
    table.add_column("count", justify="right")
    table.add_row("kept", str(summary["kept"]), style="bold")
    for reason, n in sorted(summary["dropped"].items(), key=lambda kv: -kv[1]):
        table.add_row(f"dropped: {reason}", str(n))
    table.add_section()
    table.add_row("total", str(summary["total"]))
    console.print(table)
    console.print(f"curated: {summary['output']}\ndropped: {summary['dropped_output']}")
