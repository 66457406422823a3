"""Packs: every member of a pack computes what its unpacked run computes (dropout off).

Each member has its own seed (initialisation, training sample and order) and learning rate;
a pack trains them in one forward and backward over the concatenated batch. Compared here,
step by step, with the same members trained one by one on their own copy of the model.
"""

import copy

import pytest
import torch

from peftlab.data import collate, tokenize
from peftlab.dropout import use_member_attention
from peftlab.methods import METHODS, MethodContext
from peftlab.models import load_model
from peftlab.pack import Pack, concat_batches, decoder_inputs, initial_state, step_gradients
from peftlab.tasks import build_task, prepare_splits
from tests.conftest import TOKENIZER_DIR

CPU = torch.device("cpu")
SEEDS = (0, 1, 2)
RATES = (1e-3, 3e-3, 1e-2)
CASES = [("lora", {}), ("ia3", {}), ("ln", {}), ("prompt", {"num_virtual_tokens": 5}),
         ("prefix", {"num_prefix_tokens": 5}),
         ("prefix", {"num_prefix_tokens": 5, "reparameterize": False})]


def close(a: torch.Tensor, b: torch.Tensor, relative: float) -> bool:
    return bool((a - b).norm() <= relative * b.norm() + 1e-6)


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Training mode without dropout: the modules', and T5 attention's own probability."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.0
    return model.train()


@pytest.fixture(scope="module")
def member_batches(tokenizer):
    """Each member's own training sample (its seed's draw): 3 steps of 4 examples, of
    different lengths across members."""
    task = build_task("sst2", {})
    out = []
    for seed in SEEDS:
        feats = tokenize(tokenizer, prepare_splits(task, 12, 8, 8, seed=seed).train, 128, 4)
        out.append([collate(feats, list(range(4 * i, 4 * i + 4)), tokenizer.pad_token_id)
                    for i in range(3)])
    return out


def unpacked_run(method, args, ctx, seed, lr, batches, model_name="t5-tiny"):
    """What an unpacked run does: seed, apply, AdamW with clipping, step by step."""
    torch.manual_seed(seed)
    model = no_dropout(method.apply(load_model(model_name), args, ctx, False))
    use_member_attention(model)  # the attention every trainable run computes with
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return model.eval(), losses, state


def packed_runs(method, args, ctx, batches, members=SEEDS, rates=RATES, model_name="t5-tiny"):
    base = load_model(model_name)
    states = [initial_state(method, args, ctx, base, seed) for seed in members]
    pack = Pack(no_dropout(method.apply(copy.deepcopy(base), args, ctx, False)), states,
                method.route)
    optimizers = [torch.optim.AdamW([p for _, p in pack.parameters(m)], lr=lr)
                  for m, lr in enumerate(rates)]
    losses = []
    for step in range(len(batches[0])):
        losses.append(step_gradients(pack, [[b[step]] for b in batches], CPU, False, 0))
        for m, opt in enumerate(optimizers):
            torch.nn.utils.clip_grad_norm_([p for _, p in pack.parameters(m)], 1.0)
            opt.step()
            opt.zero_grad()
    pack.model.eval()
    return pack, losses


@pytest.mark.parametrize("name,args", CASES, ids=lambda v: str(v) if v else "")
def test_every_member_trains_as_its_unpacked_run(name, args, member_batches, tokenizer):
    method = METHODS[name]
    parsed = method.Args.model_validate(args)
    ctx = MethodContext(str(TOKENIZER_DIR), 10)
    pack, packed_losses = packed_runs(method, parsed, ctx, member_batches)
    # a shared evaluation batch: every member's logits from one packed forward
    eval_batch = collate(tokenize(tokenizer, prepare_splits(build_task("sst2", {}), 8, 8, 8,
                                                            seed=0).test, 128, 4),
                         list(range(8)), tokenizer.pad_token_id)
    packed_batch, member_of_row = concat_batches([eval_batch] * len(SEEDS), 0)
    with torch.no_grad(), pack.router.routing(member_of_row):
        packed_logits = pack.model(**packed_batch).logits.view(len(SEEDS), 8, -1,
                                                               pack.model.config.vocab_size)
    for m, (seed, lr) in enumerate(zip(SEEDS, RATES)):
        model, losses, state = unpacked_run(method, parsed, ctx, seed, lr, member_batches[m])
        assert [s[m] for s in packed_losses] == pytest.approx(losses, rel=1e-5), m
        member = pack.state(m)
        assert set(member) == set(state)
        for key in state:
            # Adam divides by the root of tiny second moments: a rounding difference in a
            # near-zero gradient moves a few elements by up to lr per step; the tensor agrees
            assert close(member[key], state[key], 1e-3), (m, key)
        with torch.no_grad():
            logits = model(**eval_batch).logits
        assert close(packed_logits[m], logits, 1e-4), m


