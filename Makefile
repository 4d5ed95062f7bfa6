# The README's two commands: `make demo` and `make test`. Caches (cargo target
# dir, Kubernetes binaries, moto venv) live under ~/.cache/causeway, outside the
# clone, so a second run and CI reuse them.
SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/causeway/target
CARGO ?= cargo
ENV_BIN = $(CARGO_TARGET_DIR)/debug/causeway-env

.PHONY: demo test deps build up down lint unit integration

demo: deps build
	@bash e2e/demo.sh

test: deps
	@bash e2e/run-tests.sh

deps:
	@bash e2e/deps.sh

build:
	@$(CARGO) build --workspace --bins --quiet

up: deps build
	@$(ENV_BIN) up --nodes 3

down:
	@if [ -x $(ENV_BIN) ]; then $(ENV_BIN) down; else $(CARGO) run --quiet -p causeway-tests --bin causeway-env -- down; fi

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --quiet -- -D warnings
