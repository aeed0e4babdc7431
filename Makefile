# axguard: `make serve` runs the demo service on localhost:50051, `make test` runs every test.
# Both create the virtual environment (.venv) and install what they need on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf

.PHONY: serve test lint proto train-demo venv tools system-deps calibrate-demo bench-flag bench-gax clean

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

# Headless Chromium renders the HTML report in the tests (Debian package; needs root or sudo).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium; }

serve: $(STAMP)
	$(BIN)/axguard serve $(ARGS)

test: $(STAMP) $(BUF) system-deps
	PATH="$(CURDIR)/.tools/node_modules/.bin:$$PATH" $(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP) $(BUF)
	$(BIN)/ruff check service clients tests scripts
	$(BUF) lint

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

train-demo: $(STAMP)
	$(BIN)/python -m axguard.demo.train

# Recalibrate the bundled demo model on its calibration split.
calibrate-demo: $(STAMP)
	$(BIN)/axguard calibrate --data builtin:digits --out service/axguard/demo/assets/calibration.json

# Flag quality of the demo model and an under-trained one, written to bench/results/.
bench-flag: $(STAMP)
	$(BIN)/python bench/flag_quality.py

# GAX steps and seconds on the demo model and a ResNet-18, written to bench/results/.
bench-gax: $(STAMP)
	$(BIN)/python bench/gax.py

clean:
	rm -rf $(VENV) .tools .pytest_cache
