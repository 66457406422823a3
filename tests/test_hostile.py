"""Reliability, second round: each defect a hostile user found (issue 15), reproduced.

Paths that escape the study folder, `--overwrite` on a user's folder, edited and moved
studies, corrupt records, templates, unusable checkpoints, duplicate keys, messages.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from peftlab.cli import app
from peftlab.files import read_jsonl
from tests.conftest import DATA_DIR, tiny_run_sets

runner = CliRunner()

TINY = {
    "name": "tiny",
    "base": {"model": "t5-tiny", "max_steps": 4, "eval_every": 2, "log_every": 2,
             "batch_size": 4, "val_size": 8, "test_size": 8},
    "tasks": {"sst2": {}},
    "methods": [{"method": "untuned"}, {"method": "ln", "learning_rates": [3e-3]}],
    "train_sizes": [8],
    "seeds": [0, 1],
}
LN_CELLS = ["sst2/ln/n8/lr0.003/seed0", "sst2/ln/n8/lr0.003/seed1"]


def cli(*args: str, cwd: Path | None = None) -> tuple[int, str]:
    if cwd is None:
        result = runner.invoke(app, list(args))
        return result.exit_code, " ".join(result.output.split())
    done = subprocess.run([sys.executable, "-m", "peftlab", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=600)
    return done.returncode, " ".join((done.stdout + done.stderr).split())


def write_study(folder: Path, study: dict = TINY, name: str = "study.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def run_study(study_file: Path, out: Path, *extra: str) -> tuple[int, str]:
    return cli("run", str(study_file), "--out", str(out), "--quiet", "--workers", "1", *extra)


def statuses(out: Path) -> dict[str, str]:
    return {str(p.parent.relative_to(out)): json.loads(p.read_text())["status"]
            for p in out.rglob("summary.json")}


def train_sets(tmp_path: Path, **overrides) -> list[str]:
    return [x for s in tiny_run_sets(tmp_path, **overrides) for x in ("--set", s)]


# --- 1. nothing a study builds leaves its folder ------------------------------------------

@pytest.mark.parametrize("spec,field", [
    ({"method": "untuned", "label": "../../../victim"}, "methods.0.label"),
    ({"method": "ln", "label": "a/b", "learning_rates": [1e-3]}, "methods.0.label"),
    ({"method": "ln", "size_label": "..", "learning_rates": [1e-3]}, "methods.0.size_label"),
])
def test_a_label_that_would_leave_the_study_folder_is_refused(tmp_path, spec, field):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "metrics.jsonl").write_text("precious\n")
    (tmp_path / "a").mkdir()
    study_file = write_study(tmp_path / "a", dict(TINY, methods=[spec]))
    code, out = run_study(study_file, tmp_path / "a" / "b" / "s")
    assert code == 2 and field in out and "plain folder name" in out, out
    assert (victim / "metrics.jsonl").read_text() == "precious\n"
    assert not (tmp_path / "a" / "b").exists()


def test_a_size_value_that_would_leave_the_study_folder_is_refused(tmp_path):
    study = dict(TINY, methods=[{"method": "peft", "learning_rates": [1e-3],
                                 "sizes": {"peft_type": ["../../x"]}}])
    code, out = run_study(write_study(tmp_path, study), tmp_path / "s")
    assert code == 2 and "not a plain folder name inside the study folder" in out, out
    assert not (tmp_path / "x").exists()


def test_a_checkpoint_pointer_is_never_followed_out_of_the_run(tmp_path):
    from peftlab.checkpoint import load_checkpoint
    from peftlab.errors import CheckpointError

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest.json").write_text(json.dumps({"folder": "../../elsewhere"}))
    with pytest.raises(CheckpointError, match="not a checkpoint folder of this run"):
        load_checkpoint(run_dir)


# --- 2. --overwrite deletes only what a run wrote -----------------------------------------

def test_overwrite_keeps_a_users_own_files(tmp_path):
    code, out = cli("train", "--quiet", *train_sets(tmp_path))
    assert code == 0, out
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "model.pt").write_text("mine")
    (run_dir / "predictions" / "p.txt").write_text("mine too")
    (run_dir / "notes.md").write_text("and mine")
    code, out = cli("train", "--quiet", "--overwrite", *train_sets(tmp_path, seed=1))
    assert code == 0, out
    assert (run_dir / "checkpoints" / "model.pt").read_text() == "mine"
    assert (run_dir / "predictions" / "p.txt").read_text() == "mine too"
    assert (run_dir / "notes.md").read_text() == "and mine"
    assert json.loads((run_dir / "summary.json").read_text())["seed"] == 1


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "predictions").mkdir()
    (folder / "predictions" / "test.jsonl").write_text("a user's file of that name\n")
    (folder / "metrics.jsonl").write_text("another\n")
    code, out = cli("train", "--quiet", "--overwrite", *train_sets(tmp_path))
    assert code == 2 and "no peftlab run record" in out and "nothing was deleted" in out, out
    assert (folder / "predictions" / "test.jsonl").read_text() == "a user's file of that name\n"
    assert (folder / "metrics.jsonl").read_text() == "another\n"


# --- 3. an edited study never reuses runs made with other settings -------------------------

def test_an_edited_study_names_the_changed_cells_and_reruns_them_only_when_asked(tmp_path):
    out = tmp_path / "s"
    code, text = run_study(write_study(tmp_path), out, "--no-report")
    assert code == 0, text
    before = (out / "study.yaml").read_text()
    edited = dict(TINY, base={**TINY["base"], "max_steps": 6})
    code, text = run_study(write_study(tmp_path, edited), out)
    assert code == 2, text
    # untuned too: its resolved config (max_steps) differs, though it trains nothing
    assert "3 cells of this study folder were run with other settings" in text
    assert "sst2/ln/n8/lr0.003/seed0 (max_steps: 4 -> 6)" in text
    assert (out / "study.yaml").read_text() == before  # the study file claims what ran
    code, text = run_study(write_study(tmp_path, edited), out, "--rerun-changed")
    assert code == 0 and "3 completed" in text, text
    for cell in LN_CELLS:
        assert json.loads((out / cell / "summary.json").read_text())["steps_done"] == 6
    assert yaml.safe_load((out / "study.yaml").read_text())["base"]["max_steps"] == 6


# --- 4. the same study reached by another path ---------------------------------------------

def test_a_moved_study_resumes_under_its_new_path(tmp_path):
    study_file = write_study(tmp_path)
    code, text = cli("run", str(study_file), "--out", "rel", "--quiet", "--workers", "1",
                     "--no-report", cwd=tmp_path)
    assert code == 0, text
    unfinished = tmp_path / "rel" / LN_CELLS[0]
    (unfinished / "summary.json").unlink()  # as if killed before it finished
    shutil.move(tmp_path / "rel", tmp_path / "moved")
    code, text = run_study(study_file, tmp_path / "moved", "--no-report")
    assert code == 0 and "1 completed" in text, text
    assert set(statuses(tmp_path / "moved").values()) == {"completed"}


# --- 5. a corrupt record re-runs its cell; the rest goes on ---------------------------------

@pytest.mark.parametrize("damage", ["summary", "metrics_line", "metrics_empty"])
def test_a_corrupt_record_reruns_its_cell_naming_the_file(tmp_path, damage):
    out = tmp_path / "s"
    code, text = run_study(write_study(tmp_path), out, "--no-report")
    assert code == 0, text
    cell = out / LN_CELLS[1]
    if damage == "summary":
        (cell / "summary.json").write_text('{"status": "compl')
        broken = "summary.json"
    elif damage == "metrics_line":
        rows = (cell / "metrics.jsonl").read_text()
        (cell / "metrics.jsonl").write_text(rows + '{"step": 9, "train_lo')
        broken = "metrics.jsonl:4"
    else:
        (cell / "metrics.jsonl").write_text("")
        broken = "metrics.jsonl: no step-0 row"
    # the report says so, and goes on with the rest
    code, text = cli("report", str(out))
    assert code == 0, text
    md = (out / "report" / "report.md").read_text()
    assert "1 run folders left out" in md and broken in md
    for flags in (("--dry-run",), ("--retry-failed", "--dry-run")):
        code, text = run_study(write_study(tmp_path), out, *flags)
        assert code == 0 and broken in text and "the cell runs again" in text, text
    code, text = run_study(write_study(tmp_path), out)
    assert code == 0 and "1 completed" in text, text
    assert set(statuses(out).values()) == {"completed"}
    assert list(cell.glob("*.corrupt"))  # kept for inspection


def test_an_unfinished_cell_with_a_corrupt_config_runs_again_with_one_command(tmp_path):
    """An unfinished run's config.yaml cut mid-write: the plain command runs the cell again
    from step 0 (the config kept aside, the checkpoints it cannot vouch for dropped); no
    advice that leads to a refusal."""
    out = tmp_path / "s"
    code, text = run_study(write_study(tmp_path), out, "--no-report")
    assert code == 0, text
    cell = out / LN_CELLS[0]
    (cell / "summary.json").unlink()  # as if killed before finishing
    (cell / "checkpoints" / "step-000002").mkdir(parents=True)
    (cell / "checkpoints" / "step-000002" / "trainable.safetensors").write_bytes(b"x")
    (cell / "config.yaml").write_text("model: t5-tiny\nmethod: [ln\n")
    code, text = run_study(write_study(tmp_path), out, "--no-report")
    assert code == 0 and "config.yaml: unreadable" in text and "the cell runs again" in text, text
    assert "--rerun-changed" not in text and "1 completed" in text
    assert set(statuses(out).values()) == {"completed"}
    assert list(cell.glob("config.yaml.corrupt*"))


# --- 8. templates ------------------------------------------------------------------------

@pytest.mark.parametrize("template,expected", [
    ("Review: {review}", "unknown field {review}"),
    ("Classify this review.", "no {text} field"),
    ("{text.__class__}", "unknown field {text.__class__}"),
    ("{text[0]}", "unknown field {text[0]}"),
    ("{text!r}", "unknown field {text!r}"),
    ("{text", "not a valid template"),
])
def test_templates_are_checked_before_anything_runs(tmp_path, template, expected):
    code, out = cli("train", *train_sets(tmp_path, **{"task_args.template": f"'{template}'"}))
    assert code == 2 and "task_args.template" in out and expected in out, out
    assert not (tmp_path / "run").exists()


def test_a_template_with_literal_braces_works(tmp_path):
    from peftlab.config import resolve_run_config

    cfg = resolve_run_config({"model": "t5-tiny", "task_args": {"template": "{{json}}: {text}"}})
    assert cfg.task_args["template"] == "{{json}}: {text}"


# --- 9. a checkpoint that does not fit is discarded, and the run starts again -------------

def _killed_run(tmp_path: Path) -> tuple[Path, list[str]]:
    """A run stopped after its step-2 checkpoint (run to the end, then set back)."""
    sets = train_sets(tmp_path, max_steps=4, eval_every=2, method="lora")
    args = [sys.executable, "-m", "peftlab", "train", "--quiet", *sets]
    import signal
    import time

    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = tmp_path / "run" / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    while not pointer.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert pointer.exists(), "the run ended before its checkpoint"
    return tmp_path / "run", sets


@pytest.mark.parametrize("damage", [
    pytest.param("missing_key", marks=pytest.mark.slow), "wrong_shape",
    pytest.param("bad_rng", marks=pytest.mark.slow),
    pytest.param("garbage", marks=pytest.mark.slow)])
def test_a_checkpoint_that_does_not_fit_restarts_the_run_naming_it(tmp_path, damage):
    run_dir, sets = _killed_run(tmp_path)
    step = next((run_dir / "checkpoints").glob("step-*"))
    if damage in ("missing_key", "wrong_shape"):
        tensors = load_file(step / "trainable.safetensors")
        name = next(iter(tensors))
        if damage == "missing_key":
            del tensors[name]
        else:
            tensors[name] = tensors[name][:1].clone()
        save_file(tensors, step / "trainable.safetensors")
    elif damage == "bad_rng":
        save_file({"torch": load_file(step / "rng.safetensors")["torch"][:7].clone()},
                  step / "rng.safetensors")
    else:
        (step / "optimizer.safetensors").write_bytes(b"\x00\x01not safetensors")
    code, out = cli("train", "--quiet", *sets)
    assert code == 0, out
    assert "checkpoints" in out and "discarded: the run started again from step 0" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["notes"]
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0, 2, 4]
    # the same result as a run never interrupted
    code, _ = cli("train", "--quiet", *train_sets(tmp_path, max_steps=4, eval_every=2,
                                                  method="lora", output_dir=str(tmp_path / "b")))
    straight = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["test_metrics"] == straight["test_metrics"]


# --- 10. `peftlab train` takes the run folder's lock ---------------------------------------

def test_train_refuses_a_folder_another_process_is_writing(tmp_path):
    from peftlab.locks import run_lock

    with run_lock(tmp_path / "run") as holder:
        assert holder is None
        code, out = cli("train", "--quiet", *train_sets(tmp_path))
    assert code == 2 and "is being written by pid" in out, out


def test_a_study_names_the_cells_other_processes_hold(tmp_path):
    from peftlab.locks import run_lock

    out = tmp_path / "s"
    with run_lock(out / LN_CELLS[0]) as holder:
        assert holder is None
        code, text = run_study(write_study(tmp_path), out, "--no-report")
    assert code == 0, text
    assert f"1 cells are held by other processes, not run here: {LN_CELLS[0]} (pid" in text


# --- 11. duplicates --------------------------------------------------------------------------

def test_a_key_given_twice_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: t5-tiny\nmax_steps: 3\nseed: 0\nmax_steps: 1\n")
    code, out = cli("train", "--config", str(path))
    assert code == 2 and "run.yaml:4:1" in out and "duplicate key 'max_steps' (first given on line 2)" in out


def test_repeated_seeds_sizes_and_rates_are_named(tmp_path):
    for change, expected in ((dict(seeds=[0, 0]), "the seed 0 given more than once"),
                             (dict(train_sizes=[8, 8]), "the train size 8 given more than once"),
                             (dict(methods=[{"method": "ln", "learning_rates": [1e-3, 1e-3]}]),
                              "learning_rates: the rate 0.001 given more than once")):
        code, out = run_study(write_study(tmp_path, dict(TINY, **change)), tmp_path / "s")
        assert code == 2 and expected in out, out


# --- 12. messages ----------------------------------------------------------------------------

def test_a_full_disk_in_a_study_names_the_cell_and_the_file(tmp_path, monkeypatch):
    import errno

    from peftlab import files

    real = files.os.fsync

    def full(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp") and "predictions" in os.readlink(
                f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(files.os, "fsync", full)
    out = tmp_path / "s"
    code, text = run_study(write_study(tmp_path), out, "--no-report")
    assert code == 2, text
    assert "the study stopped at cell" in text and "the disk is full" in text
    assert "predictions/test.jsonl" in text


def test_leftover_temporaries_in_finished_runs_are_cleaned(tmp_path):
    out = tmp_path / "s"
    code, text = run_study(write_study(tmp_path), out, "--no-report")
    assert code == 0, text
    left = out / LN_CELLS[0] / ".summary.json.abc123.tmp"
    left.write_text("half a summary")
    mine = out / LN_CELLS[0] / "my.tmp"
    mine.write_text("not peftlab's")
    code, text = run_study(write_study(tmp_path), out, "--no-report")
    assert code == 0, text
    assert not left.exists() and mine.exists()


def test_checkpoints_a_finished_run_kept_are_removed_on_the_next_pass(tmp_path):
    """A kill between summary.json and the checkpoints' removal kept weights and optimizer
    state: the next pass over the study removes them (and says so), keeping a user's file."""
    out = tmp_path / "s"
    code, text = run_study(write_study(tmp_path), out, "--no-report")
    assert code == 0, text
    step = out / LN_CELLS[0] / "checkpoints" / "step-000004"
    step.mkdir(parents=True)
    (step / "optimizer.safetensors").write_bytes(b"x" * 1000)
    (step.parent / "latest.json").write_text('{"step": 4}')
    (step.parent / "mine.txt").write_text("not peftlab's")
    code, text = run_study(write_study(tmp_path), out, "--no-report")
    assert code == 0, text
    assert "removed the training checkpoints that 1 finished runs kept" in text
    assert LN_CELLS[0] in text
    assert not step.exists() and not (step.parent / "latest.json").exists()
    assert (step.parent / "mine.txt").read_text() == "not peftlab's"