@pytest.mark.parametrize("name,args", [("lora", {}),
                                       pytest.param("prefix", {}, marks=pytest.mark.slow)])
def test_members_train_as_their_unpacked_runs_on_the_flan_t5_small_geometry(name, args,
                                                                           member_batches):
    """The real geometry (d_model 512 != 6 heads x 64): two members, two steps."""
    method = METHODS[name]
    parsed = method.Args.model_validate(args)
    ctx = MethodContext(str(TOKENIZER_DIR), 10)
    batches = [b[:2] for b in member_batches[:2]]
    pack, packed_losses = packed_runs(method, parsed, ctx, batches, members=SEEDS[:2],
                                      rates=RATES[:2], model_name="flan-t5-small-random")
    for m in range(2):
        _, losses, state = unpacked_run(method, parsed, ctx, SEEDS[m], RATES[m], batches[m],
                                        model_name="flan-t5-small-random")
        assert [s[m] for s in packed_losses] == pytest.approx(losses, rel=1e-5), m
        assert all(close(pack.state(m)[k], v, 1e-3) for k, v in state.items()), m


def test_members_start_as_their_unpacked_runs_and_differ(member_batches):
    method = METHODS["lora"]
    args, ctx = method.Args(), MethodContext(str(TOKENIZER_DIR), 10)
    base = load_model("t5-tiny")
    states = [initial_state(method, args, ctx, base, seed) for seed in SEEDS]
    torch.manual_seed(1)
    alone = method.apply(load_model("t5-tiny"), args, ctx, False)
    for n, p in alone.named_parameters():
        if p.requires_grad:
            assert torch.equal(states[1][n], p)
    a_name = next(n for n in states[0] if "lora_A" in n)
    assert not torch.equal(states[0][a_name], states[1][a_name])


def test_a_diverging_member_leaves_the_others_unchanged(member_batches):
    """A NaN in one member's loss stays in that member: the others' losses and gradients
    are those they have without it."""
    method = METHODS["lora"]
    args, ctx = method.Args(), MethodContext(str(TOKENIZER_DIR), 10)
    base = load_model("t5-tiny")
    states = [initial_state(method, args, ctx, base, seed) for seed in SEEDS]
    poisoned = [dict(s) for s in states]
    name = next(n for n in poisoned[1] if "lora_B" in n)
    poisoned[1][name] = torch.full_like(poisoned[1][name], float("nan"))
    results = []
    for member_states in (states, poisoned):
        pack = Pack(no_dropout(method.apply(copy.deepcopy(base), args, ctx, False)),
                    member_states, method.route)
        losses = step_gradients(pack, [[b[0]] for b in member_batches], CPU, False, 0)
        grads = [{n: p.grad.clone() for n, p in pack.parameters(m)} for m in range(3)]
        results.append((losses, grads))
    (clean, clean_grads), (bad, bad_grads) = results
    assert bad[1] != bad[1]  # NaN
    for m in (0, 2):
        assert bad[m] == clean[m]
        for n in clean_grads[m]:
            assert torch.equal(bad_grads[m][n], clean_grads[m][n])


