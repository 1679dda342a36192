# Everything a fresh machine needs: `make demo` runs the main job, `make test` the whole suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench clean vendor

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned first: the CPU wheel, never an unpinned torch (that pulls gigabytes of CUDA)
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/lossguard demo

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) benchmarks/run_all.py

# the dashboard's chart library, committed in stream_app/dashboard/vendor/: fetched again from the npm
# registry (needs npm) and checked against the pinned tarball's sha256
UPLOT_VERSION := 1.6.32
UPLOT_SHA256  := 4b8a8191e425658e3ea8c8c1314b0fc679c861ee3a1af2b20c7b16ba50b5133d
vendor:
	rm -rf .vendor-tmp && mkdir .vendor-tmp
	cd .vendor-tmp && npm pack --silent uplot@$(UPLOT_VERSION) >/dev/null
	echo "$(UPLOT_SHA256)  .vendor-tmp/uplot-$(UPLOT_VERSION).tgz" | sha256sum -c -
	tar -xzf .vendor-tmp/uplot-$(UPLOT_VERSION).tgz -C .vendor-tmp
	cp .vendor-tmp/package/dist/uPlot.iife.min.js .vendor-tmp/package/dist/uPlot.min.css stream_app/dashboard/vendor/
	cp .vendor-tmp/package/LICENSE stream_app/dashboard/vendor/uPlot.LICENSE
	rm -rf .vendor-tmp

clean:
	rm -rf $(VENV) .pytest_cache lossguard-data
