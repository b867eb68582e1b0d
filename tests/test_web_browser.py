"""People's side of a study, in a real browser: Debian's chromium driven by Playwright against a
real server on loopback, playing whole games — by keyboard alone on a desktop against a bot
(``parlay serve`` itself), by touch on a phone-width screen against a tiny transformers model."""

import os
from pathlib import Path

import pytest

from parlay.episode import read_episodes
from parlay.web.store import Store
from parlay.web.study import study_from_flags
from tests.web_support import free_port, start_process

CHROMIUM = Path("/usr/bin/chromium")
ADMIN = "admin-token-for-the-browser-tests-0123456789"
ITEMS = ("book", "hat", "ball")
SHOTS = os.environ.get("PARLAY_SCREENSHOTS")
"""Where screenshots are also copied (default: only the test's temporary folder)."""


def launch(pw):
    assert CHROMIUM.exists(), "the browser tests need Debian's chromium (apt-get install chromium; .ci/run does)"
    return pw.chromium.launch(
        executable_path=str(CHROMIUM),
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
    )


def shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        (Path(SHOTS) / path.name).write_bytes(path.read_bytes())
    assert path.stat().st_size > 5000
    return path


def wait_my_turn_or_end(page) -> None:
    page.wait_for_function(
        "() => !document.getElementById('send').disabled || !document.getElementById('propose').disabled"
        " || !document.getElementById('result').hidden",
        timeout=60_000,
    )


def serve(tmp_path: Path, agents: list[str], command: list[str]) -> tuple[object, str, str]:
    db = f"sqlite:///{tmp_path / 'study.db'}"
    study = study_from_flags(agents, "semi-competitive", games_per_participant=1)
    store = Store(db)
    token = store.add_participants(study, 1)[0][1]
    store.close()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = [*command, "--db", db, "--port", str(port)]
    server = start_process(args, f"{base}/api/me", env={"PARLAY_ADMIN_TOKEN": ADMIN})
    return server, base, token


def test_a_person_plays_a_whole_game_by_keyboard_alone_on_a_desktop(tmp_path):
    from playwright.sync_api import sync_playwright

    command = ["-m", "parlay", "serve", "--agent", "bot:cooperative", "--games", "1"]
    server, base, token = serve(tmp_path, ["bot:cooperative"], command)
    try:
        with sync_playwright() as pw:
            browser = launch(pw)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(f"{base}/play#token={token}")
                page.wait_for_selector("#consent:not([hidden])")
                shot(page, tmp_path, "desktop-1-consent")
                page.click("#decline")  # declining sends nothing; the link still works afterwards
                assert "chose not to take part" in page.locator("#declined").inner_text()
                page.reload()
                page.wait_for_selector("#consent:not([hidden])")
                page.keyboard.press("Enter")  # the consent button has the focus

                page.wait_for_selector("#check:not([hidden])")
                page.keyboard.press("ArrowDown")  # proposals that do not fit: both score 0 (option 2)
                page.keyboard.press("Tab")
                page.keyboard.press("Space")  # semi-competitive: only my own points (option 1)
                page.keyboard.press("Tab")
                page.keyboard.press("ArrowDown")  # partner's values: unknown unless told (option 2)
                shot(page, tmp_path, "desktop-2-check")
                page.keyboard.press("Tab")
                page.keyboard.press("Enter")

                page.wait_for_selector("#game:not([hidden])")
                assert page.locator(".item").count() == 3 and page.locator(".item img").count() == 3
                wait_my_turn_or_end(page)
                attack = "<b>bold</b><script>window.pwned = 1</script>"
                page.keyboard.type(attack)
                page.keyboard.press("Enter")
                page.wait_for_function("() => document.querySelectorAll('#chat li.partner').length > 0")
                mine = page.locator("#chat li.you").first.inner_text()
                assert attack in mine  # shown as typed, as text
                assert page.locator("#chat script, #chat b").count() == 0
                assert page.evaluate("window.pwned") is None
                wait_my_turn_or_end(page)
                shot(page, tmp_path, "desktop-3-chat")

                if page.locator("#send").is_enabled():  # no proposal owed: go to the proposal by Tab
                    page.keyboard.press("Tab")
                    page.keyboard.press("Tab")
                for _ in range(3):  # books, hats, balls: keep one of each
                    page.keyboard.press("Control+A")
                    page.keyboard.type("1")
                    page.keyboard.press("Tab")
                page.keyboard.press("Enter")  # on the Propose button
                page.wait_for_selector("#result:not([hidden])", timeout=60_000)
                assert page.locator("#result-table tr").count() >= 3
                assert page.evaluate("document.activeElement.id") == "next-game"
                shot(page, tmp_path, "desktop-4-result")
                page.keyboard.press("Enter")
                page.wait_for_selector("#done:not([hidden])")
                assert "finished all 1 games" in page.locator("#done-text").inner_text()
                explained = page.locator("#points-explained").inner_text()
                assert "Score under this game's rule" in explained and "game 1:" in explained
                shot(page, tmp_path, "desktop-4b-done")

                admin = browser.new_page(viewport={"width": 1280, "height": 900})
                admin.goto(f"{base}/admin#token={ADMIN}")
                admin.wait_for_function("() => document.querySelectorAll('#games tr').length === 2")
                assert admin.locator("#conditions tr").count() == 2
                assert admin.locator("#participants td").nth(1).inner_text() == "done"
                shot(admin, tmp_path, "desktop-5-admin")
                with admin.expect_download() as download:
                    admin.click("#export-jsonl")
                path = tmp_path / "export.jsonl"
                download.value.save_as(path)
                (episode,) = read_episodes(path)
                assert episode.meta["agents"] == {"A": "human", "B": "bot:cooperative"}
                assert any(t.message and "<script>" in t.message for t in episode.turns)
                wrong = browser.new_page()
                wrong.goto(f"{base}/admin#token=not-the-admin-token")
                wrong.wait_for_function("() => document.getElementById('status').textContent.length > 0")
                assert "wrong admin token" in wrong.locator("#status").inner_text()
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait()


