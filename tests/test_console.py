"""The web console in a real browser (Playwright driving the system's Chromium, never a
downloaded one) against a real `bucketml dev`: upload through the form until the model is
served, the models page, the report, promote and roll back with the buttons (the served version
changes), the events page's filter, a dataset whose names are HTML shown escaped, and the login
beyond loopback with its CSRF checks.

Any error in the browser's console or an uncaught page error fails the test. Screenshots of
each page go to $BUCKETML_SCREENSHOTS, or to the test's temporary folder (never committed).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from helpers import ROOT, churn_frame, free_port, free_ports, running_platform, stop, wait_until

from bucketml.registry.model_registry import Registry
from bucketml.storage import LocalStorage

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-test.txt pins it)")

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
HOSTILE_COLUMN = "<img src=x onerror=alert(1)>"
HOSTILE_CATEGORY = "<script>alert(2)</script>"
TIMEOUT_MS = 180_000


def chromium_binary() -> str | None:
    import shutil

    explicit = os.environ.get("BUCKETML_CHROMIUM")
    if explicit:
        return explicit
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("BUCKETML_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no Chromium found (chromium, chromium-browser, google-chrome or $BUCKETML_CHROMIUM); "
                    "`make test` installs Debian's chromium when run as root")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=binary, args=["--no-sandbox", "--disable-gpu"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    """A fresh browser context; fails the test on any console error, page error or dialog."""
    context = browser.new_context(viewport={"width": 1280, "height": 640})
    tab = context.new_page()
    tab.set_default_timeout(15_000)
    problems: list[str] = []
    expected: list[str] = []  # console errors a test provokes on purpose (an answer of 401, say)
    tab.expected_errors = expected
    tab.on("console", lambda message: problems.append(f"console {message.type}: {message.text}")
           if message.type == "error" and not any(e in message.text for e in expected) else None)
    tab.on("pageerror", lambda error: problems.append(f"page error: {error}"))

    def dialog(d) -> None:
        problems.append(f"dialog: {d.message}")
        d.dismiss()

    tab.on("dialog", dialog)
    yield tab
    context.close()
    assert not problems, "the browser reported:\n" + "\n".join(problems)


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    with running_platform(root, free_ports()) as info:
        yield info


def upload_through_form(page, console: str, csv: Path, model: str, target: str, promotion: str = "") -> str:
    """Upload with the form, follow until it ends; the follow page's text."""
    page.goto(console + "/upload")
    page.get_by_label("CSV file").set_input_files(str(csv))
    page.get_by_label("Model name").fill(model)
    page.get_by_label("Target column").fill(target)
    if promotion:
        page.get_by_label("Promotion").select_option(promotion)
    page.get_by_role("button", name="Upload").click()
    page.wait_for_url(re.compile(r"/follow\?"))
    page.wait_for_selector("#follow:not([data-follow])", timeout=TIMEOUT_MS)
    return page.inner_text("#follow")


