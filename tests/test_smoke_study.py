"""The `smoke` preset end to end, as the README's main job runs it, and its report in a browser."""

import os
import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from peftlab.cli import app
from peftlab.report.figures import is_nonempty_image

runner = CliRunner()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "study"
    result = runner.invoke(app, ["run", "--preset", "smoke", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert '{"completed": 151}' in result.output
    return out


def test_smoke_report_has_every_cell_and_figure(smoke):
    report = smoke / "report"
    headline = pd.read_csv(report / "headline.csv")
    for task, n_labels in (("sst2", 11), ("samsum", 11)):
        t = headline[headline.task == task]
        assert t.label.nunique() == n_labels, sorted(t.label.unique())
        # every method+size has a cell at every training-set size, with a mean over 2 seeds
        assert len(t) == n_labels * 2 and t.test_mean.notna().all()
        trained = t[t.lr.notna()]
        assert (trained.seeds == 2).all() and trained.test_std.notna().all()
    runs = pd.read_csv(report / "runs.csv")
    assert len(runs) == 151 and (runs.status == "completed").all()
    sig = pd.read_csv(report / "significance.csv")
    assert len(sig) == 2 * (8 * 7 // 2) + 2 * (8 * 7 // 2)  # 8 methods per task and size
    figures = sorted((report / "figures").glob("*.png"))
    assert len(figures) == 10
    assert all(is_nonempty_image(f) for f in figures)
    assert len(list((report / "figures").glob("*.svg"))) == 10
    md = (report / "report.md").read_text()
    assert "## Findings" in md and "## Appendix: every run" in md


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
        assert loaded == "10/10"
        assert driver.title == "peftlab study report"
        assert len(driver.find_elements("css selector", "table")) >= 4
        widths = driver.execute_script(
            "return [...document.images].map(i => i.getBoundingClientRect().width)")
        assert all(w > 200 for w in widths)
        driver.save_screenshot(str(tmp_path / "report.png"))
        assert (tmp_path / "report.png").stat().st_size > 10_000
    finally:
        driver.quit()
