"""One matrix over every registered model method, on t5-tiny (and the count and save/load
checks on mt5-tiny and bart-tiny) with real SST-2 batches."""

from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from peftlab.cli import app
from peftlab.data import collate, tokenize
from peftlab.errors import ConfigError
from peftlab.families import family
from peftlab.methods import METHODS, Baseline, MethodContext
from peftlab.models import load_model
from peftlab.tasks import build_task, prepare_splits
from tests.conftest import TOKENIZER_DIR

MODEL_METHODS = [n for n, m in METHODS.items() if not isinstance(m, Baseline)]


FAMILY_MODELS = ["t5-tiny", "mt5-tiny", "bart-tiny"]


def expected_trainable(name: str, cfg, args, model: str = "t5-tiny") -> int:
    """The analytic count for each method (inference-time parameters)."""
    if cfg.model_type == "bart":
        return expected_bart(name, cfg, args, model)
    D, inner, F = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
    Le, Ld = cfg.num_layers, cfg.num_decoder_layers
    attentions = Le + 2 * Ld  # encoder self, decoder self, decoder cross
    if name in ("lora", "peft"):  # peft's default config here is LoRA r=8 on q, v
        r = getattr(args, "r", 8)
        return attentions * 2 * r * (D + inner)
    if name == "prompt":
        return args.num_virtual_tokens * D
    if name == "prefix":
        return attentions * 2 * args.num_prefix_tokens * inner
    if name == "ia3":
        return attentions * 2 * inner + (Le + Ld) * F
    if name == "ln":
        return (2 * Le + 1 + 3 * Ld + 1) * D
    if name == "full":
        return sum(p.numel() for p in load_model(model).parameters())
    if name == "untuned":
        return 0
    raise AssertionError(name)


def expected_bart(name: str, cfg, args, model: str) -> int:
    """BART: biased projections D -> D (q_proj, k_proj, v_proj), fc1/fc2 through F, and
    LayerNorms with a scale and a bias (two per encoder layer, three per decoder layer, one
    on each stack's embeddings)."""
    D, F, Le, Ld = cfg.d_model, cfg.encoder_ffn_dim, cfg.encoder_layers, cfg.decoder_layers
    attentions = Le + 2 * Ld
    if name in ("lora", "peft"):  # q_proj and v_proj (peft's own default for BART too)
        return attentions * 2 * args_r(args) * (D + D)
    if name == "prefix":
        return attentions * 2 * args.num_prefix_tokens * D
    if name == "ia3":  # k_proj, v_proj outputs; fc2's input
        return attentions * 2 * D + (Le + Ld) * F
    if name == "ln":
        return (2 * Le + 1 + 3 * Ld + 1) * 2 * D
    if name == "prompt":
        return args.num_virtual_tokens * D
    if name == "full":
        return sum(p.numel() for p in load_model(model).parameters())
    if name == "untuned":
        return 0
    raise AssertionError(name)


def args_r(args) -> int:
    return getattr(args, "r", 8)


@pytest.fixture(scope="module")
def batch(tokenizer):
    task = build_task("sst2", {})
    splits = prepare_splits(task, 8, 8, 8, seed=0)
    feats = tokenize(tokenizer, splits.train, 128, 4)
    return collate(feats, list(range(8)), tokenizer.pad_token_id)


def adapted(name: str, model: str = "t5-tiny", **args):
    """The method on a fresh model, with the defaults a config gets for the model's family."""
    method = METHODS[name]
    parsed = method.Args.model_validate({**method.defaults_for(family(model)), **args})
    torch.manual_seed(0)
    adapted_model = method.apply(load_model(model), parsed,
                                 MethodContext(str(TOKENIZER_DIR), 10), False)
    return method, parsed, adapted_model


@pytest.mark.parametrize("model", FAMILY_MODELS)
@pytest.mark.parametrize("name", MODEL_METHODS)
def test_trainable_count_matches_formula_and_only_it_trains(name, model, batch):
    method, args, adapted_model = adapted(name, model)
    state = method.export_state(adapted_model)
    count = sum(t.numel() for t in state.values())
    assert count == expected_trainable(name, load_model(model).config, args, model)
    model = adapted_model
    if not method.trains:
        assert not any(p.requires_grad for p in model.parameters())
        return
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=method.default_learning_rate)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    changed = {n for n, p in model.named_parameters() if not p.equal(before[n])}
    assert changed and changed <= trainable
    assert losses[-1] != losses[0]


