"""The replay buffer actor: scored segments arrive as Arrow tables; whole groups leave for training.

A finished sample waits until all k samples of its prompt have finished (the mirror-descent
baseline needs the whole group); an unfinished sample (a partial-rollout segment) waits to be
resumed by a rollout actor in a later iteration. Tables travel through the Ray object store
without copies.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque

import pyarrow as pa
import pyarrow.compute as pc
import ray

from k15.schema import empty_table, validate


@ray.remote(num_cpus=0)
class ReplayBuffer:
    def __init__(self, group_size: int):
        self.group_size = group_size
        self._partial_groups: dict[str, list[pa.Table]] = defaultdict(list)  # prompt_id -> finished rows
        self._ready: deque[pa.Table] = deque()  # complete groups of k, in completion order
        self._unfinished: list[pa.Table] = []
        self._seen: set[str] = set()  # finished sample ids: a retried write adds nothing twice
        self._changed = asyncio.Condition()
        self.counts = {"added_rows": 0, "duplicates": 0, "groups_completed": 0, "groups_taken": 0}

    async def add(self, table: pa.Table) -> dict:
        table = validate(table)
        finished_mask = table["finished"]
        finished = table.filter(finished_mask)
        unfinished = table.filter(pc.invert(finished_mask))
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
        """Hand every waiting segment to a rollout actor to resume."""
        table = pa.concat_tables(self._unfinished) if self._unfinished else empty_table()
        self._unfinished = []
        return table

    def stats(self) -> dict:
        return {**self.counts, "ready_groups": len(self._ready),
                "unfinished_segments": sum(t.num_rows for t in self._unfinished),
                "partial_groups": len(self._partial_groups)}
