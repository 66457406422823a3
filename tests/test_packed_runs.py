"""Packed runs: every member of a pack writes the run folder its unpacked run writes.

A member of a pack takes the same batches and dropout masks as its run alone,
its training losses agree within 1e-4 relative at every logged step, and it selects the same
step and makes the same test predictions. The packed forward computes each row with its
member's tensors gathered per row (a batched product instead of one matrix product): equal
up to floating-point rounding, hence the tolerance on losses. Validation and test losses
get 1e-3: they are computed after the steps, whose Adam updates (normalised by the gradient's
size) turn rounding in near-zero gradients into differences of the learning rate's size; on
the flan-t5-small geometry at learning rate 1e-2 the validation loss after 3 steps was 3.7e-4
off while the training losses stayed within 1e-5. Accuracy, ROUGE, selected step and every
prediction must be equal. These runs are a few steps long; over 600 steps rounding grows where
training is unstable (docs/reliability.md, benchmarks/pack_tolerance.py).
"""

import math

import pytest
import torch

from peftlab.config import resolve_run_config
from peftlab.files import read_jsonl
from peftlab.packing import packable
from peftlab.records import read_json
from peftlab.run import run, run_pack

TIMING = ("elapsed_s", "examples_per_s", "eval_s")
# what may differ between a member's record and its unpacked run's
UNCOMPARED = {"time_s", "wall_time_s", "peak_memory_mb", "peak_memory_kind", "pack",
              "git_commit", "versions"}
# seeds and learning rates of the members: every member differs from the others in both
MEMBERS = [(0, 1e-3), (1, 1e-2), (2, 3e-3)]
METHOD_ARGS = {"lora": {}, "ia3": {}, "ln": {}, "prompt": {"num_virtual_tokens": 4},
               "prefix": {"num_prefix_tokens": 4}}
RATE_SCALE = {"lora": 1.0, "ia3": 1.0, "ln": 1.0, "prompt": 30.0, "prefix": 1.0}


def config(tmp_path, name, seed, lr, **overrides):
    raw = dict(model="t5-tiny", task="sst2", method="lora", train_size=16, val_size=8,
               test_size=12, max_steps=6, eval_every=2, log_every=1, batch_size=4,
               eval_batch_size=16, dropout=0.0, seed=seed, learning_rate=lr,
               output_dir=str(tmp_path / name))
    raw.update(overrides)
    return resolve_run_config(raw)


def tolerance(key):
    return 1e-3 if key.endswith("loss") and key != "train_loss" else 1e-4


def close(a, b, relative=1e-4):
    if a is None or b is None:
        return a is b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= relative * abs(b) + 1e-7


def assert_same_run(packed, alone):
    """Two run folders record the same run (timings and the pack aside)."""
    rows_p, rows_a = read_jsonl(packed / "metrics.jsonl"), read_jsonl(alone / "metrics.jsonl")
    assert [r["step"] for r in rows_p] == [r["step"] for r in rows_a]
    for p, a in zip(rows_p, rows_a):
        assert set(p) == set(a)
        for key in set(p) - set(TIMING):
            assert close(p[key], a[key], tolerance(key)), (packed, p["step"], key, p[key], a[key])
    sp, sa = read_json(packed / "summary.json"), read_json(alone / "summary.json")
    assert set(sp) - {"pack"} == set(sa)
    for key in set(sa) - UNCOMPARED - {"val_metrics", "test_metrics"}:
        assert sp[key] == sa[key], (packed, key, sp[key], sa[key])
    for key in ("val_metrics", "test_metrics"):
        for metric, value in sa[key].items():
            assert close(sp[key][metric], value, tolerance(metric)), (packed, key, metric)
    preds_p = read_jsonl(packed / "predictions" / "test.jsonl")
    preds_a = read_jsonl(alone / "predictions" / "test.jsonl")
    assert [r["prediction"] for r in preds_p] == [r["prediction"] for r in preds_a]
    assert [r["id"] for r in preds_p] == [r["id"] for r in preds_a]


