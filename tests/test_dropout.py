"""Dropout while training: each member's masks from its own key, the same packed or alone, with
nn.Dropout's distribution, scaling and gradient; swapped in for training, put back after."""

import pytest
import torch
from torch import nn

from peftlab.dropout import MemberDropout, MemberMasks, member_dropout

CPU = torch.device("cpu")


def batch(rows: int, source: int, target: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.ones(rows, source, dtype=torch.long),
            "labels": torch.ones(rows, target, dtype=torch.long)}


def alone(seed: int, x_batch: dict, shape: tuple, p: float = 0.1):
    masks = MemberMasks([seed], CPU)
    masks.set_batch([x_batch], [0])
    return masks.apply(torch.ones(shape), p)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drops_a_fraction_p_and_scales_the_rest_like_nn_dropout(p):
    out = alone(0, batch(100, 100, 5), (100, 100, 100), p)
    reference = nn.Dropout(p)(torch.ones(100, 100, 100))
    assert (out == 0).float().mean().item() == pytest.approx(p, abs=0.002)
    assert set(out.unique().tolist()) == set(reference.unique().tolist())  # {0, 1 / (1 - p)}


def test_masks_are_independent_across_positions_rows_calls_and_micro_batches():
    p = 0.3
    masks = MemberMasks([5], CPU)
    masks.set_batch([batch(64, 128, 4)], [0])
    first = masks.apply(torch.ones(64, 128, 64), p) == 0
    second = masks.apply(torch.ones(64, 128, 64), p) == 0  # the next call
    masks.set_batch([batch(64, 128, 4)], [0])  # the member's next micro-batch
    later = masks.apply(torch.ones(64, 128, 64), p) == 0
    pairs = {"next call": (first, second), "next micro-batch": (first, later),
             "next row": (first[:-1], first[1:]), "next position": (first[:, :-1], first[:, 1:]),
             "next feature": (first[..., :-1], first[..., 1:])}
    for name, (a, b) in pairs.items():
        both = (a & b).float().mean().item()
        assert both == pytest.approx(p * p, abs=0.004), name  # dropped together: p^2


def test_the_hash_is_splitmix64s_finaliser_on_the_host_and_on_the_device():
    import numpy as np

    from peftlab.dropout import mix64, mix64_

    # SplitMix64 seeded with 0 first returns the finaliser of its increment
    assert int(mix64(np.array([0x9E3779B97F4A7C15]))[0]) == 0xE220A8397B1DCDAF
    values = [0, 1, 2**31, 2**32 - 1, 2**62 + 12345, 2**63 - 1]
    host = mix64(np.array(values, dtype=np.uint64)).view(np.int64).tolist()
    device = mix64_(torch.tensor(values, dtype=torch.int64)).tolist()  # the sign bit set too
    assert device == host and any(v < 0 for v in device)
    # a word with the sign bit set: the same bits on both sides
    negative = np.array([2**63 + 7], dtype=np.uint64)
    assert mix64_(torch.from_numpy(negative.view(np.int64)).clone()).tolist() == \
        mix64(negative).view(np.int64).tolist()


