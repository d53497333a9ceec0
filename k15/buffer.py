"""The replay buffer actor: scored segments arrive as Arrow tables; whole groups leave for training.

A finished sample waits until all k samples of its prompt have finished (the mirror-descent
baseline needs the whole group); an unfinished sample (a partial-rollout segment) waits to be
resumed by a rollout actor in a later iteration. Tables travel through the Ray object store
without copies.

Writes are idempotent: a segment's id is (sample_id, num_segments), and a segment already written
(or a sample already finished) is counted as a duplicate and dropped, so a retried or re-queued
write never adds a segment twice. `snapshot` / `restore` carry the whole state through a checkpoint.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque

import pyarrow as pa
import pyarrow.compute as pc
import ray

from k15.schema import empty_table, segment_ids, validate


@ray.remote(num_cpus=0)
class ReplayBuffer:
    def __init__(self, group_size: int):
        self.group_size = group_size
        self._partial_groups: dict[str, list[pa.Table]] = defaultdict(list)  # prompt_id -> finished rows
        self._ready: deque[pa.Table] = deque()  # complete groups of k, in completion order
        self._unfinished: list[pa.Table] = []
        self._seen: set[str] = set()  # ids of the segments written (sample ids once finished)
        self._changed = asyncio.Condition()
        self.counts = {"added_rows": 0, "duplicates": 0, "groups_completed": 0, "groups_taken": 0, "requeued": 0}

    async def add(self, table: pa.Table) -> dict:
        table = validate(table)
        finished_mask = table["finished"]
        finished = table.filter(finished_mask)
        unfinished = self._new_segments(table.filter(pc.invert(finished_mask)))
        if unfinished.num_rows:
            self._unfinished.append(unfinished)
        new_groups = 0
        for prompt_id in pc.unique(finished["prompt_id"]).to_pylist():
            rows = finished.filter(pc.equal(finished["prompt_id"], prompt_id))
            fresh = [i for i, sid in enumerate(rows["sample_id"].to_pylist()) if sid not in self._seen]
            self.counts["duplicates"] += rows.num_rows - len(fresh)
            if not fresh:
                continue
            rows = rows.take(fresh)
            self._seen.update(rows["sample_id"].to_pylist())
            self._partial_groups[prompt_id].append(rows)
            group = pa.concat_tables(self._partial_groups[prompt_id])
            if group.num_rows >= self.group_size:
                del self._partial_groups[prompt_id]
                self._ready.append(group.sort_by("sample_idx"))
                new_groups += 1
        self.counts["added_rows"] += table.num_rows
        self.counts["groups_completed"] += new_groups
        async with self._changed:
            self._changed.notify_all()
        return {"rows": table.num_rows, "finished": finished.num_rows, "unfinished": unfinished.num_rows,
                "groups_completed": new_groups}

    def _new_segments(self, table: pa.Table) -> pa.Table:
        """The unfinished rows not written before (and not of a sample that finished since)."""
        ids = segment_ids(table)
        keep = [i for i, (seg, sid) in enumerate(zip(ids, table["sample_id"].to_pylist()))
                if seg not in self._seen and sid not in self._seen]
        self.counts["duplicates"] += table.num_rows - len(keep)
        self._seen.update(ids[i] for i in keep)
        return table.take(pa.array(keep, pa.int64()))

    def requeue(self, table: pa.Table) -> int:
        """Segments a rollout actor held when it died go back to wait for the next wave. Only
        rows not already waiting and of samples not finished are taken: re-queued exactly once."""
        table = validate(table)
        waiting = {s for t in self._unfinished for s in t["sample_id"].to_pylist()}
        keep = [i for i, sid in enumerate(table["sample_id"].to_pylist()) if sid not in waiting and sid not in self._seen]
        if keep:
            self._unfinished.append(table.take(keep))
        self.counts["requeued"] += len(keep)
        return len(keep)

    def num_ready_groups(self) -> int:
        return len(self._ready)

    async def take_groups(self, n: int, timeout_s: float | None = None) -> pa.Table:
        """Wait until n complete groups are ready, then hand them over (rows of a group adjacent)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(self._ready) >= n), timeout_s)
        groups = [self._ready.popleft() for _ in range(n)]
        self.counts["groups_taken"] += n
        return pa.concat_tables(groups)

    def take_unfinished(self) -> pa.Table:
        """Hand every waiting segment to a rollout actor to resume, in sample-id order (not arrival
        order, which changes from run to run)."""
        table = pa.concat_tables(self._unfinished).sort_by("sample_id") if self._unfinished else empty_table()
        self._unfinished = []
        return table

    def stats(self) -> dict:
        return {**self.counts, "ready_groups": len(self._ready),
                "unfinished_segments": sum(t.num_rows for t in self._unfinished),
                "partial_groups": len(self._partial_groups)}

    # -- checkpoints ------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """The whole state as Arrow tables and plain values (k15.checkpoint writes it as Parquet)."""
        partial = [t for ts in self._partial_groups.values() for t in ts]
        return {"ready": pa.concat_tables(self._ready) if self._ready else empty_table(),
                "partial": pa.concat_tables(partial) if partial else empty_table(),
                "unfinished": pa.concat_tables(self._unfinished) if self._unfinished else empty_table(),
                "seen": pa.table({"id": pa.array(sorted(self._seen), pa.string())}),
                "counts": dict(self.counts)}

    def restore(self, state: dict) -> None:
        ready = validate(state["ready"])
        self._ready = deque(ready.slice(i, self.group_size) for i in range(0, ready.num_rows, self.group_size))
        partial = validate(state["partial"])
        self._partial_groups = defaultdict(list)
        for prompt_id in pc.unique(partial["prompt_id"]).to_pylist():
            self._partial_groups[prompt_id].append(partial.filter(pc.equal(partial["prompt_id"], prompt_id)))
        unfinished = validate(state["unfinished"])
        self._unfinished = [unfinished] if unfinished.num_rows else []
        self._seen = set(state["seen"]["id"].to_pylist())
        self.counts = {**self.counts, **state["counts"]}
