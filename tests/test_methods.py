"""One matrix over every registered model method, on t5-tiny with real SST-2 batches."""

import pytest
import torch

from peftlab.data import collate, tokenize
from peftlab.errors import ConfigError
from peftlab.methods import METHODS, Baseline, MethodContext
from peftlab.models import load_model
from peftlab.tasks import build_task, prepare_splits
from tests.conftest import TOKENIZER_DIR

MODEL_METHODS = [n for n, m in METHODS.items() if not isinstance(m, Baseline)]


def expected_trainable(name: str, cfg, args) -> int:
    """The analytic count for each method (inference-time parameters)."""
    D, inner, F = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
    Le, Ld = cfg.num_layers, cfg.num_decoder_layers
    attentions = Le + 2 * Ld  # encoder self, decoder self, decoder cross
    if name in ("lora", "peft"):  # peft's default config here is LoRA r=8 on q, v
        r = getattr(args, "r", 8)
        return attentions * 2 * r * (D + inner)
    if name == "prompt":
        return args.num_virtual_tokens * D * (2 if args.decoder_prompt else 1)
    if name == "prefix":
        return attentions * 2 * args.num_prefix_tokens * inner
    if name == "ia3":
        return attentions * 2 * inner + (Le + Ld) * F
    if name == "ln":
        return (2 * Le + 1 + 3 * Ld + 1) * D
    if name == "full":
        return sum(p.numel() for p in load_model("t5-tiny").parameters())
    if name == "untuned":
        return 0
    raise AssertionError(name)


@pytest.fixture(scope="module")
def batch(tokenizer):
    task = build_task("sst2", {})
    splits = prepare_splits(task, 8, 8, 8, seed=0)
    feats = tokenize(tokenizer, splits.train, 128, 4)
    return collate(feats, list(range(8)), tokenizer.pad_token_id)


def adapted(name: str, **args):
    method = METHODS[name]
    parsed = method.Args.model_validate(args)
    torch.manual_seed(0)
    model = method.apply(load_model("t5-tiny"), parsed,
                         MethodContext(str(TOKENIZER_DIR), 10), False)
    return method, parsed, model


@pytest.mark.parametrize("name", MODEL_METHODS)
def test_trainable_count_matches_formula_and_only_it_trains(name, batch):
    method, args, model = adapted(name)
    state = method.export_state(model)
    count = sum(t.numel() for t in state.values())
    assert count == expected_trainable(name, load_model("t5-tiny").config, args)
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


@pytest.mark.parametrize("name", [n for n in MODEL_METHODS if METHODS[n].trains])
def test_saved_state_loads_into_a_fresh_model_and_reproduces_logits(name, batch):
    method, args, model = adapted(name)
    with torch.no_grad():  # perturb so that the state differs from any fresh init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    state = {k: v.detach().clone() for k, v in method.export_state(model).items()}
    fresh = method.apply(load_model("t5-tiny"), args, MethodContext(str(TOKENIZER_DIR), 10), True)
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


def test_prompt_tuning_prepends_to_the_encoder_only_by_default(batch):
    _, args, model = adapted("prompt", num_virtual_tokens=5)
    assert model.peft_config["default"].num_transformer_submodules == 1
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[1] == batch["labels"].shape[1]
    _, args2, model2 = adapted("prompt", num_virtual_tokens=5, decoder_prompt=True)
    assert sum(t.numel() for t in METHODS["prompt"].export_state(model2).values()) == 2 * 5 * 64


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
