"""Exported adapters load outside peftlab (plain peft, plain transformers) and predict what
the run predicted."""

import pytest
import torch
from typer.testing import CliRunner

import peftlab
from peftlab.cli import app
from peftlab.errors import PeftlabError
from tests.conftest import TOKENIZER_DIR

RUN = dict(task="sst2", train_size=16, val_size=8, test_size=16, max_steps=4, eval_every=2,
           batch_size=4, learning_rate=1e-2)


def saved_preset(tmp_path_factory, preset):
    """A preset saved as a plain model folder with its tokenizer, as a user's base checkpoint
    would be."""
    from peftlab.models import load_model, load_tokenizer

    folder = tmp_path_factory.mktemp(preset)
    load_model(preset).save_pretrained(folder)
    load_tokenizer(str(TOKENIZER_DIR)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return saved_preset(tmp_path_factory, "t5-tiny")


def predictions_of(model, tokenizer, run):
    """Test predictions of `model` through peftlab's evaluation of the run's test split."""
    from peftlab.evaluate import evaluate_model
    from peftlab.run import setup

    s = setup(run.config, data=True)
    settings = s.eval_settings("test", progress=False)
    result = evaluate_model(model, tokenizer, s.task, s.splits.test, s.features("test"), settings)
    return [r["prediction"] for r in result.rows]


@pytest.mark.parametrize("method,args", [
    ("lora", {}), ("ia3", {}), ("prompt", {"num_virtual_tokens": 4}),
    ("peft", {"peft_type": "LOHA", "config": {"r": 2, "target_modules": ["q", "v"]}})])
def test_a_peft_adapter_loads_in_plain_peft_and_predicts_what_the_run_did(tmp_path, base, method,
                                                                        args):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    run = peftlab.train({**RUN, "model": str(base), "method": method, "method_args": args,
                         "learning_rate": 0.3 if method == "prompt" else 1e-2,
                         "output_dir": str(tmp_path / "run")}, progress=False)
    result = CliRunner().invoke(app, ["export", str(run.path), "--to", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    import json

    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)  # peft left it empty
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"# {method} on sst2, base model {base}" in card
    assert "| test | accuracy |" in card and "PeftModel.from_pretrained" in card
    assert "Writing model shards" not in result.output
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base),
                                      tmp_path / "out").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert predictions_of(model, tokenizer, run) == list(run.predictions.prediction)


@pytest.mark.parametrize("method", ["lora", "ia3", "ln"])
def test_a_merged_model_loads_in_transformers_with_the_same_outputs(tmp_path, base, method):
    from transformers import AutoModelForSeq2SeqLM

    run = peftlab.train({**RUN, "model": str(base), "method": method,
                         "output_dir": str(tmp_path / "run")}, progress=False)
    peftlab.export(run, tmp_path / "merged", merge=True)
    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    model, tokenizer = run.model()
    batch = tokenizer(["a fine, funny film"], return_tensors="pt")
    start = torch.zeros((1, 1), dtype=torch.long)
    with torch.no_grad():
        a = merged(**batch, decoder_input_ids=start).logits
        b = model(**batch, decoder_input_ids=start).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert predictions_of(merged, tokenizer, run) == list(run.predictions.prediction)
    # the untied output embedding stays untied, and the card explains transformers' warning
    assert merged.lm_head.weight.data_ptr() != merged.shared.weight.data_ptr()
    assert "will NOT tie them" in (tmp_path / "merged" / "README.md").read_text()


@pytest.mark.parametrize("method", ["prefix", "ln"])
def test_peftlabs_own_methods_export_a_folder_peftlab_loads(tmp_path, method):
    run = peftlab.train({**RUN, "model": "t5-tiny", "method": method,
                         "method_args": {"num_prefix_tokens": 4} if method == "prefix" else {},
                         "output_dir": str(tmp_path / "run")}, progress=False)
    out = peftlab.export(run, tmp_path / "out")
    assert (out / "peftlab_adapter.json").is_file() and not (out / "adapter_config.json").exists()
    model, tokenizer = peftlab.load_adapter(out)
    assert predictions_of(model, tokenizer, run) == list(run.predictions.prediction)


@pytest.fixture(scope="module")
def bart_base(tmp_path_factory):
    return saved_preset(tmp_path_factory, "bart-tiny")


