"""Training-loop options, the methods listing, hub fallbacks and custom tasks."""

import json

from typer.testing import CliRunner

from peftlab.cli import app
from peftlab.files import read_jsonl
from tests.conftest import tiny_run_sets

runner = CliRunner()


def train(tmp_path, name="run", **overrides):
    sets = tiny_run_sets(tmp_path, output_dir=str(tmp_path / name), **overrides)
    result = runner.invoke(app, ["train", "--quiet"] + [x for s in sets for x in ("--set", s)])
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / name / "summary.json").read_text()), tmp_path / name


def test_bf16_autocast_on_cpu_runs_and_stays_close_to_fp32(tmp_path):
    fp32, _ = train(tmp_path, "fp32", precision="fp32")
    bf16, _ = train(tmp_path, "bf16", precision="bf16")
    assert bf16["bf16"] is True and fp32["bf16"] is False
    assert abs(bf16["val_metrics"]["loss"] - fp32["val_metrics"]["loss"]) < 0.05 * fp32["val_metrics"]["loss"]


def test_evaluation_defaults_to_fp32_so_validation_selects_on_what_the_test_reports():
    from peftlab import run as run_module
    from peftlab.config import resolve_run_config
    from peftlab.errors import ConfigError

    cfg = resolve_run_config({"model": "t5-tiny"})
    assert cfg.eval_precision == "fp32"
    for precision, validation, test in (("fp32", False, False), ("bf16-validation", True, False),
                                        ("bf16", True, True)):
        cfg = resolve_run_config({"model": "t5-tiny", "eval_precision": precision})
        assert run_module.use_bf16_eval(cfg, "validation") is validation
        assert run_module.use_bf16_eval(cfg, "test") is test
    import pytest

    with pytest.raises(ConfigError, match="eval_precision"):
        resolve_run_config({"model": "t5-tiny", "eval_precision": "auto"})


def test_gradient_accumulation_weights_micro_batches_by_their_target_tokens(tokenizer):
    """Two SAMSum micro-batches with different target lengths accumulate to exactly the
    gradient of one batch holding both: the mean over every target token of the step."""
    import torch

    from peftlab.data import collate, tokenize
    from peftlab.models import load_model
    from peftlab.pack import Pack, step_gradients
    from peftlab.tasks import build_task, prepare_splits

    splits = prepare_splits(build_task("samsum", {}), 16, 4, 4, seed=0)
    feats = tokenize(tokenizer, splits.train, 256, 128)
    lengths = [len(x) for x in feats.labels]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    short, long = order[:2], order[-2:]  # micro-batches of very different token counts
    micro = [collate(feats, idx, tokenizer.pad_token_id) for idx in (long, short)]
    counts = [int((b["labels"] != -100).sum()) for b in micro]
    assert counts[0] > 1.5 * counts[1], counts
    whole = collate(feats, long + short, tokenizer.pad_token_id)
    model = load_model("t5-tiny").eval()  # no dropout: the two must see the same function
    cpu = torch.device("cpu")
    pack = Pack(model, [dict(model.named_parameters())], None)  # full fine-tuning, alone

    def gradient(batches, equal_weights=False):
        model.zero_grad()
        if equal_weights:  # what peftlab did before: each micro-batch's mean, halved
            for b in batches:
                (model(**b).loss / len(batches)).backward()
        else:
            step_gradients(pack, [batches], cpu, bf16=False, pad_id=tokenizer.pad_token_id)
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    single = gradient([whole])
    accumulated = gradient(micro)
    assert ((accumulated - single).norm() / single.norm()).item() < 1e-5
    # the test can fail: equal weights per micro-batch are far off
    assert ((gradient(micro, equal_weights=True) - single).norm() / single.norm()).item() > 1e-2


def test_bf16_evaluation_is_recorded_and_its_test_metrics_stay_close(tmp_path):
    fp32, _ = train(tmp_path, "fp32")
    bf16, _ = train(tmp_path, "bf16", eval_precision="bf16")
    assert fp32["eval_bf16"] == {"validation": False, "test": False}
    assert bf16["eval_bf16"] == {"validation": True, "test": True}
    a, b = fp32["test_metrics"]["loss"], bf16["test_metrics"]["loss"]
    assert a != b and abs(a - b) < 0.05 * a


def test_adafactor_and_gradient_accumulation(tmp_path):
    s, run_dir = train(tmp_path, optimizer="adafactor", grad_accum_steps=2, learning_rate=0.3,
                       method="prompt")
    assert s["status"] == "completed" and s["steps_done"] == 4
    rows = read_jsonl(run_dir / "metrics.jsonl")
    # two micro-batches of 4 per optimizer step
    assert all(r["train_loss"] > 0 for r in rows[1:])


def test_early_stopping_stops_when_validation_does_not_improve(tmp_path):
    s, run_dir = train(tmp_path, learning_rate=1e-12, max_steps=20, eval_every=1,
                       early_stopping_patience=2)
    assert s["stopped_early"] is True and s["steps_done"] == 2 and s["best_step"] == 0


def test_warmup_then_linear_decay(tmp_path):
    _, run_dir = train(tmp_path, max_steps=10, log_every=1, eval_every=10, warmup_ratio=0.2,
                       learning_rate=1e-3)
    lrs = [r["lr"] for r in read_jsonl(run_dir / "metrics.jsonl")[1:]]
    assert lrs[0] < lrs[1] < lrs[2] and max(lrs) == lrs[2] == 1e-3
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))


