"""The demo page in a real headless Chromium (Debian's, driven by Playwright) against a real uvicorn.

Also a script: `python -m tests.service.test_demo_page --screenshot docs/demo.png` takes the README's
screenshot with the same browser code, serving bundles/demo (or --bundle DIR).
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import ServerProcess, running_server, start_server

CHROMIUM = "/usr/bin/chromium"
# Headless, and nothing that phones home: the page must work with no network but the server's.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PRIMED = "i stay in india . we cooked a song . i speak"
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run does)"
)


@contextmanager
def launched_browser() -> Iterator[Any]:
    """Playwright on the system Chromium (never `playwright install`: it cannot download browsers here)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Watch:
    """What a page did that it must not: requests to anywhere but the server, uncaught script errors."""

    outside_requests: list[str] = field(default_factory=list)
    script_errors: list[str] = field(default_factory=list)


def open_demo(browser: Any, url: str, watch: Watch, path: str = "/", width: int = 1280, height: int = 1000) -> Any:
    """A fresh page on the demo, once its socket is open."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": width, "height": height})
    page.on("request", lambda r: None if r.url.startswith(url) else watch.outside_requests.append(r.url))
    page.on("pageerror", lambda e: watch.script_errors.append(str(e)))
    page.goto(url + path)
    expect(page.locator("#connection")).to_have_attribute("data-state", "open", timeout=TIMEOUT_MS)
    return page


def wait_synced(page: Any, step: int) -> None:
    """Until the session has consumed every completed word and sits at `step`."""
    from playwright.sync_api import expect

    expect(page.locator("#step")).to_have_attribute("data-step", str(step), timeout=TIMEOUT_MS)
    expect(page.locator("body")).to_have_attribute("data-synced", "true", timeout=TIMEOUT_MS)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with launched_browser() as browser:
        yield browser


@pytest.fixture
def page(browser: Any, server: ServerProcess) -> Iterator[Any]:
    watch = Watch()
    page = open_demo(browser, server.url, watch)
    yield page
    page.close()
    assert watch.script_errors == []
    assert watch.outside_requests == []  # every asset is served by the service itself


def test_typing_shows_suggestions_and_draws_the_gates(page: Any, server: ServerProcess, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    box = page.get_by_label("Your text")
    box.press_sequentially(PRIMED + " ")
    wait_synced(page, len(PRIMED.split()))
    suggestions = page.locator("#suggestions button")
    expect(suggestions).to_have_count(5)
    # The page shows the session's own predictions: those of the whole text run at once, specials left out.
    stateless = httpx.post(f"{server.url}/v1/predict", json={"text": PRIMED, "k": 20})
    assert stateless.status_code == 200
    expected = [p["word"] for p in stateless.json()["predictions"] if not p["word"].startswith("<")][:5]
    assert [suggestions.nth(i).get_attribute("data-word") for i in range(5)] == expected
    assert page.locator("#suggestions").get_attribute("aria-live") == "polite"

    model = httpx.get(f"{server.url}/v1/model").json()
    expect(page.locator("#model-version")).to_have_attribute("data-version", model["version"])
    heatmaps = page.locator("#heatmaps")
    expect(heatmaps.locator("canvas")).to_have_count(model["layers"])
    units = min(24, model["hidden_size"])
    columns = len(PRIMED.split())
    assert heatmaps.get_attribute("data-columns") == str(columns)
    # f, i, o and C for each layer, unit and word.
    assert heatmaps.get_attribute("data-cells") == str(model["layers"] * 4 * units * columns)
    colours = page.evaluate(
        """() => {
            const canvas = document.querySelector('#heatmaps canvas');
            const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
            const seen = new Set();
            for (let i = 0; i < data.length; i += 4) seen.add(data[i] << 16 | data[i + 1] << 8 | data[i + 2]);
            return seen.size;
        }"""
    )
    assert colours > 50  # the cells are painted in many shades, not a blank canvas
    assert re.fullmatch(r"\d+\.\d ms", page.locator("#latency").inner_text())
    page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_tab_accepts_and_backspace_over_a_word_rewinds(page: Any, server: ServerProcess) -> None:
    from playwright.sync_api import expect

    box = page.get_by_label("Your text")
    box.press_sequentially("i stay in ")
    wait_synced(page, 3)
    session_id = page.locator("body").get_attribute("data-session")
    before = [b.get_attribute("data-word") for b in page.locator("#suggestions button").all()]

    # Tab takes the first suggestion and completes the word: one more step.
    first = page.locator("#suggestions button").first.get_attribute("data-word")
    box.press("Tab")
    expect(box).to_have_value(f"i stay in {first} ")
    wait_synced(page, 4)
    expect(box).to_be_focused()

    # Backspace over the whole word and its space: the session rewinds to the state before it.
    for _ in range(len(first) + 1):
        box.press("Backspace")
    expect(box).to_have_value("i stay in ")
    wait_synced(page, 3)
    assert page.locator("body").get_attribute("data-session") == session_id  # rewound, not recreated
    info = httpx.get(f"{server.url}/v1/sessions/{session_id}")
    assert info.status_code == 200
    assert info.json()["step"] == 3
    assert page.locator("#heatmaps").get_attribute("data-columns") == "3"
    assert [b.get_attribute("data-word") for b in page.locator("#suggestions button").all()] == before

    # Clicking a suggestion accepts it too.
    page.locator("#suggestions button").nth(1).click()
    expect(box).to_have_value(f"i stay in {before[1]} ")
    wait_synced(page, 4)

    # Keyboard only: Esc lets Tab move into the suggestions, Enter picks the focused one.
    box.press("Escape")
    page.keyboard.press("Tab")
    focused = page.locator("#suggestions button").first
    expect(focused).to_be_focused()
    word = focused.get_attribute("data-word")
    page.keyboard.press("Enter")
    expect(box).to_have_value(f"i stay in {before[1]} {word} ")
    expect(box).to_be_focused()
    wait_synced(page, 5)


def test_the_word_being_typed_is_completed_by_the_server_and_tab_accepts(page: Any, server: ServerProcess) -> None:
    from playwright.sync_api import expect

    box = page.get_by_label("Your text")
    box.press_sequentially(PRIMED + " ")
    wait_synced(page, len(PRIMED.split()))
    suggestions = page.locator("#suggestions")
    for partial in ("h", "hi", "b"):  # typed, then replaced: each is completed from the session's state
        box.fill(f"{PRIMED} {partial}")
        expect(suggestions).to_have_attribute("data-partial", partial, timeout=TIMEOUT_MS)
        expect(suggestions).to_have_attribute("data-source", "completion", timeout=TIMEOUT_MS)
        expected = httpx.post(f"{server.url}/v1/predict", json={"text": PRIMED, "prefix": partial, "k": 5})
        assert expected.status_code == 200
        words = [p["word"] for p in expected.json()["predictions"]]
        assert words  # the tiny vocabulary has words starting with each
        assert [b.get_attribute("data-word") for b in suggestions.locator("button").all()] == words
    step = int(page.locator("#step").get_attribute("data-step"))
    assert step == len(PRIMED.split())  # completing never advanced the session
    box.press("Tab")
    expect(box).to_have_value(f"{PRIMED} {words[0]} ")
    wait_synced(page, step + 1)
    expect(suggestions).to_have_attribute("data-source", "next-word")


def test_long_range_button_predicts_a_language(page: Any) -> None:
    from playwright.sync_api import expect

    from model.corpus import _ADJECTIVES, _NOUNS, _SUBJECTS, _TEMPLATES, _TIMES, _VERBS, COUNTRY_LANGUAGE

    # The page's copy of the corpus grammar must match the generator the demo model learnt from.
    mirror = page.evaluate("() => window.cellgateDemo")
    assert [tuple(pair) for pair in mirror["COUNTRY_LANGUAGE"]] == list(COUNTRY_LANGUAGE)
    filler = mirror["FILLER"]
    assert (filler["subjects"], filler["verbs"], filler["adjectives"]) == (
        list(_SUBJECTS),
        list(_VERBS),
        list(_ADJECTIVES),
    )
    assert (filler["nouns"], filler["times"], filler["templates"]) == (list(_NOUNS), list(_TIMES), list(_TEMPLATES))

    page.get_by_label("Country").select_option("japan")
    page.get_by_label("Filler sentences").fill("4")
    page.get_by_role("button", name="Run the long-range example").click()
    result = page.locator("#longrange-result")
    expect(result).to_have_attribute("data-language", re.compile(r"\w+"), timeout=60_000)
    assert result.get_attribute("data-language") in {language for _, language in COUNTRY_LANGUAGE}
    assert "Predicted language" in result.inner_text()
    text = page.get_by_label("Your text").input_value()
    assert text.startswith("i stay in japan . ")
    assert text.endswith(" i speak ")
    wait_synced(page, len(text.split()))


def test_expired_session_is_replaced_and_the_text_replayed(page: Any, server: ServerProcess) -> None:
    from playwright.sync_api import expect

    box = page.get_by_label("Your text")
    box.press_sequentially("i stay ")
    wait_synced(page, 2)
    old = page.locator("body").get_attribute("data-session")
    assert httpx.delete(f"{server.url}/v1/sessions/{old}").status_code == 204
    box.press_sequentially("in ")
    expect(page.locator("#notice")).to_contain_text("expired", timeout=TIMEOUT_MS)
    wait_synced(page, 3)
    new = page.locator("body").get_attribute("data-session")
    assert new != old
    assert httpx.get(f"{server.url}/v1/sessions/{new}").json()["step"] == 3


def test_unreachable_server_is_reported_and_the_page_reconnects(browser: Any, tiny_bundle: Path) -> None:
    from playwright.sync_api import expect

    env = {"CELLGATE_PORT": str(free_port()), "CELLGATE_ACCESS_LOG": "false"}
    first = start_server(tiny_bundle, env)
    watch = Watch()
    try:
        page = open_demo(browser, first.url, watch)
        page.get_by_label("Your text").press_sequentially("i stay ")
        wait_synced(page, 2)
    finally:
        first.stop()
    expect(page.locator("#connection")).to_have_attribute("data-state", "unreachable", timeout=TIMEOUT_MS)
    expect(page.locator("#notice")).to_contain_text("unreachable")
    page.get_by_label("Your text").press_sequentially("in ")  # typed while the server is down

    # The same address again, but a new process: the old session is gone, so the page makes a new one.
    with running_server(tiny_bundle, env) as second:
        assert second.url == first.url
        expect(page.locator("#connection")).to_have_attribute("data-state", "open", timeout=60_000)
        wait_synced(page, 3)
        expect(page.locator("#notice")).to_contain_text("expired")
        session_id = page.locator("body").get_attribute("data-session")
        assert httpx.get(f"{second.url}/v1/sessions/{session_id}").json()["step"] == 3
    page.close()
    assert watch.script_errors == []


def test_api_key_from_the_page_address(browser: Any, tiny_bundle: Path) -> None:
    from playwright.sync_api import expect

    env = {"CELLGATE_API_KEYS": "s3cret", "CELLGATE_ACCESS_LOG": "false"}
    with running_server(tiny_bundle, env) as server:
        anonymous = browser.new_page()
        anonymous.goto(server.url + "/")
        expect(anonymous.locator("#notice")).to_contain_text("needs an API key", timeout=TIMEOUT_MS)
        anonymous.close()
        watch = Watch()
        page = open_demo(browser, server.url, watch, "/?api_key=s3cret")  # header and socket both use it
        page.get_by_label("Your text").press_sequentially("i stay ")
        wait_synced(page, 2)
        page.close()
    assert watch.script_errors == []


# ----- the README screenshot ---------------------------------------------------------------------


def take_screenshot(bundle: Path, out: Path, country: str = "india", sentences: int = 10) -> str:
    """Serve the bundle, run the long-range example on the page and save a screenshot; the result line."""
    from playwright.sync_api import expect

    with running_server(bundle, {"CELLGATE_ACCESS_LOG": "false"}) as server, launched_browser() as browser:
        page = open_demo(browser, server.url, Watch(), width=1280, height=900)
        page.get_by_label("Country").select_option(country)
        page.get_by_label("Filler sentences").fill(str(sentences))
        page.get_by_role("button", name="Run the long-range example").click()
        result = page.locator("#longrange-result")
        expect(result).to_have_attribute("data-language", re.compile(r"\w+"), timeout=120_000)
        expect(page.locator("#suggestions button")).not_to_have_count(0)
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        return str(result.inner_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Take the demo page screenshot for the README.")
    parser.add_argument("--screenshot", type=Path, default=Path("docs/demo.png"))
    parser.add_argument("--bundle", type=Path, default=Path("bundles/demo"), help="the model to serve")
    parser.add_argument("--country", default="india")
    parser.add_argument("--sentences", type=int, default=10, help="filler sentences in the long-range example")
    args = parser.parse_args(argv)
    if not (args.bundle / "manifest.json").exists():
        print(f"no bundle at {args.bundle}: run `make demo` first, or pass --bundle DIR", file=sys.stderr)  # noqa: T201
        return 2
    line = take_screenshot(args.bundle, args.screenshot, args.country, args.sentences)
    print(f"{args.screenshot}: {line}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
