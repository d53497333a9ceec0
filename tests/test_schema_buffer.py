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


def test_buffer_writes_are_idempotent_per_segment_and_requeue_is_once(ray_local):
    buf = ReplayBuffer.remote(2)
    part = segments_to_table(rows("c", 2, finished=False))
    ray.get(buf.add.remote(part))
    ray.get(buf.add.remote(part))  # the same segments again (a retried write): dropped
    taken = ray.get(buf.take_unfinished.remote())
    assert taken.num_rows == 2
    assert ray.get(buf.stats.remote())["duplicates"] == 2
    # the actor continuing them died: they come back once, however often the controller says so
    assert ray.get(buf.requeue.remote(taken)) == 2
    assert ray.get(buf.requeue.remote(taken)) == 0
    again = ray.get(buf.take_unfinished.remote())
    assert sorted(again["sample_id"].to_pylist()) == sorted(taken["sample_id"].to_pylist())
    # once a sample has finished, neither a stale segment of it nor a requeue brings it back
    ray.get(buf.add.remote(segments_to_table(rows("c", 2))))
    ray.get(buf.add.remote(part))
    assert ray.get(buf.requeue.remote(part)) == 0
    assert ray.get(buf.take_unfinished.remote()).num_rows == 0
    assert ray.get(buf.num_ready_groups.remote()) == 1


def test_buffer_snapshot_round_trips_through_a_checkpoint(ray_local, tmp_path):
    from k15.checkpoint import read_buffer, write_buffer

    buf = ReplayBuffer.remote(4)
    ray.get(buf.add.remote(segments_to_table(rows("ready", 4))))
    ray.get(buf.add.remote(segments_to_table(rows("partial", 4)[:2])))
    ray.get(buf.add.remote(segments_to_table(rows("open", 3, finished=False))))
    snap = ray.get(buf.snapshot.remote())
    write_buffer(tmp_path, snap)
    restored = ReplayBuffer.remote(4)
    ray.get(restored.restore.remote({**read_buffer(tmp_path), "counts": snap["counts"]}))
    assert ray.get(restored.stats.remote()) == ray.get(buf.stats.remote())
    ray.get(restored.add.remote(segments_to_table(rows("partial", 4)[:2])))  # already written before the save
    assert ray.get(restored.num_ready_groups.remote()) == 1
    ray.get(restored.add.remote(segments_to_table(rows("partial", 4)[2:])))
    groups = ray.get(restored.take_groups.remote(2, timeout_s=10))
    assert groups["prompt_id"].to_pylist() == ["ready"] * 4 + ["partial"] * 4
    assert ray.get(restored.take_unfinished.remote()).num_rows == 3