def test_a_byte_order_mark_in_a_tsv_header_is_accepted(tmp_path):
    from peftlab.tasks.readers import read_tsv

    path = tmp_path / "x.tsv"
    path.write_bytes(b"\xef\xbb\xbfsentence\tlabel\nfine\t1\n")
    assert read_tsv(path, ["sentence", "label"]) == [(2, {"sentence": "fine", "label": "1"})]


def test_inputs_whose_attention_cannot_fit_are_refused_before_allocating(tmp_path, monkeypatch):
    import peftlab.checks

    monkeypatch.setattr(peftlab.checks, "available_memory", lambda device: 2**30)  # 1 GiB free
    code, out = cli("train", *train_sets(tmp_path, task="samsum", max_source_length=16000,
                                         eval_batch_size=64, batch_size=8,
                                         model="flan-t5-small-random", test_size=64))
    assert code == 2 and "the longest input is" in out and "Lower `max_source_length`" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting,named", [
    ("max_new_tokens=1000000000", "max_new_tokens"), ("num_beams=1000000", "num_beams"),
    ("seed=18446744073709551616", "seed"), ("method_args.num_virtual_tokens=100000",
                                            "num_virtual_tokens")])
def test_unbounded_settings_are_refused_at_config_time_naming_the_field(tmp_path, setting,
                                                                        named):
    sets = train_sets(tmp_path)
    if "virtual" in setting:
        sets = train_sets(tmp_path, method="prompt")
    code, out = cli("train", *sets, "--set", setting)
    assert code == 2 and named in out and "Traceback" not in out, out
    assert not (tmp_path / "run").exists()


