"""Bad input through the real command: a clear one-paragraph error, exit 2, no traceback."""

import shutil

import pytest
from typer.testing import CliRunner

from peftlab.cli import app
from peftlab.config import load_run_config
from peftlab.errors import ConfigError
from tests.conftest import DATA_DIR, tiny_run_sets

runner = CliRunner()


def fails(args: list[str], *expected: str) -> str:
    result = runner.invoke(app, args)
    out = " ".join(result.output.split())
    assert result.exit_code == 2, out
    assert "Traceback" not in out
    for text in expected:
        assert text in out, out
    return out


def sets(tmp_path, **overrides) -> list[str]:
    return [x for s in tiny_run_sets(tmp_path, **overrides) for x in ("--set", s)]


def test_defaults_resolve_fully():
    cfg = load_run_config(None, ["method=prefix", "task=samsum"])
    assert cfg.learning_rate == 5e-3
    assert cfg.method_args["num_prefix_tokens"] == 20
    assert cfg.max_source_length == 512 and cfg.selection_metric == "rougeLsum"


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("model: t5-tiny\nmethod: [lora\nseed: 1\n")
    fails(["train", "--config", str(p)], "run.yaml:3:", "malformed YAML")


def test_yaml_that_is_not_a_mapping(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("- a\n- b\n")
    fails(["train", "--config", str(p)], "expected a mapping")


def test_missing_config_file(tmp_path):
    fails(["train", "--config", str(tmp_path / "nope.yaml")], "config file not found")


@pytest.mark.parametrize("item,expected", [
    ("modle=t5-tiny", "unknown key `modle` (did you mean `model`?)"),
    ("batch_size=lots", "`batch_size`: Input should be a valid integer"),
    ("learning_rate=-0.1", "`learning_rate`: Input should be greater than 0"),
    ("method_args.r=0", "`method_args.r`: Input should be greater than or equal to 1"),
    ("method_args.rank=4", "unknown key `method_args.rank`"),
    ("method=lroa", "unknown method `lroa` (did you mean `lora`?)"),
    ("task=sst", "unknown task `sst` (did you mean `sst2`?)"),
    ("train_size=0", "`train_size`"),
    ("selection_metric=acc", "`selection_metric`: 'acc' is not one of"),
    ("noequals", "expected key=value"),
])
def test_bad_values_are_named(item, expected):
    fails(["train", "--set", item], expected)


def test_train_size_larger_than_the_data(tmp_path):
    fails(["train", *sets(tmp_path, train_size=10**6)], "`train_size` is 1000000, larger than")


def _data_copy(tmp_path):
    root = tmp_path / "data"
    (root / "sst2").mkdir(parents=True)
    shutil.copy(DATA_DIR / "sst2" / "dev.tsv", root / "sst2" / "dev.tsv")
    return root


@pytest.mark.parametrize("content,expected", [
    (None, "data file not found"),
    (b"", "the file is empty"),
    (b"text\tlabel\nfine\t1\n", "train.tsv:1: missing column(s) 'sentence'"),
    (b"sentence\tlabel\nfine\t1\n\xff\xfe bad\t0\n", "train.tsv:3: undecodable bytes"),
    (b"sentence\tlabel\nfine\t1\n \t0\n", "train.tsv:3: empty sentence"),
    (b"sentence\tlabel\nfine\t1\nok\t7\n", "train.tsv:3: label '7' is not 0 or 1"),
])
def test_bad_data_files(tmp_path, content, expected):
    root = _data_copy(tmp_path)
    if content is not None:
        (root / "sst2" / "train.tsv").write_bytes(content)
    fails(["train", *sets(tmp_path, **{"task_args.data_dir": str(root)})], expected)
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start


def test_model_folder_without_weights(tmp_path):
    (tmp_path / "m").mkdir()
    fails(["train", *sets(tmp_path, model=str(tmp_path / "m"))], "has no config.json and weights")


def test_corrupt_checkpoint_on_eval(tmp_path):
    result = runner.invoke(app, ["train", "--quiet", *sets(tmp_path, max_steps=1, eval_every=1)])
    assert result.exit_code == 0, result.output
    (tmp_path / "run" / "adapter.safetensors").write_bytes(b"\x00garbage")
    fails(["eval", "--run", str(tmp_path / "run")], "adapter.safetensors: corrupt checkpoint")


def test_eval_of_a_folder_that_is_not_a_run(tmp_path):
    fails(["eval", "--run", str(tmp_path)], "not a run folder")


def test_debug_shows_the_traceback():
    result = runner.invoke(app, ["--debug", "train", "--set", "method=lroa"])
    assert result.exit_code != 0 and result.exception is not None


def _custom_classification(tmp_path, words: dict[str, str]) -> list[str]:
    for name, start in (("train", 0), ("test", 100)):
        (tmp_path / f"{name}.csv").write_text("input,target\n" + "".join(
            f"text {i},{'ab'[i % 2]}\n" for i in range(start, start + 20)))
    return sets(tmp_path, task="custom", train_size=4, val_size=4, test_size=4, **{
        "task_args.kind": "classification", "task_args.train": str(tmp_path / "train.csv"),
        "task_args.test": str(tmp_path / "test.csv"),
        **{f"task_args.label_words.{k}": v for k, v in words.items()}})


def test_label_words_that_are_equal_are_refused_before_anything_is_written(tmp_path):
    fails(["train", *_custom_classification(tmp_path, {"a": "good", "b": "Good"})],
          "task_args.label_words", "'a' and 'b' have the same word")
    # different strings, the same tokens (both unknown to the vocabulary): found at setup
    fails(["train", *_custom_classification(tmp_path, {"a": "☃", "b": "☄"})],
          "label words '☃' and '☄' are the same tokens")
    assert not (tmp_path / "run").exists()


def test_method_defaults_follow_the_models_family(tmp_path):
    from peftlab.config import resolve_run_config

    lora = resolve_run_config({"model": "bart-tiny", "method": "lora"})
    assert lora.method_args["target_modules"] == ["q_proj", "v_proj"]
    assert resolve_run_config({"model": "t5-tiny"}).method_args["target_modules"] == ["q", "v"]
    ia3 = resolve_run_config({"model": "bart-tiny", "method": "ia3"})
    assert ia3.method_args["feedforward_modules"] == ["fc2"]
    # what the config sets wins over the family's default
    own = resolve_run_config({"model": "bart-tiny", "method_args": {"target_modules": ["fc1"]}})
    assert own.method_args["target_modules"] == ["fc1"]


def test_a_method_that_cannot_adapt_a_family_says_so_at_config_time(tmp_path):
    from peftlab.config import resolve_run_config

    folder = tmp_path / "pegasus"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "pegasus"}')
    with pytest.raises(ConfigError, match=r"prefix supports t5 and bart models; `model` .*"
                                          r"pegasus is a pegasus model"):
        resolve_run_config({"model": str(folder), "method": "prefix"})
    resolve_run_config({"model": str(folder), "method": "lora"})  # peft decides at load
