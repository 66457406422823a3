import pytest

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
