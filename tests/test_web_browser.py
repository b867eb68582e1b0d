"""People's side of a study, in a real browser: Debian's chromium driven by Playwright against a
real server on loopback, playing whole games — by keyboard alone on a desktop against a bot
(``parlay serve`` itself), by touch on a phone-width screen against a tiny transformers model
(slow: training that model takes most of its time) — and the researcher's admin page, whose
charts, dropout and games in progress are checked against the admin API's numbers."""

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


@pytest.mark.slow  # 35-100 s on 2 cores: training the parrot model (its fixture), then its refused turns
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


def play_for_a_deal(client, token: str, take: bool) -> dict:
    """Play the participant's next game over HTTP: ask, then propose what the bot's last offer
    leaves the person (``take``; a deal) or half of everything (most often no valid deal)."""
    from parlay.agents.language import read_offer
    from tests.test_web import auth, wait_for_turn

    game = client.post("/api/games/next", headers=auth(token)).json()["game"]
    step = 0
    while True:
        game = wait_for_turn(client, token, game)
        if game["finished"]:
            return game
        said = [line["text"] for line in game["chat"] if line["from"] == "partner" and line["kind"] == "message"]
        offer = read_offer(said[-1], tuple(game["counts"])) if said else None
        if game["may_propose"] and (game["proposal_owed"] or offer or game["messages"] >= 4):
            kept = list(offer[1]) if offer and take else [c // 2 for c in game["counts"]]
            body = {"kind": "proposal", "kept": kept}
        else:
            body = {"kind": "message", "text": "What would you like to keep?"}
        body["move_id"] = f"{game['id']}-{step}"
        response = client.post(f"/api/games/{game['id']}/moves", json=body, headers=auth(token))
        assert response.status_code == 200, response.text
        game, step = response.json()["game"], step + 1


def test_the_admin_page_draws_each_conditions_figures_dropout_and_the_games_in_progress(tmp_path):
    """The admin page against a study with two conditions, eight finished games, one game left
    live and one the admin ends from the page: what is drawn is checked against the API's numbers,
    and the page refreshes itself."""
    import httpx
    from playwright.sync_api import sync_playwright

    from tests.test_web import auth, get_ready

    agents = ["bot:hard", "bot:cooperative"]
    db = f"sqlite:///{tmp_path / 'study.db'}"
    study = study_from_flags(agents, "semi-competitive", games_per_participant=2)
    store = Store(db)
    tokens = [t for _, t in store.add_participants(study, 6)]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = ["-m", "tests.web_server", "--agents", ",".join(agents), "--games", "2", "--admin-token", ADMIN]
    server = start_process([*command, "--db", db, "--port", str(port)], f"{base}/api/me")
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            for i, token in enumerate(tokens[:4]):  # two participants per condition, two games each
                get_ready(client, token)
                for k in range(2):  # most games end in a deal, some not: the intervals have a width
                    assert play_for_a_deal(client, token, take=(i + k) % 3 != 2)["finished"]
            stayer, leaver = tokens[4], tokens[5]
            for token in (stayer, leaver):
                get_ready(client, token)
            game = client.post("/api/games/next", headers=auth(stayer)).json()["game"]
            body = {"move_id": "admin-view-1", "kind": "message", "text": "Books for me, please."}
            if game["your_turn"]:
                game = client.post(f"/api/games/{game['id']}/moves", json=body, headers=auth(stayer)).json()["game"]
            while not game["your_turn"]:
                game = client.get(f"/api/games/{game['id']}?after={game['version']}", headers=auth(stayer)).json()
            left = client.post("/api/games/next", headers=auth(leaver)).json()["game"]
            summary = client.get("/api/admin/summary", headers=auth(ADMIN)).json()
            conditions = summary["conditions"]
            assert len(conditions) == 2 and all(c["metrics"]["games"] >= 2 for c in conditions)
            assert [g["game"] for g in summary["in_progress"]] == [game["id"], left["id"]]

            with sync_playwright() as pw:
                browser = launch(pw)
                try:
                    page = browser.new_page(viewport={"width": 1280, "height": 900})
                    page.goto(f"{base}/admin#token={ADMIN}&refresh=1")
                    page.wait_for_selector("#chart-reward svg circle.point")
                    for chart, metric in (
                        ("chart-reward", "mean_reward_a"),
                        ("chart-model-reward", "mean_reward_b"),
                        ("chart-agreement", "agreement_rate"),
                    ):
                        points = page.locator(f"#{chart} circle.point")
                        lines = page.locator(f"#{chart} line.interval")
                        assert points.count() == lines.count() == len(conditions), chart
                        for i, c in enumerate(conditions):
                            assert points.nth(i).get_attribute("data-condition") == c["name"]
                            assert float(points.nth(i).get_attribute("data-value")) == c["metrics"][metric]
                            low, high = (float(lines.nth(i).get_attribute(k)) for k in ("data-low", "data-high"))
                            assert [low, high] == c["ci95"][metric]
                            # drawn where the numbers say: the point lies on its interval's line
                            cx = float(points.nth(i).get_attribute("cx"))
                            x1, x2 = (float(lines.nth(i).get_attribute(k)) for k in ("x1", "x2"))
                            assert x1 - 1e-6 <= cx <= x2 + 1e-6
                    words = page.locator("#chart-reward text.value").all_text_contents()
                    for c, text in zip(conditions, words, strict=True):
                        low, high = c["ci95"]["mean_reward_a"]
                        mean = c["metrics"]["mean_reward_a"]
                        assert text.startswith(f"{mean:.2f} [{low:.2f}, {high:.2f}]"), text
                    for i, c in enumerate(conditions):
                        row = page.locator("#dropout tr").nth(i + 1).locator("td").all_inner_texts()
                        assert row == [c["name"], *(str(c[k]) for k in ("started", "finished", "abandoned", "live"))]
                    bars = page.locator("#chart-dropout rect.bar[data-count]").all()
                    drawn = [(b.get_attribute("data-condition"), int(b.get_attribute("data-count"))) for b in bars]
                    kinds = ("finished", "abandoned", "live")
                    assert drawn == [(c["name"], c[k]) for c in conditions for k in kinds if c[k]]
                    live = page.locator("#live tr")
                    assert live.count() == 3
                    cells = live.nth(1).locator("td").all_inner_texts()
                    mine = summary["in_progress"][0]
                    assert cells[:6] == [
                        game["id"],
                        "4",
                        "1",
                        mine["condition"],
                        str(mine["turns"]),
                        str(mine["messages"]),
                    ]
                    assert cells[6].startswith("person") and mine["turns"] == len(store.moves(game["id"])) >= 1
                    shot(page, tmp_path, "admin-1-charts")

                    # a move elsewhere shows up without a click: the page refreshes itself
                    body = {"move_id": "admin-view-2", "kind": "message", "text": "And the hats?"}
                    client.post(f"/api/games/{game['id']}/moves", json=body, headers=auth(stayer))
                    turns = len(store.moves(game["id"]))
                    page.wait_for_function(
                        "(n) => Number(document.querySelector('#live tr:nth-child(2) td:nth-child(5)').textContent)"
                        " >= n",
                        arg=turns,
                        timeout=15_000,
                    )
                    # the admin ends the leaver's game from the page: it leaves the live view and counts as abandoned
                    page.once("dialog", lambda dialog: dialog.accept())
                    page.locator("#live tr").nth(2).locator("button").click()
                    page.wait_for_function("() => document.querySelectorAll('#live tr').length === 2", timeout=15_000)
                    after = client.get("/api/admin/summary", headers=auth(ADMIN)).json()
                    assert sum(c["abandoned"] for c in after["conditions"]) == 1
                    page.wait_for_function(
                        "() => document.querySelectorAll('#chart-dropout rect.bar.abandoned[data-count]').length === 1",
                        timeout=15_000,
                    )
                    assert store.game(left["id"]).ended["status"] == "abandoned"
                    shot(page, tmp_path, "admin-2-ended")
                finally:
                    browser.close()
    finally:
        server.terminate()
        server.wait()
        store.close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