def served_version(predict: str, model: str, record: dict) -> int:
    response = requests.post(predict + "/predict", json={"model": model, "records": [record]}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["version"]


def test_upload_promote_rollback_report_and_events_in_the_browser(platform, page, shots, tmp_path):
    console, predict = platform["console"], platform["predict"]
    csv = tmp_path / "churn.csv"
    churn_frame(240, seed=1).to_csv(csv, index=False)

    page.goto(console + "/")
    assert "No models yet" in page.inner_text("main")
    text = upload_through_form(page, console, csv, "churn", "label")
    page.screenshot(path=str(shots / "console-follow.png"), full_page=True)
    assert "published  churn version 1" in text and "served     churn version 1" in text, text
    assert re.search(r"accuracy=\d\.\d{4}|balanced_accuracy=\d\.\d{4}", text), text

    page.get_by_role("link", name="see churn").click()
    assert page.inner_text("#current") == "1"
    page.get_by_role("link", name="Models").click()
    row = page.locator("tbody tr", has_text="churn")
    assert "v1" in row.inner_text() and re.search(r"=\d\.\d{4}", row.inner_text())
    page.screenshot(path=str(shots / "console-models.png"), full_page=True)

    # A second version, promoted as it is trained.
    churn_frame(300, seed=2).to_csv(csv, index=False)
    text = upload_through_form(page, console, csv, "churn", "label", promotion="always")
    assert "served     churn version 2" in text, text
    record = {"tenure": 12, "monthly": 80.0, "plan": "basic", "region": "north"}
    assert served_version(predict, "churn", record) == 2

    page.goto(console + "/models/churn")
    page.screenshot(path=str(shots / "console-model.png"), full_page=True)
    page.get_by_role("button", name="Roll back").click()
    assert "Confirm rollback" in page.inner_text("h1")
    page.get_by_role("button", name="Confirm rollback").click()
    assert "current version 2 -> 1" in page.inner_text("main")
    assert page.inner_text("#current") == "1"
    wait_until(lambda: served_version(predict, "churn", record) == 1, "predict to serve version 1 again", 15)

    page.get_by_role("button", name="Promote version 2").focus()
    page.keyboard.press("Enter")  # keyboard-usable
    page.get_by_role("button", name="Confirm promote").click()
    assert "current version 1 -> 2" in page.inner_text("main")
    wait_until(lambda: served_version(predict, "churn", record) == 2, "predict to serve version 2", 15)

    # Try it: the form calls predict and shows its answer.
    page.get_by_label(re.compile(r"^tenure")).fill("12")
    page.get_by_label(re.compile(r"^plan")).fill("basic")
    page.get_by_role("button", name="Predict").click()
    answer = page.inner_text("#answer")
    assert '"version": 2' in answer and '"predictions"' in answer, answer

    # The report of version 1, served from the bucket under a restrictive policy.
    with page.expect_response(re.compile(r"/report$")) as caught:
        page.get_by_role("link", name="report.html").nth(1).click()
    response = caught.value
    assert response.status == 200 and "sandbox" in response.headers["content-security-policy"]
    page.wait_for_load_state()
    assert "churn" in page.content()
    page.screenshot(path=str(shots / "console-report.png"))

    # Events: newest first, filtered by model and type, each open to its data.
    page.goto(console + "/events")
    page.get_by_label("Model").fill("churn")
    page.get_by_label("Type").select_option("bucketml.model.published.v1")
    page.get_by_role("button", name="Filter").click()
    types = page.locator("ol.events code.type").all_inner_texts()
    assert len(types) >= 4 and set(types) == {"bucketml.model.published.v1"}, types
    seqs = [int(s) for s in page.locator("ol.events .seq").all_inner_texts()]
    assert seqs == sorted(seqs, reverse=True)
    page.locator("ol.events summary").first.click()
    assert '"version": 2' in page.locator("ol.events pre").first.inner_text()
    page.goto(console + "/events")
    page.screenshot(path=str(shots / "console-events.png"), full_page=True)
    page.goto(console + "/upload")
    page.screenshot(path=str(shots / "console-upload.png"), full_page=True)


def test_a_canary_started_and_rolled_back_with_the_buttons(platform, page):
    """After the test above: churn has versions 1 and 2, 2 current."""
    console = platform["console"]
    page.goto(console + "/models/churn")
    page.get_by_label("Canary version").select_option("1")
    page.get_by_label("Percent").fill("30")
    page.get_by_role("button", name="Start canary").click()
    page.get_by_role("button", name="Confirm canary").click()
    assert "canary version 1 answers 30% of unpinned requests" in page.inner_text("main")
    page.get_by_role("button", name="Roll back the canary").click()
    page.get_by_role("button", name="Confirm rollback").click()
    assert "canary version 1 rolled back; version 2 answers every unpinned request" in page.inner_text("main")
    assert page.inner_text("#current") == "2"
    page.goto(console + "/events?model=churn")
    types = page.locator("ol.events code.type").all_inner_texts()
    assert types[:2] == ["bucketml.rollout.rolled_back.v1", "bucketml.rollout.started.v1"], types


def test_without_javascript_the_upload_is_followed_until_served(platform, browser, tmp_path):
    """The follow page refreshes itself (<noscript> meta refresh) where scripts do not run."""
    context = browser.new_context(java_script_enabled=False)
    tab = context.new_page()
    try:
        csv = tmp_path / "plain.csv"
        churn_frame(200, seed=4).to_csv(csv, index=False)
        tab.goto(platform["console"] + "/upload")
        tab.get_by_label("CSV file").set_input_files(str(csv))
        tab.get_by_label("Model name").fill("plain")
        tab.get_by_label("Target column").fill("label")
        tab.get_by_role("button", name="Upload").click()
        tab.wait_for_url(re.compile(r"/follow\?"))
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        html = ""
        while "Served:" not in html:
            assert time.monotonic() < deadline, html
            time.sleep(0.5)
            try:
                html = tab.content()
            except sync_api.Error:  # caught mid-refresh: look again
                html = ""
        assert "served     plain version 1" in html
    finally:
        context.close()


def test_a_dataset_named_in_html_is_shown_as_text(platform, page, tmp_path):
    console = platform["console"]
    frame = churn_frame(200, seed=3).rename(columns={"plan": HOSTILE_COLUMN})
    frame[HOSTILE_COLUMN] = frame[HOSTILE_COLUMN].replace({"basic": HOSTILE_CATEGORY})
    csv = tmp_path / "hostile.csv"
    frame.to_csv(csv, index=False)
    text = upload_through_form(page, console, csv, "hostile", "label")
    assert "served     hostile version 1" in text, text
    page.goto(console + "/models/hostile")
    assert page.locator("img").count() == 0
    assert page.locator("main script").count() == 0
    assert HOSTILE_COLUMN in page.inner_text("form.try")
    assert HOSTILE_CATEGORY in page.locator("datalist").first.inner_html().replace("&lt;", "<").replace("&gt;", ">")
    page.goto(console + "/events?model=hostile")
    page.locator("ol.events summary").first.click()
    assert page.locator("img").count() == 0


def test_a_rejected_upload_shows_its_reason(platform, page, shots, tmp_path):
    csv = tmp_path / "no-target.csv"
    csv.write_text("a,b\n1,2\n3,4\n")
    text = upload_through_form(page, platform["console"], csv, "refused", "")
    assert "rejected" in text and "The upload was rejected" in text, text
    page.goto(platform["console"] + "/models/refused")
    assert "Rejected uploads (1)" in page.inner_text("main")
    assert "no_target" in page.inner_text("ul.refused")
    page.goto(platform["console"] + "/")
    row = page.locator("tbody tr", has_text="refused").inner_text()
    assert "rejected: no_target" in row, row
    page.screenshot(path=str(shots / "console-models.png"), full_page=True)


# --- beyond loopback: the token, the login and CSRF --------------------------------------------
@pytest.fixture(scope="module")
def guarded(platform):
    """The console function alone on the platform's bucket, requiring the token as it does beyond
    loopback (BUCKETML_AUTH=token)."""
    port = free_port()
    env = dict(os.environ, BUCKETML_BUCKET=str(platform["bucket"]), BUCKETML_BROKER_URL=platform["broker"],
               BUCKETML_PREDICT_URL=platform["predict"], BUCKETML_AUTH="token", BUCKETML_TOKEN="s3cret-token")
    process = subprocess.Popen(
        [sys.executable, "-m", "functions_framework", "--asgi", "--source", str(ROOT / "functions/console/main.py"),
         "--target", "console", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url), "the guarded console to listen", 30)
        yield url
    finally:
        stop(process)


def _answers(url: str) -> bool:
    try:
        return requests.get(url + "/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_beyond_loopback_every_page_needs_the_login(guarded, page, shots):
    page.goto(guarded + "/upload")
    assert page.url.startswith(guarded + "/login")
    page.screenshot(path=str(shots / "console-login.png"), full_page=True)
    page.get_by_label("Token").fill("wrong")
    # Chromium logs the 401 that answers a wrong token; that one error is the point here.
    page.expected_errors.append("the server responded with a status of 401")
    with page.expect_response(lambda r: r.url.endswith("/login") and r.request.method == "POST") as caught:
        page.get_by_role("button", name="Log in").click()
    assert caught.value.status == 401
    assert "not the token" in page.inner_text("main")
    page.get_by_label("Token").fill("s3cret-token")
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(guarded + "/upload")
    assert page.inner_text("h1") == "Upload a dataset"
    cookie = next(c for c in page.context.cookies() if c["name"] == "bucketml_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"


def test_beyond_loopback_actions_need_the_login_and_the_csrf_token(guarded, platform):
    registry = Registry(LocalStorage(platform["bucket"]))
    before = registry.current("churn")
    # No login: pages redirect to it, actions are refused.
    assert requests.get(guarded + "/", allow_redirects=False, timeout=10).status_code == 303
    refused = requests.post(guarded + "/models/churn/rollback", data={"confirmed": "yes"}, timeout=10)
    assert refused.status_code == 401
    # Logged in, but a form without the session's CSRF token changes nothing.
    session = requests.Session()
    assert session.post(guarded + "/login", data={"token": "s3cret-token"}, timeout=10).status_code == 200
    forged = session.post(guarded + "/models/churn/rollback", data={"confirmed": "yes"}, timeout=10)
    assert forged.status_code == 403 and "CSRF" in forged.text
    wrong = session.post(guarded + "/models/churn/rollback", data={"confirmed": "yes", "csrf": "guess"}, timeout=10)
    assert wrong.status_code == 403
    time.sleep(0.2)
    after = registry.current("churn")
    assert (after.version, after.generation) == (before.version, before.generation)
    # Scripts may send the bearer token instead.
    scripted = requests.get(guarded + "/", headers={"Authorization": "Bearer s3cret-token"}, timeout=10)
    assert scripted.status_code == 200 and "<h1>Models</h1>" in scripted.text


# --- in-process: sessions, limits and forms without a browser ------------------------------------
def in_process(tmp_path, monkeypatch, token: str | None = None):
    from starlette.testclient import TestClient

    from bucketml.auth import Policy
    from bucketml.console.access import Sessions
    from bucketml.console.app import Console

    console = Console(LocalStorage(tmp_path / "bucket"), Sessions(Policy(token), token), "http://127.0.0.1:9",
                      "http://127.0.0.1:9", secure_cookie=False)
    return TestClient(console, base_url="http://127.0.0.1:8085", follow_redirects=False)


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def test_a_forged_expired_or_anonymous_cookie_is_no_session():
    from bucketml.auth import Policy
    from bucketml.console.access import Sessions

    sessions = Sessions(Policy("t0ken"), "t0ken")
    session, cookie = sessions.new(logged_in=True)
    assert sessions.read(cookie) == session
    payload, _, signature = cookie.rpartition(".")
    assert sessions.read(payload + "." + "0" * len(signature)) is None
    assert sessions.read(cookie + "x") is None and sessions.read("") is None and sessions.read("a.b") is None
    _, anonymous = sessions.new(logged_in=False)
    assert sessions.read(anonymous) is None  # a token is required: only a login makes a session
    assert Sessions(Policy("other"), "other").read(cookie) is None  # a new token ends every session


def test_on_loopback_an_action_still_needs_the_forms_csrf_token_and_this_origin(tmp_path, monkeypatch):
    client = in_process(tmp_path, monkeypatch)
    page = client.get("/upload")
    assert page.status_code == 200 and "bucketml_console" in page.cookies
    csrf = csrf_of(page.text)
    assert client.post("/models/m/rollback", data={"confirmed": "yes"}).status_code == 403
    foreign = client.post("/models/m/rollback", data={"confirmed": "yes", "csrf": csrf},
                          headers={"Origin": "https://elsewhere.example"})
    assert foreign.status_code == 403 and "another site" in foreign.text
    answered = client.post("/models/m/rollback", data={"confirmed": "yes", "csrf": csrf})
    assert answered.status_code == 404  # past the checks: model 'm' has no versions


def test_an_upload_over_the_limit_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("BUCKETML_MAX_UPLOAD_BYTES", "100")
    client = in_process(tmp_path, monkeypatch)
    csrf = csrf_of(client.get("/upload").text)
    big = client.post("/upload", data={"csrf": csrf, "model": "m"}, files={"file": ("big.csv", b"a,b\n" + b"1,2\n" * 50)})
    assert big.status_code == 413 and "over the upload limit of 100 bytes" in big.text
    # Without Content-Length (chunked), the body is cut off once past the limit and the other fields' 64 KiB.
    body = (b"--b\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\n" + csrf.encode()
            + b"\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.csv\"\r\n\r\n"
            + b"1,2\n" * 40_000 + b"\r\n--b--\r\n")
    chunked = client.post("/upload", content=iter([body[i:i + 4096] for i in range(0, len(body), 4096)]),
                          headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert chunked.status_code == 413 and "The request is over this form" in chunked.text
    bad = client.post("/upload", data={"csrf": csrf, "model": "../x"}, files={"file": ("x.csv", b"a,b\n1,2\n")})
    assert bad.status_code == 400
    spec = client.post("/upload", data={"csrf": csrf, "model": "m", "settings": "metrik=f1"},
                       files={"file": ("x.csv", b"a,b\n1,2\n")})
    assert spec.status_code == 400 and "did you mean" in spec.text
    assert not (tmp_path / "bucket" / "datasets").exists()


def test_an_upload_is_written_with_its_spec_as_metadata(tmp_path, monkeypatch):
    client = in_process(tmp_path, monkeypatch)
    csrf = csrf_of(client.get("/upload").text)
    done = client.post("/upload", data={"csrf": csrf, "model": "m", "target": "y", "task": "regression",
                                         "promotion": "canary"},
                       files={"file": ("../we ird<name>.csv", b"a,y\n1,2\n")})
    assert done.status_code == 303 and done.headers["location"].startswith("/follow?")
    storage = LocalStorage(tmp_path / "bucket")
    (info,) = list(storage.list("datasets/m/"))
    assert info.name == "datasets/m/we_ird_name_.csv"
    assert info.metadata == {"target": "y", "task": "regression", "promotion": "canary"}


def test_login_goes_back_only_to_a_page_of_the_console(tmp_path, monkeypatch):
    client = in_process(tmp_path, monkeypatch, token="t0ken")
    for target, expected in (("/events?model=a", "/events?model=a"), ("//evil.example/x", "/"),
                             ("https://evil.example/", "/"), ("/\\evil", "/")):
        answer = client.post("/login", data={"token": "t0ken", "next": target})
        assert answer.status_code == 303 and answer.headers["location"] == expected, target
