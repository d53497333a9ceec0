"""The reward pool (Ray actors) and the reward service (Ray Serve over HTTP)."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pytest
import ray

from k15.models.tokenizer import SHIPPED_DIR, load_tokenizer
from k15.reward.pool import RewardPool, reason_counts, reasons_of, score_table
from k15.reward.sandbox import bwrap_path
from k15.reward.verifiers import Scorer
from k15.schema import segments_to_table

needs_bwrap = pytest.mark.skipif(
    bwrap_path() is None, reason="bubblewrap (bwrap) is not installed: apt-get install bubblewrap"
)
LIMITS = {"cpu_s": 1, "wall_s": 1.5, "memory_mb": 256, "processes": 8, "file_mb": 4, "output_kb": 64}
ADD = json.dumps({"tests": [{"input": "2 3\n", "output": "5\n"}, {"input": "-1 1\n", "output": "0\n"}], "limits": LIMITS})
GOOD_CODE = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def ray_session():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def make_table(tok, rows, prefix="p"):
    out = []
    for i, r in enumerate(rows):
        ids = tok.encode(r["response"])
        out.append(dict(sample_id=f"{prefix}{i}#0", prompt_id=f"{prefix}{i}", sample_idx=0, task=r["task"], answer=r["answer"],
                        prompt_tokens=[1], response_tokens=ids, logprobs=[0.0] * len(ids), versions=[0] * len(ids),
                        finished=r.get("finished", True), finish_reason=r.get("finish_reason", "eos"),
                        length=len(ids), num_segments=1))
    return segments_to_table(out)


ROWS = [
    {"task": "math", "response": " 2+3=5. The answer is \\boxed{5}.", "answer": "5"},
    {"task": "math", "response": " \\boxed{6}.", "answer": "5"},
    {"task": "math", "response": " \\boxed{\\frac{1}{2}}", "answer": "0.5"},
    {"task": "math", "response": " 2+3=", "answer": "5", "finished": False, "finish_reason": "budget"},
    {"task": "math", "response": " 5 5 5 5", "answer": "5", "finish_reason": "repeat"},
    {"task": "math", "response": " no idea", "answer": "5"},
]
EXPECTED = ([1.0, 0.0, 1.0, None, -0.5, 0.0], ["correct", "wrong", "correct", None, "repeat", "no_answer"])


def test_score_table_without_ray(tok):
    scorer = Scorer()
    try:
        out = score_table(make_table(tok, ROWS), lambda t: tok.decode(t, skip_special_tokens=True), 0.5, scorer)
    finally:
        scorer.close()
    assert (out["reward"].to_pylist(), reasons_of(out)) == EXPECTED
    assert reason_counts(out) == {"correct": 2, "wrong": 1, "repeat": 1, "no_answer": 1}


def test_unknown_task_is_a_clear_error(tok):
    table = make_table(tok, [{"task": "chess", "response": "e4", "answer": "e4"}])
    with pytest.raises(ValueError, match="no verifier for task 'chess'"):
        score_table(table, lambda t: "e4")


def test_pool_scores_in_order_across_actors(tok, ray_session):
    pool = RewardPool(2, str(SHIPPED_DIR), repeat_penalty=0.5)
    table = make_table(tok, ROWS * 3)
    out = ray.get(pool.score(ray.put(table)))
    assert out["sample_id"].to_pylist() == table["sample_id"].to_pylist()
    assert out["reward"].to_pylist() == EXPECTED[0] * 3
    assert reasons_of(out) == EXPECTED[1] * 3
    assert ray.get(pool.score(table.slice(0, 0))).num_rows == 0


@needs_bwrap
def test_pool_scores_code_rows_and_keeps_a_deadline(tok, ray_session):
    config = {"code_concurrency": 2, "sandbox": {"prestart": 1, "limits": LIMITS}}
    pool = RewardPool(1, str(SHIPPED_DIR), config=config, timeout_s=60)
    rows = [{"task": "code", "response": GOOD_CODE, "answer": ADD},
            {"task": "code", "response": "```python\nprint(5)\n```", "answer": ADD},
            {"task": "code", "response": "no code", "answer": ADD},
            {"task": "math", "response": "\\boxed{4}", "answer": "4"}]
    out = ray.get(pool.score(make_table(tok, rows)))
    assert out["reward"].to_pylist() == [1.0, 0.0, 0.0, 1.0]
    assert reasons_of(out) == ["correct", "wrong_answer", "no_code", "correct"]
    # a call that misses the pool's deadline scores 0 with the reason, and the pool carries on
    slow = make_table(tok, [{"task": "code", "response": "```python\nimport time\ntime.sleep(1.2)\nprint(5)\n```",
                             "answer": ADD}])
    late = ray.get(pool.score(slow, timeout_s=0.3))
    assert late["reward"].to_pylist() == [0.0] and reasons_of(late) == ["reward_timeout"]
    again = ray.get(pool.score(make_table(tok, rows[:1])))
    assert again["reward"].to_pylist() == [1.0], reasons_of(again)


def test_pool_rejects_bad_config_naming_the_option(ray_session):
    with pytest.raises(ValueError, match="bogus"):
        RewardPool(1, str(SHIPPED_DIR), config={"sandbox": {"bogus": 1}})
    with pytest.raises(ValueError, match="code_concurrency"):
        RewardPool(1, str(SHIPPED_DIR), config={"code_concurrency": 0})
    with pytest.raises(ValueError, match="num_actors"):
        RewardPool(0, str(SHIPPED_DIR))


# -- Ray Serve -------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(ray_session):
    from ray import serve

    from k15.reward import serve as reward_serve

    port = _free_port()
    handle = reward_serve.start({"sandbox": {"prestart": 1, "limits": LIMITS}}, port=port,
                                max_ongoing_requests=64, max_replicas=2)
    yield f"http://127.0.0.1:{port}/reward", handle
    serve.shutdown()


def _post(url, body: bytes):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_service_over_http(service):
    url, _ = service
    assert _post(url, json.dumps({"task": "math", "response": "\\boxed{3}", "answer": "3"}).encode()) == (
        200, {"results": [{"reward": 1.0, "reason": "correct"}]})
    items = [{"task": "math", "response": "\\boxed{\\frac{1}{2}}", "answer": "0.5"},
             {"task": "math", "response": "nothing", "answer": "2"}]
    if bwrap_path() is not None:
        items.append({"task": "code", "response": GOOD_CODE, "answer": ADD})
    status, body = _post(url, json.dumps({"items": items}).encode())
    assert status == 200
    assert [r["reason"] for r in body["results"]] == ["correct", "no_answer", "correct"][: len(items)]


@pytest.mark.parametrize("body, field", [
    (b"{not json", "Expecting"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"items": []}).encode(), "'items'"),
    (json.dumps({"items": [{"task": "math", "response": 3, "answer": "3"}]}).encode(), "items[0].response"),
    (json.dumps({"task": "math", "response": "x"}).encode(), "'answer'"),
    (json.dumps({"task": "chess", "response": "x", "answer": "y"}).encode(), "no verifier for task"),
    (json.dumps({"task": "code", "response": "x", "answer": "{}"}).encode(), "tests"),
])
def test_service_rejects_malformed_requests_naming_the_field(service, body, field):
    url, _ = service
    status, payload = _post(url, body)
    assert status == 400 and field in payload["error"], payload


def test_service_handle_and_concurrent_load(service):
    url, handle = service
    assert handle.score.remote([("math", "\\boxed{4}", "4")]).result() == [{"reward": 1.0, "reason": "correct"}]
    body = json.dumps({"task": "math", "response": "The answer is \\boxed{7}.", "answer": "7"}).encode()
    with ThreadPoolExecutor(32) as ex:
        results = list(ex.map(lambda _: _post(url, body), range(64)))
    assert all(r == (200, {"results": [{"reward": 1.0, "reason": "correct"}]}) for r in results)


def test_reward_config_from_a_run_config():
    from omegaconf import OmegaConf

    from k15.reward.verifiers import RewardConfig

    cfg = OmegaConf.create({"math_timeout_s": 2.0, "code_concurrency": 3,
                            "sandbox": {"prestart": 1, "limits": {"cpu_s": 1, "memory_mb": 128}}})
    rc = RewardConfig.from_dict(cfg)
    assert (rc.math_timeout_s, rc.code_concurrency, rc.sandbox.prestart) == (2.0, 3, 1)
    assert (rc.sandbox.limits.cpu_s, rc.sandbox.limits.memory_mb, rc.sandbox.limits.wall_s) == (1, 128, 4.0)
    with pytest.raises(ValueError, match="reward.sandbox"):
        RewardConfig.from_dict({"sandbox": {"limts": {}}})
    with pytest.raises(ValueError, match="memory_mb"):
        RewardConfig.from_dict({"sandbox": {"limits": {"memory_mb": 0}}})


def test_reasons_follow_rows_through_slicing_and_concatenation(tok):
    scorer = Scorer()
    try:
        out = score_table(make_table(tok, ROWS), lambda t: tok.decode(t, skip_special_tokens=True), 0.5, scorer)
    finally:
        scorer.close()
    other = make_table(tok, ROWS[:2], prefix="q")
    mixed = pa.concat_tables([out.slice(1, 2), other])
    assert reasons_of(mixed) == ["wrong", "correct", None, None]
    assert reasons_of(out.take([4, 0])) == ["repeat", "correct"]
