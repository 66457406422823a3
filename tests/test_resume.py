"""A run killed with SIGKILL resumes from its last checkpoint and ends as if never killed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from peftlab.files import read_jsonl
from tests.conftest import tiny_run_sets

TIMING = ("elapsed_s", "examples_per_s", "eval_s")


def command(tmp_path, name, **overrides):
    sets = tiny_run_sets(tmp_path, output_dir=str(tmp_path / name), max_steps=30, eval_every=5,
                         log_every=5, **overrides)
    return [sys.executable, "-m", "peftlab", "train", "--quiet"] + [
        x for s in sets for x in ("--set", s)]


def rows(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in read_jsonl(run_dir / "metrics.jsonl")]


def checkpointed(run_dir, min_step):
    def ready():
        try:
            pointer = run_dir / "checkpoints" / "latest.json"
            return json.loads(pointer.read_text())["step"] >= min_step
        except (OSError, ValueError):
            return False
    return ready


def step0_logged(run_dir):
    """Killed after the step-0 evaluation, before any checkpoint exists."""
    return lambda: (run_dir / "metrics.jsonl").exists()


def kill_when(cmd, ready):
    """Start the run; SIGKILL it as soon as `ready()` holds."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def kill_after_checkpoint(cmd, run_dir, min_step):
    kill_when(cmd, checkpointed(run_dir, min_step))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Uninterrupted reference runs, one per method."""
    cache = {}

    def get(method):
        if method not in cache:
            tmp = tmp_path_factory.mktemp(f"straight-{method}")
            done = subprocess.run(command(tmp, "run", method=method), capture_output=True)
            assert done.returncode == 0, done.stderr.decode()[-2000:]
            cache[method] = tmp / "run"
        return cache[method]
    return get


@pytest.mark.parametrize("method,moment", [
    pytest.param("lora", "step0", marks=pytest.mark.slow),
    pytest.param("lora", 5, marks=pytest.mark.slow),
    pytest.param("lora", 25, marks=pytest.mark.slow), ("prefix", 15),  # mid-run: prefix
])
def test_killed_run_resumes_and_matches_an_uninterrupted_one(tmp_path, straight, method, moment):
    killed = tmp_path / "killed"
    cmd = command(tmp_path, "killed", method=method)
    kill_when(cmd, step0_logged(killed) if moment == "step0" else checkpointed(killed, moment))
    assert not (killed / "summary.json").exists()
    done = subprocess.run(cmd, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    reference = straight(method)
    expected = json.loads((reference / "summary.json").read_text())
    resumed = json.loads((killed / "summary.json").read_text())
    for key in ("best_step", "val_metrics", "test_metrics", "steps_done", "status"):
        assert resumed[key] == expected[key], key
    assert rows(killed) == rows(reference)  # no duplicated or missing steps
    # the evaluations and steps done before the kill still count in the phases
    killed_rows = read_jsonl(killed / "metrics.jsonl")
    assert resumed["time_s"]["validation"] == pytest.approx(sum(r["eval_s"] for r in killed_rows))
    assert resumed["time_s"]["training"] == pytest.approx(
        killed_rows[-1]["elapsed_s"] - resumed["time_s"]["validation"])
    assert not (killed / "checkpoints").exists()


def test_a_different_config_in_an_unfinished_run_folder_is_refused(tmp_path):
    """An unfinished run (its config.yaml and a checkpoint, no summary, as a kill leaves it)
    is not resumed with another seed: the changed key is named, nothing is touched."""
    from typer.testing import CliRunner

    from peftlab.cli import app
    from peftlab.config import resolve_run_config
    from peftlab.files import write_yaml

    sets = tiny_run_sets(tmp_path, output_dir=str(tmp_path / "r"))
    cfg = resolve_run_config(dict(s.split("=", 1) for s in sets))
    write_yaml(tmp_path / "r" / "config.yaml", cfg.model_dump())
    (tmp_path / "r" / "checkpoints").mkdir()
    (tmp_path / "r" / "checkpoints" / "latest.json").write_text('{"step": 2}')
    other = CliRunner().invoke(app, ["train", "--quiet", *[x for s in sets + ["seed=5"]
                                                            for x in ("--set", s)]])
    assert other.exit_code == 2
    assert "different config (seed: 0 -> 5)" in " ".join(other.output.split())
    assert (tmp_path / "r" / "checkpoints" / "latest.json").read_text() == '{"step": 2}'


def test_a_run_that_stopped_early_stays_stopped_when_resumed(tmp_path, monkeypatch):
    """Killed after the checkpoint at which early stopping fired (before its summary): the
    resumed run must not train on past that point."""
    import peftlab.run as run_module
    from peftlab.config import resolve_run_config

    cfg = resolve_run_config({
        "model": "t5-tiny", "task": "sst2", "method": "lora", "train_size": 16, "val_size": 16,
        "test_size": 16, "max_steps": 10, "eval_every": 1, "log_every": 1, "batch_size": 4,
        "learning_rate": 1e-12, "early_stopping_patience": 1, "output_dir": str(tmp_path / "r")})
    straight = run_module.run(cfg.model_copy(update={"output_dir": str(tmp_path / "s")}),
                              progress=False)
    assert straight["stopped_early"] and straight["steps_done"] == 1
    with monkeypatch.context() as patched:  # leave the checkpoint behind, as a kill would
        patched.setattr(run_module, "remove_checkpoints", lambda run_dir: None)
        run_module.run(cfg, progress=False)
    for name in ("summary.json", "adapter.safetensors", "predictions/test.jsonl"):
        (tmp_path / "r" / name).unlink()
    resumed = run_module.run(cfg, progress=False)
    assert resumed["steps_done"] == 1 and resumed["stopped_early"]
    assert resumed["test_metrics"] == straight["test_metrics"]


def test_rng_state_keeps_the_current_gpu_only_and_restores_old_states_in_device_order(
        monkeypatch):
    """Forced on this CPU: a checkpoint holds the current CUDA device's generator (reading
    every visible GPU's opened a context on each), and an older checkpoint's per-GPU states
    go back in numeric order (cuda10 after cuda2)."""
    import torch

    from peftlab import checkpoint

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7]))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all",
                        lambda: pytest.fail("every GPU's state was read"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": calls.append(s))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.append(states))
    state = checkpoint.rng_state()
    assert set(state) == {"torch", "cuda"} and int(state["cuda"]) == 7
    checkpoint.set_rng_state(state)
    assert int(calls[-1]) == 7
    old = {"torch": torch.get_rng_state(), **{f"cuda{i}": torch.tensor([i]) for i in (0, 2, 10)}}
    checkpoint.set_rng_state(old)
    assert [int(t) for t in calls[-1]] == [0, 2, 10]


def test_ctrl_c_says_how_to_resume_and_exits_130(tmp_path):
    cmd = command(tmp_path, "run", method="lora")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = step0_logged(tmp_path / "run")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted; run the same command again to resume" in err
    assert "Traceback" not in err
