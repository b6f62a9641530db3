"""The rollout Parquet: one row per generated sample, the contract between rollout, train and eval.

Layout on disk: `rollouts/iter_N/part-K.parquet`, one part per rollout worker or batch, each
written atomically (temporary name, then rename), so a reader never sees half a part and a
crashed writer leaves nothing that looks finished.

Columns (DESIGN.md; names and types are the contract, extra columns may be added freely):

    prompt_id         string
    sample_index      int32              index of the sample within its prompt's group
    iteration         int32
    prompt_tokens     list<int32>
    response_tokens   list<int32>
    response          string
    rollout_logprobs  list<float32>      one per response token, under the sampling policy
    routed_experts    list<list<list<int16>>>, nullable   [T, moe_layers, topk] with
                      T = len(prompt_tokens) + len(response_tokens) - 1; null for dense models
    reward            float32
    status            string             completed | truncated | aborted
    weight_version    int32
    metadata          string             a JSON object

API: `write_rollouts(rows, url)` and `read_rollouts(url)`; `rollout_part_url(root, n, k)` names a
part. Rows are dicts; token lists may be Python lists, numpy arrays or torch tensors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from miles_core.errors import MilesError
from miles_core.io import atomic_write, filesystem, join

__all__ = [
    "ROLLOUT_SCHEMA",
    "STATUSES",
    "read_rollouts",
    "rollout_part_url",
    "rollouts_table",
    "validate_rollouts",
    "write_rollouts",
]

STATUSES = ("completed", "truncated", "aborted")
EXPERT_TYPES = (pa.int16(), pa.uint8())
ROLLOUT_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("iteration", pa.int32(), nullable=False),
        pa.field("prompt_tokens", pa.list_(pa.int32()), nullable=False),
        pa.field("response_tokens", pa.list_(pa.int32()), nullable=False),
        pa.field("response", pa.string(), nullable=False),
        pa.field("rollout_logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("routed_experts", pa.list_(pa.list_(pa.list_(pa.int16()))), nullable=True),
        pa.field("reward", pa.float32(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("weight_version", pa.int32(), nullable=False),
        pa.field("metadata", pa.string(), nullable=False),
    ]
)
_DEFAULTS = {"routed_experts": None, "metadata": "{}"}
_PART = re.compile(r"iter_(\d+)/part-(\d+)\.parquet$")


def rollout_part_url(root: str, iteration: int, part: int) -> str:
    """`root/iter_N/part-K.parquet`: where rollout worker K writes iteration N."""
    return join(root, f"iter_{iteration}", f"part-{part}.parquet")


def write_rollouts(rows: Sequence[dict[str, Any]] | pa.Table, url: str) -> int:
    """Validate `rows` and write them as one Parquet part at `url`, atomically. Returns the row count."""
    table = rows if isinstance(rows, pa.Table) else rollouts_table(rows)
    validate_rollouts(table, where=url)
    with atomic_write(url) as f:
        pq.write_table(table, f)
    return table.num_rows


def read_rollouts(url: str) -> pa.Table:
    """Read one part file, or every `part-*.parquet` under a folder (an `iter_N/` or the root).

    Parts are ordered by iteration then part number; hidden temporaries are ignored. Each part
    is validated, and `routed_experts` is returned as int16 whatever a part stored.
    """
    fs, path = filesystem(url)
    if not fs.exists(path):
        raise MilesError(f"rollouts {url} do not exist")
    if fs.isdir(path):
        parts = [p for p in fs.glob(path.rstrip("/") + "/**/part-*.parquet") if "/." not in p]
        if not parts:
            raise MilesError(f"no part-*.parquet files under {url}")
        parts.sort(key=_part_key)
    else:
        parts = [path]
    tables = [_read_part(fs, p) for p in parts]
    return pa.concat_tables(tables, promote_options="default")


def _part_key(path: str) -> tuple:
    m = _PART.search(path)
    return (0, int(m.group(1)), int(m.group(2)), path) if m else (1, 0, 0, path)


def _read_part(fs, path: str) -> pa.Table:
    where = fs.unstrip_protocol(path)
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
    except Exception as e:
        raise MilesError(f"{where} is not a readable Parquet file: {e}") from e
    validate_rollouts(table, where=where)
    i = table.schema.get_field_index("routed_experts")
    return table.set_column(i, ROLLOUT_SCHEMA.field("routed_experts"), table.column(i).cast(_EXPERTS16))


_EXPERTS16 = ROLLOUT_SCHEMA.field("routed_experts").type


def validate_rollouts(table: pa.Table, where: str = "rollouts") -> None:
    """Raise a `MilesError` unless `table` follows the rollout contract (columns, types, values)."""
    for field in ROLLOUT_SCHEMA:
        if field.name not in table.column_names:
            raise MilesError(f"{where}: missing rollout column {field.name!r}")
        got = table.schema.field(field.name).type
        if not _type_ok(field, got):
            raise MilesError(f"{where}: column {field.name!r} has type {got}, expected {field.type}")
        if not field.nullable and table.column(field.name).null_count:
            raise MilesError(f"{where}: column {field.name!r} has nulls")
    bad = set(pc.unique(table.column("status")).to_pylist()) - set(STATUSES)
    if bad:
        raise MilesError(f"{where}: unknown status value(s) {sorted(bad)}; expected one of {STATUSES}")
    n_resp = pc.list_value_length(table.column("response_tokens"))
    _check_rows(
        pc.not_equal(pc.list_value_length(table.column("rollout_logprobs")), n_resp),
        where,
        "rollout_logprobs must have one value per response token",
    )
    expected = pc.subtract(pc.add(pc.list_value_length(table.column("prompt_tokens")), n_resp), 1)
    _check_rows(
        pc.not_equal(pc.list_value_length(table.column("routed_experts")), expected),
        where,
        "routed_experts must cover len(prompt_tokens) + len(response_tokens) - 1 positions",
    )


def _type_ok(field: pa.Field, got: pa.DataType) -> bool:
    if field.name != "routed_experts":
        return got == field.type
    return any(got == pa.list_(pa.list_(pa.list_(t))) for t in EXPERT_TYPES)


def _check_rows(mask: pa.ChunkedArray, where: str, message: str) -> None:
    """Raise naming the first row where `mask` is true (nulls, e.g. dense routed_experts, pass)."""
    bad = pc.fill_null(mask, False)
    if pc.any(bad).as_py():
        row = pc.index(bad, True).as_py()
        raise MilesError(f"{where}: row {row}: {message}")


def rollouts_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Build the rollout table from row dicts; keys beyond the contract become extra columns."""
    if not rows:
        return ROLLOUT_SCHEMA.empty_table()
    fields, arrays = list(ROLLOUT_SCHEMA), []
    for field in ROLLOUT_SCHEMA:
        arrays.append(_column(field, [_get(row, field.name, i) for i, row in enumerate(rows)]))
    for key in sorted({k for row in rows for k in row} - set(ROLLOUT_SCHEMA.names)):
        arrays.append(pa.array([row.get(key) for row in rows]))
        fields.append(pa.field(key, arrays[-1].type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _get(row: dict[str, Any], name: str, i: int) -> Any:
    if name in row:
        return row[name]
    if name in _DEFAULTS:
        return _DEFAULTS[name]
    raise MilesError(f"rollout row {i} has no {name!r}")


def _column(field: pa.Field, values: list[Any]) -> pa.Array:
    if field.name == "routed_experts":
        return _experts_array(values)
    if field.name == "metadata":
        values = [_metadata_json(v, i) for i, v in enumerate(values)]
    if pa.types.is_list(field.type):
        return _list_array([_numpy(v, field.type.value_type.to_pandas_dtype()) for v in values], field.type)
    try:
        return pa.array(values, type=field.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as e:
        raise MilesError(f"rollout column {field.name!r}: {e}") from e


def _numpy(value: Any, dtype: Any) -> np.ndarray:
    """Lists, numpy arrays and torch tensors alike (torch is not imported here)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def _list_array(seqs: list[np.ndarray], type_: pa.ListType) -> pa.Array:
    """A list array from one flat buffer and offsets: no per-element Python objects."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int32, count=len(seqs))
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
    flat = np.concatenate(seqs) if seqs else np.array([])
    values = pa.array(flat.astype(type_.value_type.to_pandas_dtype(), copy=False), type=type_.value_type)
    return pa.ListArray.from_arrays(pa.array(offsets), values, type=type_)


def _experts_array(values: list[Any]) -> pa.Array:
    """[T, L, K] int arrays (or None) per row -> list<list<list<int16>>> via nested offsets."""
    arrays = [None if v is None else _expert_ids(v, i) for i, v in enumerate(values)]
    present = [a for a in arrays if a is not None]
    flat = np.concatenate([a.reshape(-1) for a in present]) if present else np.zeros(0, np.int16)
    k_len = np.concatenate([np.full(a.shape[0] * a.shape[1], a.shape[2]) for a in present] or [np.zeros(0)])
    l_len = np.concatenate([np.full(a.shape[0], a.shape[1]) for a in present] or [np.zeros(0)])
    t_len = np.array([0 if a is None else a.shape[0] for a in arrays])
    inner = pa.ListArray.from_arrays(_offsets(k_len), pa.array(flat, type=pa.int16()))
    middle = pa.ListArray.from_arrays(_offsets(l_len), inner)
    mask = pa.array([a is None for a in arrays])
    return pa.ListArray.from_arrays(_offsets(t_len), middle, mask=mask)


def _expert_ids(value: Any, i: int) -> np.ndarray:
    """One row's expert ids as int16 [T, L, K], refusing ids that int16 cannot hold."""
    a = _numpy(value, None)
    if a.ndim != 3:
        raise MilesError(f"rollout row {i}: routed_experts must be [tokens, moe_layers, topk], got {a.shape}")
    if a.size and (a.min() < 0 or a.max() > np.iinfo(np.int16).max):
        raise MilesError(f"rollout row {i}: routed_experts ids must be in [0, 32767]")
    return a.astype(np.int16)


def _offsets(lengths: np.ndarray) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))


def _metadata_json(value: Any, i: int) -> str:
    if value is None:
        return "{}"
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            raise MilesError(f"rollout row {i}: metadata is not valid JSON ({e.msg})") from None
        if not isinstance(parsed, dict):
            raise MilesError(f"rollout row {i}: metadata must be a JSON object")
        return value
    if not isinstance(value, dict):
        raise MilesError(f"rollout row {i}: metadata must be a dict or a JSON string")
    return json.dumps(value, default=str)
