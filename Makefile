# One entry point. `make demo` and `make test` each set up everything first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# GPU=1: the CUDA build of TensorFlow from requirements-gpu.lock (every other pin the same as
# requirements.lock). The venv remembers its build (its stamp): later make commands keep it;
# GPU=0 switches back. Each build has its own stamp, so switching reinstalls.
GPU ?= $(if $(wildcard $(VENV)/.installed-gpu),1,0)
$(if $(filter-out 0 1,$(GPU)),$(error GPU=$(GPU): use GPU=1 (CUDA build of TensorFlow) or GPU=0 (CPU build)))
LOCK := $(if $(filter 1,$(GPU)),requirements-gpu.lock,requirements.lock)
OTHER_LOCK := $(if $(filter 1,$(GPU)),requirements.lock,requirements-gpu.lock)
STAMP := $(VENV)/.installed$(if $(filter 1,$(GPU)),-gpu)
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export TF_CPP_MIN_LOG_LEVEL := 2
# dvc runs each stage's `python -m stages.X` with this PATH, so the venv's python is used.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: help setup browser demo real leakage-audit test test-fast lint bench lock lock-gpu clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

setup: $(STAMP) browser  ## create .venv and install the pinned set (idempotent; GPU=1: CUDA TensorFlow, GPU=0: back to CPU)

# The web app's browser test drives Debian's chromium through Playwright (never a downloaded browser).
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "warning: no chromium; the browser test needs it: sudo apt-get install chromium" >&2; fi; }

# Switching builds first removes what only the other lock installs (tensorflow-cpu, or tensorflow
# and its nvidia-* CUDA wheels): the two TensorFlow builds write the same files, one venv holds one.
$(STAMP): $(LOCK) pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=python3.x" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	rm -f $(VENV)/.installed $(VENV)/.installed-gpu
	@names() { sed -n 's/==.*//p' "$$1" | tr 'A-Z_.' 'a-z--' | sort -u; }; \
	other=$$(comm -23 <(names $(OTHER_LOCK)) <(names $(LOCK))); \
	extra=$$(comm -12 <(names <($(BIN)/python -m pip freeze)) <(echo "$$other")); \
	if [ -n "$$extra" ]; then echo "removing the other build's packages:" $$extra; \
	  $(BIN)/python -m pip uninstall --quiet --yes $$extra; fi
	$(BIN)/python -m pip install --quiet -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: setup  ## set up, then run the whole pipeline on the embedded synthetic set (offline)
	$(BIN)/dvc repro
	@echo; $(BIN)/python -m tools.summary --metrics metrics --diff HEAD
	@echo; echo "vs the committed run: dvc metrics diff; all metrics: dvc metrics show; plots: dvc plots show"

# A real HAM10000 folder (metadata csv + images, or the Dataverse zips) for `make real`.
DATA ?= ../shared/data/ham10000
PROFILE ?= profiles/real-cpu.yaml

real: setup  ## the whole pipeline on real HAM10000 (DATA=folder) with the CPU profile, as a DVC experiment (~40-50 min on 2 cores)
	@test -e "$(DATA)" || { echo "error: DATA=$(DATA): not found; give a HAM10000 folder: make real DATA=/path/to/ham10000" >&2; exit 1; }
	$(BIN)/python -m tools.profile $(PROFILE) --set download.source=local:$(DATA) --record results/$(notdir $(basename $(PROFILE))).json
	@echo; $(BIN)/python -m tools.summary --metrics metrics
	@echo; echo "compare with the committed run: dvc metrics diff; keep it: dvc exp show / dvc exp branch"

# The run-to-run noise of training on the current data and params: train -> calibrate once per
# seed (train.seed_offset 1..SEEDS) as DVC experiments noise-s<N> (the workspace is not touched),
# the spread of every headline metric to metrics/noise.json (commit it: the reproduction verdict
# and make compare read its bands). NOISE_SET="train.common.epochs=2" overrides params for the runs.
SEEDS ?= 3
NOISE_SET ?=
.PHONY: noise
noise: setup  ## measure the training noise: SEEDS runs of train -> calibrate (demo: ~12 min per seed on 2 cores)
	$(BIN)/python -m tools.noise --seeds $(SEEDS) $(addprefix --set ,$(NOISE_SET))

