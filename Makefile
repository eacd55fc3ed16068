# The two commands of the README: `make demo` (score the shipped molecular demo set: 300 K,
# 1200 K and held-out molecules, GFN2-xTB labels, with the bundled model)
# and `make test`. Both create .venv when it is missing. torch is installed first and pinned:
# on these machines torch==2.13.0 is a local CPU wheel, any other request pulls CUDA packages.
# The adapter extras (orb-models, metatomic/metatrain) are installed too, with torch kept pinned,
# so that the adapter tests run in CI (about a minute more on a fresh venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.atomuq-installed

.PHONY: install demo test bench docs docs-options clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,orb,metatomic,view]" torch==2.13.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/atomuq models
	$(VENV)/bin/atomuq score src/atomuq/data/structures/molecular_demo.extxyz -o out/demo_scored.extxyz

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_force_delta.py

# Rewrite the outputs shown in README.md and docs/*.md from real runs (a few minutes), or only the
# option tables read from the CLI (seconds); tests/test_readme_commands.py checks both.
docs: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) scripts/readme_examples.py

docs-options: $(STAMP)
	$(PY) scripts/readme_examples.py --options

clean:
	rm -rf out .pytest_cache
