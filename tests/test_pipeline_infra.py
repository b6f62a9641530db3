"""Pipeline plumbing without Prefect: config validation, content hashes, manifest resume, staging."""

import os

import fsspec
import pytest

from miles_core.artifacts import ArtifactRef, Manifest, content_hash
from miles_core.config import PipelineConfig, load_pipeline_config
from miles_core.errors import MilesError, TransientError
from tasks.common import is_transient, run_stage


def test_demo_yaml_is_valid_and_overrides_apply():
    cfg = load_pipeline_config("configs/demo.yaml", ["iterations=2", "train.lr=5e-5"])
    assert cfg.iterations == 2 and cfg.train.lr == 5e-5
    assert cfg.train.qat == "int4" and cfg.train.r3  # nested defaults survive a partial override
    assert cfg.quant.format == "int4"


@pytest.mark.parametrize(
    "override,field",
    [
        ("rollout.temperature=0", "rollout.temperature"),
        ("bogus=1", "bogus"),
        ("run_name=a b", "run_name"),
        ("eval.k=[0]", "eval.k"),
        ("train.lr=-1", "train.lr"),
    ],
)
def test_invalid_config_is_one_line_naming_the_field(override, field):
    with pytest.raises(MilesError) as e:
        load_pipeline_config("configs/demo.yaml", [override])
    assert field in str(e.value) and "\n" not in str(e.value)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(MilesError, match="does not exist"):
        load_pipeline_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("iterations: [1,\n")
    with pytest.raises(MilesError, match="not valid YAML"):
        load_pipeline_config(str(bad))


def test_content_hash_tracks_content_and_ignores_temporaries(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    (d / "x.bin").write_bytes(b"123")
    h1 = content_hash(str(d))
    (d / ".x.tmp-1").write_bytes(b"junk")
    assert content_hash(str(d)) == h1
    (d / "x.bin").write_bytes(b"124")
    assert content_hash(str(d)) != h1


def test_content_hash_same_on_memory_fs(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    (d / "x.bin").write_bytes(b"abc")
    fs = fsspec.filesystem("memory")
    fs.pipe("/hashcheck/a/x.bin", b"abc")
    assert content_hash("memory://hashcheck/a") == content_hash(str(d))


def _writer(out_dir, text="hello", calls=None):
    calls.append(1)
    with open(os.path.join(out_dir, "out.txt"), "w") as f:
        f.write(text)
    return {"n": len(text)}


@pytest.mark.parametrize("root", ["local", "memory"])
def test_run_stage_records_then_skips(tmp_path, root):
    base = str(tmp_path / "run") if root == "local" else f"memory://runs-{tmp_path.name}"
    calls = []
    fn = lambda out_dir, text, calls=calls: _writer(out_dir, text, calls)  # noqa: E731
    ref = run_stage("s1", fn, f"{base}/s1", base, {}, {"text": "hi"})
    assert calls == [1] and ref.metrics == {"n": 2}
    again = run_stage("s1", fn, f"{base}/s1", base, {}, {"text": "hi"})
    assert calls == [1] and again.content_hash == ref.content_hash  # resumed from the manifest
    run_stage("s1", fn, f"{base}/s1", base, {}, {"text": "changed"})
    assert calls == [1, 1]  # new parameters, new key: runs again
    assert Manifest(base).stages["s1"]["metrics"] == {"n": 7}


def test_failed_stage_leaves_nothing(tmp_path):
    def boom(out_dir):
        with open(os.path.join(out_dir, "half.txt"), "w") as f:
            f.write("partial")
        raise RuntimeError("crash")

    base = str(tmp_path / "run")
    with pytest.raises(RuntimeError):
        run_stage("s", boom, f"{base}/s", base, {}, {})
    assert not os.path.exists(f"{base}/s")
    assert [n for n in os.listdir(base) if not n.startswith("manifest")] == []
    assert "s" not in Manifest(base).stages


def test_missing_output_is_not_trusted(tmp_path):
    base, calls = str(tmp_path / "run"), []
    fn = lambda out_dir, calls=calls: _writer(out_dir, "x", calls)  # noqa: E731
    run_stage("s", fn, f"{base}/s", base, {}, {})
    import shutil

    shutil.rmtree(f"{base}/s")
    run_stage("s", fn, f"{base}/s", base, {}, {})
    assert len(calls) == 2 and os.path.exists(f"{base}/s/out.txt")


def test_inputs_change_the_key(tmp_path):
    base, calls = str(tmp_path / "run"), []
    fn = lambda out_dir, src, calls=calls: _writer(out_dir, open(os.path.join(src, "out.txt")).read(), calls)  # noqa: E731,SIM115
    up = tmp_path / "up"
    up.mkdir()
    (up / "out.txt").write_text("v1")
    ref = ArtifactRef(stage="up", uri=str(up), content_hash=content_hash(str(up)))
    run_stage("down", fn, f"{base}/down", base, {"src": ref}, {})
    (up / "out.txt").write_text("v2")
    ref2 = ArtifactRef(stage="up", uri=str(up), content_hash=content_hash(str(up)))
    run_stage("down", fn, f"{base}/down", base, {"src": ref2}, {})
    assert len(calls) == 2
    with open(f"{base}/down/out.txt") as f:
        assert f.read() == "v2"


def test_transient_classification():
    assert is_transient(TransientError("x")) and is_transient(OSError("disk")) and is_transient(TimeoutError())
    assert not is_transient(MilesError("bad input")) and not is_transient(ValueError("bug"))


def test_pipeline_config_json_schema_for_the_ui_form():
    schema = PipelineConfig.model_json_schema()
    assert {"run_name", "iterations", "train", "rollout", "quant", "eval"} <= set(schema["properties"])
