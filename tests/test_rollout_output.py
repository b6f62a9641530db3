"""Rollout rows: the DESIGN.md Parquet schema round trip (pyarrow, pandas, polars), rewards,
stop strings on decoded text, and the `miles rollout` command."""

import json

import numpy as np
import pyarrow as pa
import pytest

from miles_core.data import ROLLOUT_SCHEMA, Prompt, read_rollouts
from miles_core.rollout import Engine, EngineConfig, Request, SamplingParams, generate_rollouts
from tests.test_rollout_fixtures import char_tokenizer, one_thread, tiny  # noqa: F401

CHAR_VOCAB = 98  # the char tokenizer: pad, eos, unk + 95 printable characters


def _prompts(n=3):
    return [Prompt(prompt_id=f"q{i}", source="toy", answer=str(i), text=f"{i} + {i} =") for i in range(n)]


def _length_reward(prompts, responses):
    return [float(len(r)) for r in responses]


@pytest.mark.parametrize("arch", ["qwen3_moe", "llama"])
def test_parquet_round_trips_with_the_design_schema(arch, tmp_path):
    import pandas as pd
    import polars as pl

    _, _, model = tiny(arch, vocab_size=CHAR_VOCAB)
    tok = char_tokenizer()
    sp = SamplingParams(temperature=0.9, max_new_tokens=6, seed=1)
    out = str(tmp_path / "rollouts")
    rows = generate_rollouts(model, tok, _prompts(), sp, n_samples=2, iteration=3, reward=_length_reward, out=out)
    table = read_rollouts(f"{out}/iter_3")
    assert table.num_rows == len(rows) == 6
    for field in ROLLOUT_SCHEMA:
        assert table.schema.field(field.name).type == field.type, field.name
    assert table.schema.field("logprob_versions").type == pa.list_(pa.int32())
    got = table.to_pylist()
    for row in got:
        n_prompt, n_resp = len(row["prompt_tokens"]), len(row["response_tokens"])
        assert len(row["rollout_logprobs"]) == len(row["logprob_versions"]) == n_resp
        assert row["reward"] == float(len(row["response"]))
        assert row["status"] in ("completed", "truncated") and row["iteration"] == 3
        meta = json.loads(row["metadata"])
        assert meta["source"] == "toy" and meta["temperature"] == 0.9 and meta["reward_status"] == "ok"
        if model.num_moe_layers:
            experts = np.asarray(row["routed_experts"])
            assert experts.shape == (n_prompt + n_resp - 1, model.num_moe_layers, model.config.num_experts_per_tok)
        else:
            assert row["routed_experts"] is None
    assert sorted((r["prompt_id"], r["sample_index"]) for r in got) == [(f"q{i}", j) for i in range(3) for j in (0, 1)]
    part = f"{out}/iter_3/part-0.parquet"
    df = pd.read_parquet(part)
    assert list(df.columns[: len(ROLLOUT_SCHEMA)]) == ROLLOUT_SCHEMA.names and len(df) == 6
    assert pl.read_parquet(part).height == 6
    assert pl.read_parquet(part)["response_tokens"].to_list() == [list(r["response_tokens"]) for r in got]


def test_stop_string_stops_on_decoded_text_and_is_cut_from_the_response():
    _, _, model = tiny("qwen3", vocab_size=CHAR_VOCAB)
    tok = char_tokenizer()
    prompt = tok("7 + 5 =", add_special_tokens=False)["input_ids"]
    free = Engine(model, tok, EngineConfig(max_slots=2, max_len=64)).generate(
        [Request("a", prompt, SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True))]
    )[0]
    stop = free.text[3:5]
    at = free.text.find(stop)
    s = Engine(model, tok, EngineConfig(max_slots=2, max_len=64)).generate(
        [Request("a", prompt, SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True, stop=[stop]))]
    )[0]
    assert (s.status, s.finish_reason) == ("completed", "stop_string")
    assert s.text == free.text[:at]
    assert s.response_tokens == free.response_tokens[: at + len(stop)]  # tokens keep the stop string


def test_rollout_command_writes_parts_with_partial_budget(tmp_path):
    import typer
    from typer.testing import CliRunner

    from flows.commands.rollout import register

    model_dir = tmp_path / "model"
    tiny("qwen3_moe", vocab_size=CHAR_VOCAB)[1].save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "answer": str(i + 1)}) + "\n" for i in range(4)))
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps `rollout` a subcommand
    out = tmp_path / "out"
    args = ["rollout", "--model", str(model_dir), "--source", str(src), "--out", str(out), "--n-samples", "2",
            "--max-new-tokens", "8", "--partial-budget", "12", "--temperature", "0.8", "--max-slots", "3"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "samples/s" in result.output and "tok/s" in result.output
    table = read_rollouts(str(out))
    assert table.num_rows == 8 and len(list((out / "iter_0").glob("part-*.parquet"))) > 1
    meta = [json.loads(m) for m in table.column("metadata").to_pylist()]
    assert any(m["aborts"] > 0 for m in meta)
    again = CliRunner().invoke(app, args)  # the same output again: refused, nothing touched
    assert again.exit_code != 0 and "already holds" in str(again.exception)
    replaced = CliRunner().invoke(app, [*args[:-6], "--max-slots", "8", "--overwrite"])  # no budget: one part
    assert replaced.exit_code == 0, replaced.output
    assert [p.name for p in (out / "iter_0").glob("part-*.parquet")] == ["part-0.parquet"]
    assert read_rollouts(str(out)).num_rows == 8


def test_rollout_command_bad_model_is_one_line_error(tmp_path):
    from flows.cli import main

    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"prompt": "1 + 1 ="}) + "\n")
    args = ["rollout", "--model", str(tmp_path / "missing"), "--source", str(src), "--out", str(tmp_path / "o")]
    assert main(args) == 2


def test_generate_rollouts_from_a_checkpoint_path_with_the_pipeline_sampling_config(tmp_path):
    from miles_core.config import SamplingConfig

    model_dir = tmp_path / "model"
    tiny("qwen3", vocab_size=CHAR_VOCAB)[1].save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    cfg = SamplingConfig(n_samples=3, max_new_tokens=5, temperature=0.8, top_k=20)
    rows = generate_rollouts(str(model_dir), None, _prompts(2), cfg, cfg.n_samples, reward="math")
    assert len(rows) == 6 and all(0 < len(r["response_tokens"]) <= 5 for r in rows)
    assert {json.loads(r["metadata"])["temperature"] for r in rows} == {0.8}
