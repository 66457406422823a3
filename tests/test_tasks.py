"""Data protocol, readers and metrics on the real SST-2 and SAMSum files."""

import json
from collections import Counter

import pytest
from rouge_score import rouge_scorer

from peftlab import files
from peftlab.errors import DataError
from peftlab.tasks import Example, build_task, prepare_splits
from peftlab.tasks.base import split_sentences
from peftlab.tasks.readers import read_csv, read_jsonl, read_tsv
from tests.conftest import cli_train


@pytest.fixture(scope="module")
def sst2():
    return build_task("sst2", {})


@pytest.mark.parametrize("k", [16, 64, 256])
def test_stratified_sampler_keeps_class_balance(sst2, k):
    splits = prepare_splits(sst2, k, 200, "all", seed=3)
    pool_share = 37_569 / 67_349  # positives in GLUE train
    positives = Counter(ex.label for ex in splits.train)[1]
    assert len(splits.train) == k
    assert abs(positives - pool_share * k) <= 1  # largest-remainder allocation


def test_validation_is_fixed_disjoint_and_apart_from_test(sst2):
    a = prepare_splits(sst2, 64, 200, "all", seed=0)
    b = prepare_splits(sst2, 64, 200, "all", seed=1)
    assert [ex.id for ex in a.validation] == [ex.id for ex in b.validation]
    assert [ex.id for ex in a.train] != [ex.id for ex in b.train]
    held_out = {ex.text for ex in a.validation} | {ex.text for ex in a.test}
    assert not held_out & {ex.text for ex in a.train}
    assert len(a.test) == 872 and a.notes["validation_source"] == "train"


def test_same_seed_same_draw(sst2):
    a = prepare_splits(sst2, 64, 50, "all", seed=7)
    b = prepare_splits(sst2, 64, 50, "all", seed=7)
    assert a.train == b.train


def test_samsum_drops_empty_and_overlapping_training_dialogues():
    splits = prepare_splits(build_task("samsum", {}), "all", 100, "all", seed=0)
    notes = splits.notes
    assert notes["train_dropped_empty_dialogues"] == 1
    assert notes["train_dropped_overlap_with_validation_or_test"] > 0
    assert len(splits.train) == 14_732 - 1 - notes["train_dropped_overlap_with_validation_or_test"]
    assert all(ex.text for ex in splits.train)
    assert "\r" not in splits.train[0].source
    assert len(splits.test) == 819


def test_samsum_validation_drops_dialogues_that_are_also_in_test():
    """SAMSum's validation and test share 4 dialogues (e.g. validation 13727839 and test
    13809965): with val_size all, none of them may select a checkpoint or a rate."""
    splits = prepare_splits(build_task("samsum", {}), 16, "all", "all", seed=0)
    test_texts = {ex.text for ex in splits.test}
    assert not test_texts & {ex.text for ex in splits.validation}
    assert splits.notes["validation_dropped_overlap_with_test"] == 4
    assert len(splits.validation) == 818 - 4
    assert "13727839" not in {ex.id for ex in splits.validation}


def test_train_size_larger_than_the_data_is_a_clear_error(sst2):
    from peftlab.errors import ConfigError

    with pytest.raises(ConfigError, match="`train_size` is 100000, larger than the"):
        prepare_splits(sst2, 100_000, 200, "all", seed=0)


def test_rouge_matches_rouge_score_directly():
    task = build_task("samsum", {})
    refs = ["Amanda baked cookies. She will bring Jerry some tomorrow.",
            "Olivia and Olivier are voting for liberals in this election."]
    preds = ["Amanda baked cookies and will bring some to Jerry tomorrow.",
             "Olivia votes for the liberals. Olivier too!"]
    examples = [Example(str(i), "", r) for i, r in enumerate(refs)]
    metrics, rows = task.metrics(preds, examples)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    direct = [scorer.score(r.replace(". ", ".\n"), p.replace(". ", ".\n"))
              for r, p in zip(refs, preds)]
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        expected = 100 * sum(d[key].fmeasure for d in direct) / len(direct)
        assert metrics[key] == pytest.approx(expected, abs=1e-9)
    assert rows[0]["score"] == pytest.approx(100 * direct[0]["rougeLsum"].fmeasure)
    assert task.primary_metric == "rougeLsum"
    assert split_sentences("A b. C d! E?") == "A b.\nC d!\nE?"


def test_sentence_splitting_keeps_abbreviations_and_numbers():
    # the regex splitter before cut after "Mr." and "p.m.": rougeLsum then matched fragments
    assert split_sentences("Mr. Smith comes at 5 p.m. tomorrow. Anna is happy!") == \
        "Mr. Smith comes at 5 p.m. tomorrow.\nAnna is happy!"
    assert split_sentences("They meet Dr. Brown at St. Mary's. It costs $3.50.") == \
        "They meet Dr. Brown at St. Mary's.\nIt costs $3.50."
    assert split_sentences("  ") == ""


