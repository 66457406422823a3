"""The training loop's options: gradient accumulation, Adafactor, early stopping, the
schedule, the fused optimizer, denormals flushed while training."""


from peftlab.files import read_jsonl
from tests.conftest import cli_train


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


def test_adafactor_and_gradient_accumulation(tmp_path):
    s, run_dir = cli_train(tmp_path, optimizer="adafactor", grad_accum_steps=2, learning_rate=0.3,
                       method="prompt")
    assert s["status"] == "completed" and s["steps_done"] == 4
    rows = read_jsonl(run_dir / "metrics.jsonl")
    # two micro-batches of 4 per optimizer step
    assert all(r["train_loss"] > 0 for r in rows[1:])


def test_early_stopping_stops_when_validation_does_not_improve(tmp_path):
    s, run_dir = cli_train(tmp_path, learning_rate=1e-12, max_steps=20, eval_every=1,
                       early_stopping_patience=2)
    assert s["stopped_early"] is True and s["steps_done"] == 2 and s["best_step"] == 0


def test_warmup_then_linear_decay(tmp_path):
    _, run_dir = cli_train(tmp_path, max_steps=10, log_every=1, eval_every=10, warmup_ratio=0.2,
                       learning_rate=1e-3)
    lrs = [r["lr"] for r in read_jsonl(run_dir / "metrics.jsonl")[1:]]
    assert lrs[0] < lrs[1] < lrs[2] and max(lrs) == lrs[2] == 1e-3
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))


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
