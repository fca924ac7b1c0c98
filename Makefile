# sealbus — the two commands are `make run` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
SEALBUS:= $(VENV)/bin/sealbus
PYTEST := $(PY) -m pytest

.PHONY: setup run test test-fast test-pure lint bench conformance vm-test vm-image fuzz install rpm clean

setup:
	@scripts/setup.sh

run: setup
	$(SEALBUS) run

# Each step is a gate: the import layers (no cycle, no upward import, see
# docs/architecture.md), ruff's rules (complexity included, pyproject.toml),
# and formatting (`ruff format` fixes what the last one reports).
# Quiet when clean: one line per gate; a failure shows what to fix (a file per line for formatting).
LINTED := broker tests benchmarks vagrant scripts
lint: setup
	@$(PY) scripts/check-layers.py
	@$(PY) -m ruff check -q $(LINTED) && echo "lint: ruff check: clean"
	@$(PY) -m ruff format --check -q --output-format concise $(LINTED) \
	  || { echo "lint: run '$(PY) -m ruff format $(LINTED)' to format these files"; exit 1; }
	@echo "lint: ruff format: clean"

# The whole suite: unit, property, fuzz (bounded), interop with real clients,
# security regression (root tiers run when root), and the enforcing SELinux
# VM tier when /dev/kvm is present.
test: setup lint
	$(PYTEST) -q -ra tests
	$(MAKE) test-pure
	$(MAKE) conformance
	@if [ -e /dev/kvm ] || [ -n "$$SEALBUS_VM" ]; then $(MAKE) vm-test; else echo "vm-test: skipped (no /dev/kvm)"; fi

test-fast: setup
	$(PYTEST) -q -x tests -m "not slow"

# `make test` runs the suite on the build `make setup` made (compiled where Cython could compile,
# see setup.py); this runs the tests of the hot-path modules and the live interop tests again on
# the pure Python build (same sources, SEALBUS_PURE_PYTHON=1 ignores the compiled modules).
PURE_TESTS := tests/test_build.py tests/test_wire_*.py tests/test_bus_*.py tests/test_reactor_*.py \
	tests/test_peer_lifecycle.py tests/test_pinned_buffers.py tests/test_interop_clients.py tests/test_smoke_run.py
test-pure: setup
	SEALBUS_PURE_PYTHON=1 $(PYTEST) -q -ra -m "not slow" $(PURE_TESTS)

# Every atheris target (tests/fuzz/) for SEALBUS_FUZZ_SECONDS each (or until SEALBUS_FUZZ_RUNS inputs,
# if set), then the table; and the random mutation fuzzer as long. `make test` runs the same targets
# briefly (tests/test_fuzz_atheris.py). On a shared machine: nice -n 19 make fuzz.
fuzz: setup
	$(PY) -m tests.fuzz.run --seconds $${SEALBUS_FUZZ_SECONDS:-300} $${SEALBUS_FUZZ_RUNS:+--runs $$SEALBUS_FUZZ_RUNS}
	SEALBUS_FUZZ_SECONDS=$${SEALBUS_FUZZ_SECONDS:-300} $(PYTEST) -q tests/test_fuzz.py tests/test_bus_statemachine.py tests/test_payload_statemachine.py

# dbus-daemon's own test programs (Debian's dbus-tests), case by case, against
# dbus-daemon and sealbus; the table is docs/conformance.md.
conformance: setup
	$(PY) scripts/conformance.py --md docs/conformance.md

bench: setup
	$(PY) -m benchmarks.run --md docs/benchmarks.md

vm-image: setup
	vagrant/qemu/build-image.sh

vm-test: setup
	vagrant/qemu/run-vm-test.sh

install: setup
	scripts/install.sh

# Fedora/RHEL packages of the working tree: SRPM, sealbus and sealbus-selinux in build/rpm
# (packaging/README.md; tests/test_rpm.py, part of `make test`, builds and inspects them).
# RPM_PYTHON_VERSION=3.14 targets that Fedora's Python where rpmbuild lacks Fedora's macros.
rpm: setup
	packaging/build-rpm.sh build/rpm

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find broker -name '*.so' -delete