@pytest.mark.parametrize("method,how", [("lora", "peft"), ("ln", "merge"), ("prefix", "peftlab")])
def test_bart_runs_export_as_t5_runs_do(tmp_path, bart_base, method, how):
    """A BART folder's family is read from its config: LoRA on q_proj/v_proj loads in plain
    peft, LayerNorm tuning (scales and biases) merges, prefixes load in peftlab."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    run = peftlab.train({**RUN, "model": str(bart_base), "method": method,
                         "method_args": {"num_prefix_tokens": 4} if method == "prefix" else {},
                         # by loss: a random BART's validation accuracy stays 50% for 4 steps,
                         # so accuracy would select step 0, the untrained state
                         "selection_metric": "loss", "output_dir": str(tmp_path / "run")},
                        progress=False)
    assert run.summary["best_step"] > 0
    out = peftlab.export(run, tmp_path / "out", merge=how == "merge")
    if how == "peft":
        assert run.config.method_args["target_modules"] == ["q_proj", "v_proj"]
        model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(bart_base), out)
        tokenizer = run.model()[1]
    elif how == "merge":
        model, tokenizer = AutoModelForSeq2SeqLM.from_pretrained(out), run.model()[1]
        trained = {n: p for n, p in model.named_parameters() if "layer_norm" in n and ".bias" in n}
        assert trained and any(p.abs().sum() > 0 for p in trained.values())  # biases trained
    else:
        model, tokenizer = peftlab.load_adapter(out)
    assert predictions_of(model.eval(), tokenizer, run) == list(run.predictions.prediction)


def test_export_refuses_what_it_cannot_do_and_never_writes_into_a_used_folder(tmp_path):
    run = peftlab.train({**RUN, "model": "t5-tiny", "method": "prompt",
                         "method_args": {"num_virtual_tokens": 4}, "learning_rate": 0.3,
                         "output_dir": str(tmp_path / "run")}, progress=False)
    with pytest.raises(PeftlabError, match="--merge: `prompt` adds tensors"):
        peftlab.export(run, tmp_path / "m", merge=True)
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    with pytest.raises(PeftlabError, match="not an empty folder"):
        peftlab.export(run, used)
    assert [p.name for p in used.iterdir()] == ["notes.txt"]


@pytest.fixture(scope="module")
def prompt_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompt")
    return peftlab.train({**RUN, "model": "t5-tiny", "method": "prompt",
                          "method_args": {"num_virtual_tokens": 4}, "learning_rate": 0.3,
                          "output_dir": str(folder / "run")}, progress=False)


def test_an_export_that_fails_midway_leaves_nothing_and_names_the_cause(tmp_path, prompt_run,
                                                                        monkeypatch):
    """A full disk while the tokenizer is written (tokenizers raise a bare Exception): no
    target, no partial folder, a message naming the step and the cause; the same export then
    succeeds."""
    from transformers import PreTrainedTokenizerBase

    def full_disk(self, *args, **kwargs):
        raise Exception("No space left on device (os error 28)")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full_disk)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", str(prompt_run.path), "--to", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "failed while writing the tokenizer" in text and "No space left on device" in text
    assert "Nothing was left at" in text and "resume" not in text
    assert not out.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert peftlab.export(prompt_run, out) == out
    assert (out / "adapter_config.json").is_file() and (out / "tokenizer.json").is_file()


def test_export_refuses_unfinished_failed_and_inside_runs_and_diverged_without_force(
        tmp_path, prompt_run):
    import json
    import shutil

    with pytest.raises(PeftlabError, match="inside the run folder"):
        peftlab.export(prompt_run, prompt_run.path / "exported")
    assert not (prompt_run.path / "exported").exists()
    run = tmp_path / "run"
    shutil.copytree(prompt_run.path, run)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "diverged",
                                                  "best_step": 0}))
    with pytest.raises(PeftlabError, match=r"diverged; .* \(step 0\).* --force exports it"):
        peftlab.export(run, tmp_path / "a")
    assert peftlab.export(run, tmp_path / "a", force=True).is_dir()
    (run / "summary.json").write_text(json.dumps({**summary, "status": "failed",
                                                  "error": "RuntimeError: boom"}))
    with pytest.raises(PeftlabError, match=r"the run failed \(RuntimeError: boom\)"):
        peftlab.export(run, tmp_path / "b", force=True)
    (run / "summary.json").unlink()
    with pytest.raises(PeftlabError, match=r"unfinished \(no summary.json\); run it to the end"):
        peftlab.export(run, tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "run"]
