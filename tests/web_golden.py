"""A seeded web study played through the HTTP API, for comparing two versions of the server.

    python -m tests.web_golden OUT_DIR            # with this checkout's parlay
    PYTHONPATH=/tmp/web-base python -m tests.web_golden OUT_DIR   # with another commit's

Only the command line (``parlay study tokens``, ``parlay serve``) and the HTTP API are used, so the
same script drives an older commit. Three participants of a two-condition ``between`` study (bots
only) each play two games with moves chosen from the view alone (a message, then half of each
count, or the proposal owed); the run writes ``OUT_DIR/export.jsonl`` (the admin export) and
``OUT_DIR/moves.jsonl`` (every stored move, without its time). Two versions behave the same when
both files are byte-identical.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from tests.web_support import free_port, start_process

ADMIN = "golden-admin-token-0123456789abcdef"
STUDY = "name: golden\nseed: 7\ngames_per_participant: 2\nconditions:\n" + "".join(
    f"  - {{name: {name}, agent: {spec}}}\n" for name, spec in (("hard", "bot:hard"), ("coop", "bot:cooperative"))
)
ANSWERS = {"mismatch": 1, "objective": 0, "values": 1}
"""The comprehension check's right answers for the semi-competitive objective (study.py)."""


def play(client: httpx.Client, token: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    assert client.post("/api/consent", json={"agree": True}, headers=headers).status_code == 200
    assert client.post("/api/check", json={"answers": ANSWERS}, headers=headers).json()["passed"]
    while not (data := client.post("/api/games/next", headers=headers).json())["done"]:
        game, step = data["game"], 0
        while not game["finished"]:
            if not game["your_turn"]:
                game = client.get(f"/api/games/{game['id']}?after={game['version']}", headers=headers).json()
                continue
            if game["may_propose"] and (game["proposal_owed"] or game["messages"] >= 3):
                body = {"kind": "proposal", "kept": [c // 2 for c in game["counts"]]}
            else:
                body = {"kind": "message", "text": f"Message {step}: may I have the books?"}
            response = client.post(
                f"/api/games/{game['id']}/moves", json={"move_id": f"move-{step:04d}", **body}, headers=headers
            )
            assert response.status_code == 200, response.text
            game, step = response.json()["game"], step + 1


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "study.db"
        db = f"sqlite:///{path}"
        (Path(tmp) / "study.yaml").write_text(STUDY)
        env = {**os.environ, "PARLAY_ADMIN_TOKEN": ADMIN}
        args = ["study", "tokens", "--study", f"{tmp}/study.yaml", "--db", db, "-n", "3", "--out", f"{tmp}/t.csv"]
        subprocess.run([sys.executable, "-m", "parlay", *args], check=True, env=env)
        tokens = [line.split(",")[1] for line in (Path(tmp) / "t.csv").read_text().splitlines()[1:]]
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        command = ["-m", "parlay", "serve", "--study", f"{tmp}/study.yaml", "--db", db, "--port", str(port)]
        server = start_process([*command, "--no-check"], f"{base}/api/me", env={"PARLAY_ADMIN_TOKEN": ADMIN})
        try:
            with httpx.Client(base_url=base, timeout=30) as client:
                for token in tokens:
                    play(client, token)
                export = client.get("/api/admin/export.jsonl", headers={"Authorization": f"Bearer {ADMIN}"})
                assert export.status_code == 200
                (out / "export.jsonl").write_text(export.text)
        finally:
            server.terminate()
            server.wait()
        with sqlite3.connect(path) as con:
            rows = con.execute("SELECT game_id, seq, player, text, tokens, move_id FROM moves ORDER BY game_id, seq")
            (out / "moves.jsonl").write_text("".join(json.dumps(list(r)) + "\n" for r in rows))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