def pack_and_alone(tmp_path, members=MEMBERS, train_sizes=None, **overrides):
    """`train_sizes`: each member's own (default: the same for all)."""
    scale = RATE_SCALE[overrides.get("method", "lora")]
    own = [{"train_size": n} for n in train_sizes] if train_sizes else [{}] * len(members)
    packed = [config(tmp_path, f"packed{i}", seed, lr * scale, **{**overrides, **own[i]})
              for i, (seed, lr) in enumerate(members)]
    summaries = run_pack(packed, progress=False, pack_id="p0")
    for i, (seed, lr) in enumerate(members):
        run(config(tmp_path, f"alone{i}", seed, lr * scale, **{**overrides, **own[i]}),
            progress=False)
    return summaries


@pytest.mark.slow  # the same with dropout on runs by default, below
@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_each_member_of_a_pack_is_its_unpacked_run_sst2(tmp_path, method):
    summaries = pack_and_alone(tmp_path, method=method, method_args=METHOD_ARGS[method])
    assert [{k: s["pack"][k] for k in ("id", "size", "index")} for s in summaries] == [
        {"id": "p0", "size": 3, "index": i} for i in range(3)]
    for s in summaries:  # a member records its share of the pack's time
        assert s["wall_time_s"] == pytest.approx(s["pack"]["wall_time_s"] / 3)
    for i in range(len(MEMBERS)):
        assert_same_run(tmp_path / f"packed{i}", tmp_path / f"alone{i}")
    # the members really differ: not one run written three times
    losses = {tuple(r["train_loss"] for r in read_jsonl(tmp_path / f"packed{i}" / "metrics.jsonl"))
              for i in range(3)}
    assert len(losses) == 3


@pytest.mark.parametrize("method,task", [(m, "sst2") for m in METHOD_ARGS] + [
    ("lora", "samsum"), pytest.param("prefix", "samsum", marks=pytest.mark.slow)])
def test_with_dropout_each_member_draws_the_masks_of_its_unpacked_run(tmp_path, method, task):
    """Dropout on (T5's 0.1, and LoRA's own): a member's masks are drawn from its own
    generator at its own shapes (peftlab.dropout), so it still is its unpacked run."""
    args = dict(METHOD_ARGS[method], **({"dropout": 0.1} if method == "lora" else {}))
    samsum = dict(task="samsum", train_size=8, val_size=4, test_size=4, max_new_tokens=6,
                  max_source_length=96, max_target_length=24, batch_size=2)
    summaries = pack_and_alone(tmp_path, method=method, method_args=args, dropout=0.1,
                               **(samsum if task == "samsum" else {}))
    assert [{k: s["pack"][k] for k in ("id", "size", "index")} for s in summaries] == [
        {"id": "p0", "size": 3, "index": i} for i in range(3)]
    for s in summaries:  # a member records its share of the pack's time
        assert s["wall_time_s"] == pytest.approx(s["pack"]["wall_time_s"] / 3)
    losses = {tuple(r["train_loss"] for r in read_jsonl(tmp_path / f"packed{i}" / "metrics.jsonl"))
              for i in range(3)}
    assert len(losses) == 3  # the members really differ: not one run written three times
    for i in range(len(MEMBERS)):
        assert_same_run(tmp_path / f"packed{i}", tmp_path / f"alone{i}")


@pytest.mark.parametrize("method", [pytest.param("lora", marks=pytest.mark.slow), "prefix",
                                    pytest.param("prompt", marks=pytest.mark.slow)])
def test_each_member_of_a_pack_is_its_unpacked_run_samsum(tmp_path, method):
    pack_and_alone(tmp_path, MEMBERS[:2], method=method, method_args=METHOD_ARGS[method],
                   task="samsum", train_size=8, val_size=4, test_size=4, max_new_tokens=6,
                   max_source_length=96, max_target_length=24, batch_size=2,
                   generate_on_validation=True)
    for i in range(2):
        assert_same_run(tmp_path / f"packed{i}", tmp_path / f"alone{i}")


