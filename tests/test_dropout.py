"""Dropout with `torch.rand` masks: nn.Dropout's distribution, scaling and gradient; swapped
in for training on CPU and put back afterwards."""

import pytest
import torch
from torch import nn

from peftlab.dropout import RandMaskDropout, rand_mask_dropout


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drops_a_fraction_p_and_scales_the_rest_like_nn_dropout(p):
    torch.manual_seed(0)
    x = torch.ones(1_000_000)
    out = RandMaskDropout(p)(x)
    reference = nn.Dropout(p)(x)
    assert (out == 0).float().mean().item() == pytest.approx(p, abs=0.002)
    assert set(out.unique().tolist()) == set(reference.unique().tolist())  # {0, 1 / (1 - p)}


def test_gradient_flows_through_kept_elements_only():
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)
    out = RandMaskDropout(0.3)(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    kept = out.detach() != 0
    assert 0 < kept.float().mean() < 1
    torch.testing.assert_close(x.grad, grad * kept / 0.7)


def test_identity_in_eval_mode_and_for_p_zero():
    x = torch.randn(8, 8)
    assert RandMaskDropout(0.5).eval()(x) is x
    assert RandMaskDropout(0.0)(x) is x
    assert (RandMaskDropout(1.0)(x) == 0).all()


def test_masks_follow_the_seed_and_bf16_keeps_its_dtype():
    x = torch.ones(10_000)
    torch.manual_seed(3)
    a = RandMaskDropout(0.1)(x)
    torch.manual_seed(3)
    b = RandMaskDropout(0.1)(x)
    c = RandMaskDropout(0.1)(x)
    assert torch.equal(a, b) and not torch.equal(b, c)
    y = RandMaskDropout(0.1)(torch.ones(100_000, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert (y == 0).float().mean().item() == pytest.approx(0.1, abs=0.005)


def test_swaps_every_dropout_of_a_peft_model_inside_the_block_only():
    from peft import LoraConfig, get_peft_model

    from peftlab.models import load_model

    model = get_peft_model(load_model("t5-tiny"), LoraConfig(
        r=2, lora_dropout=0.2, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
    before = [(n, m) for n, m in model.named_modules() if type(m) is nn.Dropout]
    assert any("lora_dropout" in n for n, _ in before)
    with rand_mask_dropout(model):
        inside = {n: m for n, m in model.named_modules() if isinstance(m, nn.Dropout)}
        assert set(inside) == {n for n, _ in before}
        assert all(type(m) is RandMaskDropout and m.p == dict(before)[n].p
                   for n, m in inside.items())
        model.eval()  # as an evaluation between training steps does
    after = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Dropout)]
    assert [(n, id(m)) for n, m in after] == [(n, id(m)) for n, m in before]
    assert not any(m.training for _, m in after)  # the mode set inside carried over
    with rand_mask_dropout(model, enabled=False):
        assert not any(type(m) is RandMaskDropout for m in model.modules())


def test_training_on_cpu_uses_rand_masks_and_a_run_repeats_from_its_seed(tmp_path,
                                                                          monkeypatch):
    import json

    import peftlab.dropout as dropout
    from peftlab.config import resolve_run_config
    from peftlab.run import run

    calls = []
    original = dropout.RandMaskDropout.forward

    def counted(self, x):
        calls.append(self.training)
        return original(self, x)

    monkeypatch.setattr(dropout.RandMaskDropout, "forward", counted)
    losses = []
    for i in range(2):
        cfg = resolve_run_config({
            "model": "t5-tiny", "task": "sst2", "method": "lora", "train_size": 16,
            "val_size": 8, "test_size": 8, "max_steps": 3, "eval_every": 3, "log_every": 1,
            "batch_size": 4, "output_dir": str(tmp_path / f"run{i}")})
        run(cfg, progress=False)
        rows = (tmp_path / f"run{i}" / "metrics.jsonl").read_text().splitlines()
        losses.append([json.loads(r)["train_loss"] for r in rows])
    assert True in calls  # T5's dropout ran through RandMaskDropout while training
    assert losses[0] == losses[1] and len(losses[0]) == 4  # step 0 and steps 1-3