def test_a_pack_of_one_is_the_unpacked_computation(member_batches):
    method = METHODS["lora"]
    args, ctx = method.Args(), MethodContext(str(TOKENIZER_DIR), 10)
    pack, losses = packed_runs(method, args, ctx, member_batches[:1], members=(0,),
                               rates=(1e-3,))
    _, alone, state = unpacked_run(method, args, ctx, 0, 1e-3, member_batches[0])
    assert [s[0] for s in losses] == pytest.approx(alone, rel=1e-6)
    for key, value in state.items():
        assert torch.allclose(pack.state(0)[key], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("plain_head", [True, False])
def test_the_lm_head_computes_labelled_positions_only_with_the_loss_unchanged(plain_head):
    """Targets of different lengths: the head's product and log-softmax skip the padded
    positions, and the loss and gradients are the model's own; a head that is not a plain
    Linear (a method could adapt it) computes every position."""
    method = METHODS["lora"]
    args, ctx = method.Args(), MethodContext(str(TOKENIZER_DIR), 10)
    torch.manual_seed(0)
    model = no_dropout(method.apply(load_model("t5-tiny"), args, ctx, False))
    if not plain_head:
        model.base_model.model.lm_head = torch.nn.Sequential(model.base_model.model.lm_head)
    ids = torch.tensor([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(),
             "labels": torch.tensor([[11, 12, 13, 1], [14, 1, -100, -100]])}
    params = [p for p in model.parameters() if p.requires_grad]
    model(**batch).loss.backward()
    expected = [p.grad.clone() for p in params]
    model.zero_grad()
    pack = Pack(model, [{n: p.detach() for n, p in model.named_parameters() if p.requires_grad}],
                method.route)
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: rows.append(out.shape[:-1]))
    loss = step_gradients(pack, [[batch]], CPU, False, 0)[0]
    hook.remove()
    assert rows == [torch.Size([6]) if plain_head else torch.Size([2, 4])]
    with torch.no_grad():
        assert loss == pytest.approx(model(**batch).loss.item(), rel=1e-6)
    for got, want in zip([p.grad for _, p in pack.parameters(0)], expected):
        assert close(got, want, 1e-5)


def test_decoder_inputs_are_the_models_own_shift():
    model = load_model("t5-tiny")
    labels = torch.tensor([[5, 6, 1, -100]])
    assert decoder_inputs(model, labels).tolist() == [[0, 5, 6, 1]]


# --- length chunks ---------------------------------------------------------------------------

def batch_of(lengths, label_length=2, width=None):
    """A micro-batch whose rows have these encoder lengths (right-padded)."""
    width = width or max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = 5
    labels = torch.full((len(lengths), label_length), 7)
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}


def test_rows_of_different_lengths_go_in_chunks_no_smaller_than_a_micro_batch():
    from peftlab.pack import gather_rows, length_chunks

    batches = [batch_of([60, 58, 61, 59]), batch_of([5, 6, 4, 5]), batch_of([7, 5, 6, 6])]
    chunks = length_chunks(batches, chunk_cost=64)
    assert sorted(r for chunk in chunks for r in chunk) == [(k, r) for k in range(3)
                                                              for r in range(4)]
    assert all(len(chunk) >= 4 and chunk == sorted(chunk) for chunk in chunks)
    # the long member apart from the short ones: 12 rows x 63 positions -> 4 x 63 + 8 x 9
    assert {frozenset(k for k, _ in chunk) for chunk in chunks} == {frozenset({0}),
                                                                     frozenset({1, 2})}
    batch, member_of_row, widths = gather_rows(batches, chunks[0], 0)
    assert widths == {"encoder": 7, "decoder": 2} and batch["input_ids"].shape == (8, 7)
    assert member_of_row.tolist() == [1, 1, 1, 1, 2, 2, 2, 2]
    # a chunk costs more than the padding it saves: one chunk, every row in order
    assert length_chunks(batches, chunk_cost=10**9) == [[(k, r) for k in range(3)
                                                         for r in range(4)]]


@pytest.mark.parametrize("name,args", [("lora", {}), ("prefix", {"num_prefix_tokens": 5}),
                                       ("prompt", {"num_virtual_tokens": 5})])
