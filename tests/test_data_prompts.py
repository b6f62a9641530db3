"""Prompt files (JSONL, Parquet) at local and memory:// URLs; malformed rows; chat rendering."""

import json
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from miles_core.data import Prompt, encode_prompt, load_prompts, load_sources, read_prompt_file, render_prompt
from miles_core.errors import MilesError
from miles_core.io import filesystem

GOOD_ROWS = [
    {"prompt": "What is 2+2?", "answer": 4, "level": 1},
    {"question": "What is 3+3?", "answer": "6", "metadata": {"topic": "add"}},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "7*6?"}], "answer": "42"},
    {"id": "q-9", "prompt": "9-1?", "answer": "8", "source": "extra"},
]


def _write_jsonl(url: str, lines: list[str]) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _urls(tmp_path) -> list[str]:
    return [str(tmp_path), f"memory://prompts-{uuid.uuid4().hex[:8]}"]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_jsonl_and_parquet_give_the_same_prompts(tmp_path, where):
    root = _urls(tmp_path)[where == "memory"]
    _write_jsonl(f"{root}/math.jsonl", [json.dumps(r) for r in GOOD_ROWS])
    fs, path = filesystem(f"{root}/math.parquet")
    keys = sorted({k for r in GOOD_ROWS for k in r})  # Parquet rows share one set of columns
    rows = [{k: (str(r[k]) if k == "answer" else r.get(k)) for k in keys} for r in GOOD_ROWS]
    with fs.open(path, "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows), f)
    from_jsonl, report = load_prompts(f"{root}/math.jsonl")
    from_parquet, _ = load_prompts(f"{root}/math.parquet")
    assert report.n_rows == 4 and report.n_loaded == 4 and report.n_malformed == 0
    assert [p.prompt_id for p in from_jsonl] == [p.prompt_id for p in from_parquet]
    first = from_jsonl[0]
    assert first.text == "What is 2+2?" and first.answer == "4" and first.source == "math"
    assert first.metadata == {"level": 1}
    assert from_jsonl[1].metadata == {"topic": "add"}
    assert from_jsonl[2].messages[0] == {"role": "system", "content": "Be brief."}
    assert from_jsonl[2].question() == "7*6?"
    assert from_jsonl[3].prompt_id == "q-9" and from_jsonl[3].source == "extra"


def test_prompt_ids_are_stable_content_hashes(tmp_path):
    _write_jsonl(f"{tmp_path}/a.jsonl", [json.dumps(r) for r in GOOD_ROWS[:2]])
    _write_jsonl(f"{tmp_path}/b.jsonl", [json.dumps(r) for r in reversed(GOOD_ROWS[:2])])
    a, _ = read_prompt_file(f"{tmp_path}/a.jsonl", source="s")
    b, _ = read_prompt_file(f"{tmp_path}/b.jsonl", source="s")
    assert {p.prompt_id for p in a} == {p.prompt_id for p in b}  # reordering keeps ids


def test_repeated_identical_prompt_gets_a_suffix_repeated_given_id_is_malformed(tmp_path):
    url = f"{tmp_path}/dup.jsonl"
    row = json.dumps({"prompt": "x?", "answer": "1"})
    _write_jsonl(url, [row, row, json.dumps({"id": 5, "prompt": "y"}), json.dumps({"id": "5", "prompt": "z"})])
    prompts, report = read_prompt_file(url, strict=False)
    assert prompts[1].prompt_id == prompts[0].prompt_id + "#1"
    assert [str(e) for e in report.malformed] == [f"{url}:4: duplicate id '5'"]


MALFORMED = [
    ('{"prompt": "ok", "answer": "1"}', None),
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected an object"),
    ('{"answer": "3"}', "no prompt"),
    ('{"prompt": "", "answer": "3"}', "non-empty string"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "role 'robot'"),
    ('{"messages": []}', "non-empty list"),
    ('{"prompt": "q", "answer": {"a": 1}}', "`answer` must be"),
    ('{"prompt": "q", "metadata": "not json"}', "metadata"),
    ('{"prompt": "q", "metadata": [1]}', "metadata"),
    ('{"prompt": "fine again", "answer": 2}', None),
]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_malformed_rows_are_reported_with_file_and_line_in_skip_mode(tmp_path, where):
    url = _urls(tmp_path)[where == "memory"] + "/bad.jsonl"
    lines = [line for line, _ in MALFORMED]
    lines.insert(3, "   ")  # a blank line is not a row, but it does count as a line
    _write_jsonl(url, lines)
    prompts, report = load_prompts(url, strict=False)
    assert [p.text for p in prompts] == ["ok", "fine again"]
    assert report.n_rows == 11 and report.n_loaded == 2 and report.n_malformed == 9
    expected_lines = [2, 3, 5, 6, 7, 8, 9, 10, 11]
    assert [e.line for e in report.malformed] == expected_lines
    for error, (_, fragment) in zip(report.malformed, [m for m in MALFORMED if m[1]], strict=True):
        assert error.file == url and fragment in error.message
    assert "9 malformed of 11 rows" in report.summary()


def test_strict_mode_raises_one_error_naming_file_and_lines(tmp_path):
    url = f"{tmp_path}/bad.jsonl"
    _write_jsonl(url, [line for line, _ in MALFORMED])
    with pytest.raises(MilesError, match=rf"9 malformed prompt row\(s\).*{url}:2: invalid JSON.*and 4 more"):
        load_prompts(url)


def test_malformed_parquet_rows_are_reported_by_row_number(tmp_path):
    url = f"{tmp_path}/p.parquet"
    pq.write_table(pa.table({"prompt": ["a", None, "c"], "answer": ["1", "2", None]}), url)
    prompts, report = load_prompts(url, strict=False)
    assert [p.text for p in prompts] == ["a", "c"] and prompts[1].answer is None
    assert [(e.line, "no prompt" in e.message) for e in report.malformed] == [(2, True)]


def test_folder_source_reads_every_prompt_file_and_merges_reports(tmp_path):
    _write_jsonl(f"{tmp_path}/d/a.jsonl", [json.dumps(GOOD_ROWS[0]), "{bad"])
    _write_jsonl(f"{tmp_path}/d/b.jsonl", [json.dumps(GOOD_ROWS[1])])
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    prompts, report = load_prompts(f"file://{tmp_path}/d", strict=False)
    assert [p.source for p in prompts] == ["a", "b"]
    assert report.n_rows == 3 and report.n_malformed == 1 and report.malformed[0].file.endswith("a.jsonl")
    capped, _ = load_prompts(f"{tmp_path}/d?size=1", strict=False)
    assert len(capped) == 1


def test_mixed_sources_load_together(tmp_path):
    _write_jsonl(f"{tmp_path}/m.jsonl", [json.dumps(GOOD_ROWS[0])])
    prompts, report = load_sources([f"{tmp_path}/m.jsonl", "reasoning_gym:chain_sum?size=3"])
    assert [p.source for p in prompts] == ["m"] + ["reasoning_gym:chain_sum"] * 3
    assert report.n_loaded == 4


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("/nonexistent/prompts.jsonl", "does not exist"),
        ("memory://nothing-here/x.jsonl", "does not exist"),
    ],
)
def test_missing_sources_are_user_errors(spec, match):
    with pytest.raises(MilesError, match=match):
        load_prompts(spec)


