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

TIMING = ("elapsed_s", "examples_per_s")


def command(tmp_path, name, **overrides):
    sets = tiny_run_sets(tmp_path, output_dir=str(tmp_path / name), max_steps=30, eval_every=5,
                         log_every=5, **overrides)
    return [sys.executable, "-m", "peftlab", "train", "--quiet"] + [
        x for s in sets for x in ("--set", s)]


def rows(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in read_jsonl(run_dir / "metrics.jsonl")]


def kill_after_checkpoint(cmd, run_dir, min_step):
    """Start the run; SIGKILL it once it has checkpointed at `min_step` or later."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = run_dir / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(pointer.read_text())["step"] >= min_step:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("method,min_step", [("lora", 5), ("prefix", 15)])
def test_killed_run_resumes_and_matches_an_uninterrupted_one(tmp_path, method, min_step):
    env_ok = subprocess.run(command(tmp_path, "straight", method=method), capture_output=True)
    assert env_ok.returncode == 0, env_ok.stderr.decode()[-2000:]
    kill_after_checkpoint(command(tmp_path, "killed", method=method), tmp_path / "killed", min_step)
    killed = tmp_path / "killed"
    assert not (killed / "summary.json").exists()
    done = subprocess.run(command(tmp_path, "killed", method=method), capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())
    resumed = json.loads((killed / "summary.json").read_text())
    for key in ("best_step", "val_metrics", "test_metrics", "steps_done", "status"):
        assert resumed[key] == straight[key], key
    assert rows(killed) == rows(tmp_path / "straight")  # no duplicated or missing steps
    assert not (killed / "checkpoints").exists()


def test_a_different_config_in_an_unfinished_run_folder_is_refused(tmp_path):
    kill_after_checkpoint(command(tmp_path, "r"), tmp_path / "r", 5)
    other = subprocess.run(command(tmp_path, "r", seed=5), capture_output=True, text=True)
    assert other.returncode == 2
    assert "different config (changed: seed)" in " ".join(other.stderr.split())
