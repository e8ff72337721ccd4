# tl-finetune: `make demo` and `make test` work on a fresh machine; each creates .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo demo-text demo-s3 test bench wheel clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.demo

# Text: all-MiniLM-L6-v2 (offline) against the same architecture from scratch, on standard-library docstrings.
demo-text: $(STAMP)
	$(PY) -m jobs.demo --text

# The same demo with every dataset, checkpoint and result on a local S3 server, run through a local Ray head.
demo-s3: $(STAMP)
	$(PY) -m cluster.local up --s3 > /dev/null
	eval "$$($(PY) -m cluster.local env)"; $(PY) -m jobs.demo; status=$$?; $(PY) -m cluster.local down; exit $$status

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m bench.core_throughput
	$(PY) -m bench.trainer_overhead
	$(PY) -m bench.s3_checkpoint
	$(PY) -m bench.sweep_asha

# The wheel that cluster.yaml installs on every node (file_mounts ~/wheels: dist/).
wheel: $(STAMP)
	rm -rf dist build
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w dist .

clean:
	rm -rf runs data/digits .pytest_cache dist build
