"""End to end in a real headless Chromium: upload a defective transistor, read the verdict; sign
in with an API token (wrong, read-only, write) on a server that needs one; a foreign page's
form POST to the service is refused.

Needs Debian's `chromium` + `chromium-driver` and the `selenium` package. Without them the test
skips with a message, except under CI=true where it fails. Screenshots of the page are kept in
test-artifacts/service-ui*.png.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from .conftest import REPO, TRANSISTOR, ServerProcess, db_rows, skip_or_fail

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
DRIVER_CANDIDATES = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
ARTIFACTS = REPO / "test-artifacts"
DEFECTIVE = TRANSISTOR / "test" / "misplaced" / "000.png"


def _first_existing(candidates: tuple[str, ...], name: str) -> str | None:
    for candidate in candidates:
        if Path(candidate).is_file():
            return candidate
    return shutil.which(name)


@pytest.fixture()
def browser(tmp_path: Path):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        skip_or_fail("selenium is not installed (pip install selenium)")
    chromium = _first_existing(CHROMIUM_CANDIDATES, "chromium")
    driver = _first_existing(DRIVER_CANDIDATES, "chromedriver")
    if not chromium or not driver:
        skip_or_fail("headless browser test needs chromium and chromedriver (apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1440,1000", f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    session.set_page_load_timeout(60)
    yield session
    session.quit()


def test_operator_ui_inspects_a_defective_transistor(
    browser, server: ServerProcess, transistor_model: Path | None, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    if transistor_model is None or not DEFECTIVE.is_file():
        skip_or_fail(f"MVTec AD transistor data not found under {TRANSISTOR} (set DEFECTLENS_DATA)")
    wait = WebDriverWait(browser, 60)
    browser.get(server.url + "/")
    wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    Select(browser.find_element(By.ID, "model")).select_by_value("transistor")

    browser.find_element(By.ID, "file").send_keys(str(DEFECTIVE))
    wait.until(lambda b: b.find_element(By.ID, "verdict").text in ("OK", "NOT OK"))
    verdict = browser.find_element(By.ID, "verdict")
    assert verdict.text == "NOT OK", browser.find_element(By.ID, "message").text
    assert "bad" in verdict.get_attribute("class")
    assert browser.find_element(By.ID, "result-model").text == "transistor"
    score = float(browser.find_element(By.ID, "score").text)
    threshold = float(browser.find_element(By.ID, "threshold-value").text)
    assert score > threshold

    loaded = "const i = document.getElementById(arguments[0]); return i.complete && i.naturalWidth > 0;"
    for image in ("overlay", "image", "mask"):
        wait.until(lambda b, image=image: b.execute_script(loaded, image))
    assert browser.execute_script("return document.getElementById('overlay').naturalWidth") > 0
    assert browser.find_element(By.ID, "overlay").get_attribute("src").startswith("blob:")  # fetched with headers
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#history tbody tr.current"))
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "service-ui.png"))
    browser.find_element(By.ID, "show-mask").click()
    wait.until(lambda b: b.find_element(By.ID, "mask").is_displayed())
    assert not browser.find_element(By.ID, "overlay").is_displayed()
    assert browser.save_screenshot(str(ARTIFACTS / "service-ui-mask.png"))

    # The slider re-judges in the browser (no new inspection) and re-draws the mask from the stored map.
    total_before = browser.execute_script("return fetch('/v1/inspections?limit=1').then(r => r.json()).then(j => j.total)")
    browser.execute_script(
        "const s = document.getElementById('threshold'); s.value = s.max; s.dispatchEvent(new Event('input'));"
    )
    wait.until(lambda b: b.find_element(By.ID, "verdict").text == "OK")
    wait.until(lambda b: "threshold=" in (b.find_element(By.ID, "mask").get_attribute("data-src") or ""))
    wait.until(lambda b: b.execute_script(loaded, "mask"))
    assert browser.find_element(By.ID, "rejudge-note").is_displayed()
    assert browser.save_screenshot(str(ARTIFACTS / "service-ui-rejudged.png"))
    total_after = browser.execute_script("return fetch('/v1/inspections?limit=1').then(r => r.json()).then(j => j.total)")
    assert total_after == total_before

    # Filtering the history and picking a past inspection.
    Select(browser.find_element(By.ID, "filter-verdict")).select_by_value("not_ok")
    verdicts = "return [...document.querySelectorAll('#history tbody tr .badge')].map(b => b.textContent)"
    wait.until(lambda b: (lambda found: found and set(found) == {"NOT OK"})(b.execute_script(verdicts)))
    browser.execute_script("document.querySelector('#history tbody tr').click()")
    wait.until(lambda b: b.find_element(By.ID, "verdict").text == "NOT OK")

    # A file that is no image: a clear message, the last result stays on screen.
    bogus = tmp_path / "notes.png"
    bogus.write_text("not an image")
    browser.find_element(By.ID, "file").send_keys(str(bogus))
    wait.until(lambda b: b.find_element(By.ID, "message").is_displayed())
    assert "cannot read image notes.png" in browser.find_element(By.ID, "message").text
    assert browser.find_element(By.ID, "verdict").text == "NOT OK"


LOADED = "const i = document.getElementById(arguments[0]); return i.complete && i.naturalWidth > 0;"


def test_operator_signs_in_with_a_token(browser, auth_server: ServerProcess, tokens: dict, brick_data: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    stain = brick_data / "test" / "stain" / "000.png"
    browser.get(auth_server.url + "/")
    wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    assert browser.find_element(By.ID, "login").is_displayed()  # the server needs a token: the page asks for one
    message = browser.find_element(By.ID, "message")

    token_box = browser.find_element(By.ID, "token")
    token_box.send_keys("dl_not-a-valid-token-at-all")
    browser.find_element(By.ID, "login-button").click()
    wait.until(lambda b: message.is_displayed() and "refused" in message.text)
    assert browser.find_element(By.ID, "login").is_displayed()

    token_box.send_keys(tokens["read"])  # read-only: the history shows, inspecting is refused
    browser.find_element(By.ID, "login-button").click()
    wait.until(lambda b: b.find_element(By.ID, "session").is_displayed())
    assert "read" in browser.find_element(By.ID, "session-role").text
    assert browser.execute_script("return sessionStorage.getItem('defectlens.token')") == tokens["read"]
    assert browser.execute_script("return document.cookie") == ""  # no cookie: nothing a foreign page can ride on
    assert browser.find_element(By.ID, "file").get_attribute("disabled")

    browser.find_element(By.ID, "logout").click()
    wait.until(lambda b: b.find_element(By.ID, "login").is_displayed())
    assert browser.execute_script("return sessionStorage.getItem('defectlens.token')") is None
    token_box.send_keys(tokens["write"])
    browser.find_element(By.ID, "login-button").click()
    wait.until(lambda b: "write" in b.find_element(By.ID, "session-role").text)
    browser.find_element(By.ID, "file").send_keys(str(stain))
    wait.until(lambda b: b.find_element(By.ID, "verdict").text in ("OK", "NOT OK"))
    for image in ("overlay", "image", "mask"):
        wait.until(lambda b, image=image: b.execute_script(LOADED, image))  # pictures fetched with the token
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#history tbody tr.current"))
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "service-ui-signed-in.png"))


def test_a_foreign_pages_form_post_is_refused(browser, server: ServerProcess, tmp_path: Path, png_bytes) -> None:
    """A page on another origin auto-submits a multipart form to /v1/inspect (a CSRF 'simple request')."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page = tmp_path / "evil.html"
    page.write_text(
        f'<form id="f" method="POST" enctype="multipart/form-data" action="{server.url}/v1/inspect">'
        '<input name="model" value="bricks"><input type="file" name="image"></form>'
        "<script>document.getElementById('f').submit()</script>"
    )
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    evil = ThreadingHTTPServer(("localhost", 0), handler)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    rows = len(db_rows(server.db_url))
    try:
        browser.get(f"http://localhost:{evil.server_address[1]}/evil.html")
        WebDriverWait(browser, 30).until(lambda b: "cross-origin" in b.find_element(By.TAG_NAME, "body").text)
    finally:
        evil.shutdown()
    assert len(db_rows(server.db_url)) == rows


