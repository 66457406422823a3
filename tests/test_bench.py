"""The developer benchmark (`benchmarks/bench.py`, `benchmarks/peftlab_bench/`): the FLOP count, the
report, flag checking, and real measurements on t5-tiny."""

import json
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from peftlab_bench.cli import app
from peftlab_bench.common import model_flops
from peftlab_bench.markdown import markdown
from peftlab_bench.reference import measure_cell_reference
from peftlab_bench.runner import run_benchmark
from peftlab_bench.runs import measure_cell_ours

runner = CliRunner()


def test_model_flops_counts_each_matmul_once_per_token():
    c = SimpleNamespace(d_model=4, num_heads=2, d_kv=3, d_ff=5, vocab_size=7, num_layers=1,
                        num_decoder_layers=1)
    inner = 6
    enc = 4 * 4 * inner + 3 * 4 * 5 + 2 * 1 * inner  # one encoder token
    dec = (4 * 4 * inner + 3 * 4 * 5 + 1 * inner) + (2 * 4 * inner + 2 * 1 * inner) + 2 * 4 * inner
    head = 4 * 7
    frozen = model_flops(c, [1], [1], full=False)
    assert frozen == 2 * (enc + dec + head) * 2
    assert model_flops(c, [1], [1], full=True) == frozen * 3 / 2
    # attention grows with the square of the length, the rest linearly
    assert model_flops(c, [2], [1], full=False) > 2 * model_flops(c, [1], [0], full=False)


def test_bench_refuses_unknown_sections_and_shapes(tmp_path):
    result = runner.invoke(app, ["--out", str(tmp_path), "--sections", "train,speed"])
    assert result.exit_code == 2 and "'speed'" in result.output and "numerics" in result.output
    result = runner.invoke(app, ["--out", str(tmp_path), "--shapes", "mnli"])
    assert result.exit_code == 2 and "'mnli'" in result.output
    result = runner.invoke(app, ["--out", str(tmp_path), "--runs-per-gpu", "1,two"])
    assert result.exit_code == 2 and "--runs-per-gpu" in result.output
    assert not (tmp_path / "bench.json").exists()


