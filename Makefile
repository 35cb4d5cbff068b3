# Two entry points for a fresh machine: `make demo` and `make test` (each sets itself up first).
PYTHON ?= python3

.PHONY: setup demo test bench

setup:
	bash scripts/setup.sh

demo: setup
	flashlm generate -p "The three primary colours are" -n 48 --temp 0
	printf 'Write a haiku about the sea.\n' | flashlm chat -n 64 --temp 0

test: setup
	$(PYTHON) -m pytest -q

bench: setup
	flashlm bench -t 2
