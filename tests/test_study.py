"""The study runner: grid expansion, dry run, resume after SIGKILL, concurrent runners, Ray."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from peftlab.cli import app
from peftlab.errors import ConfigError
from peftlab.files import read_jsonl
from peftlab.study import expand, load_study, pending, run_lock

runner = CliRunner()

TINY = {
    "name": "tiny",
    "base": {"model": "t5-tiny", "max_steps": 20, "eval_every": 5, "log_every": 5,
             "batch_size": 4, "val_size": 16, "test_size": 16},
    "tasks": {"sst2": {}},
    "methods": [{"method": "untuned"}, {"method": "majority"},
                {"method": "lora", "sizes": {"r": [2, 4]}, "learning_rates": [1e-3]},
                {"method": "ln", "learning_rates": [3e-3]}],
    "train_sizes": [16],
    "seeds": [0, 1],
}


def write_study(tmp_path, study=TINY) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_smoke_and_seed_study_grids():
    smoke = expand(load_study(preset="smoke"), Path("/x"))
    keys = [c.key for c in smoke]
    assert len(keys) == len(set(keys)) == 151
    assert "sst2/untuned" in keys and "samsum/lead-3" in keys
    assert not any(k.startswith("samsum/majority") for k in keys)
    assert "sst2/lora-r8/n64/lr0.01/seed1" in keys
    lora = next(c for c in smoke if c.key == "sst2/lora-r8/n64/lr0.01/seed1")
    assert lora.config.method_args["r"] == 8 and lora.config.method_args["alpha"] == 16
    assert lora.config.learning_rate == 0.01 and lora.config.output_dir == "/x/" + lora.key
    seed = expand(load_study(preset="seed-study"), Path("/x"))
    assert len(seed) == 822
    methods = {c.config.method for c in seed}
    assert methods == {"untuned", "majority", "lead-3", "full", "lora", "prompt", "prefix",
                       "ia3", "ln"}
    assert {c.config.train_size for c in seed if c.config.method == "lora"} == {64, 256, 1024}


def test_dry_run_prints_the_grid_and_runs_nothing(tmp_path):
    result = runner.invoke(app, ["run", str(write_study(tmp_path)), "--out",
                                 str(tmp_path / "s"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "9 runs (9 to run, 0 finished)" in result.output
    assert "total optimizer steps: 120" in result.output
    assert not (tmp_path / "s").exists()


def test_bad_study_files_are_named(tmp_path):
    bad = dict(TINY, methods=[{"method": "lora", "learning_rates": [-1]}])
    with pytest.raises(ConfigError, match="learning_rates"):
        load_study(write_study(tmp_path, bad))
    bad = dict(TINY, methods=[{"method": "lora", "method_args": {"rank": 3}}])
    with pytest.raises(ConfigError, match=r"study cell sst2/lora/n16/seed0: unknown key "
                                          r"`method_args.rank`"):
        expand(load_study(write_study(tmp_path, bad)), tmp_path)
    with pytest.raises(ConfigError, match="unknown preset `smok` \\(did you mean `smoke`"):
        load_study(preset="smok")


def study_cmd(study_file, out, *extra):
    return [sys.executable, "-m", "peftlab", "run", str(study_file), "--out", str(out),
            "--quiet", "--no-report", *extra]


def statuses(out: Path) -> dict[str, str]:
    return {str(p.parent.relative_to(out)): json.loads(p.read_text())["status"]
            for p in out.rglob("summary.json")}


def test_a_killed_study_resumes_with_every_run_exactly_once(tmp_path):
    study_file, out = write_study(tmp_path), tmp_path / "s"
    proc = subprocess.Popen(study_cmd(study_file, out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # kill mid-run: once some run has finished and another has a checkpoint
    while time.time() < deadline and proc.poll() is None:
        if list(out.rglob("summary.json")) and list(out.rglob("checkpoints/latest.json")):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the study ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < len(statuses(out)) < 9
    done = subprocess.run(study_cmd(study_file, out), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert set(statuses(out).values()) == {"completed"} and len(statuses(out)) == 9
    for metrics in out.rglob("metrics.jsonl"):
        steps = [r["step"] for r in read_jsonl(metrics)]
        assert steps == sorted(set(steps)), metrics  # no duplicated steps
    assert not list(out.rglob(".lock")) and not list(out.rglob("checkpoints"))


def test_two_runners_on_one_study_never_run_a_cell_twice(tmp_path):
    study_file, out = write_study(tmp_path), tmp_path / "s"
    procs = [subprocess.Popen(study_cmd(study_file, out), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    counts = [json.loads(o.split("study ")[-1].split(": ", 1)[1].splitlines()[0]) for o in outputs]
    assert sum(c.get("completed", 0) for c in counts) == 9, counts  # each cell ran once
    assert len(statuses(out)) == 9


def test_a_stale_lock_from_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    import socket

    (run_dir / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with run_lock(run_dir) as held:
        assert held
    (run_dir / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with run_lock(run_dir) as held:
        assert not held  # a live holder is respected


def test_failed_runs_are_recorded_and_can_be_retried(tmp_path):
    study = dict(TINY, methods=[{"method": "lora", "learning_rates": [1e-3],
                                 "method_args": {"target_modules": ["q"]}}],
                 tasks={"sst2": {"task_args": {"data_dir": str(tmp_path / "nowhere")}}})
    (tmp_path / "nowhere").mkdir()
    out = tmp_path / "s"
    result = runner.invoke(app, ["run", str(write_study(tmp_path, study)), "--out", str(out),
                                 "--quiet", "--no-report"])
    assert result.exit_code == 0, result.output
    assert set(statuses(out).values()) == {"failed"}
    summary = json.loads(next(out.rglob("summary.json")).read_text())
    assert "data file not found" in summary["error"]
    cells = expand(load_study(write_study(tmp_path, study)), out)
    assert pending(cells, retry_failed=False) == []
    assert len(pending(cells, retry_failed=True)) == 2


def run_two_cells(tmp_path, methods, seeds, *extra) -> dict[str, str]:
    """Run a two-cell study through the real command with `extra` flags; its run statuses."""
    out = tmp_path / "s"
    study = dict(TINY, methods=methods, seeds=seeds)
    result = subprocess.run(study_cmd(write_study(tmp_path, study), out, *extra),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return statuses(out)


def test_ray_backend_on_a_local_instance(tmp_path):
    pytest.importorskip("ray")
    assert run_two_cells(tmp_path, [{"method": "lora", "learning_rates": [1e-3]}], [0, 1],
                         "--backend", "ray") == {
        "sst2/lora/n16/lr0.001/seed0": "completed", "sst2/lora/n16/lr0.001/seed1": "completed"}


def test_worker_processes_run_the_grid(tmp_path):
    methods = [{"method": "lora", "learning_rates": [1e-3]},
               {"method": "ln", "learning_rates": [3e-3]}]
    assert run_two_cells(tmp_path, methods, [0], "--workers", "2") == {
        "sst2/lora/n16/lr0.001/seed0": "completed", "sst2/ln/n16/lr0.003/seed0": "completed"}