# Two runs compared on the same test images: per headline metric A, B, B-A, the paired
# lesion-bootstrap 95% CI of B-A and a verdict (significant only when the CI excludes 0 and B-A
# is larger than the noise band of `make noise`). A, B: a git revision, a DVC experiment name
# (dvc exp list) or workspace. RESCORE=1 (runs on other data versions): score A's bundle on B's
# test split, leaving out what A trained on. JSON=FILE.json also writes the comparison.
.PHONY: compare
A ?= HEAD
B ?= workspace
compare: setup  ## paired comparison of two runs: make compare A=HEAD~1 B=workspace (git revisions or experiment names; RESCORE=1, JSON=out.json)
	$(BIN)/python -m tools.compare $(A) $(B) $(if $(filter-out 0,$(RESCORE)),--rescore) $(if $(JSON),--json $(JSON))

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
	  $(BIN)/pip-audit --requirement $(LOCK) --no-deps --disable-pip --strict --progress-spinner off \
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
	$(BIN)/ruff check stages skinlesion flows serve tools tests bench

bench: setup  ## benchmarks (need ../shared/data/ham10000); results go to bench/RESULTS.md
	$(BIN)/python -m bench.run $(BENCH)

lock:  ## re-resolve requirements.in into requirements.lock and requirements-gpu.lock (needs the registries)
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv && .lockenv/bin/pip install -q -r requirements.in
	(echo "# Generated by 'make lock' from requirements.in. Do not edit by hand."; .lockenv/bin/pip freeze) > requirements.lock
	rm -rf .lockenv
	$(MAKE) --no-print-directory lock-gpu

# The GPU lock: requirements.in with tensorflow-cpu swapped for tensorflow[and-cuda] at the version
# requirements.lock pins, every other package held to its requirements.lock pin (-c), resolved from
# the index's metadata (pip --dry-run: the GBs of CUDA wheels are not downloaded). pip, setuptools
# and wheel are left out, as pip freeze leaves them out of requirements.lock.
lock-gpu: requirements.lock requirements.in  ## re-resolve requirements-gpu.lock from requirements.lock (needs the registries)
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv && .lockenv/bin/pip install -q --upgrade pip
	tf=$$(sed -n 's/^tensorflow[-_]cpu==//p' requirements.lock); \
	test -n "$$tf" || { echo "error: requirements.lock: no tensorflow-cpu==VERSION line" >&2; exit 1; }; \
	sed "s/^tensorflow[-_]cpu==.*/tensorflow[and-cuda]==$$tf/" requirements.in > .lockenv/gpu.in; \
	grep -v '^tensorflow[-_]cpu==' requirements.lock > .lockenv/constraints.txt; \
	.lockenv/bin/pip install -q --dry-run --ignore-installed --report .lockenv/report.json \
	  -c .lockenv/constraints.txt -r .lockenv/gpu.in
	(echo "# Generated by 'make lock-gpu' from requirements.in and requirements.lock (tensorflow[and-cuda] at the"; \
	 echo "# tensorflow-cpu version, every other pin the same) with $$(.lockenv/bin/python -c 'import platform as p; \
	  print("Python", ".".join(p.python_version_tuple()[:2]), "on", p.system(), p.machine())'). Do not edit by hand."; \
	 .lockenv/bin/python -c 'import json; r = json.load(open(".lockenv/report.json")); \
	  pins = {p["metadata"]["name"]: p["metadata"]["version"] for p in r["install"]}; \
	  [print(f"{n}=={pins[n]}") for n in sorted(pins, key=str.lower) if n not in ("pip", "setuptools", "wheel")]' \
	) > requirements-gpu.lock.tmp && mv requirements-gpu.lock.tmp requirements-gpu.lock
	rm -rf .lockenv

clean:  ## remove the venv (DVC cache and outputs stay)
	rm -rf $(VENV)