# the members' steps on this geometry: tests/test_pack.py (the default suite)
@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_each_member_of_a_pack_is_its_unpacked_run_on_the_flan_t5_small_geometry(tmp_path, method):
    pack_and_alone(tmp_path, MEMBERS[:2], method=method, method_args=METHOD_ARGS[method],
                   model="flan-t5-small-random", train_size=8, val_size=8, test_size=8,
                   max_steps=3, eval_every=1)
    for i in range(2):
        assert_same_run(tmp_path / f"packed{i}", tmp_path / f"alone{i}")


@pytest.mark.parametrize("method", ["lora", pytest.param("prefix", marks=pytest.mark.slow)])
def test_members_with_training_samples_of_different_sizes_are_their_unpacked_runs(tmp_path,
                                                                                 method):
    """A study's train sizes share packs: each member draws its own sample (8, 16 or 40
    examples, so it goes round its sample at its own pace), with dropout on."""
    pack_and_alone(tmp_path, train_sizes=[16, 8, 40], method=method,
                   method_args=METHOD_ARGS[method], dropout=0.1)
    for i, n in enumerate([16, 8, 40]):
        assert read_json(tmp_path / f"packed{i}" / "summary.json")["train_size"] == n
        assert_same_run(tmp_path / f"packed{i}", tmp_path / f"alone{i}")


def test_a_member_that_diverges_leaves_the_others_unchanged(tmp_path):
    members = [(0, 3e-3), (1, 1e30), (2, 1e-2)]
    summaries = pack_and_alone(tmp_path, members, method="ln")
    assert [s["status"] for s in summaries] == ["completed", "diverged", "completed"]
    for i in range(3):
        assert_same_run(tmp_path / f"packed{i}", tmp_path / f"alone{i}")
    assert read_json(tmp_path / "packed1" / "summary.json")["steps_done"] < 6


def test_members_stopping_early_at_different_steps_leave_the_others_going(tmp_path):
    summaries = pack_and_alone(tmp_path, method="lora", early_stopping_patience=1,
                               max_steps=12, eval_every=1)
    assert all(s["stopped_early"] for s in summaries)
    for i in range(3):
        assert_same_run(tmp_path / f"packed{i}", tmp_path / f"alone{i}")


