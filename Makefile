# qmpkit: `make lab` opens JupyterLab on notebooks/, `make test` runs every test.
# Both install what they need first (QEMU and fio through apt as root, then
# ./.venv with the package); a second run installs nothing new.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# qemu-system-x86: the tests start real VMs (-drive, -blockdev) as well as the storage daemon.
# chromium: the browser test drives JupyterLab in Debian's Chromium (never a downloaded one)
# libvirt: the libvirt tests start a private libvirtd; libvirt-python builds against libvirt-dev
APT_PACKAGES := qemu-system-common qemu-system-x86 qemu-utils fio chromium \
	libvirt-daemon-system libvirt-clients libvirt-dev pkg-config gcc
TOOLS := qemu-storage-daemon qemu-system-x86_64 qemu-img qemu-io fio chromium \
	libvirtd virsh pkg-config gcc
STAMP := $(VENV)/.qmpkit-installed
LAB_PORT ?= 8888

.PHONY: lab test test-matrix bench system venv clean

lab: system $(STAMP)
	@mkdir -p notebooks
	$(BIN)/jupyter lab --notebook-dir=notebooks --ip=127.0.0.1 --port=$(LAB_PORT) \
		$$( [ "$$(id -u)" = 0 ] && echo --allow-root )

# pytest's "no tests ran" (exit 5) must never pass for green.
test: system $(STAMP)
	$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

# The suite (less the browser test) in a cached chroot of the other Debian release:
# Debian 13 (QEMU 10) on a Debian 12 host, Debian 12 (QEMU 7.2) on a Debian 13 host.
test-matrix:
	APT_PACKAGES="$(APT_PACKAGES)" MATRIX_TOOLS="$(TOOLS)" tools/test-matrix

bench: system $(STAMP)
	@for b in benchmarks/*.py; do [ -e "$$b" ] || continue; echo "== $$b"; $(BIN)/python "$$b" || exit 1; done

system:
	@missing=""; for t in $(TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing $(APT_PACKAGES) (missing:$$missing)"; \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_PACKAGES) || exit 1; \
		else \
			echo "qmpkit needs$$missing. Run this as root, then try again:" >&2; \
			echo "  apt-get update && apt-get install -y $(APT_PACKAGES)" >&2; \
			exit 1; \
		fi; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