def test_a_step_in_length_chunks_equals_it_in_one_batch_dropout_included(name, args, tokenizer):
    """The same gradients and losses, and each member's same dropout masks: drawn once for
    its whole micro-batch at its own shape, each chunk taking its rows' part."""
    from peftlab.dropout import MemberMasks, member_dropout
    from peftlab.pack import length_chunks

    task = build_task("sst2", {})
    feats = tokenize(tokenizer, prepare_splits(task, 64, 8, 8, seed=0).train, 128, 4)
    by_length = sorted(range(64), key=lambda i: len(feats.input_ids[i]))
    # member 0 the shortest examples, member 2 the longest: chunks cut them apart
    micro = [[collate(feats, by_length[24 * m:24 * m + 4], tokenizer.pad_token_id)]
             for m in range(3)]
    assert len(length_chunks([b[0] for b in micro], chunk_cost=0)) > 1
    method = METHODS[name]
    parsed = method.Args.model_validate(args)
    ctx = MethodContext(str(TOKENIZER_DIR), 10)
    base = load_model("t5-tiny")  # dropout 0.1 everywhere, as Flan-T5
    states = [initial_state(method, parsed, ctx, base, seed) for seed in SEEDS]

    def step(chunk_cost):
        pack = Pack(method.apply(copy.deepcopy(base), parsed, ctx, False), states, method.route)
        pack.model.train()
        masks = MemberMasks(list(SEEDS), CPU)
        with member_dropout(pack.model, masks):
            losses = step_gradients(pack, micro, CPU, False, 0, masks, chunk_cost=chunk_cost)
        return losses, [p.grad for m in range(3) for _, p in pack.parameters(m)]

    one_losses, one_grads = step(10**9)
    chunked_losses, chunked_grads = step(0)
    assert chunked_losses == pytest.approx(one_losses, rel=1e-5)
    assert all(close(a, b, 1e-5) for a, b in zip(chunked_grads, one_grads))


@pytest.mark.parametrize("name", ["lora", "ln"])
def test_a_members_initial_state_shares_the_frozen_base_and_leaves_it_as_it_was(name):
    """A method that adds tensors gets a copy sharing the base weights (no 77M copy per
    member); its initial state is what a full copy gives, and the base model keeps its
    values and trainability. Layer-norm tuning trains base weights: a full copy."""
    method = METHODS[name]
    args = method.Args.model_validate({})
    ctx = MethodContext(str(TOKENIZER_DIR), 10)
    base = load_model("t5-tiny")
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in base.named_parameters()}
    copies = []
    real = copy.deepcopy

    def counting(obj, memo=None):
        copies.append(len(memo or {}))
        return real(obj, memo)

    import peftlab.pack as pack_module

    pack_module.copy.deepcopy, saved = counting, pack_module.copy.deepcopy
    try:
        shared = initial_state(method, args, ctx, base, seed=3)
    finally:
        pack_module.copy.deepcopy = saved
    torch.manual_seed(3)
    reference = method.apply(copy.deepcopy(base), args, ctx, False)
    expected = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    assert shared.keys() == expected.keys()
    assert all(torch.equal(shared[n], expected[n]) for n in shared)
    assert (copies[0] > 0) == method.adds_parameters  # the memo held the base's tensors
    for n, p in base.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1], n


def test_the_router_reads_its_runs_of_members_from_the_host_copy(monkeypatch):
    """A route on a GPU read with `tolist` makes the host wait for the GPU at every chunk:
    the runs of members come from the host copy the step passes along."""
    from peftlab.pack import Router

    router = Router(3)
    device_route = torch.tensor([0, 0, 2, 2, 2])  # stands for the GPU tensor
    host = device_route.clone()
    seen = []
    real = torch.unique_consecutive

    def spy(t, **kwargs):
        seen.append(t)
        return real(t, **kwargs)

    monkeypatch.setattr(torch, "unique_consecutive", spy)
    with router.routing(device_route, host):
        assert router.segments(10) == [(0, 4), (2, 6)]
    assert seen and all(t is host for t in seen)
    assert router.route is None and router.host_route is None