def test_a_pack_killed_between_its_members_checkpoints_resumes_bit_for_bit(tmp_path,
                                                                          monkeypatch):
    """The kill lands after one member's step-4 pointer, before the others': the pack resumes
    every member from step 2 (one unit), and its files equal the uninterrupted pack's exactly:
    adapters, losses, every metrics row but the timings."""
    from safetensors.torch import load_file

    import peftlab.checkpoint as checkpoint

    def cfgs(folder):
        return [config(tmp_path, f"{folder}/m{i}", seed, lr, max_steps=8, dropout=0.1)
                for i, (seed, lr) in enumerate(MEMBERS)]

    run_pack(cfgs("reference"), progress=False)
    moved = []
    real_point_to = checkpoint.point_to

    def killed(run_dir, step):
        if step == 4 and any(s == 4 for _, s in moved):  # after the first member's pointer
            raise KeyboardInterrupt  # as a kill: nothing after this line runs
        real_point_to(run_dir, step)
        moved.append((run_dir.name, step))

    monkeypatch.setattr(checkpoint, "point_to", killed)
    with pytest.raises(KeyboardInterrupt):
        run_pack(cfgs("killed"), progress=False)
    monkeypatch.undo()
    assert checkpoint.pointer_step(tmp_path / "killed/m0") == 4
    assert checkpoint.pointer_step(tmp_path / "killed/m1") == 2
    assert (tmp_path / "killed/m0/checkpoints/step-000002").is_dir()  # kept for the pack
    summaries = run_pack(cfgs("killed"), progress=False)
    assert summaries[0]["notes"] == []  # its record is the uninterrupted one
    for i in range(len(MEMBERS)):
        ref, again = tmp_path / f"reference/m{i}", tmp_path / f"killed/m{i}"
        a, b = load_file(ref / "adapter.safetensors"), load_file(again / "adapter.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        rows_a, rows_b = read_jsonl(ref / "metrics.jsonl"), read_jsonl(again / "metrics.jsonl")
        assert [{k: v for k, v in r.items() if k not in TIMING} for r in rows_a] == \
            [{k: v for k, v in r.items() if k not in TIMING} for r in rows_b]
        assert not (again / "checkpoints").exists()


def test_runs_that_differ_in_more_than_seed_rate_and_train_size_are_refused(tmp_path):
    from peftlab.errors import PeftlabError

    a = config(tmp_path, "a", 0, 1e-3)
    b = config(tmp_path, "b", 1, 1e-3, max_steps=8)
    with pytest.raises(PeftlabError, match="differ only in seed, learning_rate, train_size, output_dir"):
        run_pack([a, b], progress=False)
    full = [config(tmp_path, n, s, 1e-4, method="full") for n, s in (("f0", 0), ("f1", 1))]
    with pytest.raises(PeftlabError, match="cannot be packed: method `full` has no routed"):
        run_pack(full, progress=False)
    # BART draws its dropout inside its layers from torch's generator: packs need dropout 0
    bart = [config(tmp_path, n, s, 1e-3, model="bart-tiny", dropout=None) for n, s in
            (("b0", 0), ("b1", 1))]
    assert not packable(bart[0]) and packable(bart[0].model_copy(update={"dropout": 0.0}))
    with pytest.raises(PeftlabError, match="BART's dropout.*set `dropout: 0`"):
        run_pack(bart, progress=False)
    assert not any((tmp_path / n).exists() for n in ("a", "f0", "b0"))


@pytest.mark.parametrize("method,task", [
    *[pytest.param(m, "sst2", marks=pytest.mark.slow if m in ("ia3", "prompt") else ())
      for m in METHOD_ARGS],
    pytest.param("prefix", "samsum", marks=pytest.mark.slow)])  # peft's (IA)3, prompt: slow
def test_each_member_of_a_bart_pack_is_its_unpacked_run(tmp_path, method, task):
    """BART (LayerNorms with biases, biased projections, learned positions; LoRA on q_proj and
    v_proj by the family's defaults) packs as T5 does, with dropout off (see above)."""
    samsum = dict(task="samsum", train_size=8, val_size=4, test_size=4, max_new_tokens=6,
                  max_source_length=96, max_target_length=24, batch_size=2)
    pack_and_alone(tmp_path, method=method, method_args=METHOD_ARGS[method], model="bart-tiny",
                   **(samsum if task == "samsum" else {}))
    for i in range(len(MEMBERS)):
        assert_same_run(tmp_path / f"packed{i}", tmp_path / f"alone{i}")
    losses = {tuple(r["train_loss"] for r in read_jsonl(tmp_path / f"packed{i}" / "metrics.jsonl"))
              for i in range(3)}
    assert len(losses) == 3


# --- studies run in packs -------------------------------------------------------------------

STUDY = {
    "name": "packed",
    "base": {"model": "t5-tiny", "max_steps": 12, "eval_every": 3, "log_every": 3,
             "batch_size": 4, "val_size": 8, "test_size": 12, "dropout": 0.0},
    "tasks": {"sst2": {}},
    "methods": [{"method": "untuned"}, {"method": "full", "learning_rates": [1e-4]},
                {"method": "lora", "learning_rates": [1e-3, 1e-2]},
                {"method": "prompt", "sizes": {"num_virtual_tokens": [4]},
                 "learning_rates": [0.3]}],
    "train_sizes": [16],
    "seeds": [0, 1, 2],
}


def run_study(tmp_path, folder, *flags):
    import yaml
    from typer.testing import CliRunner

    from peftlab.cli import app

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / folder),
                                      "--quiet", "--no-report", *flags])
    return result.exit_code, " ".join(result.output.split())


def run_folders(study):
    return sorted(p.parent.relative_to(study) for p in study.rglob("config.yaml"))


@pytest.fixture(scope="module")
def unpacked_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unpacked")
    code, out = run_study(tmp, "alone", "--workers", "1")
    assert code == 0, out
    return tmp / "alone"