def test_lead3_on_samsum_test_matches_the_samsum_paper():
    """Gliwa et al. (2019), Table 2, LEAD-3 on the SAMSum test set: R-1 31.40, R-2 8.68,
    R-L 29.42 (summary-level, what rougeLsum is)."""
    from peftlab.evaluate import evaluate_predictions
    from peftlab.methods.baselines import lead3

    task = build_task("samsum", {})
    splits = prepare_splits(task, 8, 8, "all", seed=0)
    metrics = evaluate_predictions(task, lead3(splits.train, splits.test), splits.test).metrics
    assert len(splits.test) == 819
    assert metrics["rouge1"] == pytest.approx(31.40, abs=0.2)
    assert metrics["rouge2"] == pytest.approx(8.68, abs=0.1)
    assert metrics["rougeLsum"] == pytest.approx(29.42, abs=0.3)
    assert metrics["rougeL"] < 25  # sentence-level ROUGE-L is not the papers' R-L


def test_classification_metrics(sst2):
    examples = [Example("a", "", "positive", 1), Example("b", "", "negative", 0)]
    metrics, rows = sst2.metrics([1, 1], ["positive", "maybe"], examples)
    assert metrics["accuracy"] == 50.0
    assert metrics["generation_exact_match"] == 50.0
    assert metrics["invalid_generation_rate"] == 50.0
    assert rows[1] == {"prediction": "positive", "score": 0.0, "generation": "maybe",
                       "scores": {"accuracy": 0.0, "generation_exact_match": 0.0}}
    # per-example scores are on the metric's scale: each metric is their mean
    assert rows[0]["scores"] == {"accuracy": 100.0, "generation_exact_match": 100.0}
    for metric in ("accuracy", "generation_exact_match"):
        assert metrics[metric] == sum(r["scores"][metric] for r in rows) / len(rows)


# --- readers: every error names the file and the line -------------------------------------

def test_tsv_errors(tmp_path):
    p = tmp_path / "x.tsv"
    with pytest.raises(DataError, match="not found"):
        read_tsv(p, ["sentence", "label"])
    p.write_text("")
    with pytest.raises(DataError, match="x.tsv: the file is empty"):
        read_tsv(p, ["sentence", "label"])
    p.write_text("text\tlabel\nfine\t1\n")
    with pytest.raises(DataError, match=r"x.tsv:1: missing column\(s\) 'sentence'"):
        read_tsv(p, ["sentence", "label"])
    p.write_text("sentence\tlabel\nfine\t1\nbroken line\n")
    with pytest.raises(DataError, match="x.tsv:3: expected 2 tab-separated fields, found 1"):
        read_tsv(p, ["sentence", "label"])
    p.write_bytes(b"sentence\tlabel\nok\t1\nbad \xff\xfe\t0\n")
    with pytest.raises(DataError, match="x.tsv:3: undecodable bytes"):
        read_tsv(p, ["sentence", "label"])


