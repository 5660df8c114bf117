"""Issue 9's browser test: `dynastudy dashboard` on loopback over a store filled by a real small sweep (a copy of
the `dyn_study` fixture: aig swept, resnet and elastic trained, lesion studies), opened in headless chromium.

It checks what a person would look at: the Pareto plot holds every frontier point and one front per method; moving
the budget slider highlights the point `dynastudy best` answers for that budget; clicking the highlighted point
opens its trial view with its panels (gate rates for aig, the lesion curve for the lesioned resnet); the compare
view's hypervolumes are `dynastudy pareto --by-method`'s; the search view draws; and a trial trained while the page
is open appears without a reload. Screenshots go to test-artifacts/ (or DYNASTUDY_TEST_ARTIFACTS).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import pytest

from browser import artifacts_dir, browser_paths, chromium, dashboard
from stack import clean_env, cli, dyn_common

pytestmark = pytest.mark.e2e

# Frontier points and fronts the page's Pareto plot holds (plotly's own trace data, named by dashboards.figures).
TRACES_JS = """const g = document.querySelector('#pareto-graph .js-plotly-plot');
if (!g || !g._fullData) return null;
return g._fullData.map(t => [t.name, t.x ? t.x.length : 0, t.customdata ? Array.from(t.customdata) : []]);"""
# Page pixel offset, from the graph's centre, of the point (x, y) in data units.
POINT_JS = """const g = document.querySelector('#pareto-graph .js-plotly-plot');
const xa = g._fullLayout.xaxis, ya = g._fullLayout.yaxis, r = g.getBoundingClientRect();
return [xa._offset + xa.d2p(arguments[0]) - r.width / 2, ya._offset + ya.d2p(arguments[1]) - r.height / 2];"""


def _wait(driver, what, timeout: float = 60, poll: float = 0.5):
    deadline = time.time() + timeout
    while True:
        try:
            value = what(driver)
        except Exception:  # the page is still rendering
            value = None
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what.__doc__ or what}")
        time.sleep(poll)


def _traces(driver) -> dict[str, tuple[int, list]]:
    return {name: (n, ids) for name, n, ids in (driver.execute_script(TRACES_JS) or [])}


def _by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.ID, element_id)
    return found[0] if found else None


def _open_tab(driver, label: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.XPATH, f"//div[contains(@class, 'tab') and normalize-space()='{label}']").click()


def test_dashboard_in_a_browser(dyn_study, tmp_path, cifar_dir, capsys):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser_paths()  # skip early (fail under CI) without a browser
    shots = artifacts_dir() / "dashboard"
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    # The page reads a copy of the study's database (a trial is added to it below); artifacts stay where they are.
    db = tmp_path / "mlflow.db"
    shutil.copy(dyn_study["res"] / "mlflow.db", db)
    uri = f"sqlite:///{db}"
    store = ["--tracking-uri", uri, "--results-dir", str(tmp_path / "res")]
    def dynastudy(*args: str) -> tuple[str, str]:
        code, out, err = cli(capsys, *args)
        assert code == 0, err
        return out, err

    every = json.loads(dynastudy("pareto", "--study", "dyn", "--all", "--format", "json", *store)[0])
    methods = {p["method"] for p in every}
    assert methods == {"aig", "resnet", "elastic"}

    with dashboard(["--refresh", "1", *store], clean_env(), tmp_path / "dashboard.log") as url, \
            chromium(tmp_path / "profile") as driver:
        driver.get(url)

        # Pareto view: every point of every trial, one front per method, and the best point under the budget.
        def plotted(d):
            """the Pareto plot with every point"""
            t = _traces(d)
            return t if sum(n for k, (n, _) in t.items() if k.startswith("points: ")) == len(every) else None

        traces = _wait(driver, plotted, timeout=90)
        assert {k for k in traces if k.startswith("front: ")} == {f"front: {m}" for m in methods}
        assert "4 trials" in driver.find_element(By.CSS_SELECTOR, "#pareto-graph .gtitle").text
        _wait(driver, lambda d: _by_id(d, "best-info") or _by_id(d, "best-none"))
        driver.save_screenshot(str(shots / "1-pareto.png"))

        # Drag the budget slider (as a mouse would) to the left, then check the highlighted point against the CLI.
        label = _by_id(driver, "budget-label").get_attribute("data-budget")
        thumb = driver.find_element(By.CSS_SELECTOR, "#budget [role=slider]")
        ActionChains(driver).click_and_hold(thumb).move_by_offset(-120, 0).move_by_offset(-60, 0).release().perform()
        _wait(driver, lambda d: _by_id(d, "budget-label").get_attribute("data-budget") != label)
        _wait(driver, lambda d: _by_id(d, "best-info") or _by_id(d, "best-none"))
        time.sleep(1.5)  # the last drag event's answer
        budget = float(_by_id(driver, "budget-label").get_attribute("data-budget"))
        best = json.loads(dynastudy("best", "--study", "dyn", "--max-macs", repr(budget), "--format", "json",
                                    *store)[0])
        info = _wait(driver, lambda d: _by_id(d, "best-info"))
        assert info.get_attribute("data-run-id") == best["run_id"]
        assert float(info.get_attribute("data-val-acc")) == pytest.approx(best["val_acc"])
        assert float(info.get_attribute("data-macs")) == pytest.approx(best["macs"]) and best["macs"] <= budget
        n, star = _traces(driver)["best under budget"]
        assert n == 1 and star == [best["run_id"]]
        driver.save_screenshot(str(shots / "2-budget-moved.png"))

        # Click the highlighted point: its trial view opens.
        graph = driver.find_element(By.ID, "pareto-graph")
        dx, dy = driver.execute_script(POINT_JS, best["macs"], best["val_acc"])
        ActionChains(driver).move_to_element_with_offset(graph, int(dx), int(dy)).pause(0.5).click().perform()
        summary = _wait(driver, lambda d: _by_id(d, "trial-summary"), timeout=60)
        assert summary.get_attribute("data-run-id") == best["run_id"]
        panels = {e.get_attribute("id") for e in driver.find_elements(By.CSS_SELECTOR, "#trial-view .panel")}
        assert {"panel-curves", "panel-exits", "panel-frontier"} <= panels
        method = best["config"]["method"]
        if method == "aig":
            assert "panel-gates" in panels
        else:
            assert "panel-gates" not in panels
        driver.save_screenshot(str(shots / f"3-trial-{method}.png"))
        driver.execute_script("arguments[0].scrollIntoView()", _by_id(driver, "panel-exits"))
        driver.save_screenshot(str(shots / f"3-trial-{method}-exits.png"))

        # The lesioned resnet trial, picked from the trial list: its lesion panel is there.
        resnet = dyn_study["lesioned"]["resnet"]
        if best["run_id"] != resnet:
            picker = driver.find_element(By.ID, "trial-run")
            picker.click()
            inputs = "#trial-run input, [role=listbox] input, input[type=search]"
            search = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, inputs))
            search[0].send_keys("resnet")
            search[0].send_keys(Keys.ENTER)
            _wait(driver, lambda d: _by_id(d, "trial-summary").get_attribute("data-run-id") == resnet)
        lesion = _wait(driver, lambda d: _by_id(d, "panel-lesion"))
        assert _by_id(driver, "panel-gates") is None
        driver.execute_script("arguments[0].scrollIntoView()", lesion)
        driver.save_screenshot(str(shots / "4-trial-resnet-lesion.png"))

        # Compare view: one row per method, hypervolumes as `dynastudy pareto --by-method` prints them.
        _open_tab(driver, "Compare")
        table = _wait(driver, lambda d: _by_id(d, "compare-table"))
        rows = table.find_elements(By.CSS_SELECTOR, "tr")[1:]
        shown = {r.find_elements(By.TAG_NAME, "td")[0].text: r.find_elements(By.TAG_NAME, "td")[4].text
                 for r in rows}
        printed = dynastudy("pareto", "--study", "dyn", "--by-method", "--format", "json", *store)[1]
        expected = {m: f"{float(v):.4f}" for m, v in re.findall(r"^(\w+): hypervolume ([\d.]+)", printed, re.M)}
        assert shown == expected
        driver.save_screenshot(str(shots / "5-compare.png"))

        _open_tab(driver, "Search")
        _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#search-view .js-plotly-plot"))
        driver.save_screenshot(str(shots / "6-search.png"))

        # A trial trained while the page is open appears on the Pareto plot without a reload.
        _open_tab(driver, "Pareto")
        small = ["--subset", "200", "--set", "data.val_size=200", "--set", "data.test_subset=200"]
        r = subprocess.run([sys.executable, "-m", "study.cli", "run", "--method", "resnet",
                            *dyn_common(dyn_study["res"], cifar_dir), *small, "--tracking-uri", uri],
                           capture_output=True, text=True, env=clean_env(), timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        _wait(driver, lambda d: "5 trials" in d.find_element(By.CSS_SELECTOR, "#pareto-graph .gtitle").text,
              timeout=60)
        total = sum(n for k, (n, _) in _traces(driver).items() if k.startswith("points: "))
        assert total > len(every)
        driver.save_screenshot(str(shots / "7-new-trial.png"))
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
