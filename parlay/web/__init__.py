"""The human-study web app (``parlay serve``): people play the models through the same game core.

- ``study.py``: the study file (conditions, design, bonus), blinded balanced assignment, the
  comprehension check;
- ``store.py``: SQLAlchemy storage of participants, games and moves (SQLite WAL by default);
- ``hub.py``: live games rebuilt from their moves, and one batching worker per model agent;
- ``app.py``: the FastAPI routes, authentication, limits and security headers;
- ``results.py``: per-condition results, bonuses and exports (Episodes JSONL, CSV);
- ``static/``: the participant and admin pages (plain HTML, CSS and JavaScript).
"""
