"""`llmfs stat PATH`: how much a store, a mount or one file takes, per codec.

PATH may be a store directory, a mount point, or a file or directory inside a mount. The store is
read in one LMDB read transaction alongside the running daemon (LMDB readers never block the
writer); writes the daemon still buffers are not counted until they are flushed.
"""

from __future__ import annotations

import os
import sys

from llmfs.codec import CODEC_NAMES
from llmfs.codec.registry import DAMAGED

from . import control, mounts
from .models import model_report
from .store import Store, StoreError
from .units import human


def find_store(path: str) -> tuple[str, str | None]:
    """(store path, path inside the mount or None) for PATH. A mount's store is trusted only once
    llmfs/mounts.py has checked that a running llmfs daemon serves it from there."""
    path = os.path.realpath(path)
    entry = mounts.mount_containing(path)
    if entry is None:
        if os.path.isfile(os.path.join(path, "data.mdb")):
            return path, None
        raise StoreError(f"{path} is neither an llmfs store nor inside an llmfs mount")
    try:
        daemon = mounts.verify(entry)
    except mounts.NotOurs as e:
        raise StoreError(
            f"{path} is in the fuse.llmfs mount {entry.target}, which no running llmfs daemon serves: {e}"
        ) from None
    return daemon.store, path


def store_report(store: Store) -> list[tuple[str, str]]:
    with store.read() as t:
        c = t.counters
        pending = 0
        for h, _ in t.pending():
            pending += t.plain_length(h) or 0  # 0: gone, or a damaged header
        clean = t.meta("clean") == b"1"
    rows = [
        ("store", store.path),
        ("block size", human(store.block_size)),
        ("logical bytes", f"{c.logical} ({human(c.logical)})"),
    ]
    unique = sum(r[1] for r in c.per_codec)
    stored = c.stored
    for cid, (n, plain, size) in enumerate(c.per_codec):
        if n:
            rows.append(
                (
                    f"stored {CODEC_NAMES.get(cid, cid)}",
                    f"{size} ({human(size)}) in {n} blocks holding {human(plain)}",
                )
            )
    lm_plain = c.per_codec[2][1] if len(c.per_codec) > 2 else 0
    rows += [
        ("stored bytes", f"{stored} ({human(stored)})"),
        (
            "unique block bytes",
            f"{unique} ({human(unique)}); dedup and holes save {human(max(c.logical - unique, 0))}",
        ),
        ("LM-compressed fraction", f"{lm_plain / unique:.1%}" if unique else "-"),
        ("pending compaction", f"{pending} ({human(pending)})"),
        ("ratio", f"{c.logical / stored:.2f}x" if stored else "-"),
        ("state", "clean" if clean else "mounted or not cleanly unmounted"),
    ]
    rows += [("model", line.removeprefix("model ")) for line in model_report(store)]
    return rows


def file_report(store: Store, path: str) -> list[tuple[str, str]]:
    ino = os.lstat(path).st_ino
    with store.read() as t:
        inode = t.inode(ino)
        if inode is None:
            raise StoreError(f"{path}: inode {ino} is not in the store (not flushed yet?)")
        per_codec: dict[int, list[int]] = {}
        hashes = t.block_hashes(ino, 0, (1 << 64) - 1)
        for h in hashes.values():
            head = t.header(h)  # None: a damaged header, shown as such
            row = per_codec.setdefault(head.codec_id if head else DAMAGED, [0, 0])
            row[0] += 1
            row[1] += t.stored_size(h) or 0  # at rest (a compact LM block's bytes)
    stored = sum(r[1] for r in per_codec.values())
    rows = [("file", path), ("inode", str(ino)), ("logical bytes", str(inode.size))]
    for cid, (n, size) in sorted(per_codec.items()):
        rows.append((f"stored {CODEC_NAMES.get(cid, cid)}", f"{size} in {n} blocks"))
    rows += [("stored bytes", str(stored)), ("ratio", f"{inode.size / stored:.2f}x" if stored else "-")]
    return rows


def daemon_report(store_path: str) -> list[tuple[str, str]]:
    """The running daemon's decode cache and compaction counters, from its control socket."""
    try:
        answers = list(control.request(store_path, {"op": "stats"}))
    except OSError:
        return [("daemon", "not answering")]
    stats = answers[-1].get("result", {}) if answers else {}
    rows = []
    for key, value in sorted(stats.get("cache", {}).items()):
        rows.append((f"cache {key}", f"{value:.3f}" if isinstance(value, float) else str(value)))
    comp = stats.get("compaction", {})
    if comp:
        rows.append(
            (
                "compacted this mount",
                f"{comp.get('blocks', 0)} blocks, "
                f"{comp.get('lm_blocks', 0)} by the LM, saved "
                f"{human(comp.get('before', 0) - comp.get('after', 0))}",
            )
        )
    rows += cluster_rows(stats.get("cluster"))
    return rows


def cluster_rows(cl: dict | None) -> list[tuple[str, str]]:
    """The daemon's Ray cluster (llmfs/cluster.py): its state, throughput, and each worker."""
    if not cl:
        return []
    state = cl["state"] + (f" ({cl['error']})" if cl.get("error") else "")
    rows = [
        ("cluster", f"{cl['address']}: {state}, {len(cl['workers'])} worker(s)"),
        (
            "cluster compacted",
            f"{cl['blocks']} blocks, {human(cl['plain'])} in {cl['batches']} batches, {human(cl['rate'])}/s",
        ),
        (
            "cluster failures",
            f"{sum(w['failures'] for w in cl['workers'])} worker call(s) "
            f"failed, {cl['retries']} retried, {cl['mismatches']} did not "
            f"verify, {cl['local_fallbacks']} block(s) done locally",
        ),
    ]
    if cl.get("decode_remote_rate"):
        rows.append(
            (
                "cluster reads",
                f"measured {human(cl['decode_remote_rate'])}/s per worker there, "
                f"{human(cl['decode_local_rate'])}/s here; decoded {cl['decode_blocks']} blocks, "
                f"{human(cl['decode_plain'])} at {human(cl['decode_rate'])}/s; "
                f"{cl['decode_fallbacks']} decoded here after asking, "
                f"{cl['decode_failures']} call(s) failed",
            )
        )
    elif "decode_remote_rate" in cl:
        rows.append(("cluster reads", "not measured: cold reads decode here"))
    for w in cl["workers"]:
        rows.append(
            (
                f"cluster worker {w['name']}",
                f"{w['host']} pid {w['pid']} {w['device']}"
                f"{'' if w['alive'] else ' (lost)'}: {w['blocks']} blocks, "
                f"{human(w['plain'])} at {human(w['rate'])}/s, verified {w['verified']}, "
                f"decoded {w.get('decoded', 0)} for reads, {w['failures']} failure(s)",
            )
        )
    return rows


def register(sub) -> None:
    p = sub.add_parser("stat", help="space used by a store, a mount or a file, per codec")
    p.add_argument("path")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        store_path, inner = find_store(args.path)
        # readonly: a writable LMDB environment opens its tables in a write transaction, which would
        # wait for the writer lock that the mounted daemon's group commit holds
        store = Store(store_path, lock=False, readonly=True)
    except (StoreError, OSError) as e:
        print(f"llmfs stat: {e}", file=sys.stderr)
        return 1
    try:
        mount_root = inner is not None and os.path.ismount(inner)
        rows = store_report(store) if inner is None or mount_root else file_report(store, inner)
        if mount_root:
            rows += daemon_report(store_path)
    except (StoreError, OSError) as e:
        print(f"llmfs stat: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
