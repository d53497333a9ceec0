"""The one Arrow schema of a trajectory segment, shared by rollout, reward, buffer and trainer.

A row is one sample (prompt_id, sample_idx) as far as it has been generated. An unfinished row is
a *segment* of a partial rollout (paper 2.6.2): it goes back to a rollout actor in a later
iteration and continues from prompt_tokens + response_tokens. `versions` holds the policy version
that generated each response token, so every token range knows its policy.
"""

from __future__ import annotations

from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc

SEGMENT_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),  # "<prompt_id>#<sample_idx>", unique per run
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("sample_idx", pa.int32(), nullable=False),
        pa.field("task", pa.string(), nullable=False),  # which verifier scores it ("math", ...)
        pa.field("answer", pa.string(), nullable=False),  # reference answer for the verifier
        pa.field("difficulty", pa.float32()),  # optional label, null when unknown
        pa.field("prompt_tokens", pa.list_(pa.int32()), nullable=False),
        pa.field("response_tokens", pa.list_(pa.int32()), nullable=False),
        pa.field("logprobs", pa.list_(pa.float32()), nullable=False),  # behaviour-policy log-probs
        pa.field("versions", pa.list_(pa.int32()), nullable=False),  # policy version per token
        pa.field("finished", pa.bool_(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),  # eos | length | repeat | budget
        pa.field("reward", pa.float32()),  # null until scored
        pa.field("length", pa.int32(), nullable=False),  # len(response_tokens)
        pa.field("num_segments", pa.int32(), nullable=False),  # rollout calls that wrote it
    ]
)

FINISH_REASONS = ("eos", "length", "repeat", "budget")


class SchemaError(ValueError):
    """A table or row does not match SEGMENT_SCHEMA; the message names the field."""


def make_sample_id(prompt_id: str, sample_idx: int) -> str:
    return f"{prompt_id}#{sample_idx}"


def segment_ids(table: pa.Table) -> list[str]:
    """A segment's id: "<sample_id>/<num_segments>", unique per run (each rollout call that writes a
    sample increments num_segments), so the buffer can drop a segment written twice."""
    return [f"{s}/{n}" for s, n in zip(table["sample_id"].to_pylist(), table["num_segments"].to_pylist())]


def segments_to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Build a validated table from row dicts (missing optional fields become null)."""
    rows = list(rows)
    columns = {}
    for field in SEGMENT_SCHEMA:
        values = [row.get(field.name) for row in rows]
        if not field.nullable:
            for i, v in enumerate(values):
                if v is None:
                    raise SchemaError(f"segment row {i}: field '{field.name}' is missing")
        try:
            columns[field.name] = pa.array(values, type=field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
            raise SchemaError(f"segment field '{field.name}': {e}") from None
    table = pa.Table.from_pydict(columns, schema=SEGMENT_SCHEMA)
    validate(table)
    return table


def empty_table() -> pa.Table:
    return SEGMENT_SCHEMA.empty_table()


def validate(table: pa.Table) -> pa.Table:
    """Check a table at a hand-off: same fields and types, per-token lists aligned."""
    if not isinstance(table, pa.Table):
        raise SchemaError(f"expected a pyarrow.Table of segments, got {type(table).__name__}")
    for field in SEGMENT_SCHEMA:
        if field.name not in table.column_names:
            raise SchemaError(f"segment table lacks field '{field.name}'")
        actual = table.schema.field(field.name).type
        if actual != field.type:
            raise SchemaError(f"segment field '{field.name}' has type {actual}, expected {field.type}")
    extra = set(table.column_names) - set(SEGMENT_SCHEMA.names)
    if extra:
        raise SchemaError(f"segment table has unknown fields {sorted(extra)}")
    n_resp = pc.list_value_length(table["response_tokens"])
    for name in ("logprobs", "versions"):
        n = pc.list_value_length(table[name])
        if not pc.all(pc.equal(n, n_resp)).as_py() and table.num_rows:
            bad = pc.index(pc.equal(n, n_resp), False).as_py()
            raise SchemaError(f"segment row {bad}: '{name}' and 'response_tokens' differ in length")
    if table.num_rows and not pc.all(pc.equal(table["length"], n_resp.cast(pa.int32()))).as_py():
        raise SchemaError("segment field 'length' does not match len(response_tokens)")
    return table.select(SEGMENT_SCHEMA.names)
