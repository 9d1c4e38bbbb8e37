# The two commands of the README, plus helpers. Each target sets up what it needs first.
.PHONY: setup demo test bench clean

setup:
	@bash scripts/bootstrap.sh

demo: setup
	.venv/bin/towerstream demo

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/towerstream bench

clean:
	rm -rf .pytest_cache build *.egg-info
