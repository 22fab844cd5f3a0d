# Parley — `make run` starts everything, `make test` runs the whole suite. Both set up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')
GEN_STAMP := gen/.stamp

.PHONY: venv protos run test lint bench clean db-stop help

help:
	@echo "make run    - set up, start PostgreSQL (embedded unless PARLEY_DATABASE_URL) and all services"
	@echo "make test   - set up, then run the whole test suite"
	@echo "make lint   - ruff"
	@echo "make bench  - run the benchmarks, write bench/results.md"

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	@# The repo root and the generated protos are importable from the venv.
	@printf '%s\n%s\n' "$(CURDIR)" "$(CURDIR)/gen" > "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/parley_paths.pth"
	@touch $@

venv: $(STAMP)

$(GEN_STAMP): $(STAMP) $(PROTOS)
	@rm -rf gen && mkdir -p gen
	$(BIN)/python -m grpc_tools.protoc -Iprotos \
		--python_out=gen --pyi_out=gen --grpc_python_out=gen \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=gen \
		$(PROTOS)
	@touch $@

protos: $(GEN_STAMP)

run: protos
	$(BIN)/python -m services.run

test: protos
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check services tests bench

bench: protos
	$(BIN)/python bench/run_all.py

db-stop: venv
	$(BIN)/python -m services.admin.devdb stop

clean:
	rm -rf gen .pytest_cache