def test_markdown_reports_every_section():
    run = {"examples_per_s": 10.0, "tokens_per_s": 400.0, "flops_per_s": 1e9,
           "peak_memory_mb": 900.0, "padding_fraction": 0.02}
    curve = {"losses": [3.0, 2.0], "val_metric": 60.0, "examples_per_s": 5.0}
    r = {"date": "2026-11-28", "machine": "x", "torch": "t", "model": "m", "precision": "fp32",
         "steps": 10, "warmup": 3, "curve_steps": 100,
         "matmul": {"size": 2048, "fp32_flops_per_s": 2.5e11, "bf16_flops_per_s": 8e11},
         "train": {"sst2/lora": {"ours": run, "reference": {"examples_per_s": 5.0,
                                                            "peak_memory_mb": 1000.0},
                                 "speedup": 2.0, "mfu": 0.004},
                   "sst2/full": {"ours": {"error": "boom"}, "reference": {"error": "boom"}}},
         "mfu": {"fp32/8": {**run, "peak_flops_per_s": 2e11, "flops_per_s": 5e10, "mfu": 0.25},
                 "bf16/64": {"error": "out of memory"}},
         "numerics": {"lora": {"max_abs_diff": 0.0}},
         "bf16": {"lora": {"fp32": curve, "bf16": curve, "speedup": 1.5, "max_abs_loss_diff": 0.01,
                           "mean_abs_loss_diff": 0.005, "val_metric": {"fp32": 60.0, "bf16": 59.5}}},
         "bf16_eval": {"full": {"examples": 872, "agreement": 0.995, "seconds": {"fp32": 30.0,
                                                                                 "bf16": 12.0},
                                "metrics": {"fp32": {"accuracy": 55.0, "loss": 0.71},
                                            "bf16": {"accuracy": 54.9, "loss": 0.7101}}},
                       "lora": {"error": "boom"}},
         "batching": {"sst2": {"grouped": run, "random": {**run, "padding_fraction": 0.3},
                               "speedup": 1.1}},
         "eval": {"sst2": {"ours": {"examples": 872, "bf16": True, "rank_examples_per_s": 100.0,
                                    "rank_and_generate_examples_per_s": 70.0,
                                    "generate_examples_per_s": 90.0},
                           "ours_fp32": {"rank_examples_per_s": 40.0},
                           "reference": {"examples_per_s": 16.0},
                           "reference_short": {"examples_per_s": 20.0},
                           "rank_vs_own_generation": 1.11, "rank_vs_reference": 6.25,
                           "rank_vs_reference_short": 5.0, "rank_fp32_vs_reference": 2.5}},
         "cell": {"sst2": {"ours": {"seconds": 10.0, "test_metrics": {"accuracy": 50.0},
                                    "phases": {"setup": 1.0, "training": 6.0, "validation": 1.5,
                                               "test": 1.25}},
                           "reference": {"seconds": 25.0, "test_metrics": {"test_accuracy": 0.5,
                                                                           "test_runtime": 3.0},
                                         "phases": {"setup": 2.0, "training": 12.0,
                                                    "validation": 6.0, "test": 5.0}},
                           "speedup": 2.5}},
         "grid": {"8": {"runs": 16, "max_steps": 50, "seconds": 80.0, "runs_per_hour": 720.0},
                  "1": {"runs": 2, "max_steps": 50, "seconds": 70.0, "runs_per_hour": 103.0}}}
    text = markdown(r)
    assert "| sst2/lora | 10.00 | 5.00 | 2.00x | 400 | 0.4% | 900 | 1000 |" in text
    assert "| sst2/full | boom | boom |" in text
    assert "| fp32 | 8 | 10.00 | 50.0 G | 200 G | 25.0% |" in text
    assert "| bf16 | 64 | error: out of memory |" in text
    assert "lora 0.00e+00" in text
    assert "| lora | 1.50x | 0.0100 | 0.0050 | 60.00 | 59.50 |" in text
    assert "| sst2 | 2.0% | 30.0% | 1.10x |" in text
    assert "| full | 872 | 99.5% | 55.00 | 54.90 | 0.7100 | 0.7101 | 30.0 | 12.0 |" in text
    assert "| lora | error: boom |" in text
    assert "here, bf16: rank classification 100.0 ex/s (fp32: 40.0)" in text
    assert "the test split's work) 70.0 ex/s (fp32: –)" in text
    assert "rank classification 6.2x faster (fp32: 2.5x)" in text
    assert "| sst2 | 10.0 | 25.0 | 2.50x | accuracy 50.000 | accuracy 0.500 |" in text
    assert ("cell's seconds went (the runs above): peftlab setup 1.0, training 6.0, validation 1.5, "
            "test 1.2; reference setup 2.0, training 12.0, validation 6.0, test 5.0.") in text
    assert text.index("| 1 | 2 | 50 |") < text.index("| 8 | 16 | 50 |")  # N in order


@pytest.mark.slow  # 45-50 s of subprocesses; the sections' logic is tested above and below
def test_tiny_benchmark_matches_the_reference_loss_and_keeps_earlier_sections(tmp_path):
    kw = dict(methods=["lora"], shapes=["sst2"], steps=2, warmup=1, precision="fp32",
              model="t5-tiny", log=lambda m: None)
    first = run_benchmark(tmp_path, sections=["train"], **kw)
    row = first["train"]["sst2/lora"]
    assert row["ours"]["examples_per_s"] > 0 and row["reference"]["examples_per_s"] > 0
    assert row["speedup"] > 0 and 0 < row["mfu"] < 1
    assert row["mfu"] == row["ours"]["flops_per_s"] / row["ours"]["peak_flops_per_s"]
    assert row["ours"]["peak_memory_mb"] > 100
    second = run_benchmark(tmp_path, sections=["numerics"], keep=True, **kw)
    for method in ("lora", "full"):  # same batches, same order: the same losses
        numerics = second["numerics"][method]
        assert len(numerics["ours"]) == 8
        for ours, ref in zip(numerics["ours"], numerics["reference"]):
            assert abs(ours - ref) <= 1e-5 * max(1.0, abs(ref))  # float rounding only
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert set(saved) >= {"train", "numerics", "matmul"}
    assert "| sst2/lora |" in (tmp_path / "bench.md").read_text()