@pytest.mark.parametrize("model_name", ["t5-tiny", "bart-tiny"])  # mT5 is T5's code
@pytest.mark.parametrize("name", [n for n in MODEL_METHODS if METHODS[n].trains])
def test_saved_state_loads_into_a_fresh_model_and_reproduces_logits(name, model_name, batch):
    method, args, model = adapted(name, model_name)
    with torch.no_grad():  # perturb so that the state differs from any fresh init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    state = {k: v.detach().clone() for k, v in method.export_state(model).items()}
    fresh = method.apply(load_model(model_name), args, MethodContext(str(TOKENIZER_DIR), 10), True)
    fresh.eval()
    method.load_state(fresh, state)
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, fresh(**batch).logits, atol=1e-5)


def test_lora_at_step_zero_is_exactly_the_base_model(batch):
    base = load_model("t5-tiny")
    _, _, lora = adapted("lora")
    with torch.no_grad():
        assert torch.equal(base(**batch).logits, lora(**batch).logits)
        ids = batch["input_ids"][:2]
        assert torch.equal(base.generate(input_ids=ids, max_new_tokens=5),
                           lora.generate(input_ids=ids, max_new_tokens=5))


def test_prompt_tuning_prepends_to_the_encoder_only(batch):
    _, args, model = adapted("prompt", num_virtual_tokens=5)
    assert model.peft_config["default"].num_transformer_submodules == 1
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[1] == batch["labels"].shape[1]
    # peft's decoder half never reached the model: the option is gone, with the reason
    with pytest.raises(ValueError, match="decoder_prompt` was removed.*zero gradient"):
        METHODS["prompt"].Args.model_validate({"decoder_prompt": True})


def test_prompt_vocab_init_draws_from_the_most_common_ordinary_tokens(tokenizer):
    from peftlab.models import common_tokens

    pool = common_tokens(tokenizer, 5000)
    assert len(pool) == 5000 and not set(pool) & set(tokenizer.all_special_ids)
    # T5's SentencePiece pieces are ordered by unigram log-probability: the top 5,000
    # ordinary tokens are ids 3..5002 (no sentinel <extra_id_*>, no unused row >= 32100)
    assert pool == list(range(3, 5003))
    _, _, model = adapted("prompt", num_virtual_tokens=50, init="vocab")
    prompt = model.prompt_encoder["default"].embedding.weight
    table = model.get_input_embeddings().weight
    rows = [int((table - row).abs().sum(1).argmin()) for row in prompt]
    assert all(torch.equal(table[i], row) for i, row in zip(rows, prompt))
    assert all(3 <= i < 5003 for i in rows)
    _, _, small = adapted("prompt", num_virtual_tokens=50, init="vocab", vocab_top_k=10)
    small_prompt = small.prompt_encoder["default"].embedding.weight
    assert all(any(torch.equal(r, table[i]) for i in range(3, 13)) for r in small_prompt)


def test_prompt_text_init_uses_the_text_embeddings(tokenizer):
    _, _, model = adapted("prompt", num_virtual_tokens=3, init="text", init_text="great movie")
    ids = tokenizer("great movie")["input_ids"][:3]
    prompt = model.prompt_encoder["default"].embedding.weight
    words = model.get_input_embeddings().weight[ids]
    assert torch.allclose(prompt, words)


@pytest.mark.parametrize("field,targets", [("lora", ["q", "wi"]), ("ia3", ["k", "v", "wi"])])
def test_targets_that_match_nothing_are_an_error(field, targets):
    method = METHODS[field]
    args = method.Args.model_validate(
        {"target_modules": targets} | ({"feedforward_modules": []} if field == "ia3" else {}))
    with pytest.raises(ConfigError, match=r"`wi` matches no module.*did you mean `wi_[01]`.*wi_0, wi_1, wo"):
        method.apply(load_model("t5-tiny"), args, MethodContext(str(TOKENIZER_DIR), 10), False)


def test_gated_ffn_targets_work():
    method, args, model = adapted("lora", target_modules=["wi_0", "wi_1", "wo"])
    names = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert any(".wi_0." in n for n in names) and any(".wo." in n for n in names)