def test_unknown_file_type_and_option_are_user_errors(tmp_path):
    (tmp_path / "p.csv").write_text("prompt\nx\n")
    with pytest.raises(MilesError, match="unknown prompt file type"):
        load_prompts(f"{tmp_path}/p.csv")
    _write_jsonl(f"{tmp_path}/p.jsonl", [json.dumps(GOOD_ROWS[0])])
    with pytest.raises(MilesError, match="unknown option"):
        load_prompts(f"{tmp_path}/p.jsonl?seed=3")


def _tokenizer(template: str | None) -> PreTrainedTokenizerFast:
    """A real (tiny, word-level) fast tokenizer: BOS added for plain text, template optional."""
    words = ["<unk>", "<s>", "<|system|>", "<|user|>", "<|assistant|>", "What", "is", "2+2", "?", "Be", "brief", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.add_special_tokens(["<s>", "<|system|>", "<|user|>", "<|assistant|>"])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")
    out.chat_template = template
    return out


TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_chat_template_comes_from_the_tokenizer():
    tok = _tokenizer(TEMPLATE)
    chat = Prompt(
        "c", "s", messages=({"role": "system", "content": "Be brief ."}, {"role": "user", "content": "What is 2+2 ?"})
    )
    assert render_prompt(chat, tok) == "<s><|system|> Be brief . <|user|> What is 2+2 ? <|assistant|>"
    text = Prompt("t", "s", text="What is 2+2 ?")
    assert render_prompt(text, tok) == "<s><|user|> What is 2+2 ? <|assistant|>"
    ids = encode_prompt(text, tok)
    assert ids.count(1) == 1 and ids[0] == 1  # the template's BOS, not a second one
    assert ids == [1, 3, 5, 6, 7, 8, 4]


def test_plain_text_fallback_without_a_template():
    tok = _tokenizer(None)
    text = Prompt("t", "s", text="What is 2+2 ?")
    assert render_prompt(text, tok) == "What is 2+2 ?"
    assert encode_prompt(text, tok) == [1, 5, 6, 7, 8]  # the tokenizer's own BOS
    chat = Prompt("c", "s", messages=({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}))
    assert render_prompt(chat) == "System: Be brief.\n\nUser: Hi\n\nAssistant:"


def test_prompt_needs_exactly_one_of_text_and_messages():
    with pytest.raises(ValueError):
        Prompt("x", "s")
    with pytest.raises(ValueError):
        Prompt("x", "s", text="a", messages=({"role": "user", "content": "b"},))
