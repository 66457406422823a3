"""Rank classification, generation and the validation loss against direct computations."""

import numpy as np
import pytest
import torch

from peftlab.data import IGNORE_INDEX, collate, pad, tokenize
from peftlab.evaluate import EvalSettings, evaluate_model, generate, rank_classify
from peftlab.models import load_model
from peftlab.tasks import build_task, prepare_splits


@pytest.fixture(scope="module")
def sst2_val(tokenizer):
    task = build_task("sst2", {})
    splits = prepare_splits(task, 8, 96, 8, seed=0)
    return task, splits.validation, tokenize(tokenizer, splits.validation, 128, 4)


def label_heavy_model(tokenizer) -> torch.nn.Module:
    """t5-tiny whose output layer can only favour the two label words or EOS (others get 0),
    so that greedy generation is often, but not always, a valid label."""
    torch.manual_seed(1)
    model = load_model("t5-tiny")
    keep = [tokenizer("negative")["input_ids"][0], tokenizer("positive")["input_ids"][0], 1]
    with torch.no_grad():
        weight = torch.zeros_like(model.lm_head.weight)
        weight[keep] = torch.randn(3, weight.shape[1]) * 3
        model.lm_head.weight.copy_(weight)
    return model.eval()


def settings(tokenizer, batch_size=16):
    return EvalSettings(batch_size, 4, 1, torch.device("cpu"), False,
                        pad_id=tokenizer.pad_token_id, progress=False)


def test_rank_classification_agrees_with_valid_greedy_generations(tokenizer, sst2_val):
    task, examples, feats = sst2_val
    model = label_heavy_model(tokenizer)
    s = settings(tokenizer)
    candidates = [tokenizer(w)["input_ids"] for w in task.label_words]
    scores = rank_classify(model, feats, candidates, s).scores
    generated = generate(model, tokenizer, feats, s)
    valid = [(i, g) for i, g in enumerate(generated) if g in task.label_words]
    assert len(valid) >= 10, generated  # the check below must have something to check
    assert len({g for _, g in valid}) == 2 or len(valid) < len(generated)
    for i, g in valid:
        assert task.label_words[scores[i].argmax()] == g


def test_validation_loss_equals_the_models_own_token_loss(tokenizer, sst2_val):
    task, examples, feats = sst2_val
    model = load_model("t5-tiny").eval()
    result = evaluate_model(model, tokenizer, task, examples, feats, settings(tokenizer, 7))
    batch = collate(feats, list(range(len(feats))), tokenizer.pad_token_id)
    with torch.no_grad():
        direct = model(**batch).loss.item()  # mean over all label tokens of the split
    assert result.metrics["loss"] == pytest.approx(direct, rel=1e-5)
    assert [r["id"] for r in result.rows] == [ex.id for ex in examples]


