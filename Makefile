# Two commands on a fresh clone: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SKD := $(VENV)/bin/skd
DEMO := runs/demo

.PHONY: install test demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

# Two pytest processes, each test file in one of them (module fixtures are built once): the suite is
# mostly single-threaded, so this about halves its time on a 2-core machine. TEST_WORKERS=0 runs it in one.
TEST_WORKERS ?= 2

test: install
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# The whole pipeline on the built-in synthetic dataset, on the CPU: a teacher, its cache, a baseline
# student and the three distilled ablations (+PI, +PI+PA, +PI+PA+HO), all evaluated in one table.
demo: install
	$(PY) -m pipeline.demo --out $(DEMO)

clean:
	rm -rf $(DEMO) data/synthetic.zarr data/synthetic.zarr.partial
