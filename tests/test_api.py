"""The Python API (`import peftlab`): what a notebook calls, on the same engine as the CLI."""

import pytest
import torch

import peftlab
from peftlab.errors import PeftlabError

RUN = dict(model="t5-tiny", task="sst2", method="lora", train_size=16, val_size=8,
           test_size=8, max_steps=4, eval_every=2, log_every=2, batch_size=4)


def test_train_returns_the_run_and_its_model_reproduces_its_predictions(tmp_path):
    run = peftlab.train({**RUN, "output_dir": str(tmp_path / "run")}, progress=False)
    assert run.summary["status"] == "completed" and run.config.method == "lora"
    assert list(run.metrics.step) == [0, 2, 4] and "val_accuracy" in run.metrics
    assert len(run.predictions) == 8 and {"id", "prediction", "generation"} <= set(
        run.predictions.columns)
    model, tokenizer = run.model()
    # the loaded model generates what the run's test evaluation generated
    from peftlab.run import setup

    examples = {ex.id: ex for ex in setup(run.config).splits.test}
    for row in run.predictions.head(3).itertuples():
        inputs = tokenizer(examples[row.id].source, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=run.config.max_new_tokens,
                                 num_beams=1, do_sample=False)
        assert tokenizer.decode(out[0], skip_special_tokens=True).strip() == row.generation


def test_train_takes_a_yaml_file_with_overrides_and_load_run_reads_it_back(tmp_path):
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**RUN, "output_dir": str(tmp_path / "a")}))
    run = peftlab.train(path, method="ln", learning_rate=3e-3, progress=False)
    assert run.config.method == "ln" and run.summary["learning_rate"] == 3e-3
    again = peftlab.load_run(tmp_path / "a")
    assert again.summary == run.summary and again.metrics.equals(run.metrics)
    with pytest.raises(PeftlabError, match="not a run folder"):
        peftlab.load_run(tmp_path)


def test_run_study_and_load_study_give_the_report_tables(tmp_path):
    study = {"name": "api", "base": {k: v for k, v in RUN.items() if k not in ("task", "method")},
             "tasks": {"sst2": {}},
             "methods": [{"method": "untuned"}, {"method": "lora", "learning_rates": [1e-3, 1e-2]}],
             "train_sizes": [16], "seeds": [0, 1]}
    messages = []
    result = peftlab.run_study(study, out=tmp_path / "s", workers=1, pack=2, progress=False,
                               say=messages.append)
    assert result.counts == {"completed": 5}
    assert any("packs of up to 2" in m for m in messages)
    assert (tmp_path / "s" / "report" / "report.md").is_file()
    loaded = peftlab.load_study(tmp_path / "s")
    runs = loaded.runs
    assert len(runs) == 5 and set(runs.method) == {"untuned", "lora"}
    headline = loaded.headline
    assert set(headline.method_name) == {"untuned", "lora"}
    assert not loaded.significance.empty
    assert loaded.run("sst2/lora/n16/lr0.01/seed1").summary["pack"]["size"] == 2
    with pytest.raises(PeftlabError, match="folder not found"):
        peftlab.load_study(tmp_path / "nothing")


def test_calibrate_runs_one_pack_of_each_method_and_projects_the_rest(tmp_path):
    study = {"name": "cal", "base": {k: v for k, v in RUN.items() if k not in ("task", "method")},
             "tasks": {"sst2": {}},
             "methods": [{"method": "untuned"}, {"method": "lora", "learning_rates": [1e-3, 1e-2]},
                         {"method": "ln", "learning_rates": [3e-3]}],
             "train_sizes": [16], "seeds": [0, 1]}
    messages = []
    result = peftlab.run_study(study, out=tmp_path / "s", workers=1, pack=2, progress=False,
                               calibrate=True, say=messages.append)
    # lora's first pack (2 runs) and ln's (2 runs); the untuned model is not worth timing
    assert result.counts == {"completed": 4}
    finished = sorted(p.parent.relative_to(tmp_path / "s").as_posix()
                      for p in (tmp_path / "s").rglob("summary.json"))
    assert finished == ["sst2/ln/n16/lr0.003/seed0", "sst2/ln/n16/lr0.003/seed1",
                        "sst2/lora/n16/lr0.001/seed0", "sst2/lora/n16/lr0.001/seed1"]
    assert "estimated time for 2 of the 3 pending runs" in messages[-1]
    assert "no measured time yet for 1 task/method pairs (sst2/untuned)" in messages[-1]


def test_python_callers_get_the_command_lines_checks(tmp_path):
    """One validation for the CLI and the API: bad worker and pack counts, a run key that
    leaves the study, a config of the wrong type."""
    for options, field in (({"workers": 0}, "workers"), ({"workers": -3}, "workers"),
                           ({"pack": -1}, "pack"), ({"pack": 0}, "pack"),
                           ({"backend": "slurm"}, "backend")):
        with pytest.raises(PeftlabError, match=f"`{field}` must be"):
            peftlab.run_study(preset="smoke", out=tmp_path / "s", dry_run=True, **options)
    assert not (tmp_path / "s").exists()
    (tmp_path / "other" / "run").mkdir(parents=True)
    (tmp_path / "study").mkdir()
    study = peftlab.load_study(tmp_path / "study")
    for key in ("../other/run", "/etc", ".", "sst2/../../other/run"):
        with pytest.raises(PeftlabError, match="not a run of the study"):
            study.run(key)
    with pytest.raises(PeftlabError, match=r"`config` is a RunConfig, a mapping .* not list"):
        peftlab.train([1, 2])


def test_train_returns_the_record_it_wrote_without_reading_it_back(tmp_path):
    """`train` returns the config it resolved and the summary it wrote: the same as loading
    the folder afterwards."""
    run = peftlab.train({"model": "t5-tiny", "task": "sst2", "method": "lora", "train_size": 16,
                         "val_size": 8, "test_size": 8, "max_steps": 2,
                         "output_dir": str(tmp_path / "run")}, progress=False)
    loaded = peftlab.load_run(run.path)
    assert run.path == loaded.path and run.config == loaded.config
    assert run.summary == loaded.summary and run.summary["status"] == "completed"
