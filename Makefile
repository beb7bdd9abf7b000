# One entry point. `make demo` and `make test` each set up everything first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export TF_CPP_MIN_LOG_LEVEL := 2
# dvc runs each stage's `python -m stages.X` with this PATH, so the venv's python is used.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: help setup browser demo real leakage-audit test test-fast lint bench lock clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

setup: $(STAMP) browser  ## create .venv and install the pinned set (idempotent)

# The web app's browser test drives Debian's chromium through Playwright (never a downloaded browser).
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "warning: no chromium; the browser test needs it: sudo apt-get install chromium" >&2; fi; }

$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=python3.x" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: setup  ## set up, then run the whole pipeline on the embedded synthetic set (offline)
	$(BIN)/dvc repro
	@echo; $(BIN)/python -m stages.summary --metrics metrics --diff HEAD
	@echo; echo "vs the committed run: dvc metrics diff; all metrics: dvc metrics show; plots: dvc plots show"

# A real HAM10000 folder (metadata csv + images, or the Dataverse zips) for `make real`.
DATA ?= ../shared/data/ham10000
PROFILE ?= profiles/real-cpu.yaml

real: setup  ## the whole pipeline on real HAM10000 (DATA=folder) with the CPU profile, as a DVC experiment (~40-50 min on 2 cores)
	@test -e "$(DATA)" || { echo "error: DATA=$(DATA): not found; give a HAM10000 folder: make real DATA=/path/to/ham10000" >&2; exit 1; }
	$(BIN)/python -m stages.profile $(PROFILE) --set download.source=local:$(DATA) --record results/$(notdir $(basename $(PROFILE))).json
	@echo; $(BIN)/python -m stages.summary --metrics metrics
	@echo; echo "compare with the committed run: dvc metrics diff; keep it: dvc exp show / dvc exp branch"

leakage-audit: setup  ## train one model on an image-level vs the lesion-level split of real data (DATA=folder): reports/leakage_audit/
	$(BIN)/python -m bench.leakage_audit --data $(DATA)

test: setup  ## set up, then run the test suite (pytest's 5, "no tests collected", is not a failure)
	$(BIN)/python -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

# `make test` audits the pinned set first.
test: audit

.PHONY: audit
# Known vulnerabilities in requirements.lock, from PyPI's advisory data (`make audit
# AUDIT_SERVICE=osv` for OSV's). Any advisory fails the build: bump the pin (mind DESIGN.md's
# traps), or accept it in AUDIT_IGNORE below with its reason (docs/operations.md, "Dependency
# audit"). --strict: a package the service cannot answer for fails too.
# AUDIT_OFFLINE: auto (default) first asks the service about one pinned package and, when it
# cannot answer (a network that reaches the package index but not its advisory API, like the
# CI sandbox), skips the audit with a loud warning instead of failing every build;
# 0 = always audit (fail when unreachable: use it where the internet is reachable); 1 = skip.
AUDIT_SERVICE ?= pypi
AUDIT_OFFLINE ?= auto
AUDIT_PROBE_URL = $(if $(filter osv,$(AUDIT_SERVICE)),https://api.osv.dev/v1/vulns/PYSEC-2023-74,https://pypi.org/pypi/pip/24.0/json)
# Accepted advisories, one line each: AUDIT_IGNORE += ID  # package version: reason (date, who)
AUDIT_IGNORE :=
audit: setup  ## known vulnerabilities in requirements.lock (pip-audit; AUDIT_OFFLINE=auto|0|1)
	@offline="$(AUDIT_OFFLINE)"; \
	if [ "$$offline" = auto ]; then \
	  if $(BIN)/python -c "import urllib.request as u; u.urlopen('$(AUDIT_PROBE_URL)', timeout=15)" 2>/dev/null; \
	  then offline=0; else offline=1; \
	    echo "WARNING: the '$(AUDIT_SERVICE)' vulnerability service is not reachable from here ($(AUDIT_PROBE_URL)); dependency audit SKIPPED. Run 'make audit AUDIT_OFFLINE=0' where it is." >&2; fi; \
	elif [ "$$offline" = 1 ]; then \
	  echo "WARNING: dependency audit SKIPPED (AUDIT_OFFLINE=1): requirements.lock was not checked for known vulnerabilities" >&2; \
	fi; \
	if [ "$$offline" != 1 ]; then \
	  $(BIN)/pip-audit --requirement requirements.lock --no-deps --disable-pip --strict --progress-spinner off \
	    --vulnerability-service $(AUDIT_SERVICE) $(addprefix --ignore-vuln ,$(AUDIT_IGNORE)) \
	  || { echo "error: dependency audit failed (pip-audit above): a known vulnerability (bump the pin, or accept it in the Makefile's AUDIT_IGNORE with its reason), or the '$(AUDIT_SERVICE)' service could not answer for every package" >&2; exit 1; }; \
	fi

# `make test` leaves out the tests marked heavy (fault injection, the Prefect server on PostgreSQL,
# load: minutes each; CI's make test stays under ~40 min on 2 cores); `make test-slow` runs them
# with every other slow test. A PYTEST_ADDOPTS of your own comes first; the command line wins.
test: export PYTEST_ADDOPTS := $(PYTEST_ADDOPTS) -m "not heavy"

.PHONY: test-slow
test-slow: setup  ## the slow tests, the heavy ones too (faults, PostgreSQL server, load; ~30 min on 2 cores)
	$(BIN)/python -m pytest -m "slow or heavy"; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

test-fast: setup  ## the tests that take seconds
	$(BIN)/python -m pytest -m "not slow and not e2e"

lint: setup  ## ruff
	$(BIN)/ruff check stages flows serve tests bench

bench: setup  ## benchmarks (need ../shared/data/ham10000); results go to bench/RESULTS.md
	$(BIN)/python -m bench.run $(BENCH)

lock:  ## re-resolve requirements.in into requirements.lock (needs the registries)
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv && .lockenv/bin/pip install -q -r requirements.in
	(echo "# Generated by 'make lock' from requirements.in. Do not edit by hand."; .lockenv/bin/pip freeze) > requirements.lock
	rm -rf .lockenv

clean:  ## remove the venv (DVC cache and outputs stay)
	rm -rf $(VENV)
