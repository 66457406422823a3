import pytest
from typer.testing import CliRunner

from peftlab.cli import app
from peftlab.errors import ModelLoadError
from peftlab.models import count_parameters, load_model


def test_flan_t5_small_random_has_the_real_parameter_count_untied():
    model = load_model("flan-t5-small-random")
    assert count_parameters(model) == 76_961_152
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    cfg = model.config
    assert (cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff) == (512, 6, 64, 1024)
    assert cfg.num_layers == cfg.num_decoder_layers == 8
    assert cfg.d_model != cfg.num_heads * cfg.d_kv


def test_t5_tiny_geometry_and_size():
    model = load_model("t5-tiny")
    cfg = model.config
    assert cfg.d_model != cfg.num_heads * cfg.d_kv
    embeddings = model.shared.weight.numel() + model.lm_head.weight.numel()
    assert 100_000 < count_parameters(model) - embeddings < 1_000_000


def test_presets_are_the_same_checkpoint_every_time():
    a, b = load_model("t5-tiny"), load_model("t5-tiny")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.equal(q), name


def test_model_folder_without_weights_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no config.json and weights"):
        load_model(str(tmp_path))


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_local_folder_round_trip(tmp_path):
    model = load_model("t5-tiny")
    model.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    assert count_parameters(again) == count_parameters(model)
    assert again.lm_head.weight.equal(model.lm_head.weight)


def test_loading_a_local_untied_checkpoint_prints_no_known_harmless_warning(tmp_path, capfd):
    """Real Flan-T5 checkpoints hold `shared` and `lm_head` apart on purpose: transformers'
    'will NOT tie them' warning is silenced, and so is peft's use of a deprecated property."""
    import warnings

    from peftlab.methods import METHODS, MethodContext
    from tests.conftest import TOKENIZER_DIR

    load_model("t5-tiny").save_pretrained(tmp_path)
    capfd.readouterr()
    from peftlab.models import silence_known_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning, even one already shown...
        silence_known_warnings()  # ...but those peftlab silences
        model = load_model(str(tmp_path))
        METHODS["lora"].apply(model, METHODS["lora"].Args(), MethodContext(str(TOKENIZER_DIR), 1),
                              False)
    assert "NOT tie them" not in capfd.readouterr().err
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    with warnings.catch_warnings(record=True) as unfiltered:  # the filter is what hides it
        warnings.simplefilter("always")
        METHODS["lora"].apply(load_model("t5-tiny"), METHODS["lora"].Args(),
                              MethodContext(str(TOKENIZER_DIR), 1), False)
    assert [w for w in unfiltered if "is_gradient_checkpointing" in str(w.message)]
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()


def test_offline_a_hub_model_fails_at_once_saying_how_to_download_it(monkeypatch):
    """No network: no connection is attempted (no minute of retries), and the error names
    the current download command."""
    import socket

    import peftlab.hub
    import peftlab.models
    from peftlab.errors import DataError, ModelLoadError
    from peftlab.tasks.common import load_hub_split

    def no_network(*args, **kwargs):
        raise AssertionError("a connection was attempted")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(peftlab.hub, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(peftlab.models, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(ModelLoadError) as e:
        peftlab.models.load_model("google/flan-t5-base")
    assert "cannot be reached" in str(e.value) and "`hf download google/flan-t5-base" in str(e.value)
    with pytest.raises(ModelLoadError, match="hf download google/flan-t5-base"):
        peftlab.models.load_tokenizer("google/flan-t5-base")
    with pytest.raises(DataError, match="cannot be reached from here. Set PEFTLAB_DATA_DIR"):
        load_hub_split("glue", "sst2", "train")


def test_an_unreachable_hub_puts_huggingface_hub_offline_so_nothing_retries(monkeypatch,
                                                                             capfd):
    """`local_files_only` did not reach every request: transformers still asked the hub for
    a model's adapter_config.json, with five retries and backoff (29 s) before the error."""
    import socket

    from huggingface_hub import constants

    import peftlab.hub
    from peftlab.errors import ModelLoadError

    def unreachable(*args, **kwargs):
        raise OSError("no route")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    peftlab.hub.hub_reachable.cache_clear()
    try:
        assert peftlab.hub.hub_reachable() is False and constants.HF_HUB_OFFLINE is True
        assert not peftlab.hub.offline_by_setting()  # the user's setting stays theirs
        with pytest.raises(ModelLoadError, match="cannot be reached"):
            peftlab.models.load_model("google/flan-t5-base")
    finally:
        peftlab.hub.hub_reachable.cache_clear()
    assert "Retrying" not in capfd.readouterr().err


def test_the_hub_probe_respects_the_offline_setting(monkeypatch):
    import peftlab.hub

    peftlab.hub.hub_reachable.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert peftlab.hub.hub_reachable() is False
    peftlab.hub.hub_reachable.cache_clear()


def test_family_presets_are_their_real_architectures():
    from peftlab.families import family, model_type

    for name, cls, kind in (("mt5-tiny", "MT5ForConditionalGeneration", "t5"),
                            ("bart-tiny", "BartForConditionalGeneration", "bart"),
                            ("t5-tiny", "T5ForConditionalGeneration", "t5")):
        model = load_model(name)
        assert type(model).__name__ == cls and family(name) == kind
        # the Flan-T5 tokenizer's ids: pad 0, end of sequence 1, decoding starts from pad
        assert (model.config.pad_token_id, model.config.eos_token_id,
                model.config.decoder_start_token_id) == (0, 1, 0)
    assert model_type("bart-tiny") == "bart" and model_type("mt5-tiny") == "mt5"
    bart = load_model("bart-tiny")
    assert bart.lm_head.weight is bart.get_input_embeddings().weight  # BART ties them
    assert load_model("mt5-tiny").lm_head.weight is not load_model("mt5-tiny").shared.weight


def test_a_local_folders_family_is_read_from_its_config(tmp_path):
    from peftlab.families import family

    load_model("bart-tiny").save_pretrained(tmp_path / "bart")
    assert family(str(tmp_path / "bart")) == "bart"
    (tmp_path / "pegasus").mkdir()
    (tmp_path / "pegasus" / "config.json").write_text('{"model_type": "pegasus"}')
    assert family(str(tmp_path / "pegasus")) == "other"


def test_the_dropout_setting_reaches_barts_functional_dropouts():
    from peftlab.models import set_dropout

    model = load_model("bart-tiny")
    set_dropout(model, 0.25)
    rates = [getattr(m, key) for m in model.modules() for key in ("dropout", "activation_dropout")
             if isinstance(getattr(m, key, None), float)]
    assert len(rates) > 12 and set(rates) == {0.25}  # layers, attentions, stacks
    assert (model.config.dropout, model.config.activation_dropout) == (0.25, 0.25)


def test_offline_hub_model_says_how_to_use_a_local_copy(tmp_path):
    result = CliRunner().invoke(app, ["train", "--set", "model=google/flan-t5-small",
                                 "--set", f"output_dir={tmp_path / 'r'}"])
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert "could not load model `google/flan-t5-small`" in out and "--local-dir DIR" in out