def test_gradient_flows_through_kept_elements_only():
    masks = MemberMasks([0], CPU)
    masks.set_batch([batch(64, 32, 4)], [0])
    x = torch.randn(64, 32, 8, requires_grad=True)
    out = MemberDropout(0.3, masks)(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    kept = out.detach() != 0
    assert 0 < kept.float().mean() < 1
    torch.testing.assert_close(x.grad, grad * kept / 0.7)


def test_identity_in_eval_mode_and_for_p_zero():
    masks = MemberMasks([0], CPU)
    masks.set_batch([batch(8, 8, 2)], [0])
    x = torch.randn(8, 8, 4)
    assert MemberDropout(0.5, masks).eval()(x) is x
    assert MemberDropout(0.0, masks)(x) is x
    assert (MemberDropout(1.0, masks)(x) == 0).all()


def test_a_members_masks_are_the_ones_it_draws_alone_whatever_it_is_packed_with():
    first, second = batch(2, 5, 3), batch(3, 9, 7)  # the second is longer on both sides
    masks = MemberMasks([11, 12], CPU)
    masks.set_batch([first, second], [0, 1])
    hidden = masks.apply(torch.ones(5, 9, 16), 0.3)
    decoder = masks.apply(torch.ones(5, 7, 16), 0.3)
    # attention probabilities of a cross-attention with 4 prefix keys in front
    probs = masks.apply(torch.ones(5, 2, 7, 4 + 9), 0.3)
    own = MemberMasks([11], CPU)
    own.set_batch([first], [0])
    assert torch.equal(hidden[:2, :5], own.apply(torch.ones(2, 5, 16), 0.3))
    assert torch.equal(decoder[:2, :3], own.apply(torch.ones(2, 3, 16), 0.3))
    assert torch.equal(probs[:2, :, :3, :4 + 5], own.apply(torch.ones(2, 2, 3, 4 + 5), 0.3))
    other = MemberMasks([12], CPU)  # the second member, alone
    other.set_batch([second], [0])
    assert torch.equal(hidden[2:], other.apply(torch.ones(3, 9, 16), 0.3))
    # a member's stream is its own: another seed draws other masks
    assert not torch.equal(hidden[:2, :5], hidden[2:4, :5])
    # in chunks of rows (any members, any order, the chunk's own widths): the same masks
    chunked = MemberMasks([11, 12], CPU)
    chunked.start([0, 1])
    chunked.chunk([(1, 2), (0, 0)])  # widths 9 and 7: the chunk's own
    assert torch.equal(chunked.apply(torch.ones(2, 9, 16), 0.3), hidden[[4, 0]])
    chunked.chunk([(0, 1)])
    assert torch.equal(chunked.apply(torch.ones(1, 5, 16), 0.3), hidden[[1], :5])


def test_swaps_every_dropout_of_a_peft_model_inside_the_block_only():
    from peft import LoraConfig, get_peft_model

    from peftlab.models import load_model

    model = get_peft_model(load_model("t5-tiny"), LoraConfig(
        r=2, lora_dropout=0.2, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
    before = [(n, m) for n, m in model.named_modules() if type(m) is nn.Dropout]
    assert any("lora_dropout" in n for n, _ in before)
    masks = MemberMasks([0], CPU)
    with member_dropout(model, masks):
        inside = {n: m for n, m in model.named_modules() if isinstance(m, MemberDropout)}
        assert set(inside) == {n for n, _ in before}
        assert all(m.p == dict(before)[n].p for n, m in inside.items())
        attention = [m for n, m in model.named_modules() if n.endswith("EncDecAttention")]
        assert attention and all(m.peftlab_dropout is masks for m in attention)
        model.eval()  # as an evaluation between training steps does
    after = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Dropout)]
    assert [(n, id(m)) for n, m in after] == [(n, id(m)) for n, m in before]
    assert not any(m.training for _, m in after)  # the mode set inside carried over
    assert not any(hasattr(m, "peftlab_dropout") for m in model.modules())


def test_training_draws_member_masks_and_a_run_repeats_from_its_seed(tmp_path, monkeypatch):
    import json

    import peftlab.dropout as dropout
    from peftlab.config import resolve_run_config
    from peftlab.run import run

    calls = []
    original = dropout.MemberMasks.apply

    def counted(self, x, p):
        calls.append(x.dim())
        return original(self, x, p)

    monkeypatch.setattr(dropout.MemberMasks, "apply", counted)
    losses = []
    for i in range(2):
        cfg = resolve_run_config({
            "model": "t5-tiny", "task": "sst2", "method": "lora", "train_size": 16,
            "val_size": 8, "test_size": 8, "max_steps": 3, "eval_every": 3, "log_every": 1,
            "batch_size": 4, "output_dir": str(tmp_path / f"run{i}")})
        run(cfg, progress=False)
        rows = (tmp_path / f"run{i}" / "metrics.jsonl").read_text().splitlines()
        losses.append([json.loads(r)["train_loss"] for r in rows])
    assert 3 in calls  # T5's dropout modules: rows, positions, features
    assert 4 in calls  # its attention-probability dropout: rows, heads, queries, keys
    assert losses[0] == losses[1] and len(losses[0]) == 4  # step 0 and steps 1-3
