"""Precision on each device: bf16 autocast in training, fp32 evaluation by default, what
a bf16 evaluation records."""


from tests.conftest import cli_train


def test_bf16_autocast_on_cpu_runs_and_stays_close_to_fp32(tmp_path):
    fp32, _ = cli_train(tmp_path, "fp32", precision="fp32")
    bf16, _ = cli_train(tmp_path, "bf16", precision="bf16")
    assert bf16["bf16"] is True and fp32["bf16"] is False
    assert abs(bf16["val_metrics"]["loss"] - fp32["val_metrics"]["loss"]) < 0.05 * fp32["val_metrics"]["loss"]


def test_evaluation_defaults_to_fp32_so_validation_selects_on_what_the_test_reports():
    from peftlab import run as run_module
    from peftlab.config import resolve_run_config
    from peftlab.errors import ConfigError

    cfg = resolve_run_config({"model": "t5-tiny"})
    assert cfg.eval_precision == "fp32"
    for precision, validation, test in (("fp32", False, False), ("bf16-validation", True, False),
                                        ("bf16", True, True)):
        cfg = resolve_run_config({"model": "t5-tiny", "eval_precision": precision})
        assert run_module.use_bf16_eval(cfg, "validation") is validation
        assert run_module.use_bf16_eval(cfg, "test") is test
    import pytest

    with pytest.raises(ConfigError, match="eval_precision"):
        resolve_run_config({"model": "t5-tiny", "eval_precision": "auto"})


def test_bf16_evaluation_is_recorded_and_its_test_metrics_stay_close(tmp_path):
    fp32, _ = cli_train(tmp_path, "fp32")
    bf16, _ = cli_train(tmp_path, "bf16", eval_precision="bf16")
    assert fp32["eval_bf16"] == {"validation": False, "test": False}
    assert bf16["eval_bf16"] == {"validation": True, "test": True}
    a, b = fp32["test_metrics"]["loss"], bf16["test_metrics"]["loss"]
    assert a != b and abs(a - b) < 0.05 * a
