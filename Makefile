# Two entry points for a fresh machine: `make demo` and `make test`. Each installs what it needs first (re-runs skip
# finished steps) into the active virtualenv, or into .venv/ (created here) when none is active, so a system Python
# that refuses pip installs (PEP 668) works too.
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := $(CURDIR)/.venv
endif
export VENV
PY := $(VENV)/bin/python
FLASHLM := $(VENV)/bin/flashlm

.PHONY: setup setup-test demo test bench

setup:
	@bash scripts/setup.sh runtime

setup-test:
	@bash scripts/setup.sh test

demo: setup
	$(FLASHLM) generate -p "The three primary colours are" -n 48 --temp 0
	printf 'Write a haiku about the sea.\n' | $(FLASHLM) chat -n 64 --temp 0

test: setup-test
	$(PY) -m pytest -q

bench: setup
	$(FLASHLM) bench -t 2
