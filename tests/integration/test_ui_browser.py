"""The dashboard in a real browser: Debian's headless Chromium driven by Selenium (through
chromedriver; nothing downloads a browser) against a real uvicorn on an ephemeral loopback port,
over real runs, a real SQLite registry, a served digits classifier and a tiny served GPT.

Checks that each page renders and draws, that the run page follows a run that is still writing
metrics.jsonl, that compare shows only the differing setting, that promote and rollback go
through the confirmation dialog and land in the history with the API key's name, that the
playground classifies a digit as the model does in process and streams a chat answer, and that
the browser reports no Content-Security-Policy violation. Screenshots of every page are written
to $SHIPYARD_UI_SCREENSHOTS (default: a pytest temporary folder).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from tests.serve_support import running_server
from tests.ui_support import (
    append_records,
    digits_runs,
    grouped_runs,
    read_records,
    start_live_run,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from tests.lm_support import loaded_lm

    from shipyard.compress import BenchParams, compress
    from shipyard.package import load_package
    from shipyard.package.registry import Registry
    from shipyard.serve.auth import add_key
    from shipyard.serve.settings import ServeSettings
    from shipyard.ui import UISettings, create_ui_app

    base = tmp_path_factory.getbasetemp()
    work = tmp_path_factory.mktemp("ui-site")
    runs = Path(shutil.copytree(digits_runs(base), work / "runs"))
    shutil.copytree(grouped_runs(base), runs, dirs_exist_ok=True)  # a cv and a tune study
    package = runs / "digits-mlp" / "lr-3e-3" / "package"
    url = f"sqlite:///{work / 'registry.db'}"
    with Registry(url, work / "store") as reg:
        reg.register(package, name="digits")
        reg.register(package, name="digits")
        reg.promote("digits", 1, "production", actor="setup")
        quick = BenchParams(latency_calls=2, throughput_calls=1, warmup=1, rounds=1)
        int8 = compress(package, work / "int8", quantize="int8", bench=quick)
        reg.register(int8.package, name="digits-int8")  # a child: parent and report
    keys = work / "keys.json"
    admin_key, _ = add_key(keys, "admin", "alice")
    digits = load_package(package)
    settings = ServeSettings(keys_file=keys, access_log=False)
    ui = UISettings(runs_dir=runs, registry_url=url, artifact_root=str(work / "store"))
    app = create_ui_app(settings, ui, preloaded=[digits, loaded_lm(base)])
    shots = Path(os.environ.get("SHIPYARD_UI_SCREENSHOTS") or work / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    with running_server(app) as base_url:
        yield {
            "url": base_url,
            "key": admin_key,
            "runs": runs,
            "digits": digits,
            "shots": shots,
            "app": app,
            "int8": int8,
        }


@pytest.fixture(scope="module")
def browser(site: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not fetch anything
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        # the server has keys: the first page is the login form, whatever was asked for
        driver.get(site["url"] + "/ui/registry")
        wait(driver, lambda d: "/ui/login?next=" in d.current_url)
        assert driver.find_elements(By.CSS_SELECTOR, "link[rel=stylesheet], script[src]") == []
        driver.find_element(By.ID, "key").send_keys(site["key"])
        driver.find_element(By.CSS_SELECTOR, "#login button").click()
        wait(driver, lambda d: d.execute_script("return document.body.dataset.ready"))
        assert driver.current_url == site["url"] + "/ui/registry"
        cookie = driver.get_cookie("shipyard_ui")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
        assert driver.execute_script("return document.cookie") == ""  # scripts cannot read it
        # the login form also left the key in this tab for the playground's inference calls
        stored = driver.execute_script("return sessionStorage.getItem('shipyard.apiKey')")
        assert stored == site["key"]
        yield driver
    finally:
        driver.quit()


def wait(driver: Any, condition: Callable[[Any], Any], timeout: float = 60) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def open_page(driver: Any, site: dict[str, Any], path: str) -> None:
    driver.get(site["url"] + path)
    wait(
        driver,
        lambda d: d.execute_script(
            "return document.body.dataset.ready || document.body.dataset.error"
        ),
    )
    error = driver.execute_script("return document.body.dataset.error")
    assert not error, f"{path}: {error}"


def shot(driver: Any, site: dict[str, Any], name: str) -> None:
    driver.save_screenshot(str(site["shots"] / f"{name}.png"))


def canvas_points(driver: Any, selector: str) -> int:
    return int(driver.find_element(By.CSS_SELECTOR, selector).get_attribute("data-points") or 0)


def test_runs_table_lists_the_real_runs(browser: Any, site: dict[str, Any]) -> None:
    open_page(browser, site, "/ui/")
    ids = [
        e.text for e in browser.find_elements(By.CSS_SELECTOR, "#runs-table tr[data-id] td.mono")
    ]
    assert sorted(ids) == ["digits-mlp/lr-1e-2", "digits-mlp/lr-3e-3"]  # the groups are closed
    assert len(browser.find_elements(By.CSS_SELECTOR, "#runs-table svg.spark polyline")) == 2
    shot(browser, site, "runs")
    browser.find_element(By.ID, "filter").send_keys("1e-2")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#runs-table tbody tr")) == 1)
    browser.set_window_size(390, 844)  # a phone
    shot(browser, site, "runs-phone")
    browser.set_window_size(1280, 900)


def test_runs_table_groups_cv_folds_and_study_trials(browser: Any, site: dict[str, Any]) -> None:
    open_page(browser, site, "/ui/")
    groups = {
        e.get_attribute("data-group"): e.find_element(By.CSS_SELECTOR, ".group-value").text
        for e in browser.find_elements(By.CSS_SELECTOR, "#runs-table tr.group-row")
    }
    api = httpx.get(
        site["url"] + "/ui/api/runs", headers={"Authorization": f"Bearer {site['key']}"}
    ).json()
    cv, study = (next(g for g in api["groups"] if g["kind"] == k) for k in ("cv", "tune"))
    fmt = "{:.4g}".format  # the page's number format (4 significant digits)
    assert groups == {
        cv["id"]: f"accuracy {fmt(cv['mean'])} ± {fmt(cv['std'])}",
        study["id"]: f"accuracy {fmt(study['value'])} ★ trial {study['best_trial']}",
    }

    def rows() -> list[str]:
        return list(
            browser.execute_script(
                "return [...document.querySelectorAll('#runs-table tbody tr')]"
                ".map((r) => r.dataset.id || r.dataset.group)"
            )
        )

    browser.find_element(By.CSS_SELECTOR, f"[data-toggle='{cv['id']}']").click()
    after = rows()
    i = after.index(cv["id"])
    assert after[i + 1 : i + 3] == [m["run"] for m in cv["members"]]  # fold 0, fold 1
    browser.find_element(By.CSS_SELECTOR, f"[data-toggle='{study['id']}']").click()
    after = rows()
    i = after.index(study["id"])
    assert after[i + 1 : i + 4] == [m["run"] for m in study["members"]]  # best first
    best = browser.find_element(By.CSS_SELECTOR, "#runs-table tr[data-best]")
    assert best.get_attribute("data-id") == study["members"][0]["run"]
    assert f"trial {study['best_trial']} ★" in best.text
    shot(browser, site, "runs-groups")

    # select the cv group and compare it: its folds, with the group's mean ± std on top
    browser.find_element(
        By.CSS_SELECTOR, f"tr[data-group='{cv['id']}'] input[type=checkbox]"
    ).click()
    browser.find_element(By.ID, "compare-button").click()
    wait(browser, lambda d: d.execute_script("return document.body.dataset.ready"))
    assert "group=" in browser.current_url
    row = browser.find_element(By.CSS_SELECTOR, f"#compare-groups tr[data-group='{cv['id']}']")
    assert f"{fmt(cv['mean'])} ± {fmt(cv['std'])}" in row.text
    compared = [
        e.get_attribute("data-run")
        for e in browser.find_elements(By.CSS_SELECTOR, "#compare-best tbody tr")
    ]
    assert compared == [m["run"] for m in cv["members"]]
    keys = [
        e.get_attribute("data-key")
        for e in browser.find_elements(By.CSS_SELECTOR, "#compare-diff tbody tr")
    ]
    assert keys == ["data.folds.index"]
    shot(browser, site, "compare-cv")

    open_page(browser, site, "/ui/compare?group=" + study["id"])
    best = browser.find_element(By.CSS_SELECTOR, "#compare-best tbody tr[data-best]")
    assert best.get_attribute("data-run") == study["members"][0]["run"] and "★" in best.text


def test_run_page_draws_curves_and_follows_a_growing_run(
    browser: Any, site: dict[str, Any]
) -> None:
    source = site["runs"] / "digits-mlp" / "lr-3e-3"
    open_page(browser, site, "/ui/runs/digits-mlp/lr-3e-3")
    train = [r for r in read_records(source) if r["kind"] == "train"]
    val = [r for r in read_records(source) if r["kind"] == "val"]
    # loss and the validation curves: every point of this short history is drawn
    assert canvas_points(browser, "#chart") >= len(train) + len(val)
    assert "best" in browser.find_element(By.ID, "best-note").text
    assert browser.find_element(By.ID, "config").text.startswith("name:")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#plots img[data-loaded]")) == 3)
    shot(browser, site, "run")
    browser.execute_cdp_cmd(
        "Emulation.setEmulatedMedia",
        {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
    )
    browser.refresh()
    wait(browser, lambda d: d.execute_script("return document.body.dataset.ready"))
    bg = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
    assert bg == "rgb(15, 17, 21)"  # the dark palette follows the OS setting
    shot(browser, site, "run-dark")
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})

    live = start_live_run(site["runs"], source)
    open_page(browser, site, "/ui/runs/digits-mlp/live")
    assert browser.find_element(By.ID, "run-status").text == "running"
    before = canvas_points(browser, "#chart")
    append_records(live, train[2:] + val)
    wait(browser, lambda d: canvas_points(d, "#chart") >= before + len(train[2:]) + len(val))
    assert int(browser.execute_script("return document.body.dataset.updates || 0")) >= 1
    shot(browser, site, "run-live")


def test_compare_shows_only_the_differing_setting(browser: Any, site: dict[str, Any]) -> None:
    open_page(browser, site, "/ui/compare?run=digits-mlp/lr-3e-3&run=digits-mlp/lr-1e-2")
    keys = [
        e.get_attribute("data-key")
        for e in browser.find_elements(By.CSS_SELECTOR, "#compare-diff tbody tr")
    ]
    assert keys == ["optim.lr"]
    assert canvas_points(browser, "#compare-chart") > 0
    shot(browser, site, "compare")
    browser.find_element(By.ID, "compare-full").click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#compare-diff tbody tr")) > 10)


def _confirm(driver: Any) -> None:
    wait(
        driver, lambda d: d.find_element(By.ID, "confirm-dialog").get_attribute("open") is not None
    )
    driver.find_element(By.ID, "confirm-yes").click()


def test_promote_and_rollback_with_confirmation_and_history(
    browser: Any, site: dict[str, Any]
) -> None:
    open_page(browser, site, "/ui/registry#digits")
    wait(browser, lambda d: d.execute_script("return document.body.dataset.model") == "digits")

    def production() -> str:  # read in one script: the page re-renders after each change
        return str(
            browser.execute_script(
                "const b = document.querySelector('[data-alias=production] b');"
                "return b ? b.textContent : ''"
            )
        )

    assert production() == "v1"
    browser.find_element(By.CSS_SELECTOR, "[data-promote='2']").click()
    browser.find_element(By.ID, "confirm-no").click()  # cancelled: nothing changes
    assert production() == "v1"
    browser.find_element(By.CSS_SELECTOR, "[data-promote='2']").click()
    _confirm(browser)
    wait(browser, lambda d: production() == "v2")
    who = browser.execute_script(
        "return [...document.querySelectorAll('#history td.who')].map((e) => e.textContent)"
    )
    assert who == ["alice", "setup"]
    shot(browser, site, "registry")
    browser.find_element(By.CSS_SELECTOR, "[data-rollback=production]").click()
    _confirm(browser)
    wait(browser, lambda d: production() == "v1")
    rows = browser.execute_script(
        "return [...document.querySelectorAll('#history tbody tr')].map((r) => r.innerText)"
    )
    assert rows[0].split()[-3:] == ["rollback", "1", "alice"]


def test_registry_shows_a_compressed_versions_parent_and_report(
    browser: Any, site: dict[str, Any]
) -> None:
    from shipyard.compress.measure import report_rows

    open_page(browser, site, "/ui/registry#digits-int8")
    wait(browser, lambda d: d.execute_script("return document.body.dataset.model") == "digits-int8")
    lineage = browser.find_element(By.CSS_SELECTOR, "#versions tr[data-version='1'] .lineage")
    parent = lineage.find_element(By.CSS_SELECTOR, "a[href='/ui/registry#digits']")
    assert parent.text == "digits v1"
    assert "quantize · report below" in lineage.text
    cells = browser.execute_script(
        "return [...document.querySelectorAll('section.report[data-version=\"1\"] tr')]"
        ".map((r) => [...r.children].map((c) => c.textContent))"
    )
    assert cells == report_rows(site["int8"].report)  # the table `shipyard compress` prints
    shot(browser, site, "registry-compressed")


def test_playground_classifies_a_digit_like_the_model(browser: Any, site: dict[str, Any]) -> None:
    from sklearn.datasets import load_digits

    image = load_digits().images[7].astype(np.float32)
    expected = site["digits"].predict_arrays(image[None, None])["label"][0]
    open_page(browser, site, "/ui/playground#digits-mlp")
    assert (
        Select(browser.find_element(By.ID, "pg-model")).first_selected_option.text == "digits-mlp"
    )
    assert len(browser.find_elements(By.CSS_SELECTOR, "#pg-grid input")) == 64
    browser.find_element(By.CSS_SELECTOR, "#pg-tensor details summary").click()
    browser.find_element(By.ID, "pg-json").send_keys(json.dumps(image.tolist()))
    browser.find_element(By.ID, "pg-run").click()
    top = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#pg-topk [data-label]"))
    assert top[0].get_attribute("data-label") == str(expected)
    assert len(top) == 5
    shot(browser, site, "playground")


def test_playground_streams_a_chat_answer(browser: Any, site: dict[str, Any]) -> None:
    open_page(browser, site, "/ui/playground#tiny-lm")
    wait(browser, lambda d: d.find_element(By.ID, "pg-chat").is_displayed())
    limit = browser.find_element(By.ID, "chat-max")
    limit.clear()
    limit.send_keys("16")  # the tiny GPT's context is 64 tokens
    box = browser.find_element(By.ID, "chat-input")
    box.send_keys("def main(")
    browser.find_element(By.ID, "chat-send").click()
    answer = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant[data-done]"))
    assert answer.get_attribute("data-error") is None, answer.get_attribute("data-error")
    streamed = browser.execute_script("return arguments[0].textContent", answer)
    # the same request without streaming (same seed) gives the same text: nothing was lost
    reference = httpx.post(
        site["url"] + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {site['key']}"},
        json={
            "model": "tiny-lm",
            "messages": [{"role": "user", "content": "def main("}],
            "temperature": 0.8,
            "top_p": 0.95,
            "max_tokens": 16,
            "seed": 0,
        },
        timeout=60,
    ).json()
    assert streamed == reference["choices"][0]["message"]["content"] and streamed
    assert float(browser.find_element(By.ID, "chat-stats").get_attribute("data-ttft")) > 0
    browser.find_element(By.ID, "copy-curl").click()
    code = browser.find_element(By.ID, "chat-code").text
    assert code.startswith("curl -N " + site["url"] + "/v1/chat/completions")
    assert '"stream":true' in code and "$SHIPYARD_API_KEY" in code
    shot(browser, site, "chat")


def test_server_page_charts_live_metrics(browser: Any, site: dict[str, Any]) -> None:
    open_page(browser, site, "/ui/server")
    names = [
        e.text
        for e in browser.find_elements(By.CSS_SELECTOR, "#server-models tbody td:first-child")
    ]
    assert sorted(names) == ["digits-mlp", "tiny-lm"]
    scope = browser.find_element(By.ID, "server-scope")  # one process: its own numbers
    assert scope.get_attribute("data-scope") == "this-process"
    assert scope.text.startswith("1 process (pid ")
    # charts start from the second sample (rates need two); the page samples every 2 s
    wait(browser, lambda d: canvas_points(d, "#m-rps") >= 1, timeout=30)
    shot(browser, site, "server")


def test_no_csp_violations(browser: Any, site: dict[str, Any]) -> None:
    logs = browser.get_log("browser")
    csp = [e["message"] for e in logs if "Content Security Policy" in e["message"]]
    assert csp == []
    severe = [
        e["message"] for e in logs if e["level"] == "SEVERE" and "favicon" not in e["message"]
    ]
    assert severe == [], "\n".join(severe)
    reports = httpx.get(
        site["url"] + "/ui/api/csp-report", headers={"Authorization": f"Bearer {site['key']}"}
    ).json()
    assert reports == {"violations": []}
