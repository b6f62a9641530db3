"""The rollout Parquet: exact schema, round trips on local and memory:// URLs, validation."""

import json
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from miles_core.data import (
    ROLLOUT_SCHEMA,
    read_rollouts,
    rollout_part_url,
    rollouts_table,
    validate_rollouts,
    write_rollouts,
)
from miles_core.errors import MilesError
from miles_core.io import filesystem

CONTRACT = {
    "prompt_id": pa.string(),
    "sample_index": pa.int32(),
    "iteration": pa.int32(),
    "prompt_tokens": pa.list_(pa.int32()),
    "response_tokens": pa.list_(pa.int32()),
    "response": pa.string(),
    "rollout_logprobs": pa.list_(pa.float32()),
    "routed_experts": pa.list_(pa.list_(pa.list_(pa.int16()))),
    "reward": pa.float32(),
    "status": pa.string(),
    "weight_version": pa.int32(),
    "metadata": pa.string(),
}


def make_row(i: int, moe: bool = True, **over) -> dict:
    """A sample with prompt length 3+i%2 and response length 2+i%3; experts [T, 2 layers, top-2]."""
    rng = np.random.default_rng(i)
    p, r = 3 + i % 2, 2 + i % 3
    row = {
        "prompt_id": f"p{i // 4}",
        "sample_index": i % 4,
        "iteration": 3,
        "prompt_tokens": list(range(p)),
        "response_tokens": torch.arange(r, dtype=torch.int64) + 100,  # tensors are accepted
        "response": f"answer {i}",
        "rollout_logprobs": rng.normal(size=r).astype(np.float64),
        "routed_experts": rng.integers(0, 128, size=(p + r - 1, 2, 2)) if moe else None,
        "reward": float(i % 2),
        "status": ["completed", "truncated", "aborted"][i % 3],
        "weight_version": 2,
        "metadata": {"source": "gsm", "i": i},
    }
    row.update(over)
    return row


def test_schema_has_exactly_the_contract_columns_and_types():
    assert ROLLOUT_SCHEMA.names == list(CONTRACT)
    for name, type_ in CONTRACT.items():
        assert ROLLOUT_SCHEMA.field(name).type == type_
    assert ROLLOUT_SCHEMA.field("routed_experts").nullable
    assert not any(f.nullable for f in ROLLOUT_SCHEMA if f.name != "routed_experts")


@pytest.mark.parametrize("where", ["local", "memory"])
def test_write_then_read_round_trips_every_value(tmp_path, where):
    root = str(tmp_path / "rollouts") if where == "local" else f"memory://run-{uuid.uuid4().hex[:8]}/rollouts"
    rows = [make_row(i, moe=i != 5) for i in range(8)]
    assert write_rollouts(rows, rollout_part_url(root, 3, 0)) == 8
    table = read_rollouts(rollout_part_url(root, 3, 0))
    assert table.schema.names[: len(CONTRACT)] == list(CONTRACT)
    got = table.to_pylist()
    for row, back in zip(rows, got, strict=True):
        assert back["prompt_tokens"] == row["prompt_tokens"]
        assert back["response_tokens"] == row["response_tokens"].tolist()
        np.testing.assert_allclose(back["rollout_logprobs"], row["rollout_logprobs"].astype(np.float32))
        if row["routed_experts"] is None:
            assert back["routed_experts"] is None
        else:
            assert np.array_equal(np.array(back["routed_experts"]), row["routed_experts"])
        assert json.loads(back["metadata"]) == row["metadata"]
        assert (back["status"], back["reward"], back["weight_version"]) == (row["status"], row["reward"], 2)


def test_reading_a_folder_reads_all_parts_in_iteration_then_part_order(tmp_path):
    root = str(tmp_path / "rollouts")
    for it, part in [(10, 0), (2, 1), (2, 0), (2, 10)]:
        write_rollouts([make_row(0, prompt_id=f"it{it}-part{part}")], rollout_part_url(root, it, part))
    (tmp_path / "rollouts" / "iter_2" / ".part-3.parquet.tmp-dead").write_bytes(b"half a file")
    whole = read_rollouts(root).column("prompt_id").to_pylist()
    assert whole == ["it2-part0", "it2-part1", "it2-part10", "it10-part0"]
    assert read_rollouts(f"{root}/iter_2").num_rows == 3


def test_extra_columns_are_kept():
    table = rollouts_table([make_row(0, advantage=0.5), make_row(1)])
    assert table.column("advantage").to_pylist() == [0.5, None]
    validate_rollouts(table)


def test_uint8_expert_parts_are_read_back_as_int16(tmp_path):
    table = rollouts_table([make_row(0)])
    narrow = pa.list_(pa.list_(pa.list_(pa.uint8())))
    i = table.schema.get_field_index("routed_experts")
    table = table.set_column(i, pa.field("routed_experts", narrow), table.column(i).cast(narrow))
    pq.write_table(table, tmp_path / "part-0.parquet")
    back = read_rollouts(str(tmp_path / "part-0.parquet"))
    assert back.schema.field("routed_experts").type == CONTRACT["routed_experts"]


def test_write_is_atomic_no_temporary_left_and_failed_write_leaves_nothing():
    root = f"memory://atomic-{uuid.uuid4().hex[:8]}"
    write_rollouts([make_row(0)], rollout_part_url(root, 0, 0))
    fs, path = filesystem(root)
    assert [p.rsplit("/", 1)[1] for p in fs.find(path)] == ["part-0.parquet"]
    with pytest.raises(MilesError):
        write_rollouts([make_row(0, status="exploded")], rollout_part_url(root, 0, 1))
    assert [p.rsplit("/", 1)[1] for p in fs.find(path)] == ["part-0.parquet"]


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"status": "done"}, "unknown status"),
        ({"rollout_logprobs": [0.1]}, "one value per response token"),
        ({"routed_experts": np.zeros((2, 2, 2), dtype=np.int64)}, "routed_experts must cover"),
        ({"routed_experts": np.zeros((4, 2), dtype=np.int64)}, "tokens, moe_layers, topk"),
        ({"routed_experts": np.full((4, 2, 2), 40000)}, r"\[0, 32767\]"),
        ({"metadata": "{not json"}, "not valid JSON"),
        ({"metadata": "[1]"}, "JSON object"),
        ({"reward": "high"}, "reward"),
    ],
)
def test_invalid_rows_are_refused_with_a_clear_error(over, match):
    with pytest.raises(MilesError, match=match):
        write_rollouts([make_row(1), make_row(0, **over)], "memory://never/part-0.parquet")


def test_missing_field_and_missing_column_are_named():
    row = make_row(0)
    del row["weight_version"]
    with pytest.raises(MilesError, match="row 0 has no 'weight_version'"):
        rollouts_table([row])
    table = rollouts_table([make_row(0)]).drop_columns(["reward"])
    with pytest.raises(MilesError, match="missing rollout column 'reward'"):
        validate_rollouts(table)


def test_reading_a_foreign_parquet_names_the_file_and_problem(tmp_path):
    pq.write_table(pa.table({"prompt_id": ["a"], "reward": [1.0]}), tmp_path / "part-0.parquet")
    with pytest.raises(MilesError, match=r"part-0\.parquet: missing rollout column 'sample_index'"):
        read_rollouts(str(tmp_path))
    with pytest.raises(MilesError, match="do not exist"):
        read_rollouts(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MilesError, match="no part"):
        read_rollouts(str(tmp_path / "empty"))


def test_empty_rows_give_an_empty_valid_table():
    table = rollouts_table([])
    assert table.num_rows == 0 and table.schema.names == list(CONTRACT)
    validate_rollouts(table)
