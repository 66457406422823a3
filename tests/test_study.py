"""The study runner: grid expansion, dry run, resume after SIGKILL, concurrent runners, Ray."""

import json
import os
import re
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
from peftlab.locks import run_lock
from peftlab.study import expand, load_study, pending

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
    completed = [re.search(r"study .*: .*?(\d+) completed", o) for o in outputs]
    assert sum(int(m.group(1)) for m in completed if m) == 9, outputs  # each cell ran once
    assert len(statuses(out)) == 9


def test_a_lock_dies_with_its_holder_and_a_live_one_is_respected(tmp_path):
    """flock: the kernel drops the lock when its holder dies, whatever its pid becomes."""
    run_dir = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from peftlab.locks import run_lock\n"
        "with run_lock(Path(sys.argv[1])) as h:\n"
        "    assert h is None; print('held', flush=True); time.sleep(60)"), str(run_dir)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with run_lock(run_dir) as other:
        assert other is not None and other["pid"] == holder.pid  # a live holder, named
    holder.kill()
    holder.wait()
    with run_lock(run_dir) as other:
        assert other is None  # taken over at once: no stale file to judge
    assert not (run_dir / ".lock").exists()


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


def test_ray_backend_on_a_local_instance_runs_a_pack_as_one_task(tmp_path):
    pytest.importorskip("ray")
    assert run_two_cells(tmp_path, [{"method": "lora", "learning_rates": [1e-3]}], [0, 1],
                         "--backend", "ray", "--pack", "2") == {
        "sst2/lora/n16/lr0.001/seed0": "completed", "sst2/lora/n16/lr0.001/seed1": "completed"}
    packs = [json.loads((tmp_path / "s" / "sst2/lora/n16/lr0.001" / f"seed{i}" / "summary.json")
                        .read_text())["pack"] for i in (0, 1)]
    assert packs[0]["id"] == packs[1]["id"] and [p["index"] for p in packs] == [0, 1]


def _children(pid: int) -> list[int]:
    """Worker processes (spawned by multiprocessing) whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_workers_die_with_the_main_process(tmp_path):
    """kill -9 of `peftlab run --workers 2`: its workers must not run the queue on alone."""
    study = dict(TINY, base={**TINY["base"], "max_steps": 400, "eval_every": 100},
                 methods=[{"method": "ln", "learning_rates": [3e-3]}], seeds=[0, 1, 2, 3])
    proc = subprocess.Popen(study_cmd(write_study(tmp_path, study), tmp_path / "s", "--workers",
                                      "2"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    workers: list[int] = []
    while time.time() < deadline and len(workers) < 2:
        workers = _children(proc.pid)
        time.sleep(0.2)
    assert len(workers) == 2, "the workers did not start"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    survivors = [w for w in workers if _alive(w)]
    for w in survivors:
        os.kill(w, signal.SIGKILL)
    assert not survivors, "workers outlived the main process"


def test_results_do_not_depend_on_the_number_of_workers(tmp_path):
    """Every run gets the same CPU thread count (cpu_threads, 1 per run in a study) whether
    it shares the machine with another or not: the same numbers, to the bit."""
    methods = [{"method": "lora", "learning_rates": [1e-3]}, {"method": "ln", "learning_rates": [3e-3]}]
    study = dict(TINY, methods=methods, seeds=[0])
    folders = {}
    for n in (1, 2):
        out = tmp_path / f"w{n}"
        done = subprocess.run(study_cmd(write_study(tmp_path, study), out, "--workers", str(n)),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        folders[n] = out
    timing = ("elapsed_s", "examples_per_s", "eval_s")
    for cell in ("sst2/lora/n16/lr0.001/seed0", "sst2/ln/n16/lr0.003/seed0"):
        a, b = (folders[n] / cell for n in (1, 2))
        rows = [[{k: v for k, v in r.items() if k not in timing} for r in read_jsonl(f / "metrics.jsonl")]
                for f in (a, b)]
        assert rows[0] == rows[1], cell
        assert (a / "adapter.safetensors").read_bytes() == (b / "adapter.safetensors").read_bytes()
        assert yaml.safe_load((a / "config.yaml").read_text())["cpu_threads"] == 1


@pytest.mark.slow  # 38 s; the ray backend runs by default in the local-instance test
def test_ray_cluster_started_apart_with_a_relative_out_from_another_folder(tmp_path):
    """A cluster started as its own process (`ray start --head`) in another folder, without
    PEFTLAB_DATA_DIR: the runs land under the driver's relative --out and find the data."""
    pytest.importorskip("ray")
    ray_bin = Path(sys.executable).parent / "ray"
    env = {k: v for k, v in os.environ.items() if k != "PEFTLAB_DATA_DIR"}
    (tmp_path / "cluster").mkdir()
    port = 6300 + os.getpid() % 500
    started = subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=2",
                              "--include-dashboard=false", "--disable-usage-stats"],
                             cwd=tmp_path / "cluster", env=env, capture_output=True, text=True,
                             timeout=120)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        driver = tmp_path / "driver"
        driver.mkdir()
        study = dict(TINY, methods=[{"method": "ln", "learning_rates": [3e-3]}])
        command = [sys.executable, "-m", "peftlab", "run", str(write_study(tmp_path, study)),
                   "--out", "relstudy", "--backend", "ray", "--address", "auto",
                   "--quiet"]
        first = subprocess.run(command, cwd=driver, capture_output=True, text=True, timeout=600)
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
        assert statuses(driver / "relstudy") == {
            "sst2/ln/n16/lr0.003/seed0": "completed", "sst2/ln/n16/lr0.003/seed1": "completed"}
        assert (driver / "relstudy" / "report" / "report.md").is_file()
        assert not list((tmp_path / "cluster").rglob("summary.json"))
        second = subprocess.run(command, cwd=driver, capture_output=True, text=True, timeout=600)
        assert second.returncode == 0 and "nothing to run" in second.stdout, second.stdout
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_workers_are_pinned_to_the_gpus_the_parent_was_given(monkeypatch):
    """Under CUDA_VISIBLE_DEVICES=2,3 a worker pinned to '0' would take the machine's GPU 0,
    outside the parent's share."""
    from peftlab.device import worker_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert worker_gpus(2) == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a1b2, GPU-c3d4")
    assert worker_gpus(2) == ["GPU-a1b2", "GPU-c3d4"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert worker_gpus(3) == ["0", "1", "2"]


def test_a_study_without_a_terminal_logs_its_progress(monkeypatch, caplog):
    """The study's bar is off in a job log: a line every PEFTLAB_PROGRESS_SECONDS instead,
    with runs done of the total, their statuses and an ETA, even while no run finishes."""
    import logging

    from peftlab.study import StudyProgressLines

    monkeypatch.setenv("PEFTLAB_PROGRESS_SECONDS", "0.05")
    counts: dict[str, int] = {}
    with caplog.at_level(logging.INFO, logger="peftlab"):
        lines = StudyProgressLines(4, counts, enabled=True)
        time.sleep(0.2)
        counts.update(completed=2, failed=1)
        time.sleep(0.2)
        lines.stop()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("study:")]
    assert said[0].startswith("study: 0/4 runs done, ") and said[0].endswith("ETA -")
    assert "study: 3/4 runs done (2 completed, 1 failed)" in said[-1]
    assert "ETA" in said[-1] and not said[-1].endswith("ETA -")
    quiet = StudyProgressLines(4, counts, enabled=False)
    quiet.stop()
    assert quiet.thread is None
