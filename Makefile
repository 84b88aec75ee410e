# backupninja-kvm. Run as root on Debian 12:
#   make demo     install, then back up a throwaway VM through the real backupninja
#   make test     install what the tests need, then run every test
#   make install  install for real use (handler, helper on the PATH, example)
#   make deb      build dist/backupninja-kvm_VERSION_ARCH.deb (Debian hosts: dpkg -i it)

PYTHON      ?= /usr/bin/python3
VENV        ?= .venv
PREFIX      ?= /usr/local
LIBDIR      ?= /opt/backupninja-kvm
HANDLERDIR  ?= /usr/share/backupninja
DOCDIR      ?= /usr/share/doc/backupninja-kvm
PYTEST_ARGS ?=

.PHONY: all host test-host venv install uninstall deb demo test lint unit example bench clean

all: venv

host:
	bash scripts/setup-host

test-host:
	bash scripts/setup-host --with-test-tools

# The venv sees Debian's python3-libvirt (matching the installed libvirt).
$(VENV)/.done: setup.cfg pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test,fast]' ruff mypy
	touch $@

venv: host $(VENV)/.done

install: host
	$(PYTHON) -m venv --system-site-packages $(LIBDIR)
	$(LIBDIR)/bin/pip install --quiet --disable-pip-version-check --upgrade '.[fast]'
	ln -sf $(LIBDIR)/bin/backupninja-kvm $(PREFIX)/bin/backupninja-kvm
	install -D -m 644 handlers/kvm $(HANDLERDIR)/kvm
	install -D -m 644 handlers/kvm.helper $(HANDLERDIR)/kvm.helper
	install -D -m 644 examples/example.kvm $(DOCDIR)/example.kvm
	install -D -m 644 -t $(DOCDIR)/ride-along examples/ride-along/*
	@echo "installed: $(PREFIX)/bin/backupninja-kvm, $(HANDLERDIR)/kvm (+ kvm.helper for ninjahelper), $(DOCDIR)/example.kvm, $(DOCDIR)/ride-along/"

uninstall:
	rm -f $(PREFIX)/bin/backupninja-kvm $(HANDLERDIR)/kvm $(HANDLERDIR)/kvm.helper
	rm -rf $(LIBDIR) $(DOCDIR)

# Built from a copy of the tracked (and new, not ignored) files, so that
# neither the venv nor build leftovers get in, and the .deb goes to dist/.
DEB_BUILD ?= build/deb
deb:
	rm -rf $(DEB_BUILD) && mkdir -p $(DEB_BUILD)/src dist
	git ls-files -z --cached --others --exclude-standard \
	   | rsync -a --from0 --files-from=- --ignore-missing-args . $(DEB_BUILD)/src
	# Debian's python3 and tools, not another python3 earlier on the PATH
	cd $(DEB_BUILD)/src && env PATH=/usr/sbin:/usr/bin:/sbin:/bin \
	   dpkg-buildpackage -us -uc -b --no-sign
	mv $(DEB_BUILD)/*.deb dist/
	@ls dist/*.deb

demo: install
	bash scripts/demo

lint: venv
	$(VENV)/bin/ruff check src tests bench setup.py
	$(VENV)/bin/ruff format --check src tests bench setup.py
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/python -m pytest -q tests/unit

test: test-host venv lint
	$(VENV)/bin/python -m pytest -ra $(PYTEST_ARGS) tests

# Benchmark on a throwaway VM; BENCH_ARGS e.g. --size 2G --data 1G --window 64M --runs 5
BENCH_ARGS ?=
bench: venv
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)

example: venv
	$(VENV)/bin/backupninja-kvm example-config > examples/example.kvm

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