def test_methods_lists_exact_counts():
    result = runner.invoke(app, ["methods", "--model", "t5-tiny"])
    assert result.exit_code == 0, result.output
    for count in ("9,216", "1,280", "7,680", "1,408", "768", "4,359,168"):
        assert count in result.output
    assert "lead-3" in result.output
    # off a terminal, no cell is folded mid-word at 80 columns
    assert '"target_modules": ["q", "v"]}' in result.output
    assert '{"num_virtual_tokens": 20, "init": "vocab"' in result.output


def test_methods_lists_exact_counts_on_bart_with_its_defaults():
    result = runner.invoke(app, ["methods", "--model", "bart-tiny"])
    assert result.exit_code == 0, result.output
    # LoRA r=8 on q_proj, v_proj (6 attentions, 64 -> 64): 6 * 2 * 8 * 128; prefix 6 * 2 * 20
    # * 64; (IA)^3 on k_proj, v_proj and fc2's 256 inputs; LayerNorm scales and biases (10)
    for count in ("12,288", "15,360", "1,792", "1,536", "2,421,248"):
        assert count in result.output
    assert '"q_proj"' in result.output and '"fc2"' in result.output  # the family's defaults


def test_offline_hub_model_says_how_to_use_a_local_copy(tmp_path):
    result = runner.invoke(app, ["train", "--set", "model=google/flan-t5-small",
                                 "--set", f"output_dir={tmp_path / 'r'}"])
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert "could not load model `google/flan-t5-small`" in out and "--local-dir DIR" in out


def test_custom_generation_task_through_the_datasets_library(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    for split, start, n in (("train", 0, 12), ("test", 100, 4)):
        rows = [{"question": f"what is {i} plus one?", "answer": f"{i + 1}"}
                for i in range(start, start + n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s, run_dir = train(tmp_path, task="custom", **{
        "task_args.hf_dataset": str(folder), "task_args.train": "train", "task_args.test": "test",
        "task_args.input_column": "question", "task_args.target_column": "answer",
        "task_args.max_new_tokens": 4, "train_size": 6, "val_size": 4, "test_size": 4,
    })
    assert s["selection_metric"] == "rougeLsum"
    assert len(read_jsonl(run_dir / "predictions" / "test.jsonl")) == 4


def test_random_batches_pad_more_than_length_grouped_ones_and_both_are_deterministic(tokenizer):
    from peftlab.data import tokenize, training_batches
    from peftlab.tasks import build_task, prepare_splits

    splits = prepare_splits(build_task("samsum", {}), 256, 8, 8, seed=0)
    features = tokenize(tokenizer, splits.train, 512, 128)

    def padding(group: bool, seed: int = 0) -> tuple[float, list]:
        batches = training_batches(features, 8, seed, tokenizer.pad_token_id,
                                   group_by_length=group)
        real = padded = 0
        firsts = []
        for _ in range(32):  # one epoch
            b = next(batches)
            real += int(b["attention_mask"].sum())
            padded += b["attention_mask"].numel()
            firsts.append(b["input_ids"].sum(1).tolist())  # a fingerprint per example
        return 1 - real / padded, firsts

    grouped, order_g = padding(True)
    random, order_r = padding(False)
    assert grouped < 0.5 * random
    assert padding(False)[1] == order_r and padding(True)[1] == order_g
    assert padding(False, seed=1)[1] != order_r


def test_group_by_length_is_a_run_option(tmp_path):
    s, run_dir = train(tmp_path, group_by_length=False)
    assert s["status"] == "completed"
    assert "group_by_length: false" in (run_dir / "config.yaml").read_text()


def test_fused_adamw_takes_the_same_step_as_the_reference_implementation():
    import torch

    from peftlab.config import resolve_run_config
    from peftlab.loop import make_optimizer

    cfg = resolve_run_config({"model": "t5-tiny", "task": "sst2", "method": "full",
                              "weight_decay": 0.01})
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(64, 32)) for _ in range(3)]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = make_optimizer(cfg, ours)
    opt_plain = torch.optim.AdamW(plain, lr=cfg.learning_rate, weight_decay=0.01, foreach=False)
    assert opt_ours.param_groups[0]["fused"] is True
    for _ in range(5):
        grads = [torch.randn(64, 32) for _ in ours]
        for params, opt in ((ours, opt_ours), (plain, opt_plain)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_training_on_cpu_flushes_denormals_and_restores_the_setting_after():
    import torch

    from peftlab.loop import train
    from peftlab_bench.common import setup

    def denormal() -> float:
        return (torch.tensor([1e-20]) * torch.tensor([1e-20])).item()  # 1e-40: a denormal

    assert denormal() != 0.0
    cfg, s, features = setup("lora", "sst2", 4, 16, model="t5-tiny")
    cfg = cfg.model_copy(update={"max_steps": 2, "eval_every": 1})
    seen = []

    def evaluate() -> dict[str, float]:
        seen.append(denormal())
        return {"accuracy": 0.0}

    train(s.model, s.method, cfg, features, evaluate, lambda row: None, ("accuracy", True),
          s.device, False, s.tokenizer.pad_token_id, progress=False)
    assert seen == [0.0, 0.0, 0.0]  # step 0, 1 and 2 evaluations ran inside the loop
    assert denormal() != 0.0
