"""`llmfs mount STORE MOUNTPOINT [-f] [-o opts]` or `llmfs mount --config FILE [-f]`: serve a store
through FUSE (config files: llmfs/config.py; running as a systemd service: llmfs/service.py).

Without -f the command starts the daemon (this same command with -f) in its own session and
returns once the mount answers, or prints why it failed. The daemon's log goes to STORE/llmfs.log.

Lifecycle of a mount (the daemon):
  1. open the store and take its lock (a second mount is refused with who holds it);
  2. if the last session did not end cleanly (meta "clean" is 0): purge files unlinked while open
     and files created but never stored (store.py: unstored), and run fsck's quick checks; anything else wrong refuses the mount and asks for fsck;
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
import stat
import subprocess
import sys

from llmfs.cache import DecodeCache, Readahead
from llmfs.cache.decode_cache import DEFAULT_RAM_BUDGET
from llmfs.codec import Registry

from . import config, fsck, heap, mounts, service
from .background import Background
from .compactor import COMPACT_AFTER
from .fuseops import FUSE, Operations
from .models import THREADS, Models, store_spec
from .namespace import DIRTY_LIMIT, Filesystem
from .store import COMMIT_INTERVAL, GROUP_BYTES, LOCK_FILE, Store, StoreError
from .units import parse_size, positive_int

log = logging.getLogger("llmfs")

LOG_FILE = "llmfs.log"
# What a store directory holds besides control.sock (made 0600 by control.py)
STORE_FILES = ("data.mdb", "lock.mdb", LOCK_FILE, LOG_FILE)
# Options we always pass: inode numbers are ours (hard links show as such), and the kernel checks
# permissions. No hard_remove: libfuse then hides an open file that loses its last name by a
# rename that fuseops.py turns into an unlink plus an in-memory alias, so fstat(2) on it keeps
# working (no .fuse_hidden file is ever listed or stored).
#
# The kernel caches attributes and names for ATTR_TIMEOUT seconds. Without it every path walk
# asked us for the attributes of each directory on the way (default_permissions checks them):
# a small file's create took twelve requests, six of them GETATTRs. libfuse's high-level API gives
# every *name* its own kernel inode, so a change through one hard link (nlink after `ln`, which
# tar and rsync -H rely on; chmod; a write) leaves the others' cached attributes stale:
# fuseops.py remembers the names of linked files and invalidates the others' on every change.
# Files with one name, and directories, change only through their own kernel inode, which the
# kernel keeps current. One second, like libfuse's default: a case the invalidation missed would
# show stale attributes for at most that long.
ATTR_TIMEOUT = 1.0
#
# max_threads: libfuse answers requests on at most this many worker threads (its default is 10).
# A cold read of an LM block waits seconds to minutes for the model (decodes take turns on the
# engine), and it waits on a worker: with 10 workers, ten such reads left none for ls, stat or a
# write, which then hung behind the model for everyone. Decoding is bounded elsewhere (one engine,
# batches); the workers only wait, and a waiting thread costs a stack's worth of address space
# and no CPU. With FUSE_THREADS workers, metadata, writes and zstd/raw reads never wait behind LM
# decodes unless more than FUSE_THREADS - 1 cold LM reads are in flight at once.
FUSE_THREADS = 64
# The kernel reads ahead of a sequential reader in requests of at most its readahead window, 128 KiB
# by default: a 256 MiB file was 2,048 READ requests, each paying the way through the kernel, libfuse,
# ctypes and Python. The kernel takes the smaller of what the daemon asks for in its reply to INIT
# (Operations' max_readahead) and the read_ahead_kb of the mount's device (the FUSE bdi in sysfs),
# which only root may raise: the daemon raises it when it can and otherwise keeps the kernel's
# default. A READ request is at most 1 MiB (max_pages, libfuse's max_write-sized buffer) whatever
# the window; a window of several MiB keeps several of them in flight at once, so that reads of
# zstd blocks, whose decoding releases the GIL, run on more than one libfuse worker (and core)
# while the reader copies the last reply: with a 1 MiB window the kernel asked for the next MiB
# only when the reader reached the current one. The window is the kernel's page cache, not the
# daemon's memory; a reader that is not sequential never grows it that far.
READAHEAD = 4 << 20
BASE_OPTIONS = {
    "use_ino": True,
    "default_permissions": True,
    "attr_timeout": ATTR_TIMEOUT,
    "entry_timeout": ATTR_TIMEOUT,
    "max_threads": FUSE_THREADS,
}


# The -o options a user may give (on the command line, in a config file's `options`, or in fstab
# through mount.fuse.llmfs): the kernel's mount flags and the FUSE mount options that libfuse 3
# passes on (lib/mount.c, lib/fuse_lowlevel.c). Everything else is refused before the store is
# opened: libfuse's own tuning (attr_timeout, kernel_cache, umask, uid, modules, ...) would change
# what BASE_OPTIONS guarantee, and fsname/subtype are how `llmfs umount` and `llmfs stat` find the
# store of a mount.
FLAG_OPTIONS = {
    "ro",
    "rw",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "exec",
    "noexec",
    "async",
    "sync",
    "dirsync",
    "atime",
    "noatime",
    "allow_other",
    "allow_root",
    "auto_unmount",
    "default_permissions",
}
# (max_read= is not among them: libfuse 3's high-level API then fails its init and exits.)
VALUE_OPTIONS = {
    "context": "an SELinux context",
    "fscontext": "an SELinux context",
    "defcontext": "an SELinux context",
    "rootcontext": "an SELinux context",
}
OWN_OPTIONS = {"fsname": "the store's path", "subtype": "llmfs"}


class MountError(Exception):
    pass


def parse_options(values: list[str]) -> dict:
    """-o values ("a,b=c", ...) → {key: value or True}; MountError for an option we do not pass
    to FUSE, so that a wrong option fails before the store is touched (once it is marked in use,
    a failed start would leave it marked unclean)."""
    opts = {}
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            key, eq, val = item.partition("=")
            if key in OWN_OPTIONS:
                raise MountError(f"option {key} is set by llmfs ({OWN_OPTIONS[key]}); remove -o {item}")
            if key in FLAG_OPTIONS:
                if eq:
                    raise MountError(f"option {key} takes no value (-o {item})")
                opts[key] = True
            elif key in VALUE_OPTIONS:
                if not val:
                    raise MountError(f"option {key} needs {VALUE_OPTIONS[key]} (-o {item})")
                opts[key] = val
            else:
                raise MountError(
                    f"unsupported mount option {item!r}; llmfs passes these to FUSE: "
                    f"{', '.join(sorted(FLAG_OPTIONS))}, "
                    f"{', '.join(k + '=' for k in sorted(VALUE_OPTIONS))}"
                )
    return opts


def secure_store(path: str) -> list[str]:
    """Make a store private to its owner before mounting it: the directory 0700, its files 0600
    (minus any owner bits they lack). data.mdb holds every file's data and names, and the mount's
    mode checks do not guard it: a store others can read or write is readable or forgeable around
    the mount. Returns what was changed, for the log and the user; MountError where it cannot be
    changed (not our store) or where a store file is not a plain file (a symlink is never followed:
    root mounting a user's store must not chmod what a link points to)."""
    changed = []
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise MountError(f"cannot open the store {path}: {e.strerror}") from None
    try:
        st = os.fstat(dfd)
        if st.st_mode & 0o077:
            mode = stat.S_IMODE(st.st_mode) & 0o700
            _chmod(dfd, mode, path)
            changed.append(
                f"{path} was mode {stat.S_IMODE(st.st_mode):04o}, open to other users; made it {mode:04o}"
            )
        for name in STORE_FILES:
            where = os.path.join(path, name)
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
            except FileNotFoundError:
                continue
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise MountError(f"{where} is a symbolic link; a store's files must be its own") from None
                raise MountError(f"cannot open {where}: {e.strerror}") from None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise MountError(f"{where} is not a regular file")
                if st.st_mode & 0o077:
                    mode = stat.S_IMODE(st.st_mode) & 0o600
                    _chmod(fd, mode, where)
                    changed.append(f"{where} was mode {stat.S_IMODE(st.st_mode):04o}; made it {mode:04o}")
            finally:
                os.close(fd)
    finally:
        os.close(dfd)
    return changed


def _chmod(fd: int, mode: int, where: str) -> None:
    try:
        os.fchmod(fd, mode)
    except OSError as e:
        raise MountError(
            f"{where} can be read or written by other users and cannot be made "
            f"private ({e.strerror}); `chmod go-rwx` it as its owner"
        ) from None


def open_filesystem(
    store_path: str,
    dirty_limit: int = DIRTY_LIMIT,
    cache_size: int | None = None,
    gpu_cache_size: int | None = None,
    device: str = "auto",
    threads: int | None = None,
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
            problems, _ = fsck.run_checks(store, [fsck.check_unstored], repair=True)
            for p in problems:  # a crash between a file's create and its data: absent, not empty
                log.warning("after the crash: %s", p.message.replace("; repair deletes it", ": deleted"))
            # Counters are derived: recount them (damaged blocks leave them off). A damaged block
            # is its files' problem (their reads of it fail), never a reason to refuse the mount.
            fsck.run_checks(store, [fsck.check_counters], repair=True)
            damage = [
                p
                for p in fsck.run_checks(store, [c for c in fsck.QUICK_CHECKS if c in fsck.DAMAGE_CHECKS])[0]
            ]
            for p in damage:
                log.warning("fsck %s: %s", p.check, p.message)
            problems, _ = fsck.run_checks(
                store, [c for c in fsck.QUICK_CHECKS if c not in fsck.DAMAGE_CHECKS]
            )
            if problems:
                for p in problems:
                    log.error("fsck %s: %s", p.check, p.message)
                raise MountError(
                    f"{store_path} has {len(problems)} problem(s) after an unclean "
                    f"shutdown; run `llmfs fsck --repair {store_path}`"
                )
            log.info("%s: checks passed", store_path)
        # The device tier holds decoded blocks in GPU memory when CUDA is present (device=None
        # picks it); without a GPU budget there is no device tier.
        cache = DecodeCache(
            cache_size if cache_size is not None else DEFAULT_RAM_BUDGET, device_budget=gpu_cache_size or 0
        )
        fs = Filesystem(
            store, registry, cache, dirty_limit=dirty_limit, readahead=Readahead(), batch_releases=True
        )
        return fs, models
    except BaseException:
        store.close()
        raise


def serve(args, ready_fd: int | None) -> int:
    """Run the daemon in the foreground until unmounted."""
    mountpoint = os.path.abspath(args.mountpoint)
    user_opts = parse_options(args.options)  # checked by run() already

    def report(message: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            os.write(ready_fd, message.encode() + b"\n")
            os.close(ready_fd)
            ready_fd = None

    def warn(message: str) -> None:
        log.warning("%s", message)  # stderr: the log file, the journal or the terminal
        if ready_fd is not None:  # and the `llmfs mount` that started us prints it
            os.write(ready_fd, f"warning: {message}".encode().replace(b"\n", b" ") + b"\n")

    # Before any thread starts: the write path's buffers stay in the heap (llmfs/heap.py).
    heap.keep_freed_memory(args.dirty_limit + GROUP_BYTES)
    try:
        try:
            os.stat(mountpoint)
        except OSError as e:
            # Under systemd (Restart=on-failure, a mount unit) nobody is there to run umount.
            if e.errno == errno.ENOTCONN and not (
                service.under_systemd() and service.detach_stale(mountpoint)
            ):
                raise MountError(
                    f"{args.mountpoint} is the mount of a daemon that died; run "
                    f"`llmfs umount {args.mountpoint}` first"
                ) from None
        if not os.path.isdir(mountpoint):
            raise MountError(f"mount point {args.mountpoint} is not a directory")
        if os.path.ismount(mountpoint):
            raise MountError(f"{args.mountpoint} is already a mount point")
        for change in secure_store(args.store):
            warn(change)
        fs, models = open_filesystem(
            args.store, args.dirty_limit, args.cache_size, args.gpu_cache_size, args.device, args.threads
        )
    except (StoreError, MountError) as e:
        report(f"error: {e}")
        print(f"llmfs mount: {e}", file=sys.stderr)
        return 1
    store = fs.store
    # Where and by whom, for the error of a second mount and for `llmfs umount`/`stat`, which
    # trust a mount only when this names it (llmfs/mounts.py); the device follows once mounted.
    real_mountpoint = os.path.realpath(mountpoint)
    store.describe_lock_holder(mounts.lock_text(real_mountpoint, os.getpid()))
    store.set_clean(False)
    store.start_group_commit(args.commit_interval)  # changes reach the disk in groups
    background = Background(
        fs, models, None if args.no_compaction else args.compact_after, cluster_coder(args, fs)
    )
    served = False

    def ready():
        nonlocal served
        served = True
        dev = mounts.own_device(real_mountpoint, store.path)
        if dev is None:
            log.warning(
                "%s is not in /proc/self/mountinfo; `llmfs umount` will not know this daemon", real_mountpoint
            )
        else:
            store.describe_lock_holder(mounts.lock_text(real_mountpoint, os.getpid(), dev))
            raise_readahead(dev, READAHEAD)
        log.info("mounted %s on %s", store.path, mountpoint)
        background.start()
        service.notify("READY=1", f"STATUS=serving {store.path} on {mountpoint}")
        report("ok")

    def destroy():
        service.on_stop(mountpoint)
        try:
            fs.stop_batches()  # released files still waiting in a batch are stored first
            fs.flush_all()  # what is lost is logged; the final flush below says it again
        except StoreError as e:
            log.error("flush at unmount: %s", e)

    ops = Operations(fs, on_ready=ready, on_destroy=destroy, max_readahead=READAHEAD)
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
    status = 0
    with background.shutdown_lock:
        try:
            status = finish(fs)
        finally:
            fs.buffer.close()
            fs.cache.close()
            store.close()
    service.stopped()
    log.info("unmounted %s", mountpoint)
    return status


def raise_readahead(dev: tuple[int, int], size: int, sysfs: str = "/sys/class/bdi") -> bool:
    """Raise the read_ahead_kb of the mount's device (major, minor) to `size` bytes when it is
    lower (READAHEAD above). Returns whether it is at least that now; without the right to write
    it (not root) the kernel's default stays, which costs speed, not correctness."""
    path = os.path.join(sysfs, f"{dev[0]}:{dev[1]}", "read_ahead_kb")
    try:
        with open(path) as f:
            if int(f.read()) * 1024 >= size:
                return True
        with open(path, "w") as f:
            f.write(f"{size // 1024}\n")
        return True
    except (OSError, ValueError) as e:
        log.debug("readahead stays the kernel's default (%s: %s)", path, e)
        return False


def finish(fs: Filesystem) -> int:
    """The end of a session: flush what is buffered and mark the store clean. Every flush is one
    transaction, so the store is consistent whether or not a file's last writes could be stored:
    the store is marked clean unless the final sync (or the mark) failed, and then it stays
    marked unclean, so the next mount checks it. Data that could not be stored is named in the
    log and on stderr (the daemon's stderr is the log unless it runs in the foreground).
    Returns the exit status: 0, or 1 if data was lost or the store could not be marked."""
    try:
        fs.stop_batches()  # (destroy did, unless libfuse ended without it)
        lost = fs.flush_all()
    except StoreError as e:
        log.error(
            "unmount: the store could not be synced (%s); it stays marked unclean and "
            "the next mount checks it",
            e,
        )
        print(f"llmfs: unmount: the store could not be synced: {e}", file=sys.stderr)
        return 1
    for line in lost:
        log.error("unmount: lost %s", line)
        print(f"llmfs: unmount: lost {line}", file=sys.stderr)
    try:
        fs.end_session()  # no file is left marked created-but-not-stored (store.py: unstored)
        fs.store.set_clean(True)
    except StoreError as e:
        log.error("unmount: the store could not be marked clean (%s); the next mount checks it", e)
        return 1
    return 1 if lost else 0


def cluster_coder(args, fs: Filesystem):
    """The Ray cluster coder for --cluster (the compactor's remote coder and the reads' remote
    decoder, measured against fs's own decode at connect), or None (llmfs/cluster.py)."""
    if not args.cluster:
        return None
    from .cluster import ClusterCoder, ray_available

    if not ray_available():
        log.error(
            "--cluster %s: ray is not installed (pip install 'llmfs[cluster]'); compacting locally",
            args.cluster,
        )
        return None
    return ClusterCoder(
        args.cluster,
        store_spec(fs.store),
        workers=args.cluster_workers,
        timeout=args.cluster_timeout,
        device=args.device,
        # one engine thread per actor: a node runs one actor per CPU slot (cluster.ClusterCoder)
        threads=1,
        local_decode=lambda blobs: fs.registry.decode_many(blobs, fs.block_size),
    )


def start_daemon(args) -> int:
    """Start `llmfs mount -f` detached and wait until it reports the mount ready."""
    if not os.path.isfile(os.path.join(args.store, "data.mdb")):
        print(
            f"llmfs mount: {args.store} is not an llmfs store (no data.mdb); create one with "
            f"`llmfs mkfs {args.store}`",
            file=sys.stderr,
        )
        return 1
    read_fd, write_fd = os.pipe()
    cmd = (
        [sys.executable, "-m", "llmfs.cli"]
        + (["--debug"] if args.debug else [])
        + [
            "mount",
            args.store,
            args.mountpoint,
            "-f",
            "--ready-fd",
            str(write_fd),
            "--dirty-limit",
            str(args.dirty_limit),
        ]
    )
    if args.cache_size is not None:
        cmd += ["--cache-size", str(args.cache_size)]
    if args.gpu_cache_size is not None:
        cmd += ["--gpu-cache-size", str(args.gpu_cache_size)]
    cmd += ["--device", args.device]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    cmd += ["--commit-interval", str(args.commit_interval)]
    cmd += ["--compact-after", str(args.compact_after)] + (["--no-compaction"] if args.no_compaction else [])
    if args.cluster:
        cmd += [
            "--cluster",
            args.cluster,
            "--cluster-workers",
            str(args.cluster_workers),
            "--cluster-timeout",
            str(args.cluster_timeout),
        ]
    for o in args.options:
        cmd += ["-o", o]
    log_path = os.path.join(args.store, LOG_FILE)
    try:  # private like the rest of the store (secure_store), whatever the umask
        log_fd = os.open(
            log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except OSError as e:
        print(f"llmfs mount: cannot open {log_path}: {e.strerror}", file=sys.stderr)
        return 1
    with os.fdopen(log_fd, "ab") as logf:
        proc = subprocess.Popen(
            cmd,
            pass_fds=(write_fd,),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
        )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as r:
        while True:
            answer = r.readline().decode(errors="replace").strip()
            if not answer.startswith("warning: "):
                break
            print(f"llmfs mount: {answer}", file=sys.stderr)
    if answer == "ok":
        return 0
    proc.wait(timeout=30)
    print(f"llmfs mount: {answer.removeprefix('error: ') or 'the daemon exited'}", file=sys.stderr)
    return 1


def register(sub) -> None:
    p = sub.add_parser("mount", help="mount a store (returns once the mount is usable)")
    p.add_argument("store", nargs="?", help="the store (or `store` in --config)")
    p.add_argument("mountpoint", nargs="?", help="where to mount (or `mountpoint` in --config)")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file with store, mountpoint and options (e.g. /etc/llmfs/NAME.toml); "
        "arguments given here override it",
    )
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground (Ctrl-C unmounts)")
    p.add_argument(
        "-o", dest="options", action="append", default=[], help="FUSE mount options, e.g. allow_other"
    )
    p.add_argument(
        "--dirty-limit",
        type=parse_size,
        default=None,
        help="buffered write bytes before files are flushed (default 64M)",
    )
    p.add_argument(
        "--cache-size",
        type=parse_size,
        default=None,
        help="bytes of decoded blocks kept in RAM (default 64M)",
    )
    p.add_argument(
        "--gpu-cache-size",
        type=parse_size,
        default=None,
        help="bytes of decoded blocks kept in GPU memory when CUDA is present (default 0: none)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the LM runs: a CUDA GPU when present (auto), or the CPU",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads of the LM's kernels (default 1). They sleep between calls "
        "(no spinning), but a call waits for the helpers it woke: more pay off on "
        "cores that nothing else keeps busy",
    )
    p.add_argument(
        "--compact-after",
        type=float,
        default=COMPACT_AFTER,
        metavar="SECONDS",
        help="compress blocks with the LM once unchanged this long (default 600)",
    )
    p.add_argument(
        "--commit-interval",
        type=float,
        default=COMMIT_INTERVAL,
        metavar="SECONDS",
        help="changes not fsync'ed reach the disk within this many seconds: what a "
        "crash can lose (default 5, like ext4's commit=)",
    )
    p.add_argument(
        "--no-compaction", action="store_true", help="no background compaction (`llmfs compact` still works)"
    )
    p.add_argument(
        "--cluster",
        metavar="ADDRESS",
        default=None,
        help="compact (and decode cold reads, when faster) on a Ray cluster (ray://HEAD:10001, "
        "or HOST:6379 when this machine is a Ray node); needs `pip install llmfs[cluster]`",
    )
    p.add_argument(
        "--cluster-workers",
        type=int,
        default=0,
        metavar="N",
        help="model actors on the cluster (default 0: one per GPU, one per CPU node)",
    )
    p.add_argument(
        "--cluster-timeout",
        type=float,
        default=config.CLUSTER_TIMEOUT,
        metavar="SECONDS",
        help="a batch not back in this long is retried on another worker (default 600)",
    )
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
            log.warning("%s: %s is accepted but not implemented yet; it has no effect", args.config, key)
    if args.store is None or args.mountpoint is None:
        print("llmfs mount: give STORE and MOUNTPOINT, or --config FILE that names them", file=sys.stderr)
        return 2
    if args.dirty_limit is None:
        args.dirty_limit = DIRTY_LIMIT
    try:
        parse_options(args.options)
    except MountError as e:
        print(f"llmfs mount: {e}", file=sys.stderr)
        return 2
    if args.foreground:
        return serve(args, args.ready_fd)
    return start_daemon(args)