@pytest.mark.slow  # 15 s of subprocesses: a benchmark's check
def test_eval_precision_compares_one_checkpoint_in_fp32_and_bf16():
    from peftlab_bench.evaluation import measure_eval_precision

    r = measure_eval_precision("lora", 2, model="t5-tiny")
    assert r["examples"] == 872  # the whole SST-2 test split
    assert r["best_step"] == 2  # the trained checkpoint
    assert 0.5 <= r["agreement"] <= 1.0
    fp32, bf16 = r["metrics"]["fp32"], r["metrics"]["bf16"]
    assert fp32["loss"] != bf16["loss"]  # both precisions really ran
    assert abs(fp32["accuracy"] - bf16["accuracy"]) <= 100 * (1 - r["agreement"]) + 1e-9


def test_mfu_section_measures_full_fine_tuning_per_precision_and_batch_size(tmp_path,
                                                                            monkeypatch):
    import peftlab_bench.runner as bench

    calls = []

    def fake_measure(kind, **kw):
        calls.append((kind, kw))
        return {"examples_per_s": 1.0, "tokens_per_s": 1.0, "flops_per_s": 1e9,
                "peak_flops_per_s": 4e9, "mfu": 0.25, "peak_memory_mb": 1.0}

    monkeypatch.setattr(bench, "subprocess_measure", fake_measure)
    r = run_benchmark(tmp_path, ["lora"], ["sst2"], 2, 1, "fp32", ["mfu"], model="t5-tiny",
                      log=lambda m: None)
    assert [(kw["precision"], kw["batch_size"]) for _, kw in calls] == [
        (p, b) for p in ("fp32", "bf16") for b in bench.MFU_BATCH_SIZES]
    assert all(kind == "ours" and kw["method"] == "full" for kind, kw in calls)
    assert set(r["mfu"]) == {f"{p}/{b}" for p in ("fp32", "bf16") for b in bench.MFU_BATCH_SIZES}
    assert "## Full fine-tuning's MFU by batch size" in (tmp_path / "bench.md").read_text()


def test_repeats_measure_back_to_back_pairs_in_alternating_order(tmp_path, monkeypatch):
    """The reported ratio is the median of back-to-back pairs' ratios, not a ratio of
    medians, and each row keeps every pair's ratio."""
    import peftlab_bench.runner as bench

    calls = []
    # the host slows down over time: each measurement is slower than the one before
    def fake_measure(kind, **kw):
        calls.append(kind)
        slow = len(calls)
        if kind == "matmul":
            return {"fp32_flops_per_s": 1e11, "bf16_flops_per_s": 2e11}
        if kind.startswith("cell"):
            return {"seconds": (10.0 if kind == "cell-ours" else 20.0) * slow, "test_metrics": {}}
        rate = (30.0 if kind == "ours" else 10.0) / slow
        return {"examples_per_s": rate, "tokens_per_s": rate, "peak_memory_mb": 1.0,
                "mfu": 0.1 / slow}

    monkeypatch.setattr(bench, "subprocess_measure", fake_measure)
    r = run_benchmark(tmp_path, ["lora"], ["sst2"], 2, 1, "fp32", ["train", "cell"],
                      model="t5-tiny", repeats=3, log=lambda m: None)
    train_calls = [c for c in calls if c in ("ours", "reference")]
    assert train_calls == ["ours", "reference", "reference", "ours", "ours", "reference"]
    row = r["train"]["sst2/lora"]
    # ratio 3 * (reference's slowness) / (ours'); calls 2-3, 4-5, 6-7 after the matmul call
    assert row["speedups"] == pytest.approx([3 * 3 / 2, 3 * 4 / 5, 3 * 7 / 6])
    assert row["speedup"] == pytest.approx(3.5)
    assert row["ours"]["examples_per_s"] == pytest.approx(30 / 5)  # the median ours run
    assert row["mfu"] == row["ours"]["mfu"]
    assert [run["examples_per_s"] for run in row["runs"]["reference"]] == pytest.approx(
        [10 / 3, 10 / 4, 10 / 7])
    cell = r["cell"]["sst2"]
    assert cell["speedups"] == pytest.approx([2 * 9 / 8, 2 * 10 / 11, 2 * 13 / 12])
    assert cell["speedup"] == pytest.approx(2 * 13 / 12)
    text = (tmp_path / "bench.md").read_text()
    assert "| sst2/lora | 6.00 | " in text and "3.50x (2.40-4.50x, 3 pairs)" in text


