"""`k15 eval` and `k15 curate`: the pass@k estimator, the format filters, the aggregation, and both
commands end to end through Ray on a small file."""

import itertools
import json
import random
import subprocess
import sys
from fractions import Fraction
from math import comb

import pyarrow.parquet as pq
import pytest

from k15.atomic import atomic_write, atomic_write_text
from k15.curate import format_issue
from k15.data.arithmetic import generate_problems
from k15.data.dataset import load_prompt_file
from k15.eval_report import accuracy_by_length, difficulty_groups, pass_at_k, summarize


def run_k15(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "k15.cli", *args], capture_output=True, text=True, timeout=timeout)


# -- the estimator -----------------------------------------------------------------------------
def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Share of the k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_matches_enumeration_over_subsets():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 10)
        c, k = rng.randint(0, n), rng.randint(1, n)
        assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_where_binomials_are_huge():
    n, c, k = 5000, 7, 1000  # C(5000, 1000) has over a thousand digits
    exact = 1 - Fraction(comb(n - c, k), comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 6, 5) == 1.0 and pass_at_k(8, 2, 1) == 0.25


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 8)


# -- aggregation -------------------------------------------------------------------------------
def problem(difficulty, correct, lengths=None):
    return {"prompt_id": "p", "difficulty": difficulty, "correct": correct, "lengths": lengths or [10] * len(correct)}


def test_per_difficulty_groups_by_value_or_quantile_bin():
    assert difficulty_groups([2.0, 3.0, 2.0, None]) == ["2", "3", "2", "unknown"]
    labels = difficulty_groups([i / 100 for i in range(100)])  # 100 distinct values: 4 quantile bins
    assert len(set(labels)) == 4 and all(labels.count(lab) == 25 for lab in set(labels))
    assert labels[0].startswith("[0,") and labels[-1].endswith("0.99]")


def test_summarize_breaks_pass_at_k_down_by_difficulty():
    problems = [problem(1.0, [True, True, False, False]), problem(1.0, [False] * 4),
                problem(2.0, [True] * 4, [5, 15, 25, 35]), problem(None, [False, True, False, False])]
    out = summarize(problems, ks=[1, 4])
    groups = {g["difficulty"]: g for g in out["by_difficulty"]}
    assert list(groups) == ["1", "2", "unknown"]
    assert groups["1"]["problems"] == 2 and groups["1"]["pass@1"] == pytest.approx(0.25)
    assert groups["1"]["pass@4"] == pytest.approx(0.5) and groups["2"]["pass@1"] == 1.0
    assert groups["2"]["mean_length"] == 20.0 and groups["unknown"]["pass@1"] == pytest.approx(0.25)
    assert out["pass_at_k"]["pass@1"] == pytest.approx((0.5 + 0 + 1 + 0.25) / 4)
    assert out["samples"] == 16 and out["lengths"]["p50"] == 10.0
    bins = accuracy_by_length(problems, bins=4)
    assert sum(b["count"] for b in bins) == 16
    assert bins[-1]["accuracy"] == 1.0  # only the 35-token sample lands in the last bin


