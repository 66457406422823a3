"""Prefix tuning reaches every attention: encoder self, decoder self and decoder cross, on
T5, mT5 and BART."""

import pytest
import torch

from peftlab.methods import METHODS, MethodContext
from peftlab.methods.prefix import ATTN_NAME, KINDS, attention_modules
from peftlab.models import load_model
from tests.conftest import TOKENIZER_DIR

PREFIX = METHODS["prefix"]
IDS = torch.tensor([[37, 1782, 19, 207, 5, 1], [94, 47, 1, 0, 0, 0]])
MASK = (IDS != 0).long()
LABELS = torch.tensor([[1465, 1], [2841, 1]])


FAMILIES = ["t5-tiny", "mt5-tiny", "bart-tiny"]


def prefixed(model="t5-tiny", **args):
    torch.manual_seed(0)
    parsed = PREFIX.Args.model_validate(args)
    return PREFIX.apply(load_model(model), parsed, MethodContext(str(TOKENIZER_DIR), 1), False)


def stacks(model):
    """(encoder, decoder) of a T5 or BART model."""
    return model.get_encoder(), model.get_decoder()


def logits(model, ids=IDS, mask=MASK, labels=LABELS):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, labels=labels).logits


@pytest.mark.parametrize("name", FAMILIES)
def test_the_attention_function_without_prefixes_equals_the_models_own(name):
    base = load_model(name)
    patched = load_model(name)
    patched.set_attn_implementation(ATTN_NAME)
    assert torch.allclose(logits(base), logits(patched), atol=1e-5)
    gen = dict(input_ids=IDS, attention_mask=MASK, max_new_tokens=6)
    assert torch.equal(base.generate(**gen), patched.generate(**gen))


@pytest.mark.parametrize("name", FAMILIES)
def test_prefix_changes_encoder_and_decoder_outputs(name):
    (encoder_base, decoder_base), model = stacks(load_model(name)), prefixed(name)
    encoder, decoder = stacks(model)
    with torch.no_grad():
        enc_base = encoder_base(input_ids=IDS, attention_mask=MASK).last_hidden_state
        enc = encoder(input_ids=IDS, attention_mask=MASK).last_hidden_state
        # the same encoder states into both decoders: only the decoder prefixes differ
        dec_base = decoder_base(input_ids=LABELS, encoder_hidden_states=enc,
                                encoder_attention_mask=MASK).last_hidden_state
        dec = decoder(input_ids=LABELS, encoder_hidden_states=enc,
                      encoder_attention_mask=MASK).last_hidden_state
    assert not torch.allclose(enc_base, enc, atol=1e-4)
    assert not torch.allclose(dec_base, dec, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_zeroing_each_prefix_kind_changes_the_logits(kind, name):
    model = prefixed(name, reparameterize=False)
    before = logits(model)
    with torch.no_grad():
        model.peftlab_prefix.prefixes[kind].zero_()
    assert not torch.allclose(before, logits(model), atol=1e-5)


@pytest.mark.parametrize(("name", "attention_class", "d_kv"), [
    ("t5-tiny", "T5Attention", 8), ("mt5-tiny", "MT5Attention", 8),
    ("bart-tiny", "BartAttention", 16)])
def test_every_attention_module_has_a_prefix_and_counts_match(name, attention_class, d_kv):
    model = prefixed(name, num_prefix_tokens=7)
    modules = attention_modules(model)
    everything = [m for m in model.modules() if type(m).__name__ == attention_class]
    assert [len(modules[k]) for k in KINDS] == [2, 2, 2] and len(everything) == 6
    assert all(hasattr(m, "peftlab_prefix") for m in everything)
    state = PREFIX.export_state(model)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        f"peftlab_prefix.prefixes.{k}": (2, 2, 4, 7, d_kv) for k in KINDS
    }


def test_kinds_option_limits_where_prefixes_go():
    model = prefixed(kinds=["decoder_cross"])
    modules = attention_modules(model)
    assert not any(hasattr(m, "peftlab_prefix") for m in modules["encoder"])
    assert all(hasattr(m, "peftlab_prefix") for m in modules["decoder_cross"])


@pytest.mark.parametrize("name", FAMILIES)
def test_padding_does_not_leak_into_a_prefixed_example(name):
    model = prefixed(name)
    alone = logits(model, IDS[1:, :3], MASK[1:, :3], LABELS[1:])
    batched = logits(model)[1:]
    assert torch.allclose(alone, batched, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_generation_with_cache_equals_without_and_beams_run(name):
    model = prefixed(name)
    gen = dict(input_ids=IDS, attention_mask=MASK, max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        cached = model.generate(**gen, use_cache=True)
        uncached = model.generate(**gen, use_cache=False)
        beams = model.generate(**gen, num_beams=3)
    assert torch.equal(cached, uncached)
    assert beams.shape[0] == 2


@pytest.mark.parametrize("name", FAMILIES)
def test_folding_the_mlp_keeps_the_function(name):
    model = prefixed(name, reparameterize=True)
    assert not model.peftlab_prefix.plain
    before = logits(model)
    state = PREFIX.export_state(model)
    PREFIX.load_state(model, state)
    assert model.peftlab_prefix.plain
    assert torch.allclose(before, logits(model), atol=1e-5)
    # inference-time parameters only: the MLP is gone
    assert sum(p.numel() for p in model.peftlab_prefix.parameters()) == sum(
        v.numel() for v in state.values())


def test_reparameterised_prefix_trains_through_the_mlp():
    model = prefixed(reparameterize=True)
    model.train()
    model(input_ids=IDS, attention_mask=MASK, labels=LABELS).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert any("mlps" in n for n in grads)


@pytest.mark.parametrize("name", FAMILIES)
def test_vocab_init_uses_real_activations(name):
    model = prefixed(name, reparameterize=False, init="vocab")
    enc = model.peftlab_prefix.prefixes["encoder"]
    # keys of layer 0 are the k-projection of real token states, not N(0, 0.25) noise
    assert not torch.allclose(enc, torch.zeros_like(enc))
    with pytest.raises(ValueError, match="reparameterize: false"):
        PREFIX.Args.model_validate({"init": "vocab"})


def test_prefix_works_on_the_flan_t5_small_geometry():
    torch.manual_seed(0)
    model = PREFIX.apply(load_model("flan-t5-small-random"), PREFIX.Args(),
                         MethodContext(str(TOKENIZER_DIR), 1), False)
    out = model(input_ids=IDS, attention_mask=MASK, labels=LABELS)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert sum(v.numel() for v in PREFIX.export_state(model).values()) == 24 * 2 * 20 * 384
