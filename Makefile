# residual_exp — `make demo` runs the embedded default, `make test` runs the tests.
# Both create the virtualenv first if it is missing (`make install` is idempotent).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: install
	$(PY) -m residual_exp

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ""

clean:
	rm -rf outputs multirun .pytest_cache
