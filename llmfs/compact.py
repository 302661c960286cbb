"""`llmfs compact MOUNTPOINT|STORE [--now] [--path P] [--recode]`: compact cold blocks with the
language model now, with a progress bar, and print what it saved. `--recode` instead re-encodes LM
blocks coded by older engine versions or other models with the current model, rewrites the LM blocks
an older store format kept longer in this one's short form (no model needed), and retires the model
files no block needs any more (compactor.py). On a mounted store the daemon does the work
(asked through its control socket); on an unmounted one this process does, holding the store's lock.
"""

from __future__ import annotations

import os
import sys
import time

from llmfs.codec import Registry
from llmfs.codec.progress import Progress

from . import control
from .compactor import Compactor, Result
from .models import THREADS, Models, store_spec
from .statcmd import find_store
from .store import ROOT_INO, Store, StoreError, StoreLocked
from .units import human, positive_int


def inodes_under(store: Store, path: bytes) -> list[int]:
    """Every inode at or below `path` (relative to the filesystem's root)."""
    with store.read() as t:
        ino = ROOT_INO
        for part in path.split(b"/"):
            if part:
                ino = t.lookup(ino, part)
                if ino is None:
                    raise StoreError(f"{os.fsdecode(path)}: no such file in the store")
        out, stack = [], [ino]
        while stack:
            ino = stack.pop()
            out.append(ino)
            inode = t.inode(ino)
            if inode is not None and inode.is_dir:
                stack.extend(child for _, child in t.listdir(ino))
    return out


def compact_offline(
    store_path: str,
    now: bool,
    path: bytes | None,
    progress,
    threads: int | None = None,
    recode: bool = False,
) -> Result:
    """Compaction of an unmounted store, in this process. recode: LM blocks of other models or
    engine versions are re-encoded with the current model (compactor.py), then model files no
    block needs are dropped."""
    store = Store(store_path)
    try:
        if not store.was_clean():
            raise StoreError(
                f"{store_path} was not unmounted cleanly; mount it once or run "
                f"`llmfs fsck --repair {store_path}` first"
            )
        models = Models(store, threads=threads or THREADS)
        registry = Registry(model_resolver=models.resolve)
        compactor = Compactor(store, registry, models.compaction_codec, store_spec(store))
        inos = inodes_under(store, path) if path is not None else None
        if not recode:
            return compactor.compact(compactor.candidates(0 if now else None, inos), progress)
        res = compactor.recode(inos, progress)
        if path is None:
            models.retire_unused()
        return res
    finally:
        store.close()


def recode_offline(store_path: str, path: bytes | None, progress, threads: int | None = None) -> Result:
    """`--recode` on an unmounted store (compact_offline with recode)."""
    return compact_offline(store_path, True, path, progress, threads, recode=True)


def compact_online(store_path: str, now: bool, path: bytes | None, progress, recode: bool = False) -> Result:
    req = {
        "op": "compact",
        "now": now,
        "path": os.fsdecode(path) if path is not None else None,
        "recode": recode,
    }
    try:
        for answer in control.request(store_path, req):
            if "error" in answer:
                raise StoreError(answer["error"])
            if "result" in answer:
                return Result(**answer["result"])
            progress(answer["done"], answer["total"], answer.get("cluster"))
    except (ConnectionError, FileNotFoundError) as e:  # connecting: nobody serves the socket
        raise StoreError(
            f"{store_path} is in use by a process that does not take compaction "
            f"requests ({e.strerror}); try again when it is done"
        ) from None
    raise StoreError("the daemon closed the connection without an answer")


def fs_path(arg: str) -> bytes:
    """--path: a path inside a mount (made relative to the mount's root), or else a path relative
    to the store's root."""
    real = os.path.realpath(arg)
    if os.path.exists(real):
        root = real
        while root != "/" and not os.path.ismount(root):
            root = os.path.dirname(root)
        if root != "/":
            rel = os.path.relpath(real, root)
            return b"" if rel == "." else os.fsencode(rel)
    return os.fsencode(arg).strip(b"/")


def register(sub) -> None:
    p = sub.add_parser("compact", help="compact cold blocks with the LM now")
    p.add_argument("target", metavar="MOUNTPOINT|STORE")
    p.add_argument("--now", action="store_true", help="every pending block, however recently written")
    p.add_argument("--path", help="only the files at or below this path (in the mount)")
    p.add_argument(
        "--recode",
        action="store_true",
        help="re-encode LM blocks of older engine versions or other models with the "
        "current model, then drop the model files no block needs",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads of the LM for an unmounted store (default 1; a mounted "
        "store compacts with its daemon's --threads)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    progress = Progress("compacting")
    t0 = time.monotonic()
    try:
        store_path, _ = find_store(args.target)
        path = fs_path(args.path) if args.path is not None else None
        try:
            if args.recode:
                res = recode_offline(store_path, path, progress, args.threads)
            else:
                res = compact_offline(store_path, args.now, path, progress, args.threads)
        except StoreLocked:
            res = compact_online(store_path, args.now, path, progress, args.recode)
    except (StoreError, OSError) as e:
        progress.close()
        print(f"llmfs compact: {e}", file=sys.stderr)
        return 1
    progress.close()
    secs = time.monotonic() - t0
    if not res.blocks:
        print(
            "nothing to recode: every LM block uses the current model, kept in its shortest form"
            if args.recode
            else "nothing to compact" + ("" if args.now else " (use --now for recent writes)")
        )
        return 0
    print(
        f"compacted {res.blocks} blocks in {secs:.1f} s: {human(res.before)} -> "
        f"{human(res.after)}, saved {human(res.saved)} "
        f"({res.saved / res.before:.0%}); {res.lm_blocks} now stored by the LM, "
        f"{res.skipped} left as they were"
    )
    return 0