def test_what_evaluation_or_a_rank_would_need_is_checked_before_training(tmp_path,
                                                                          monkeypatch):
    """A LoRA rank above the layers' size hung; 16,000 prompt tokens, 64 beams or a large
    generation budget exhausted memory at test time, after training: refused up front."""
    import peftlab.checks

    code, out = cli("train", *train_sets(tmp_path, **{"method_args.r": 1000000}))
    assert code == 2 and "`method_args.r` is 1,000,000" in out, out
    monkeypatch.setattr(peftlab.checks, "available_memory", lambda device: 2**30)  # 1 GiB free
    code, out = cli("train", *train_sets(tmp_path, method="prompt",
                                         **{"method_args.num_virtual_tokens": 16000}))
    assert code == 2 and "plus 16,000 method tokens" in out and "GiB is free" in out, out
    code, out = cli("train", *train_sets(tmp_path, task="samsum", num_beams=64,
                                         max_new_tokens=16000, eval_batch_size=64,
                                         model="flan-t5-small-random"))
    assert code == 2 and "`num_beams` or `max_new_tokens`" in out, out
    assert not (tmp_path / "run" / "summary.json").exists()


def test_data_dir_is_written_into_the_config(tmp_path):
    from peftlab.config import resolve_run_config

    cfg = resolve_run_config({"model": "t5-tiny", "output_dir": "rel/run"})
    assert cfg.task_args["data_dir"] == str(DATA_DIR)
    assert cfg.output_dir == os.path.abspath("rel/run")