def test_generation_loss_and_rouge_on_samsum(tokenizer):
    task = build_task("samsum", {})
    splits = prepare_splits(task, 4, 6, 4, seed=0)
    feats = tokenize(tokenizer, splits.validation, 256, 64)
    model = load_model("t5-tiny").eval()
    result = evaluate_model(model, tokenizer, task, splits.validation, feats, settings(tokenizer, 4))
    batch = collate(feats, list(range(len(feats))), tokenizer.pad_token_id)
    with torch.no_grad():
        direct = model(**batch).loss.item()
    assert result.metrics["loss"] == pytest.approx(direct, rel=1e-5)
    assert set(result.metrics) >= {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert all("scores" in r for r in result.rows)


def test_batching_does_not_change_predictions(tokenizer, sst2_val):
    task, examples, feats = sst2_val
    model = label_heavy_model(tokenizer)
    a = evaluate_model(model, tokenizer, task, examples, feats, settings(tokenizer, 2))
    b = evaluate_model(model, tokenizer, task, examples, feats, settings(tokenizer, 64))
    assert [r["prediction"] for r in a.rows] == [r["prediction"] for r in b.rows]
    assert a.metrics["accuracy"] == b.metrics["accuracy"]


METHOD_CASES = [("lora", {}), ("prefix", {}), ("prompt", {}), ("ia3", {}), ("full", {})]


def perturbed_model(method: str, args: dict) -> torch.nn.Module:
    """t5-tiny with the method applied and every trainable tensor moved off its init."""
    from peftlab.methods import METHODS, MethodContext
    from tests.conftest import TOKENIZER_DIR

    m = METHODS[method]
    torch.manual_seed(0)
    model = m.apply(load_model("t5-tiny"), m.Args(**args), MethodContext(str(TOKENIZER_DIR), 1),
                    False)
    with torch.no_grad():  # make every adapter non-trivial
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("method,args", METHOD_CASES)
def test_shared_encoder_scores_equal_repeated_input_scores(tokenizer, sst2_val, method, args):
    """One encoder pass and one cached start step per input, copied to every candidate, give
    the log-probs of running each (input, candidate) pair through the whole model."""
    from peftlab.evaluate import _candidate_logprobs, _encode, _token_logprobs

    _, _, feats = sst2_val
    model = perturbed_model(method, args)
    s = settings(tokenizer)
    # candidates of different lengths, so padding inside the candidates is exercised too
    words = ["negative", "positive", "very good"]
    cand = [tokenizer(w)["input_ids"] for w in words]
    assert len({len(c) for c in cand}) > 1
    cand = pad(cand, IGNORE_INDEX)
    inputs = collate(feats, list(range(6)), tokenizer.pad_token_id)["input_ids"]
    with torch.no_grad():
        shared = _candidate_logprobs(model, _encode(model, inputs, s), cand, s)
        repeated = _token_logprobs(model, inputs.repeat_interleave(3, dim=0), cand.repeat(6, 1), s)
    assert torch.allclose(shared, repeated, atol=1e-5)
    assert (shared != 0).sum() == 6 * sum(len(tokenizer(w)["input_ids"]) for w in words)


@pytest.mark.parametrize("method,args", METHOD_CASES)
def test_generation_from_shared_encoder_equals_plain_generation(tokenizer, sst2_val, method,
                                                                args):
    task, _, feats = sst2_val
    model = perturbed_model(method, args)
    s = settings(tokenizer)
    candidates = [tokenizer(w)["input_ids"] for w in task.label_words]
    ranked = rank_classify(model, feats, candidates, s, generate_with=tokenizer)
    plain = generate(model, tokenizer, feats, s)
    assert ranked.generated == plain
    assert len(set(plain)) > 1  # a model that says one thing everywhere would hide a mix-up
    alone = rank_classify(model, feats, candidates, s)
    assert alone.generated is None
    np.testing.assert_allclose(alone.scores, ranked.scores, rtol=1e-6)


def test_greedy_loop_from_the_cache_stops_rows_at_eos_as_generate_does(tokenizer, sst2_val,
                                                                         monkeypatch):
    """Rows that end (EOS) at different steps; the test split's generation must not fall back
    to `generate` for the default generation settings, and must match it."""
    task, _, feats = sst2_val
    model = label_heavy_model(tokenizer)
    s = settings(tokenizer)
    s.max_new_tokens = 6
    plain = generate(model, tokenizer, feats, s)
    lengths = {len(tokenizer(g)["input_ids"]) for g in plain}
    assert len(lengths) > 1 and 2 in lengths  # a label word + EOS, and longer ones
    candidates = [tokenizer(w)["input_ids"] for w in task.label_words]

    def refuse(*a, **kw):
        raise AssertionError("generate called: the greedy loop from the cache was not used")

    monkeypatch.setattr(type(model), "generate", refuse)
    ranked = rank_classify(model, feats, candidates, s, generate_with=tokenizer)
    assert ranked.generated == plain
    alone = rank_classify(model, feats, candidates, s)
    np.testing.assert_allclose(alone.scores, ranked.scores, rtol=1e-6)
    # the label's EOS is scored from the cache after the label word: the generated positions
    # must be gone from it by then
    np.testing.assert_allclose(alone.nll, ranked.nll, rtol=1e-6)


def test_generation_settings_the_loop_does_not_apply_go_to_generate(tokenizer, sst2_val):
    from peftlab.evaluate import _encode, _greedy_from_cache

    task, _, feats = sst2_val
    model = label_heavy_model(tokenizer)
    model.generation_config.repetition_penalty = 3.0
    s = settings(tokenizer)
    inputs = collate(feats, list(range(4)), tokenizer.pad_token_id)["input_ids"]
    with torch.no_grad():
        assert _greedy_from_cache(model, _encode(model, inputs, s), s) is None
    candidates = [tokenizer(w)["input_ids"] for w in task.label_words]
    ranked = rank_classify(model, feats, candidates, s, generate_with=tokenizer)
    assert ranked.generated == generate(model, tokenizer, feats, s)  # penalty applied in both


@pytest.mark.parametrize("method,args", [
    case if case[0] in ("lora", "prompt") else pytest.param(*case, marks=pytest.mark.slow)
    for case in METHOD_CASES])
def test_bf16_evaluation_runs_on_a_copy_close_to_fp32(tokenizer, sst2_val, method, args):
    """bf16 evaluates a bf16 copy: the trained fp32 weights and the train mode are untouched,
    the numbers differ from fp32 (it really ran in bf16) but only by bf16 rounding."""
    from dataclasses import replace

    task, examples, feats = sst2_val
    model = perturbed_model(method, args).train()
    # as between two validations: a training forward and backward (non-leaf tensors around)
    model(**collate(feats, list(range(4)), tokenizer.pad_token_id)).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = settings(tokenizer)
    bf16 = evaluate_model(model, tokenizer, task, examples, feats, replace(s, bf16=True))
    fp32 = evaluate_model(model, tokenizer, task, examples, feats, s)
    assert model.training
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[name]), name
    assert bf16.metrics["loss"] != fp32.metrics["loss"]
    assert bf16.metrics["loss"] == pytest.approx(fp32.metrics["loss"], rel=0.02)
    same = np.mean([a["prediction"] == b["prediction"] for a, b in zip(fp32.rows, bf16.rows)])
    assert same >= 0.9, same


