"""Prompt sets: local JSONL/Parquet files (validated row by row) or the built-in arithmetic task.

A record has `prompt` (str), `answer` (str or number), optional `difficulty` (number) and `task`
(str, default "math"). A bad record stops loading with an error naming the file, row and field.
"""

from __future__ import annotations

import json
from pathlib import Path

from k15.data import arithmetic


class DatasetError(ValueError):
    pass


def _check_record(rec, where: str) -> dict:
    if not isinstance(rec, dict):
        raise DatasetError(f"{where}: expected an object with 'prompt' and 'answer', got {type(rec).__name__}")
    prompt, answer = rec.get("prompt"), rec.get("answer")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DatasetError(f"{where}: field 'prompt' must be a non-empty string, got {prompt!r:.60}")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or str(answer).strip() == "":
        raise DatasetError(f"{where}: field 'answer' must be a non-empty string or number, got {answer!r:.60}")
    difficulty = rec.get("difficulty")
    if difficulty is not None and (isinstance(difficulty, bool) or not isinstance(difficulty, (int, float))):
        raise DatasetError(f"{where}: field 'difficulty' must be a number, got {difficulty!r:.60}")
    task = rec.get("task", "math")
    if not isinstance(task, str):
        raise DatasetError(f"{where}: field 'task' must be a string, got {task!r:.60}")
    return {"prompt": prompt, "answer": str(answer).strip(),
            "difficulty": None if difficulty is None else float(difficulty), "task": task}


def load_prompt_file(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"prompt file not found: {path}")
    records = []
    if path.suffix == ".jsonl":
        with path.open() as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}, row {lineno}: not valid JSON ({e.msg})") from None
                records.append(_check_record(rec, f"{path}, row {lineno}"))
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:
            raise DatasetError(f"{path}: not a readable Parquet file ({e})") from None
        records = [_check_record(rec, f"{path}, row {i + 1}") for i, rec in enumerate(rows)]
    else:
        raise DatasetError(f"{path}: unsupported prompt file type '{path.suffix}' (use .jsonl or .parquet)")
    if not records:
        raise DatasetError(f"{path}: no records")
    for i, rec in enumerate(records):
        rec["prompt_id"] = f"{path.stem}-{i}"
    return records


def builtin_problems(data_cfg, seed: int) -> tuple[list[arithmetic.Problem], list[arithmetic.Problem]]:
    """Disjoint train and held-out sets of the built-in arithmetic task."""
    held_out = arithmetic.generate_problems(data_cfg.eval_size, seed=seed + 1_000_003, min_ops=data_cfg.min_ops,
                                            max_ops=data_cfg.max_ops, max_value=data_cfg.max_value, prefix="eval")
    train = arithmetic.generate_problems(data_cfg.train_size, seed=seed, min_ops=data_cfg.min_ops,
                                         max_ops=data_cfg.max_ops, max_value=data_cfg.max_value, prefix="train")
    return arithmetic.split_disjoint(train, held_out), held_out


def load_datasets(data_cfg, seed: int) -> tuple[list[dict], list[dict]]:
    """(train records, held-out records)."""
    if data_cfg.source == "builtin":
        train, held_out = builtin_problems(data_cfg, seed)
        return [p.as_record() for p in train], [p.as_record() for p in held_out]
    train = load_prompt_file(data_cfg.source)
    if data_cfg.eval_source:
        return train, load_prompt_file(data_cfg.eval_source)
    cut = max(1, len(train) // 10)
    return train[cut:], train[:cut]
