# axguard: `make serve` runs the demo service on localhost:50051, `make test` runs every test.
# Both create the virtual environment (.venv) and install what they need on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf

.PHONY: serve test lint proto train-demo venv tools clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

$(BUF):
	mkdir -p .tools
	npm install --silent --no-save --prefix .tools @bufbuild/buf@$(BUF_VERSION)

tools: $(BUF)

serve: $(STAMP)
	$(BIN)/axguard serve $(ARGS)

test: $(STAMP) $(BUF)
	PATH="$(CURDIR)/.tools/node_modules/.bin:$$PATH" $(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP) $(BUF)
	$(BIN)/ruff check service clients tests scripts
	$(BUF) lint

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

train-demo: $(STAMP)
	$(BIN)/python -m axguard.demo.train

clean:
	rm -rf $(VENV) .tools .pytest_cache
