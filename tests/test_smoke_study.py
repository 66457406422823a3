"""A small study end to end through the CLI (the README's main job, the 151-run `smoke`
preset, has the same shape and runs outside the default suite), and its report in a browser."""

import os
import shutil

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from peftlab.cli import app
from peftlab.report.figures import is_nonempty_image

runner = CliRunner()

# both tasks, the references, a method with a size knob, 3 seeds (t-intervals appear from 3)
MINI = {
    "name": "mini",
    "base": {"model": "t5-tiny", "max_steps": 4, "eval_every": 2, "log_every": 2,
             "batch_size": 4, "eval_batch_size": 32},
    "tasks": {"sst2": {"val_size": 16, "test_size": 24},
              "samsum": {"val_size": 4, "test_size": 6, "max_source_length": 64,
                         "max_target_length": 16, "max_new_tokens": 6}},
    "methods": [{"method": "untuned"}, {"method": "majority"}, {"method": "lead-3"},
                {"method": "full", "learning_rates": [1e-3]},
                {"method": "lora", "sizes": {"r": [2, 8]}, "learning_rates": [1e-2]},
                {"method": "prefix", "learning_rates": [1e-2]}],
    "train_sizes": [16],
    "seeds": [0, 1, 2],
    "pack": 3,  # the README's main job packs too (the smoke preset)
}
RUNS = {"sst2": 1 + 3 + 3 + 6 + 3, "samsum": 1 + 1 + 3 + 6 + 3}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mini")
    (folder / "mini.yaml").write_text(yaml.safe_dump(MINI))
    out = folder / "study"
    result = runner.invoke(app, ["run", str(folder / "mini.yaml"), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"study {out}: {sum(RUNS.values())} completed" in result.output
    return out


def test_study_report_has_every_cell_and_figure(smoke):
    report = smoke / "report"
    headline = pd.read_csv(report / "headline.csv")
    for task, labels in (("sst2", {"untuned", "majority", "full", "lora-r2", "lora-r8", "prefix"}),
                         ("samsum", {"untuned", "lead-3", "full", "lora-r2", "lora-r8", "prefix"})):
        t = headline[headline.task == task]
        assert set(t.label) == labels and t.test_mean.notna().all()
        trained = t[t.lr.notna()]
        assert (trained.seeds == 3).all() and trained.test_std.notna().all()
        assert trained.ci_low.notna().all() and (trained.ci_low >= 0).all()
    runs = pd.read_csv(report / "runs.csv")
    assert len(runs) == sum(RUNS.values()) and (runs.status == "completed").all()
    sig = pd.read_csv(report / "significance.csv")
    # every pair of the 6 configurations per task; shown: each of the 5 methods' reported
    # configuration against the best trained method, full fine-tuning and the untuned model
    assert (~sig.shown).sum() == 2 * (6 * 5 // 2)
    assert sig[sig.shown].p_holm.notna().all() and sig.shown.sum() >= 2 * 4
    figures = sorted((report / "figures").glob("*.png"))
    assert len(figures) == 8  # per task: curves, efficiency, data scaling, expected search
    assert all(is_nonempty_image(f) for f in figures)
    assert len(list((report / "figures").glob("*.svg"))) == 8
    md = (report / "report.md").read_text()
    assert "## Findings" in md and "## Appendix: every run" in md
    assert "## samsum: test ROUGE-Lsum F1" in md and "crossed random-effects t-test" in md
    assert "nan" not in md.split("## Appendix")[0]


def chromium_paths():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium and chromium-driver (see .ci/run)")
        pytest.skip("headless Chromium not installed (apt-get install chromium chromium-driver)")
    return browser, driver


def test_html_report_renders_in_headless_chromium(smoke, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-sync",
                 "--disable-component-update", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get((smoke / "report" / "report.html").resolve().as_uri())
        loaded = WebDriverWait(driver, 30).until(
            lambda d: d.execute_script("return document.body.dataset.figuresLoaded"))
        assert loaded == "8/8"
        assert driver.title == "peftlab study report"
        assert len(driver.find_elements("css selector", "table")) >= 4
        widths = driver.execute_script(
            "return [...document.images].map(i => i.getBoundingClientRect().width)")
        assert all(w > 200 for w in widths)
        driver.save_screenshot(str(tmp_path / "report.png"))
        assert (tmp_path / "report.png").stat().st_size > 10_000
    finally:
        driver.quit()
