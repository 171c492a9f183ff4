# Two commands on a fresh machine:  `make demo` (set up, then run the tiny preset end to end)
#                                    `make test` (set up, then run the test suite)
# Both create .venv and install into it. torch==2.13.0 goes in first: a CPU build of it lies on the dev and CI
# machines, and once it is installed pip keeps it instead of pulling a multi-GB CUDA build for deepspeed.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

.PHONY: setup demo test clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/crawl2chat run --preset tiny
	$(VENV)/bin/crawl2chat status

test: $(STAMP)
	bash infra/ci/install-services.sh   # Debian packages for the server, UI and local-cluster tests
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) artifacts
