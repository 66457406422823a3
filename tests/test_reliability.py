"""Safe files, clear errors for storage faults, safe parsing, fuzzed inputs, numerical faults."""

import errno
import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from peftlab import files
from peftlab.cli import app
from peftlab.config import RunConfig, load_run_config, read_yaml_mapping
from peftlab.errors import ConfigError, DataError, PeftlabError
from peftlab.tasks.readers import read_csv, read_jsonl, read_tsv
from tests.conftest import tiny_run_sets

runner = CliRunner()


def cli(*args):
    result = runner.invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())


def sets(tmp_path, **overrides):
    return [x for s in tiny_run_sets(tmp_path, **overrides) for x in ("--set", s)]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    files.write_json(target, {"v": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError):
        files.write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_disk_full_during_a_run_is_a_clear_error_and_keeps_what_was_written(tmp_path, monkeypatch):
    import peftlab.run as run_module

    def full(path, tensors):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(run_module, "save_tensors", full)
    code, out = cli("train", "--quiet", *sets(tmp_path))
    assert code == 2 and "the disk is full" in out and "adapter.safetensors" in out
    assert "Traceback" not in out
    run_dir = tmp_path / "run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[-1]["step"] == 4  # complete lines only
    assert not (run_dir / "summary.json").exists()  # the run is not marked finished
    assert not list(run_dir.rglob(".*.tmp"))


def test_output_folder_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    code, out = cli("train", *sets(tmp_path, output_dir=str(tmp_path / "file" / "run")))
    assert code == 2 and "a path component is a file" in out


def test_yaml_cannot_execute_code(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("model: !!python/object/apply:os.system ['touch " + str(tmp_path / "pwned") + "']\n")
    with pytest.raises(ConfigError):
        read_yaml_mapping(p)
    assert not (tmp_path / "pwned").exists()


def test_corrupt_training_checkpoint_is_a_clear_error(tmp_path):
    from peftlab.checkpoint import load_checkpoint

    ckpt = tmp_path / "checkpoints"
    (ckpt / "step-000005").mkdir(parents=True)
    (ckpt / "latest.json").write_text('{"folder": "step-000005", "step": 5}')
    (ckpt / "step-000005" / "state.json").write_text("{}")
    (ckpt / "step-000005" / "trainable.safetensors").write_bytes(b"\x01\x02garbage")
    with pytest.raises(PeftlabError, match="checkpoints: unreadable checkpoint .*SafetensorError"):
        load_checkpoint(tmp_path)


def test_a_diverging_run_does_not_stop_the_study_and_the_report_says_so(tmp_path):
    study = {
        "name": "div", "base": {"model": "t5-tiny", "max_steps": 4, "eval_every": 2,
                                "batch_size": 4, "val_size": 16, "test_size": 16},
        "tasks": {"sst2": {}},
        "methods": [{"method": "full", "learning_rates": [1e30]},
                    {"method": "ln", "learning_rates": [3e-3]}],
        "train_sizes": [16], "seeds": [0],
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study))
    code, out = cli("run", str(path), "--out", str(tmp_path / "s"), "--quiet", "--workers", "1")
    assert code == 0, out
    assert "1 diverged" in out and "1 completed" in out
    md = (tmp_path / "s" / "report" / "report.md").read_text()
    assert "1 runs diverged: sst2/full/n16/lr1e+30/seed0" in md


# --- fuzzing: random configs and random bytes give a result or a clear error -------------

FIELDS = list(RunConfig.model_fields) + ["modle", "method_args.r", "task_args.data_dir", "x.y"]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                   st.floats(allow_nan=True), st.text(max_size=20),
                   st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5),
                                                                        st.integers(), max_size=2))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=6))
def test_fuzz_config(raw):
    sets = [f"{key}={json.dumps(value)}" for key, value in raw.items()]  # JSON is valid YAML
    try:
        cfg = load_run_config(None, sets)
    except PeftlabError:
        return
    assert isinstance(cfg, RunConfig)
    assert cfg.learning_rate is None or cfg.learning_rate > 0


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=200))
def test_fuzz_yaml_text(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("y") / "c.yaml"
    p.write_text(text)
    try:
        assert isinstance(read_yaml_mapping(p), dict)
    except ConfigError:
        pass


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), reader=st.sampled_from([read_tsv, read_jsonl, read_csv]))
def test_fuzz_data_readers(tmp_path_factory, data, reader):
    suffix = {read_tsv: ".tsv", read_jsonl: ".jsonl", read_csv: ".csv"}[reader]
    p = tmp_path_factory.mktemp("d") / f"f{suffix}"
    p.write_bytes(data)
    try:
        rows = reader(p, ["sentence", "label"])
    except DataError:
        return
    assert all(isinstance(line, int) and {"sentence", "label"} <= set(row) for line, row in rows)