# -- format filters ----------------------------------------------------------------------------
TESTS_OK = json.dumps({"style": "stdio", "tests": [{"input": "1\n", "output": "2\n"}]})


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "Q: 7+3-5=?\nA:", "answer": "5"}, None),
    ({"prompt": "Half of one?", "answer": "\\frac{1}{2}"}, None),
    ({"prompt": "How can we improve 3x=6? Solve for x.", "answer": "2"}, None),  # "improve" is no proof
    ({"prompt": "Which is prime? (A) 4 (B) 6 (C) 7", "answer": "C"}, "multiple_choice"),
    ({"prompt": "2+2=?\nA. 3\nB. 4", "answer": "4"}, "multiple_choice"),
    ({"prompt": "Pick the right one.", "answer": "(B)"}, "multiple_choice"),
    ({"prompt": "True or false: 7 is odd.", "answer": "True"}, "true_false"),
    ({"prompt": "Is 12 even?", "answer": "\\text{Yes}"}, "true_false"),
    ({"prompt": "Prove that there are infinitely many primes.", "answer": "QED"}, "proof"),
    ({"prompt": "Show that sqrt(2) is irrational.", "answer": "irrational"}, "proof"),
    ({"prompt": "What is it?", "answer": "???"}, "unparsable_answer"),
    ({"prompt": "Echo.", "answer": TESTS_OK, "task": "code"}, None),
    ({"prompt": "Echo.", "answer": '{"tests": []}', "task": "code"}, "bad_code_tests"),
    ({"prompt": "Echo.", "answer": "not json", "task": "code"}, "bad_code_tests"),
    ({"prompt": "Translate.", "answer": "bonjour", "task": "french"}, "unknown_task"),
])
def test_format_filters(row, reason):
    assert format_issue({"task": "math", **row}) == reason


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = atomic_write_text(tmp_path / "out.json", "old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


# -- the commands, end to end ------------------------------------------------------------------
@pytest.fixture
def small_file(tmp_path):
    """10 arithmetic problems over two difficulties, one multiple-choice and one proof row."""
    rows = [p.as_record() for p in generate_problems(5, seed=1, min_ops=2, max_ops=2)]
    rows += [p.as_record() for p in generate_problems(5, seed=2, min_ops=4, max_ops=4)]
    for r in rows:
        r.pop("prompt_id")
    rows += [{"prompt": "Pick one: (A) 1 (B) 2", "answer": "A"}, {"prompt": "Prove that 1 < 2.", "answer": "QED"}]
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


FAST = ["rollout.max_response_tokens=24"]


@pytest.mark.slow
def test_k15_eval_writes_results_and_plot(small_file, tmp_path):
    out = tmp_path / "eval"
    proc = run_k15("eval", f"eval.source={small_file}", f"eval.output={out}", "eval.samples=4", "eval.ks=[1,2,8]", *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "untrained default model" in proc.stderr and "pass@1" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["problems"] == 12 and results["samples"] == 48 and list(results["pass_at_k"]) == ["pass@1", "pass@2"]
    assert [g["difficulty"] for g in results["by_difficulty"]] == ["2", "4", "unknown"]
    assert sum(g["problems"] for g in results["by_difficulty"]) == 12
    assert sum(b["count"] for b in results["accuracy_by_length"]) == 48
    assert sum(results["finish_reasons"].values()) == 48
    assert all(p["n"] == 4 and 0 <= p["correct"] <= 4 for p in results["per_problem"])
    assert (out / "accuracy_vs_length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_k15_curate_writes_curated_and_dropped_rows(small_file, tmp_path):
    output = tmp_path / "out" / "cur.parquet"
    proc = run_k15("curate", f"curate.source={small_file}", f"curate.output={output}", "curate.samples=3",
                   "curate.no_cot_attempts=2", *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "k15 curate" in proc.stdout and "dropped: proof" in proc.stdout
    kept = pq.read_table(output).to_pylist()
    dropped = [json.loads(line) for line in (tmp_path / "out" / "cur.dropped.jsonl").read_text().splitlines()]
    assert len(kept) + len(dropped) == 12
    reasons = {d["source_prompt_id"]: d["reason"] for d in dropped}
    assert reasons["small-10"] == "multiple_choice" and reasons["small-11"] == "proof"
    assert set(reasons.values()) <= {"multiple_choice", "proof", "easy_to_hack"}
    for row in kept:
        assert row["difficulty"] == pytest.approx(1 - row["pass_rate"]) and row["pass_rate"] * 3 in (0, 1, 2, 3)
    assert len({r["source_prompt_id"] for r in kept} | set(reasons)) == 12
    if kept:  # the training loader reads it back
        assert [r["difficulty"] for r in load_prompt_file(output)] == [r["difficulty"] for r in kept]


@pytest.mark.parametrize("command", ["eval", "curate"])
def test_bad_input_file_is_one_error_line(tmp_path, command):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1=?", "answer": "2"}) + "\n"
                   + json.dumps({"prompt": "2+2=?", "answer": "4"}) + "\n{not json\n")
    proc = run_k15(command, f"{command}.source={bad}")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("k15: error:") and f"{bad}, row 3" in lines[0]


@pytest.mark.parametrize("args, needle", [(["eval", "model.path=/does/not/exist"], "/does/not/exist"),
                                          (["curate", "curate.samples=0"], "curate.samples"),
                                          (["eval", "eval.bogus=1"], "bogus")])
def test_bad_config_is_one_error_line(args, needle):
    proc = run_k15(*args)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and needle in lines[0], proc.stderr