@pytest.mark.parametrize("peft_type,config", [
    ("LOHA", {"r": 4, "target_modules": ["q", "v"]}),
    ("LORA", {"r": 4, "use_dora": True, "target_modules": ["q", "v"]}),
    ("ADALORA", {"init_r": 6, "target_r": 2, "target_modules": ["q", "v"]}),
    ("VERA", {"r": 16, "target_modules": ["q"]}),
])
def test_any_peft_method_trains(peft_type, config, batch):
    method, args, model = adapted("peft", peft_type=peft_type, config=config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(1, 3):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        method.on_step(model, step)
        opt.zero_grad()
    assert torch.isfinite(loss)
    assert sum(t.numel() for t in method.export_state(model).values()) > 0


def test_peft_method_checks_targets_and_names():
    with pytest.raises(ConfigError, match="`wi` matches no module"):
        adapted("peft", peft_type="LOHA", config={"target_modules": ["q", "wi"]})
    with pytest.raises(ValueError, match="unknown peft type"):
        METHODS["peft"].Args.model_validate({"peft_type": "LORRA"})
    with pytest.raises(ConfigError, match="method_args.config"):
        adapted("peft", peft_type="LOHA", config={"no_such_field": 1})


GRADIENT_CASES = [(n, {}) for n in MODEL_METHODS if METHODS[n].trains] + [
    ("prefix", {"reparameterize": False}),
    ("prompt", {"init": "random"}),
    ("peft", {"peft_type": "LOHA", "config": {"r": 4, "target_modules": ["q", "v"]}}),
    ("peft", {"peft_type": "LORA", "config": {"r": 4, "use_dora": True, "target_modules": ["q"]}}),
    ("peft", {"peft_type": "ADALORA", "config": {"init_r": 6, "target_r": 2,
                                                 "target_modules": ["q", "v"]}}),
    ("peft", {"peft_type": "VERA", "config": {"r": 16, "target_modules": ["q"]}}),
]


@pytest.mark.parametrize("name,args", GRADIENT_CASES, ids=lambda v: str(v) if v else "default")
def test_everything_counted_receives_a_gradient_and_the_counts_are_what_trains(name, args, batch):
    """What a method exports and counts must be what training changes: a parameter that never
    gets a gradient (peft's decoder prompt rows did not) trains nothing and inflates the count."""
    from peftlab.run import parameter_counts

    method, parsed, model = adapted(name, **args)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(trained.values(), lr=1e-2)
    model.train()
    # one step first: LoRA's B (and AdaLoRA's E, VeRA's lambda_b) start at zero, which
    # leaves the factor before them without a gradient on the very first batch only
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad()
    store = getattr(model, "peftlab_prefix", None)
    loss = model(**batch).loss
    if store is not None:  # the prefixes as used, which the MLP computes when it trains
        for kv in store._current.values():
            kv.retain_grad()
    loss.backward()
    for n, p in trained.items():
        assert p.grad is not None, f"{n} got no gradient"
        # per row, not per tensor: peft's decoder prompt was the second half of one tensor;
        # only full fine-tuning has rows a batch does not reach (embeddings of absent tokens)
        rows = p.grad.reshape(len(p), -1).abs().sum(1) if p.dim() else p.grad.abs()[None]
        reached = rows.sum() > 0 if name == "full" else (rows > 0).all()
        assert reached, f"{n}: rows {torch.nonzero(rows == 0).flatten().tolist()[:8]} got none"
    if store is not None:
        for kind, kv in store._current.items():
            per_layer = kv.grad.flatten(1).abs().sum(1)  # every layer of every kind
            assert (per_layer > 0).all(), kind
    setup = SimpleNamespace(method=method, model=model, base_params=10**6)
    counts = parameter_counts(setup)
    assert counts["trained_params"] == sum(p.numel() for p in trained.values())
    exported = sum(t.numel() for t in method.export_state(model).values())
    assert counts["trainable_params"] == exported
    if name == "prefix" and parsed.reparameterize:
        assert counts["trained_params"] > counts["trainable_params"]  # the MLP trains
    else:
        assert counts["trained_params"] == counts["trainable_params"]


def test_methods_declare_what_export_and_the_study_runner_ask_of_them():
    """What other layers once listed by name: which methods merge into the base weights, and
    which runs depend on the training sample (every trained method, and the majority class)."""
    from peftlab.methods import METHODS

    assert {n for n, m in METHODS.items() if getattr(m, "mergeable", False)} == {"lora", "ia3",
                                                                                "ln"}
    assert {n for n, m in METHODS.items() if m.uses_training_sample} == \
        {n for n, m in METHODS.items() if m.trains} | {"majority"}


def test_methods_lists_exact_counts():
    result = CliRunner().invoke(app, ["methods", "--model", "t5-tiny"])
    assert result.exit_code == 0, result.output
    for count in ("9,216", "1,280", "7,680", "1,408", "768", "4,359,168"):
        assert count in result.output
    assert "lead-3" in result.output
    # off a terminal, no cell is folded mid-word at 80 columns
    assert '"target_modules": ["q", "v"]}' in result.output
    assert '{"num_virtual_tokens": 20, "init": "vocab"' in result.output


def test_methods_lists_exact_counts_on_bart_with_its_defaults():
    result = CliRunner().invoke(app, ["methods", "--model", "bart-tiny"])
    assert result.exit_code == 0, result.output
    # LoRA r=8 on q_proj, v_proj (6 attentions, 64 -> 64): 6 * 2 * 8 * 128; prefix 6 * 2 * 20
    # * 64; (IA)^3 on k_proj, v_proj and fc2's 256 inputs; LayerNorm scales and biases (10)
    for count in ("12,288", "15,360", "1,792", "1,536", "2,421,248"):
        assert count in result.output
    assert '"q_proj"' in result.output and '"fc2"' in result.output  # the family's defaults
