# Tandem: httpd + relayd.  `make run` and `make test` set everything up.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
JOBS    ?= 2

.PHONY: all venv deps run test unit regress netns fuzz bench bench-smoke configtest clean

all: test

# The virtual environment with the pinned dependencies (re-made when
# pyproject.toml changes).  Debian's python3 needs python3-venv for this.
$(STAMP): pyproject.toml
	@$(PY) -c 'import ensurepip, venv' 2>/dev/null || \
	  (apt-get update -q && apt-get install -y -q python3-venv python3-dev)
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	@touch $@

venv: $(STAMP)

# System packages the tests and the benchmark use (installed if missing).
deps:
	@sh .ci/install-deps

run: venv
	$(VPY) conf/demo.py

test: venv deps
	$(VPY) -m pytest -q -n $(JOBS) --dist loadgroup -p no:cacheprovider tests

unit: venv
	$(VPY) -m pytest -q tests/unit

regress: venv deps
	$(VPY) -m pytest -q -n $(JOBS) --dist loadgroup tests/regress

# Every parser that sees untrusted input, fuzzed at length (about 10
# minutes; FUZZ_SCALE=0.1 for a quick one).  `make test` runs a short
# version (tests/fuzz/test_fuzz.py, FUZZ_SECONDS per target).
fuzz: venv
	$(VPY) -m tests.fuzz

# The network-namespace tests alone (root: nftables, routes, veth pairs).
netns: venv deps
	$(VPY) -m pytest -q -m netns tests/regress

configtest: venv
	$(VPY) -m httpd -n -f conf/httpd.conf
	sed 's|"/etc/acme-client.conf"|"conf/acme-client.conf"|' conf/httpd-acme.conf > conf/.httpd-acme.test
	$(VPY) -m httpd -n -f conf/.httpd-acme.test; rc=$$?; rm -f conf/.httpd-acme.test; exit $$rc
	$(VPY) -m relayd -n -f conf/relayd.conf
	$(VPY) -m acme_client -n -f conf/acme-client.conf

bench: venv deps
	$(VPY) bench/bench.py $(BENCH_ARGS)
	$(VPY) bench/hce.py

bench-smoke: venv deps
	$(VPY) bench/bench.py --smoke $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
