# residual_exp — `make demo` runs the embedded default, `make test` runs the tests.
# Both create the virtualenv first if it is missing (`make install` is idempotent) and install
# the tested dependency set pinned in constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all lock bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e '.[dev]'
	touch $(STAMP)

demo: install
	$(PY) -m residual_exp

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ""

# re-pin constraints.txt to what is installed now (after an upgrade that passed `make test-all`)
lock: install
	$(PY) -m pip freeze --exclude-editable | grep -v '^residual.exp' > constraints.txt

clean:
	rm -rf outputs multirun .pytest_cache