def test_a_failed_repeat_reports_the_error_and_no_ratio(tmp_path, monkeypatch):
    import peftlab_bench.runner as bench

    calls = []

    def fake_measure(kind, **kw):
        calls.append(kind)
        if kind == "cell-reference" and len(calls) == 3:
            return {"error": "killed"}
        return {"seconds": 10.0, "test_metrics": {}}

    monkeypatch.setattr(bench, "subprocess_measure", fake_measure)
    r = run_benchmark(tmp_path, ["lora"], ["sst2"], 2, 1, "fp32", ["cell"], model="t5-tiny",
                      repeats=2, log=lambda m: None)
    assert r["cell"]["sst2"]["reference"] == {"error": "killed"}
    assert "speedup" not in r["cell"]["sst2"]
    assert "| sst2 |  | killed |" in (tmp_path / "bench.md").read_text()


def test_a_small_cell_reports_where_each_pipelines_seconds_went():
    """Both sides of the cell, run for real on t5-tiny: the phases add up to the wall time
    and the reference's evaluations are the ones its Trainer ran."""
    cell = {"max_steps": 4, "eval_every": 2, "val_size": 8, "test_size": 16}
    for measure in (measure_cell_ours, measure_cell_reference):
        r = measure("sst2", "lora", "fp32", model="t5-tiny", cell=cell)
        phases = r["phases"]
        assert set(phases) == {"setup", "training", "validation", "test"}, measure
        assert min(phases.values()) > 0 and sum(phases.values()) <= r["seconds"]
        assert sum(phases.values()) > 0.8 * r["seconds"]  # the phases cover the run
        assert r["test_examples"] == 16
    assert r["evaluations"] == 2  # steps 2 and 4; the reference has no step-0 evaluation


def test_grid_on_cpu_runs_up_to_one_worker_per_cpu_and_says_so(tmp_path, monkeypatch):
    import os

    import peftlab_bench.runner as bench

    calls = []

    def fake_measure(kind, **kw):
        calls.append(kw["runs_per_gpu"])
        return {"runs": kw["n_runs"], "max_steps": kw["max_steps"], "seconds": 10.0,
                "runs_per_hour": 360.0 * kw["n_runs"], "device": "cpu"}

    monkeypatch.setattr(bench, "subprocess_measure", fake_measure)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    run_benchmark(tmp_path, ["lora"], ["sst2"], 2, 1, "fp32", ["grid"], model="t5-tiny",
                  runs_per_gpu=(1, 2, 4, 8), log=lambda m: None)
    assert calls == [1, 2]
    text = (tmp_path / "bench.md").read_text()
    assert "## Grid throughput on this CPU (`peftlab run STUDY --workers N`" in text
    assert "| 2 | 4 | 200 | 10.0 | 1440 |" in text


