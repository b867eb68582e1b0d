from parlay.cli import run

run()
