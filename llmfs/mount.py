"""`llmfs mount STORE MOUNTPOINT [-f] [-o opts]` or `llmfs mount --config FILE [-f]`: serve a store
through FUSE (config files: llmfs/config.py; running as a systemd service: llmfs/service.py).

Without -f the command starts the daemon (this same command with -f) in its own session and
returns once the mount answers, or prints why it failed. The daemon's log goes to STORE/llmfs.log.

Lifecycle of a mount (the daemon):
  1. open the store and take its lock (a second mount is refused with who holds it);
  2. if the last session did not end cleanly (meta "clean" is 0): purge files unlinked while open
     and run fsck's quick checks; anything else wrong refuses the mount and asks for fsck;
  3. mark the store unclean, start the store's group commit (llmfs/store.py: what is not fsync'ed
     is committed within COMMIT_INTERVAL, 5 s), serve FUSE (multithreaded), tell the caller we are ready (and systemd:
     READY=1, from FUSE's init callback);
  4. on unmount or SIGINT/SIGTERM: tell systemd STOPPING=1, flush every buffered write, sync, mark
     clean, release the lock, exit 0.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import subprocess
import sys

from llmfs.cache import DecodeCache, Readahead
from llmfs.cache.decode_cache import DEFAULT_RAM_BUDGET
from llmfs.codec import Registry

from . import config, fsck, service
from .background import Background
from .compactor import COMPACT_AFTER
from .fuseops import FUSE, Operations
from .mkfs import parse_size, positive_int
from .models import THREADS, Models
from .namespace import DIRTY_LIMIT, Filesystem
from .store import COMMIT_INTERVAL, Store, StoreError

log = logging.getLogger("llmfs")

LOG_FILE = "llmfs.log"
# Options we always pass: inode numbers are ours (hard links show as such), unlinked open files
# are ours to keep (no .fuse_hidden files), and the kernel checks permissions. libfuse's high-level
# API gives every *name* its own kernel inode, so a cached attribute of one hard link goes stale
# when another name changes it (nlink after `ln`, which tar and rsync -H rely on): attr_timeout=0
# makes the kernel ask us on every stat.
BASE_OPTIONS = {"use_ino": True, "hard_remove": True, "default_permissions": True,
                "attr_timeout": 0}


class MountError(Exception):
    pass


def parse_options(values: list[str]) -> dict:
    opts = {}
    for value in values:
        for item in value.split(","):
            if not item:
                continue
            key, eq, val = item.partition("=")
            opts[key] = val if eq else True
    return opts


def open_filesystem(store_path: str, dirty_limit: int = DIRTY_LIMIT,
                    cache_size: int | None = None, gpu_cache_size: int | None = None,
                    device: str = "auto", threads: int | None = None
                    ) -> tuple[Filesystem, Models]:
    """Open (and lock) a store for serving, recovering from an unclean shutdown first."""
    store = Store(store_path)
    try:
        models = Models(store, threads=threads or THREADS, device=device)
        registry = Registry(model_resolver=models.resolve)
        if not store.was_clean():
            log.warning("%s was not unmounted cleanly; checking it", store_path)
            problems, _ = fsck.run_checks(store, [fsck.check_orphans], repair=True)
            if problems:
                log.warning("removed %d file(s) that were deleted while open", len(problems))
            problems, _ = fsck.run_checks(store, fsck.QUICK_CHECKS)
            if problems:
                for p in problems:
                    log.error("fsck %s: %s", p.check, p.message)
                raise MountError(f"{store_path} has {len(problems)} problem(s) after an unclean "
                                 f"shutdown; run `llmfs fsck --repair {store_path}`")
            log.info("%s: checks passed", store_path)
        # The device tier holds decoded blocks in GPU memory when CUDA is present (device=None
        # picks it); without a GPU budget there is no device tier.
        cache = DecodeCache(cache_size if cache_size is not None else DEFAULT_RAM_BUDGET,
                            device_budget=gpu_cache_size or 0)
        fs = Filesystem(store, registry, cache, dirty_limit=dirty_limit, readahead=Readahead())
        return fs, models
    except BaseException:
        store.close()
        raise


def serve(args, ready_fd: int | None) -> int:
    """Run the daemon in the foreground until unmounted."""
    mountpoint = os.path.abspath(args.mountpoint)
    user_opts = parse_options(args.options)

    def report(message: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            os.write(ready_fd, message.encode() + b"\n")
            os.close(ready_fd)
            ready_fd = None

    try:
        try:
            os.stat(mountpoint)
        except OSError as e:
            # Under systemd (Restart=on-failure, a mount unit) nobody is there to run umount.
            if e.errno == errno.ENOTCONN and not (service.under_systemd()
                                                  and service.detach_stale(mountpoint)):
                raise MountError(f"{args.mountpoint} is the mount of a daemon that died; run "
                                 f"`llmfs umount {args.mountpoint}` first") from None
        if not os.path.isdir(mountpoint):
            raise MountError(f"mount point {args.mountpoint} is not a directory")
        if os.path.ismount(mountpoint):
            raise MountError(f"{args.mountpoint} is already a mount point")
        fs, models = open_filesystem(args.store, args.dirty_limit, args.cache_size,
                                     args.gpu_cache_size, args.device, args.threads)
    except (StoreError, MountError) as e:
        report(f"error: {e}")
        print(f"llmfs mount: {e}", file=sys.stderr)
        return 1
    store = fs.store
    store.describe_lock_holder(f"mounted at {mountpoint} by pid {os.getpid()}")
    store.set_clean(False)
    store.start_group_commit(args.commit_interval)  # changes reach the disk in groups
    background = Background(fs, models, None if args.no_compaction else args.compact_after)
    served = False

    def ready():
        nonlocal served
        served = True
        log.info("mounted %s on %s", store.path, mountpoint)
        background.start()
        service.notify("READY=1", f"STATUS=serving {store.path} on {mountpoint}")
        report("ok")

    def destroy():
        service.on_stop(mountpoint)
        fs.flush_all()

    ops = Operations(fs, on_ready=ready, on_destroy=destroy)
    options = dict(BASE_OPTIONS, fsname=store.path, subtype="llmfs", **user_opts)
    if args.debug:
        options["debug"] = True  # libfuse traces every request on stderr
    try:
        FUSE(ops, mountpoint, foreground=True, nothreads=False, **options)
    except RuntimeError as e:
        if not served:
            report(f"error: FUSE could not mount {mountpoint} ({e}); see {LOG_FILE} in the store")
            log.error("mount failed: %s", e)
            store.close()
            return 1
        # libfuse 3 returns 8 when SIGTERM/SIGINT/SIGHUP ended its loop; it has unmounted and
        # called destroy by now. That is how systemd stops us: a normal end, not a failure.
        log.info("stopping on a signal (libfuse status %s)", e)
    finally:
        report("error: the daemon stopped before the mount was ready")
    service.on_stop(mountpoint)
    background.stop()
    with background.shutdown_lock:
        try:
            fs.flush_all()
            store.set_clean(True)
        finally:
            fs.cache.close()
            store.close()
    service.stopped()
    log.info("unmounted %s", mountpoint)
    return 0


def start_daemon(args) -> int:
    """Start `llmfs mount -f` detached and wait until it reports the mount ready."""
    if not os.path.isfile(os.path.join(args.store, "data.mdb")):
        print(f"llmfs mount: {args.store} is not an llmfs store (no data.mdb); create one with "
              f"`llmfs mkfs {args.store}`", file=sys.stderr)
        return 1
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "llmfs.cli"] + (["--debug"] if args.debug else []) + [
        "mount", args.store, args.mountpoint, "-f", "--ready-fd", str(write_fd),
        "--dirty-limit", str(args.dirty_limit)]
    if args.cache_size is not None:
        cmd += ["--cache-size", str(args.cache_size)]
    if args.gpu_cache_size is not None:
        cmd += ["--gpu-cache-size", str(args.gpu_cache_size)]
    cmd += ["--device", args.device]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    cmd += ["--commit-interval", str(args.commit_interval)]
    cmd += ["--compact-after", str(args.compact_after)] + (
        ["--no-compaction"] if args.no_compaction else [])
    for o in args.options:
        cmd += ["-o", o]
    log_path = os.path.join(args.store, LOG_FILE)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, pass_fds=(write_fd,), start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as r:
        answer = r.readline().decode().strip()
    if answer == "ok":
        return 0
    proc.wait(timeout=30)
    print(f"llmfs mount: {answer.removeprefix('error: ') or 'the daemon exited'}", file=sys.stderr)
    return 1


def register(sub) -> None:
    p = sub.add_parser("mount", help="mount a store (returns once the mount is usable)")
    p.add_argument("store", nargs="?", help="the store (or `store` in --config)")
    p.add_argument("mountpoint", nargs="?", help="where to mount (or `mountpoint` in --config)")
    p.add_argument("--config", metavar="FILE",
                   help="TOML file with store, mountpoint and options (e.g. /etc/llmfs/NAME.toml); "
                        "arguments given here override it")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground (Ctrl-C unmounts)")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="FUSE mount options, e.g. allow_other")
    p.add_argument("--dirty-limit", type=parse_size, default=None,
                   help="buffered write bytes before files are flushed (default 64M)")
    p.add_argument("--cache-size", type=parse_size, default=None,
                   help="bytes of decoded blocks kept in RAM (default 64M)")
    p.add_argument("--gpu-cache-size", type=parse_size, default=None,
                   help="bytes of decoded blocks kept in GPU memory when CUDA is present "
                        "(default 0: none)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the LM runs: a CUDA GPU when present (auto), or the CPU")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads of the LM (default 1). More only on cores nothing else "
                        "needs: torch's threads spin while they wait, and on a busy 2-core "
                        "machine 2 threads compacted a block 27x slower than 1")
    p.add_argument("--compact-after", type=float, default=COMPACT_AFTER, metavar="SECONDS",
                   help="compress blocks with the LM once unchanged this long (default 600)")
    p.add_argument("--commit-interval", type=float, default=COMMIT_INTERVAL, metavar="SECONDS",
                   help="changes not fsync'ed reach the disk within this many seconds: what a "
                        "crash can lose (default 5, like ext4's commit=)")
    p.add_argument("--no-compaction", action="store_true",
                   help="no background compaction (`llmfs compact` still works)")
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.config:
        try:
            cfg = config.load(args.config)
        except config.ConfigError as e:
            print(f"llmfs mount: {e}", file=sys.stderr)
            return 1
        config.apply(cfg, args)
        if cfg.log_level and not args.debug:
            logging.getLogger().setLevel(service.LEVELS[cfg.log_level])
        args.debug = args.debug or cfg.log_level == "debug"
        for key in cfg.not_yet:
            log.warning("%s: %s is accepted but not implemented yet; it has no effect",
                        args.config, key)
    if args.store is None or args.mountpoint is None:
        print("llmfs mount: give STORE and MOUNTPOINT, or --config FILE that names them",
              file=sys.stderr)
        return 2
    if args.dirty_limit is None:
        args.dirty_limit = DIRTY_LIMIT
    if args.foreground:
        return serve(args, args.ready_fd)
    return start_daemon(args)
