# RahatBack — `make help` lists the targets.
export UV_PYTHON_DOWNLOADS := never
UV ?= uv
RUN := $(UV) run --frozen

.PHONY: help install up up-jwt demo test lint fmt bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

install:  ## install uv (if missing) and the locked dependencies into .venv
	@command -v $(UV) >/dev/null || python3 -m pip install --quiet uv
	$(UV) sync --frozen

up: install  ## start the local stack: nats-server, API on SQLite, one enrolled agent (Ctrl-C stops it)
	$(RUN) python scripts/devstack.py up

up-jwt: install  ## like `make up`, with NATS in operator/JWT mode (docs/nats-security.md)
	$(RUN) python scripts/devstack.py up --nats-jwt

demo:  ## with `make up` running: back up a SQLite demo database, restore it, compare rows
	$(RUN) python scripts/demo.py

test: install  ## run every test (unit, integration with real nats-server + PostgreSQL, end to end)
	$(RUN) pytest -n 2 --dist loadfile

lint: install  ## ruff + mypy --strict
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) mypy

fmt:  ## format the code
	$(RUN) ruff format .
	$(RUN) ruff check --fix .

bench: install  ## benchmarks against a ~1 GB PostgreSQL database; writes docs/benchmarks.md
	$(RUN) python bench/run.py

clean:  ## remove local state (var/)
	rm -rf var