def test_a_person_plays_a_tiny_transformers_model_on_a_phone(tmp_path, parrot_lm):
    from playwright.sync_api import sync_playwright

    spec = f"hf:{parrot_lm}"
    command = ["-m", "tests.web_server", "--agents", spec, "--games", "1", "--delay", "0.7"]
    server, base, token = serve(tmp_path, [spec], [*command, "--admin-token", ADMIN])
    try:
        with sync_playwright() as pw:
            browser = launch(pw)
            try:
                context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
                page = context.new_page()
                page.goto(f"{base}/play#token={token}")
                page.tap("#agree")
                page.wait_for_selector("#check:not([hidden])")
                for question, option in (("mismatch", 0), ("objective", 0), ("values", 1)):  # one wrong
                    page.tap(f"#q-{question} label >> nth={option}")
                page.tap("#check-form button")
                page.wait_for_selector("#q-mismatch .wrong-mark")  # marked in words, not only by colour
                assert page.locator(".wrong-mark").all_inner_texts() == ["Not right yet"]
                assert page.get_attribute("#q-mismatch", "aria-invalid") == "true"
                shot(page, tmp_path, "phone-0-check-wrong")
                for question, option in (("mismatch", 1), ("objective", 0), ("values", 1)):
                    page.tap(f"#q-{question} label >> nth={option}")
                page.tap("#check-form button")
                page.wait_for_selector("#game:not([hidden])")
                wrapped = "() => document.documentElement.scrollWidth <= window.innerWidth"
                assert page.evaluate(wrapped), "the game must fit a phone-width screen"
                wait_my_turn_or_end(page)
                page.fill("#message", "Hello! I would like the books.")
                page.tap("#send")
                page.wait_for_selector("#typing:not([hidden])")  # the model is answering
                shot(page, tmp_path, "phone-1-typing")
                page.wait_for_function("() => document.querySelectorAll('#chat li.partner').length > 0")
                wait_my_turn_or_end(page)
                tops = [page.locator(f"#proposal-inputs input[name={i}]").bounding_box()["y"] for i in ITEMS]
                assert max(tops) - min(tops) < 1, f"the proposal inputs must sit in one row at 390 px: {tops}"
                for item, n in zip(("book", "hat", "ball"), (1, 0, 1), strict=True):
                    page.fill(f"#proposal-inputs input[name={item}]", str(n))
                page.tap("#propose")
                # the tiny model answers every turn with a message, which the referee refuses while a
                # proposal is owed: after five refusals the game ends, and the page says why
                page.wait_for_selector("#result:not([hidden])", timeout=120_000)
                assert "invalid replies" in page.locator("#result-text").inner_text()
                assert page.evaluate(wrapped)
                shot(page, tmp_path, "phone-2-result")
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