def test_a_study_in_packs_writes_what_it_writes_unpacked(tmp_path, unpacked_study):
    code, out = run_study(tmp_path, "s", "--pack", "4", "--dry-run")
    assert code == 0, out
    # lora: 2 rates x 3 seeds = 6 cells -> 3 + 3 (split evenly); prompt: 3 seeds -> 3;
    # full fine-tuning and the untuned model alone
    assert "packs of up to 4: 9 of the runs to run in 3 packs (sizes 3), 4 alone" in out
    code, out = run_study(tmp_path, "s", "--pack", "4", "--workers", "2")
    assert code == 0, out
    assert "13 runs: 9 in 3 packs, 4 alone, 2 at a time" in out and "13 completed" in out
    study = tmp_path / "s"
    assert run_folders(study) == run_folders(unpacked_study)
    packed = {}
    for folder in run_folders(study):
        summary = read_json(study / folder / "summary.json")
        if "pack" in summary:
            packed.setdefault(summary["pack"]["id"], []).append(summary["pack"]["index"])
        assert_same_run(study / folder, unpacked_study / folder)
    assert sorted(sorted(v) for v in packed.values()) == [[0, 1, 2]] * 3


def test_a_pack_killed_mid_training_resumes_to_the_same_files(tmp_path, unpacked_study):
    import subprocess
    import sys

    import yaml

    from tests.test_resume import kill_when

    path = tmp_path / "study.yaml"
    study = dict(STUDY, methods=[STUDY["methods"][2]], pack=6)  # lora: one pack of 6
    study["base"] = dict(STUDY["base"], max_steps=12)
    path.write_text(yaml.safe_dump(study))
    folder = tmp_path / "s"
    cmd = [sys.executable, "-m", "peftlab", "run", str(path), "--out", str(folder), "--quiet",
           "--no-report", "--workers", "1"]
    pointers = [folder / "sst2" / "lora" / "n16" / f"lr{lr}" / f"seed{s}" / "checkpoints" /
                "latest.json" for lr in ("0.001", "0.01") for s in range(3)]

    def some_checkpoint() -> bool:  # one member has checkpointed at step 6 or later
        for p in pointers:
            try:
                if read_json(p)["step"] >= 6:
                    return True
            except Exception:  # noqa: BLE001 - not written yet, or being replaced
                pass
        return False

    kill_when(cmd, some_checkpoint)
    assert not any((p.parent.parent / "summary.json").exists() for p in pointers)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "6 completed" in done.stdout
    for p in pointers:
        run_dir = p.parent.parent
        key = run_dir.relative_to(folder)
        assert read_json(run_dir / "summary.json")["pack"]["size"] == 6
        assert not (run_dir / "checkpoints").exists()
        assert_same_run(run_dir, unpacked_study / key)


