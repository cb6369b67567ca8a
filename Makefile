# Every target sets up the environment first (idempotent; seconds when it is ready).
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup train test test-slow lint bench
setup:
	@bash scripts/setup_env.sh

train: setup
	deepspeed capo_fast/train.py $(ARGS)

test: setup
	ruff check .
	python -m pytest -q -m "not slow" tests

test-slow: setup
	HYPOTHESIS_PROFILE=explore python -m pytest -q -m slow tests

lint: setup
	ruff check .

bench: setup
	python -m pytest bench --benchmark-only $(ARGS)
