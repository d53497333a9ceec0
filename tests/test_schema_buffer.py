"""Segment schema round trip and the replay buffer's grouping, through a real Ray actor."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from k15.buffer import ReplayBuffer
from k15.evaluate import fresh_rows
from k15.schema import SchemaError, segments_to_table, validate


def rows(prompt_id, k, finished=True, reward=1.0):
    out = fresh_rows([{"prompt_id": prompt_id, "task": "math", "answer": "3", "difficulty": 2.0}], [[5, 6, 7]], k)
    for j, r in enumerate(out):
        r.update(response_tokens=[1, 2, j], logprobs=[-0.1, -0.2, -0.3], versions=[0, 0, 1], finished=finished,
                 finish_reason="eos" if finished else "budget", reward=reward if finished else None, length=3,
                 num_segments=1)
    return out


def test_schema_round_trip_through_parquet(tmp_path):
    table = segments_to_table(rows("p", 3))
    pq.write_table(table, tmp_path / "s.parquet")
    back = validate(pq.read_table(tmp_path / "s.parquet"))
    assert back.equals(table)
    assert back["versions"].to_pylist()[2] == [0, 0, 1]


def test_schema_names_the_bad_field():
    bad = rows("p", 1)
    bad[0]["logprobs"] = [-0.1]
    with pytest.raises(SchemaError, match="logprobs"):
        segments_to_table(bad)
    missing = rows("p", 1)
    missing[0]["prompt_id"] = None
    with pytest.raises(SchemaError, match="prompt_id"):
        segments_to_table(missing)


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def test_buffer_releases_whole_groups_and_keeps_segments(ray_local):
    buf = ReplayBuffer.remote(4)
    ray.get(buf.add.remote(segments_to_table(rows("a", 4)[:3])))  # 3 of 4 finished so far
    ray.get(buf.add.remote(segments_to_table(rows("b", 2, finished=False))))
    assert ray.get(buf.num_ready_groups.remote()) == 0
    ray.get(buf.add.remote(segments_to_table(rows("a", 4)[3:])))
    ray.get(buf.add.remote(segments_to_table(rows("a", 4)[3:])))  # a retried write: no duplicate
    group = ray.get(buf.take_groups.remote(1, timeout_s=10))
    assert group["sample_idx"].to_pylist() == [0, 1, 2, 3]
    assert set(group["prompt_id"].to_pylist()) == {"a"}
    unfinished = ray.get(buf.take_unfinished.remote())
    assert unfinished.num_rows == 2 and not any(unfinished["finished"].to_pylist())
    stats = ray.get(buf.stats.remote())
    assert stats["duplicates"] == 1 and stats["unfinished_segments"] == 0