@pytest.mark.parametrize("task", ["sst2", "samsum"])
@pytest.mark.parametrize("together", [True, False])
def test_a_packs_members_are_evaluated_as_their_runs_together_or_one_by_one(tmp_path, task,
                                                                            together,
                                                                            monkeypatch):
    """Together (a GPU's way): the encoder runs as many times for three members as for one, on
    three times the rows. One by one (a CPU's): as each run alone. Either way each member's
    result is its own evaluation's."""
    import peftlab.device
    from peftlab.run import evaluate_pack, setup_pack

    monkeypatch.setitem(peftlab.device.EVALUATE_TOGETHER, "cpu", together)
    extra = dict(task="samsum", val_size=4, max_new_tokens=4, max_source_length=64,
                 max_target_length=16) if task == "samsum" else {}
    # prompt tuning: each member's initial prompt is its own, so the members' outputs differ
    cfgs = [config(tmp_path, f"m{i}", seed, lr, method="prompt",
                   method_args=METHOD_ARGS["prompt"], **extra)
            for i, (seed, lr) in enumerate(MEMBERS)]
    setups = setup_pack(cfgs)
    encoder = setups[0].model.get_base_model().encoder
    rows: list[int] = []
    hook = encoder.register_forward_hook(
        lambda module, args, out: rows.append(len(out.last_hidden_state)))
    packed = evaluate_pack(setups, "validation", [0, 1, 2], progress=False)
    rows_packed = list(rows)
    rows.clear()
    alone = [setups[i].evaluate("validation", progress=False) for i in range(3)]
    hook.remove()
    assert len(rows_packed) == (len(rows) // 3 if together else len(rows))
    assert sum(rows_packed) == sum(rows)
    for t, a in zip(packed, alone):
        assert [r["prediction"] for r in t.rows] == [r["prediction"] for r in a.rows]
        assert t.metrics["loss"] == pytest.approx(a.metrics["loss"], rel=1e-5)
    assert len({round(t.metrics["loss"], 6) for t in packed}) == 3


@pytest.mark.parametrize("together", [True, False])
def test_a_prompt_pack_evaluates_its_bf16_copy_with_the_copys_prompts(tmp_path, together,
                                                                      monkeypatch):
    """bf16 evaluation evaluates a deep copy cast to bf16. Prompt tuning's routed
    `get_prompt` was a closure the copy shared: together (a GPU's way) it read the original's
    idle router ('a packed model was called without a route'); one by one it silently read
    the fp32 prompts. Forced on this CPU: the copy's prompts are its own, in bf16, and each
    member's result is its own bf16 evaluation's."""
    import peftlab.device
    from peftlab.evaluate import inference_model
    from peftlab.run import evaluate_pack, setup_pack

    monkeypatch.setitem(peftlab.device.EVALUATE_TOGETHER, "cpu", together)
    cfgs = [config(tmp_path, f"m{i}", seed, lr, method="prompt", eval_precision="bf16",
                   method_args=METHOD_ARGS["prompt"]) for i, (seed, lr) in enumerate(MEMBERS)]
    setups = setup_pack(cfgs)
    model = setups[0].model
    copy = inference_model(model, bf16=True)
    assert copy.get_prompt.__self__ is copy
    with copy.peftlab_pack.router.evaluating(1):
        prompt = copy.get_prompt(2)
    (stack,) = copy.peftlab_pack.stacks.values()
    assert prompt.dtype == torch.bfloat16 and torch.equal(prompt[0], stack.storage[1])
    packed = evaluate_pack(setups, "validation", [0, 1, 2], progress=False)
    for i, result in enumerate(packed):
        alone = setups[i].evaluate("validation", progress=False)
        assert [r["prediction"] for r in result.rows] == [r["prediction"] for r in alone.rows]
        assert result.metrics["loss"] == pytest.approx(alone.metrics["loss"], rel=2e-2)


def test_a_member_another_process_holds_is_left_out_of_its_pack(tmp_path):
    from peftlab.locks import run_lock

    held = tmp_path / "s" / "sst2" / "lora" / "n16" / "lr0.001" / "seed1"
    study = dict(STUDY, methods=[STUDY["methods"][2]])
    study["base"] = dict(STUDY["base"], max_steps=4, eval_every=2)
    import yaml

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    from typer.testing import CliRunner

    from peftlab.cli import app

    with run_lock(held) as holder:
        assert holder is None
        result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "s"),
                                          "--quiet", "--no-report", "--pack", "3",
                                          "--workers", "1"])
    out = " ".join(result.output.split())
    assert result.exit_code == 0, out
    assert "5 completed, 1 locked" in out and "sst2/lora/n16/lr0.001/seed1" in out
    assert not (held / "summary.json").exists()
    seed0 = read_json(held.parent / "seed0" / "summary.json")["pack"]
    assert seed0["size"] == 2  # the pack went on without the held member


