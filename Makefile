# neurofuse: two commands.  `make demo` and `make test` set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.neurofuse-installed
# spinning OpenMP threads make torch crawl when another process shares the cores
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test setup clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first: anything that resolves `torch` before 2.13.0 is present would pull a CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[test,hf,federated]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/neurofuse demo --force

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache build src/*.egg-info
