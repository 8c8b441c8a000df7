# Set-up and main jobs. `make train` and `make test` each work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The recipe sized for one GPU (the base model) where an NVIDIA driver answers, the CPU recipe elsewhere.
CONFIG ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 \
            && echo configs/multi30k_en_de_gpu.yaml || echo configs/multi30k_en_de.yaml)

# The CPU build of torch on machines without an NVIDIA driver, the normal (CUDA) build otherwise.
# Override with e.g. `make venv TORCH=torch==2.14.1`.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

# Training data: DATA=DIR if given, else ../shared/data/multi30k when present, else the Hugging Face Hub.
DATA ?= $(wildcard ../shared/data/multi30k)

# Runtime wheels for scripts/gpu_check.sh on a machine without network (Python PYVER, manylinux x86_64).
PYVER ?= 3.12
RUNTIME_PACKAGES := numpy pyyaml sentencepiece sacrebleu tqdm

.PHONY: venv install test test-fast train lint clean browser wheels

venv: $(VENV)/.installed
install: venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Debian's chromium and its driver, for the web page test (browser downloads are not possible in CI).
# Installs with apt as root or through passwordless sudo; a no-op once both are installed. Where it
# cannot install (no apt-get, no root) it says so and succeeds: the web page test then skips
# (and fails under CI=true).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif ! command -v apt-get >/dev/null; then echo "make browser: no apt-get, chromium not installed" >&2; \
	else SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  { $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver; } \
	  || echo "make browser: could not install chromium (needs root or passwordless sudo)" >&2; fi

# -rs lists every skip with its reason. pytest exits 5 when it collects nothing: that is a failure too.
test: venv browser
	$(PY) -m pytest -rs tests; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$status

# The inner loop: every test not marked slow (the ones that train models or start servers).
test-fast: venv
	$(PY) -m pytest -rs -m "not slow" tests; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test-fast: no tests were collected" >&2; exit 1; fi; exit $$status

# The whole recipe: prepare, train, average the last 5 step checkpoints, score the test split.
train: venv
	DATA="$(DATA)" NMT=$(VENV)/bin/nmt PY=$(PY) scripts/reproduce_multi30k.sh $(CONFIG) $(ARGS)

# Kept once downloaded (wheels/ is ignored); gpu_check.sh installs from wheels/pyX.Y offline.
wheels: wheels/py$(PYVER)/.complete
wheels/py%/.complete:
	$(PYTHON) -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version $* \
	  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux_2_28_x86_64 -d wheels/py$* $(RUNTIME_PACKAGES)
	@du -sh wheels/py$*
	touch $@

lint: venv
	$(VENV)/bin/ruff check src tests scripts

clean:
	rm -rf $(VENV) runs