@pytest.mark.slow  # 11 s of runs: a benchmark's check
def test_grid_measures_runs_through_the_study_runner_on_cpu():
    import os

    from peftlab_bench.runs import measure_grid

    r = measure_grid(runs_per_gpu=2, n_runs=2, model="t5-tiny", max_steps=2)
    assert r["statuses"] == {"completed": 2}
    assert r["device"] == "cpu" and r["threads_per_run"] == max(1, (os.cpu_count() or 1) // 2)
    assert r["runs_per_hour"] == pytest.approx(3600 * 2 / r["seconds"])


def test_pack_measures_the_same_runs_unpacked_and_packed_with_their_mfu():
    from peftlab_bench.runs import measure_pack

    cell = {"max_steps": 2, "eval_every": 2, "train_size": 16, "val_size": 4, "test_size": 4,
            "batch_size": 4}
    kw = dict(model="t5-tiny", cell=cell, matmul_size=512, workers=1)
    alone = measure_pack("lora", "sst2", 1, 2, **kw)
    packed = measure_pack("lora", "sst2", 2, 2, **kw)
    assert alone["statuses"] == packed["statuses"] == {"completed": 2}
    assert alone["packs"] == 2 and packed["packs"] == 1
    # the same runs: the same training batches, hence the same useful FLOPs
    assert alone["train_flops"] == packed["train_flops"] > 0
    for r in (alone, packed):
        assert r["mfu"] == pytest.approx(r["train_flops"] / r["seconds"] / r["peak_flops_per_s"])
        assert 0 < r["mfu"] < 1


def test_pack_section_runs_each_pack_size_beside_the_unpacked_runs_and_reports_them(tmp_path,
                                                                                    monkeypatch):
    import peftlab_bench.runner as bench

    calls = []

    def fake_measure(kind, **kw):
        calls.append((kind, kw.get("pack"), kw.get("workers")))
        seconds = {1: 100.0, 4: 80.0, 8: 50.0}[kw["pack"]]
        if kind == "study":
            return {"preset": kw["preset"], "pack": kw["pack"], "runs": 151, "workers": 2,
                    "seconds": seconds, "runs_per_hour": 3600 * 151 / seconds}
        return {"method": kw["method"], "pack": kw["pack"], "runs": kw["n_runs"], "workers": 2,
                "packs": -(-kw["n_runs"] // kw["pack"]),
                "seconds": seconds, "runs_per_hour": 3600 * kw["n_runs"] / seconds,
                "mfu": 0.1, "settings": {"max_steps": 20}}

    monkeypatch.setattr(bench, "subprocess_measure", fake_measure)
    run_benchmark(tmp_path, ["full", "lora"], ["sst2"], 2, 1, "fp32", ["pack"],
                  model="t5-tiny", pack_sizes=(4, 8), pack_runs=8, pack_study="smoke",
                  log=lambda m: None)
    assert [c[:2] for c in calls] == [("pack", 1), ("pack", 4), ("pack", 8), ("study", 1),
                                      ("study", 4), ("study", 8)]  # full fine-tuning: unpacked
    text = (tmp_path / "bench.md").read_text()
    assert "## Packed training (`peftlab run --pack P`)" in text
    assert "| sst2/lora | 8 | 1 | 2 | 8 | 50.0 | 576 | 2.00x | 10.00% |" in text
    assert "| study | 4 |  | 2 | 151 | 80.0 | 6795 | 1.25x |" in text


def test_pack_measurement_workers_split_the_host_on_a_gpu_too(monkeypatch):
    """8 workers sharing a GPU each got every host thread (cpu_threads None on CUDA), which
    oversubscribed the host and slowed the 8-process baseline; forced GPU branch here."""
    import peftlab.device
    import peftlab.study
    from peftlab.device import threads_per_worker
    from peftlab_bench.common import SHAPES
    from peftlab_bench.runs import measure_pack

    captured = []

    class Stop(Exception):
        pass

    def fake_execute(cells, **kwargs):
        captured.extend(cells)
        raise Stop

    monkeypatch.setattr(peftlab.device, "gpu_count", lambda: 1)
    monkeypatch.setattr(peftlab.study, "execute", fake_execute)
    with pytest.raises(Stop):
        measure_pack("lora", next(iter(SHAPES)), pack=1, n_runs=2, workers=8)
    assert len(captured) == 2
    assert {c.config.cpu_threads for c in captured} == {threads_per_worker(8)}