def test_operator_sees_review_and_marks_it_good(browser, review_server: ServerProcess, brick_data: Path) -> None:
    """Issue 15: REVIEW is a third state on screen, with its p-value and reasons; the operator's
    "good after review" is stored with who; a drifting model shows a warning."""
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(review_server.url + "/")
    wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    assert not browser.find_element(By.ID, "drift").is_displayed()
    browser.find_element(By.ID, "file").send_keys(str(brick_data / "test" / "good" / "000.png"))
    wait.until(lambda b: b.find_element(By.ID, "verdict").text in ("OK", "REVIEW", "NOT OK"))
    verdict = browser.find_element(By.ID, "verdict")
    assert verdict.text == "REVIEW" and "review" in verdict.get_attribute("class")
    assert browser.find_element(By.ID, "p-value").text.startswith(("0.", "1")) and "z" in browser.find_element(By.ID, "p-value").text
    assert "between review" in browser.find_element(By.ID, "reasons").text
    wait.until(lambda b: b.execute_script(
        "return [...document.querySelectorAll('#history tbody tr.current .badge')].map(x => x.textContent)") == ["REVIEW"])
    inspection_id = browser.find_element(By.ID, "inspection-id").text

    browser.find_element(By.ID, "operator").clear()
    browser.find_element(By.ID, "operator").send_keys("dana")
    browser.find_element(By.ID, "review-note").send_keys("reflection on the mortar")
    browser.find_element(By.ID, "review-good").click()
    wait.until(lambda b: "good after review" in b.find_element(By.ID, "review-state").text)
    assert "dana" in browser.find_element(By.ID, "review-state").text
    reviews = httpx.get(f"{review_server.url}/v1/inspections/{inspection_id}/reviews", timeout=30).json()["items"]
    assert [(r["decision"], r["operator"], r["note"], r["verdict"]) for r in reviews] == [
        ("good", "dana", "reflection on the mortar", "REVIEW")]
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "service-ui-review.png"))

    # the served model's scores drift (rows written straight into its log): the page warns
    from defectlens.service.store import InspectionStore

    model = httpx.get(f"{review_server.url}/v1/models", timeout=30).json()["items"][0]
    store = InspectionStore(review_server.db_url)
    for index in range(40):
        score = model["threshold"] * (3.0 + 0.01 * index)
        store.add(model_name=model["name"], model_sha256=model["sha256"], image_sha256="d" * 64, width=64, height=64,
                  score=score, threshold=model["threshold"], is_anomalous=True, latency_ms=1.0, image_path="x.png",
                  heatmap_path="x.png", mask_path="x.png", map_path="x.npy")
    store.close()
    browser.refresh()
    wait.until(lambda b: b.find_element(By.ID, "drift").is_displayed())
    assert "Drift warning" in browser.find_element(By.ID, "drift").text and model["name"] in browser.find_element(By.ID, "drift").text
    assert browser.save_screenshot(str(ARTIFACTS / "service-ui-drift.png"))