def test_jsonl_errors(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": "1", "dialogue": "a", "summary": "b"}\n{"id": "2", "dialogue": "a"\n')
    with pytest.raises(DataError, match="x.jsonl:2: invalid JSON"):
        read_jsonl(p, ["id", "dialogue", "summary"])
    p.write_text('{"id": "1", "dialogue": "a"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:1: missing key\(s\) 'summary'"):
        read_jsonl(p, ["id", "dialogue", "summary"])
    p.write_text('[1, 2]\n')
    with pytest.raises(DataError, match="x.jsonl:1: expected a JSON object"):
        read_jsonl(p, ["id"])


def test_csv_errors(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text('input,target\n"a, b",c\nonly-one\n')
    with pytest.raises(DataError, match="x.csv:3: wrong number of fields"):
        read_csv(p, ["input", "target"])


def _samsum_dir(tmp_path, train_rows, bad_split=None, bad_rows=None):
    root = tmp_path / "data" / "samsum"
    root.mkdir(parents=True)
    row = {"id": "v1", "dialogue": "A: hi\r\nB: hello", "summary": "They greet."}
    for split in ("train", "validation", "test"):
        rows = train_rows if split == "train" else [row]
        if split == bad_split:
            rows = bad_rows
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / "data")


def test_empty_dialogue_in_an_evaluation_set_is_an_error(tmp_path):
    train = [{"id": "t1", "dialogue": "A: x\nB: y", "summary": "s."}]
    data = _samsum_dir(tmp_path, train, "test", [{"id": "e", "dialogue": "  ", "summary": "s"}])
    task = build_task("samsum", {"data_dir": data})
    with pytest.raises(DataError, match=r"test.jsonl:1: empty dialogue in the test set"):
        task.load()


def test_sst2_label_outside_the_verbalizer_and_empty_sentence(tmp_path):
    root = tmp_path / "sst2"
    root.mkdir()
    (root / "dev.tsv").write_text("sentence\tlabel\ngood \t1\n")
    (root / "train.tsv").write_text("sentence\tlabel\ngood \t1\nbad \t2\n")
    task = build_task("sst2", {"data_dir": str(tmp_path)})
    with pytest.raises(DataError, match=r"train.tsv:3: label '2' is not 0 or 1"):
        task.load()
    (root / "train.tsv").write_text("sentence\tlabel\ngood \t1\n  \t0\n")
    with pytest.raises(DataError, match=r"train.tsv:3: empty sentence"):
        task.load()


def test_custom_classification_task_from_csv(tmp_path):
    rows = ["text,label"] + [f"example number {i},{'yes' if i % 3 else 'no'}" for i in range(30)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "t.csv").write_text("text,label\nsomething,yes\nelse,no\n")
    task = build_task("custom", {
        "kind": "classification", "train": str(tmp_path / "d.csv"), "test": str(tmp_path / "t.csv"),
        "input_column": "text", "target_column": "label",
        "label_words": {"no": "negative", "yes": "positive"}, "template": "Q: {text}",
    })
    splits = prepare_splits(task, 9, 6, "all", seed=0)
    assert Counter(ex.target for ex in splits.train) == {"positive": 6, "negative": 3}
    assert splits.train[0].source.startswith("Q: example number")
    (tmp_path / "t.csv").write_text("text,label\nsomething,maybe\n")
    with pytest.raises(DataError, match=r"t.csv:2: label 'maybe' is not one of"):
        task.load()


@pytest.mark.parametrize("id_column", ["key", None])
def test_duplicate_ids_in_a_custom_split_are_refused_naming_the_lines(tmp_path, id_column):
    """The report pairs examples by id: a repeated id is refused at load time with the
    file, the id and both lines (without an id column, rows are numbered and cannot repeat)."""
    (tmp_path / "d.csv").write_text("key,text,label\n" + "".join(
        f"k{i},example {i},yes\n" for i in range(8)))
    (tmp_path / "t.csv").write_text("key,text,label\na,one,yes\nb,two,no\na,three,no\n")
    task = build_task("custom", {
        "kind": "classification", "train": str(tmp_path / "d.csv"),
        "test": str(tmp_path / "t.csv"), "input_column": "text", "target_column": "label",
        "label_words": {"no": "negative", "yes": "positive"},
        **({"id_column": id_column} if id_column else {})})
    if id_column:
        with pytest.raises(DataError, match=r"t.csv:4: id 'a' again \(first at .*t.csv:2\)"):
            task.load()
    else:
        assert [ex.id for ex in task.load().test] == ["test-0", "test-1", "test-2"]


def _custom(tmp_path, train_rows: str, test_rows: str):
    (tmp_path / "train.csv").write_text("text,label\n" + train_rows)
    (tmp_path / "test.csv").write_text("text,label\n" + test_rows)
    return build_task("custom", {
        "kind": "classification", "train": str(tmp_path / "train.csv"),
        "test": str(tmp_path / "test.csv"), "input_column": "text", "target_column": "label",
        "label_words": {"no": "negative", "yes": "positive"}})


def test_training_data_that_is_all_test_data_says_so(tmp_path):
    rows = "".join(f"example {i},{'yes' if i % 2 else 'no'}\n" for i in range(10))
    with pytest.raises(DataError, match="every training example is also a test example"):
        prepare_splits(_custom(tmp_path, rows, rows), 4, 2, "all", seed=0)


def test_a_training_file_too_small_to_give_validation_says_why(tmp_path):
    from peftlab.errors import ConfigError

    task = _custom(tmp_path, "only one,yes\n", "a test,no\n")
    with pytest.raises(ConfigError, match=r"`val_size` is 2, but with no validation file "
                                          r"validation is drawn from the 1 training examples, "
                                          r"leaving 0 to train on"):
        prepare_splits(task, 1, 2, "all", seed=0)


def test_custom_generation_task_through_the_datasets_library(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    for split, start, n in (("train", 0, 12), ("test", 100, 4)):
        rows = [{"question": f"what is {i} plus one?", "answer": f"{i + 1}"}
                for i in range(start, start + n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s, run_dir = cli_train(tmp_path, task="custom", **{
        "task_args.hf_dataset": str(folder), "task_args.train": "train", "task_args.test": "test",
        "task_args.input_column": "question", "task_args.target_column": "answer",
        "task_args.max_new_tokens": 4, "train_size": 6, "val_size": 4, "test_size": 4,
    })
    assert s["selection_metric"] == "rougeLsum"
    assert len(files.read_jsonl(run_dir / "predictions" / "test.jsonl")) == 4