def test_a_pack_that_fails_runs_its_cells_one_by_one(tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    import peftlab.study.runner
    from peftlab.cli import app

    real = peftlab.study.runner.run_pack

    def failing_in_packs(cfgs, *args, **kwargs):
        if len(cfgs) > 1:
            raise RuntimeError("out of memory (simulated)")
        return real(cfgs, *args, **kwargs)

    monkeypatch.setattr(peftlab.study.runner, "run_pack", failing_in_packs)
    study = dict(STUDY, methods=[STUDY["methods"][2]], seeds=[0])
    study["base"] = dict(STUDY["base"], max_steps=2, eval_every=2)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "s"), "--quiet",
                                      "--no-report", "--pack", "2", "--workers", "1"])
    out = " ".join(result.output.split())
    assert result.exit_code == 0 and "2 completed" in out, out
    for lr in ("0.001", "0.01"):
        summary = read_json(tmp_path / "s" / "sst2" / "lora" / "n16" / f"lr{lr}" / "seed0" /
                            "summary.json")
        assert summary["status"] == "completed" and "pack" not in summary


def test_a_group_larger_than_a_pack_is_split_evenly(tmp_path):
    """9 cells (3 rates x 3 seeds) in packs of up to 8: 5 and 4, not 8 and one run alone;
    methods that cannot be packed, and other sizes, never share a pack."""
    from pathlib import Path

    from peftlab.study import expand, packs, study_config

    study = study_config(dict(STUDY, methods=[
        {"method": "lora", "sizes": {"r": [2, 4]}, "learning_rates": [1e-3, 3e-3, 1e-2]},
        {"method": "full", "learning_rates": [1e-4]}]))
    cells = expand(study, Path(tmp_path))
    groups = packs(cells, 8)
    assert sorted(len(g) for g in groups) == [1, 1, 1, 4, 4, 5, 5]
    for g in groups:
        assert len({(c.config.method, str(c.config.method_args)) for c in g}) == 1
    assert [len(g) for g in packs(cells, 1)] == [1] * len(cells)
    # fewer packs than workers would leave workers idle: the largest are halved to fill them
    lora = [c for c in cells if c.config.method == "lora"]
    assert sorted(len(g) for g in packs(lora, 18)) == [9, 9]  # two sizes: two groups
    assert sorted(len(g) for g in packs(lora, 18, slots=4)) == [4, 4, 5, 5]
    assert sorted(len(g) for g in packs(lora[:2], 8, slots=4)) == [1, 1]  # no more to split
    # a study's train sizes pack together: 2 sizes x 3 rates x 3 seeds of one LoRA size
    study = study_config(dict(STUDY, train_sizes=[16, 32], methods=[
        {"method": "lora", "sizes": {"r": [2, 4]}, "learning_rates": [1e-3, 3e-3, 1e-2]}]))
    groups = packs(expand(study, Path(tmp_path)), 18)
    assert [len(g) for g in groups] == [18, 18]
    assert all({c.config.train_size for c in g} == {16, 32} for g in groups)


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_the_packs_a_study_shows_are_the_packs_it_runs(tmp_path, monkeypatch, backend):
    """The packs are made once: the dry-run text and the runner get the same groups (on Ray,
    where a task runs one pack, they are not split to fill workers)."""
    import peftlab.study
    from peftlab.api import run_study
    from peftlab.study import Outcome

    ran, said = [], []

    def fake_execute(cells, *args, groups=None, **kwargs):
        ran.append(groups)
        return Outcome({"completed": len(cells)}, [])

    monkeypatch.setattr(peftlab.study, "execute", fake_execute)
    run_study(STUDY, out=tmp_path / "s", workers=2, pack=8, backend=backend, report=False,
              progress=False, say=said.append)
    (groups,) = ran
    packed = [g for g in groups if len(g) > 1]
    sizes = ", ".join(map(str, sorted({len(g) for g in packed}, reverse=True)))
    assert f"{sum(map(len, packed))} of the runs to run in {len(packed)} packs (sizes {sizes})" \
        in said[0]
    # lora's 6 runs (2 rates x 3 seeds) and prompt's 3 packed; full fine-tuning and untuned
    # alone; on Ray nothing is split for the workers
    assert sorted(len(g) for g in packed) == [3, 6]
    assert sum(map(len, groups)) == 13  # untuned 1, full 3, lora 6, prompt 3