def test_a_label_that_is_a_token_prefix_of_another_can_lose(tokenizer, sst2_val):
    """"good" is a token prefix of "good movie". Scored without its end-of-sequence token,
    "good" always wins (the longer label only adds log-probabilities below zero); with it, a
    model that says "good movie" picks "good movie"."""
    from peftlab.evaluate import label_scores

    _, _, feats = sst2_val
    words = ["good", "good movie"]
    cand = [tokenizer(w)["input_ids"] for w in words]
    assert cand[1][: len(cand[0]) - 1] == cand[0][:-1]  # a token prefix, EOS aside
    torch.manual_seed(0)
    model = load_model("t5-tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = collate(feats, list(range(16)), tokenizer.pad_token_id)
    batch["labels"] = torch.tensor([cand[1]] * 16)  # every input: "good movie"
    model.train()
    for _ in range(40):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    for scoring in ("sum", "mean"):
        s = settings(tokenizer)
        s.label_scoring = scoring
        ranked = rank_classify(model, feats, cand, s)
        assert (ranked.scores.argmax(1) == 1).all(), scoring
    # without EOS: the prefix label's score is never below the longer label's
    from peftlab.evaluate import _candidate_logprobs, _encode

    with torch.no_grad():
        inputs = batch["input_ids"]
        lp = _candidate_logprobs(model, _encode(model, inputs, s), pad(cand, IGNORE_INDEX), s)
    lp = lp.view(16, 2, -1).double().numpy()
    without_eos = [lp[:, 0, :1].sum(-1), lp[:, 1, :2].sum(-1)]
    assert (without_eos[0] >= without_eos[1]).all()
    with_eos = label_scores(lp, np.array([2.0, 3.0]), "sum")
    assert (with_eos[:, 1] > with_eos[:, 0]).all()


def test_label_scores_sum_and_mean():
    from peftlab.evaluate import label_scores

    lp = np.array([[[-1.0, -0.5, 0.0], [-0.2, -0.3, -0.4]]])  # a 2-token and a 3-token label
    lengths = np.array([2.0, 3.0])
    assert label_scores(lp, lengths, "sum").tolist() == [[-1.5, pytest.approx(-0.9)]]
    assert label_scores(lp, lengths, "mean").tolist() == [[-0.75, pytest.approx(-0.3)]]


def test_label_log_probabilities_are_computed_a_chunk_of_rows_at_a_time(monkeypatch):
    """score - logsumexp over chunks of rows equals the full log-softmax's picks, padding 0,
    with bf16 logits too (a pack evaluated together on a GPU)."""
    import peftlab.evaluate as evaluate

    torch.manual_seed(0)
    logits = torch.randn(7, 5, 50) * 4
    labels = torch.randint(0, 50, (7, 5))
    labels[2, 3:] = evaluate.IGNORE_INDEX
    reference = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    reference = reference * (labels != evaluate.IGNORE_INDEX)
    monkeypatch.setattr(evaluate, "LOGPROB_CHUNK_ELEMENTS", 2 * 5 * 50)  # 2 rows a chunk
    chunked = evaluate._picked_logprobs(logits, labels)
    assert torch.allclose(chunked, reference, atol=1e-5) and (chunked[2, 3:] == 0).all()
    half = evaluate._picked_logprobs(logits.bfloat16(), labels)
    assert half.dtype == torch.float32 and torch.allclose(half, reference, atol=0.1)
