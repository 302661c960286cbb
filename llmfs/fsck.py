"""`llmfs fsck STORE [--repair]`: check the store against the invariants of store.py, one small named
check per invariant. Each check returns Problems; a Problem may carry a repair, applied with
--repair in one write transaction. Exit status as e2fsck: 0 clean, 1 problems repaired, 4 problems
left (a corrupt block cannot be repaired: its files are named so they can be restored).

Damaged blocks (a container whose header or payload does not decode, or decodes to bytes that are
not its hash) are named with every file that uses them. `--repair` quarantines such a block
(`quarantine`): its container is replaced by a DAMAGED one (codec/registry.py) that keeps the
damaged bytes and the block's length. The files keep their sizes and every other byte, and the
damaged range keeps reading as EIO — it is NOT punched to zeros. Zeros would be wrong bytes that
no program can tell from data: `cp`, `tar`, a backup or a compiler would take them silently, and
the damage would spread into copies and backups. An error at the damaged range is what a disk's
bad sector gives (ext4, ZFS and btrfs all return EIO there), is what backup tools report, and
stays until the file is deleted, truncated or rewritten — writing the block's original content
back (restoring the file from a backup) heals the block in every file that shares it. A store
with quarantined blocks is consistent: fsck lists them ("quarantined: ...") but counts them as
no problem, so a repaired store checks clean. Blocks coded by a model that cannot be loaded here
are reported but never quarantined: that is a missing model, not damage.

The checks read the whole metadata into memory (inodes, dirents, the block map): a few dozen bytes
per entry. Threading: runs alone, with the store's lock held (not while mounted).
"""

from __future__ import annotations

import logging
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from llmfs.codec import ContainerError, ModelMismatch, Registry, UnsupportedVersion
from llmfs.codec.container import pack
from llmfs.codec.registry import DAMAGED

from .models import Models, model_report
from .store import ROOT_INO, Counters, Store, StoreError, Txn, block_hash, header_of, now_ns

log = logging.getLogger("llmfs")


# Blocks decoded together: the LM decodes the segments of a whole batch in one engine pass.
FSCK_BATCH = 32


@dataclass
class Problem:
    check: str
    message: str
    repair: Callable[[Txn], None] | None = None


class Snapshot:
    """The metadata one fsck run looks at, read in one transaction."""

    def __init__(self, t: Txn):
        self.inodes = dict(t.inodes())
        self.dirents = list(t.all_dirents())
        self.blockmap = list(t.blockmap_entries())
        self.refs = dict(t.refs())
        self.block_keys = {h for h, _ in t.blocks()}
        self.orphans = set(t.orphans())
        self.unstored = set(t.unstored())
        self.pending = {h for h, _ in t.pending()}
        self.block_size = t.store.block_size
        self.counters = t.counters
        names = {}
        for parent, name, ino in self.dirents:
            names.setdefault(ino, (parent, name))
        self._names = names

    def path(self, ino: int) -> str:
        parts, seen = [], set()
        while ino != ROOT_INO and ino not in seen:
            seen.add(ino)
            entry = self._names.get(ino)
            if entry is None:
                return f"<inode {ino}, no name>"
            ino, name = entry
            parts.append(name.decode(errors="replace"))
        return "/" + "/".join(reversed(parts))


def check_root(s: Snapshot, t: Txn) -> list[Problem]:
    root = s.inodes.get(ROOT_INO)
    if root is None or not root.is_dir:
        return [Problem("root", "the root directory is missing or not a directory")]
    return []


def check_dirents(s: Snapshot, t: Txn) -> list[Problem]:
    out = []
    for parent, name, ino in s.dirents:
        pin = s.inodes.get(parent)
        if ino not in s.inodes or pin is None or not pin.is_dir:

            def repair(t, parent=parent, name=name):
                t.unlink(parent, name)

            out.append(
                Problem(
                    "dirents",
                    f"entry {name!r} in inode {parent} names "
                    f"{'a missing inode' if ino not in s.inodes else 'a non-directory'}"
                    f" ({ino})",
                    repair,
                )
            )
    return out


def check_link_counts(s: Snapshot, t: Txn) -> list[Problem]:
    names = Counter(ino for _, _, ino in s.dirents)
    subdirs = Counter(parent for parent, _, ino in s.dirents if ino in s.inodes and s.inodes[ino].is_dir)
    out = []
    for ino, inode in s.inodes.items():
        if inode.is_dir:
            want = 2 + subdirs[ino] if (names[ino] or ino == ROOT_INO) else 0
        else:
            want = names[ino]
        if ino in s.orphans and want == 0:
            continue  # unlinked while open: cleaned up at the next mount
        if want == 0 and ino != ROOT_INO:

            def repair(t, ino=ino):
                t.delete_inode(ino)

            out.append(Problem("link_counts", f"inode {ino} has no name; repair deletes it", repair))
        elif inode.nlink != want:

            def repair(t, ino=ino, want=want):
                i = t.inode(ino)
                t.put_inode(ino, i.evolve(nlink=want), i)

            out.append(
                Problem("link_counts", f"{s.path(ino)}: link count {inode.nlink}, {want} names", repair)
            )
    return out


def check_unstored(s: Snapshot, t: Txn) -> list[Problem]:
    """Files created and never stored when the store was last used (store.py: unstored): the
    session ended without a clean unmount between their create and their data. Repair deletes
    each one that is still an empty regular file with every name it has (links and renames
    included): a crash finds a new file absent or whole, never created-but-empty. A mark whose
    inode is gone or holds data is only dropped."""
    if not s.unstored:
        return []
    names: dict[int, list[tuple[int, bytes]]] = {}
    for parent, name, ino in s.dirents:
        if ino in s.unstored:
            names.setdefault(ino, []).append((parent, name))
    mapped = {ino for ino, _, _ in s.blockmap if ino in s.unstored}
    out = []
    for ino in sorted(s.unstored):
        inode = s.inodes.get(ino)
        empty = inode is not None and inode.is_reg and inode.size == 0 and ino not in mapped
        links = tuple(names.get(ino, ()))
        where = ", ".join(s.path(p).rstrip("/") + "/" + n.decode(errors="replace") for p, n in links)

        def repair(t, ino=ino, empty=empty, links=links):
            if empty:
                now = now_ns()
                for parent, name in links:
                    t.unlink(parent, name)
                    pinode = t.inode(parent)
                    if pinode is not None:
                        t.put_inode(parent, pinode.evolve(mtime=now, ctime=now))
                t.delete_inode(ino)
            else:
                t.remove_unstored(ino)

        what = (
            f"{where or f'inode {ino}'} was created and never stored before the store was "
            "last left uncleanly; repair deletes it"
            if empty
            else f"inode {ino} is marked unstored but {'is gone' if inode is None else 'holds data'}; "
            "repair drops the mark"
        )
        out.append(Problem("unstored", what, repair))
    return out


def check_orphans(s: Snapshot, t: Txn) -> list[Problem]:
    out = []
    for ino in s.orphans:

        def repair(t, ino=ino):
            i = t.inode(ino)
            if i is None or i.nlink == 0:
                t.delete_inode(ino)
            else:
                t.remove_orphan(ino)

        out.append(
            Problem(
                "orphans",
                f"inode {ino} was unlinked while open when the store was last used; repair deletes it",
                repair,
            )
        )
    return out


def check_blockmap(s: Snapshot, t: Txn) -> list[Problem]:
    out = []
    for ino, idx, h in s.blockmap:
        inode = s.inodes.get(ino)
        why = None
        if inode is None or not inode.is_reg:
            why = "belongs to no regular file"
        elif idx * s.block_size >= inode.size:
            why = f"lies past the end of {s.path(ino)} ({inode.size} bytes)"
        elif h not in s.block_keys:
            why = f"of {s.path(ino)} names a block that is not stored; repair makes it a hole"
        if why:

            def repair(t, ino=ino, idx=idx):
                t.set_block(ino, idx, None)

            out.append(Problem("blockmap", f"block {idx} of inode {ino} {why}", repair))
    return out


def check_refcounts(s: Snapshot, t: Txn) -> list[Problem]:
    want = Counter(h for _, _, h in s.blockmap)
    out = []
    for h in set(want) | set(s.refs) | s.block_keys:
        n, have = want[h], s.refs.get(h, 0)
        if n and h not in s.block_keys:
            continue  # reported (and repaired) by check_blockmap
        if n != have:

            def repair(t, h=h, n=n):
                t.set_refcount(h, n)

            out.append(Problem("refcounts", f"block {h.hex()[:16]}: refcount {have}, {n} references", repair))
    return out


def check_pending(s: Snapshot, t: Txn) -> list[Problem]:
    out = []
    for h in s.pending - s.block_keys:

        def repair(t, h=h):
            t.txn.delete(h, db=t.db["pending"])

        out.append(Problem("pending", f"compaction queue names missing block {h.hex()[:16]}", repair))
    return out


def _count(t: Txn) -> Counters:
    want = Counters.zero()
    want.logical = sum(i.size for _, i in t.inodes() if i.is_reg)
    for _h, head, size in t.block_headers():
        if head is None:  # damaged: not counted (check_block_headers names it)
            continue
        row = want.per_codec[head.codec_id]
        row[0] += 1
        row[1] += head.length
        row[2] += size  # the bytes kept at rest (a compact LM block's, not its expanded form's)
    return want


def check_counters(s: Snapshot, t: Txn) -> list[Problem]:
    if _count(t).pack() == s.counters.pack():
        return []

    def repair(t):  # recounted in the repair transaction, after the repairs before it
        t.set_counters(_count(t))

    return [Problem("counters", "the usage counters differ from the store's contents", repair)]


def _models(s: Snapshot, t: Txn) -> Models:
    """One Models per fsck run (a model loads once), never refusing the store (fsck reports)."""
    models = getattr(s, "_fsck_models", None)
    if models is None:
        models = s._fsck_models = Models(t.store, check=False)
    return models


def check_models(s: Snapshot, t: Txn) -> list[Problem]:
    """Every model that coded a block is recorded (so the block can be decoded again), and every
    recorded model file exists."""
    known, keys = t.models(), t.model_keys()
    files = set(t.model_file_digests())
    missing: dict[bytes, int] = {}
    for h, _blob in t.blocks():
        head = t.header(h)
        if (
            head is not None
            and head.fingerprint
            and head.fingerprint not in known
            and head.fingerprint not in keys
        ):
            missing[head.fingerprint] = missing.get(head.fingerprint, 0) + 1
    out = [
        Problem(
            "models",
            f"{n} block(s) were coded by model {fp.hex()}, which the store "
            f"does not record: they cannot be decoded",
        )
        for fp, n in missing.items()
    ]
    for fp, d in keys.items():
        if d not in files:
            out.append(
                Problem(
                    "models",
                    f"model {fp.hex()} names model file {d.hex()[:16]}, which is missing from the store",
                )
            )
    return out


def check_dictionaries(s: Snapshot, t: Txn) -> list[Problem]:
    """Every LM block that continues a dictionary (payload version 4) names one the store holds,
    and each held dictionary parses and hashes to its id. (Blocks naming a missing one cannot be
    decoded: like a missing model, that is reported, not quarantined.)"""
    from llmfs.codec.lm import dictionary
    from llmfs.codec.lm.codec import payload_dictionary

    held = t.dictionaries()
    out = []
    for did, blob in held.items():
        try:
            ok = dictionary.parse(blob).id == did
        except ContainerError:
            ok = False
        if not ok:
            out.append(Problem("dictionaries", f"LM dictionary {did.hex()} is corrupt"))
    cur = t.current_dictionary()
    if cur is not None and cur not in held:
        out.append(Problem("dictionaries", f"the store's current dictionary {cur.hex()} is missing"))
    classes = t.dictionary_classes()
    if classes is not None:
        try:
            parsed = {did: dictionary.parse(blob) for did, blob in held.items()}
        except ContainerError:
            parsed = {}
        try:
            dictionary.parse_classes(classes, parsed)
        except ContainerError as e:
            out.append(Problem("dictionaries", f"the store's dictionary classes are unusable: {e}"))
    missing: dict[bytes, int] = {}
    for _h, blob in t.blocks():
        head = header_of(blob)
        if head is None or not head.fingerprint:
            continue
        did = payload_dictionary(bytes(blob[head.payload_offset : head.payload_offset + 16]))
        if did is not None and did not in held:
            missing[did] = missing.get(did, 0) + 1
    out += [
        Problem(
            "dictionaries",
            f"{n} block(s) continue LM dictionary {did.hex()}, which the store does not hold: "
            f"they cannot be decoded",
        )
        for did, n in missing.items()
    ]
    return out


def check_model_files(s: Snapshot, t: Txn) -> list[Problem]:
    """Each model file hashes to its key and answers to the fingerprints that name it."""
    from llmfs.codec.lm import modelfile

    out = []
    keys = t.model_keys()
    for d in t.model_file_digests():
        blob = t.model_file(d)
        if modelfile.digest(blob) != d:
            users = sorted(fp.hex() for fp, k in keys.items() if k == d)
            out.append(
                Problem(
                    "model_files",
                    f"model file {d.hex()[:16]} is corrupt (does not "
                    f"match its hash); blocks of model(s) {', '.join(users)} cannot "
                    f"be decoded until it is restored",
                )
            )
            continue
        try:
            m = modelfile.read_manifest(blob[: 64 << 20])
        except modelfile.BadModelFile as e:
            out.append(Problem("model_files", f"model file {d.hex()[:16]}: {e}"))
            continue
        answers = {m["fingerprint"], *m["aliases"]}
        for fp, k in keys.items():
            if k == d and fp.hex() not in answers:
                out.append(
                    Problem(
                        "model_files",
                        f"fingerprint {fp.hex()} names model file {d.hex()[:16]}, which does not decode it",
                    )
                )
    return out


def check_model_embedding(s: Snapshot, t: Txn) -> list[Problem]:
    """Blocks of models not stored in the store (written before store format 2) decode only
    while this machine can still build their model: repair stores it. Loads models (slow)."""
    models = _models(s, t)
    out = []
    for use in models.usage():
        if use.digest is not None or use.spec is None:
            continue  # embedded, or reported by check_models
        try:
            codec = models.resolve(use.fingerprint)
        except ContainerError as e:
            out.append(
                Problem(
                    "model_embedding",
                    f"{use.blocks} block(s) of model "
                    f"{use.fingerprint.hex()} ({use.spec}) depend on the environment, "
                    f"which cannot build it: {e}",
                )
            )
            continue
        mf = codec.model_file

        def repair(t, mf=mf, spec=use.spec):
            t.put_model_file(mf.digest, memoryview(mf.blob), sorted(mf.fingerprints))
            t.add_model(mf.fingerprint, spec)

        out.append(
            Problem(
                "model_embedding",
                f"{use.blocks} block(s) of model "
                f"{use.fingerprint.hex()} ({use.spec}) depend on the environment: "
                f"repair stores the model in the store",
                repair,
            )
        )
    return out


def _users(s: Snapshot) -> dict[bytes, list[tuple[int, int]]]:
    users = defaultdict(list)
    for ino, idx, h in s.blockmap:
        users[h].append((ino, idx))
    return users


def _files(s: Snapshot, users: list[tuple[int, int]]) -> str:
    return ", ".join(sorted({f"{s.path(ino)} (block {idx})" for ino, idx in users})) or "no file"


def quarantine(t: Txn, h: bytes, users: list[tuple[int, int]]) -> None:
    """Replace damaged block h's container by a DAMAGED one (reads as EIO for good; see the module
    docstring), keeping the damaged bytes as its payload and the block's plaintext length: from
    its header when that is readable and sane, else from the sizes of the files that use it."""
    blob = t.container(h)
    if blob is None or t.container_codec(h) == DAMAGED:
        return
    bs = t.store.block_size
    head = t.header(h)
    if head is not None and 0 < head.length <= bs:
        length = head.length
    else:
        length = 0
        for ino, idx in users:
            inode = t.inode(ino)
            if inode is not None:
                length = max(length, min(bs, inode.size - idx * bs))
        length = length or bs
    t.replace_container(h, pack(DAMAGED, length, 0, blob))
    t.remove_pending(h)


def check_block_headers(s: Snapshot, t: Txn) -> list[Problem]:
    """Every stored container's header is readable (without decoding: quick). A damaged one names
    its files; repair quarantines it. A compact block whose model number the store handed out but
    its modelnums table lost is the table's damage, not the block's: reported, never quarantined
    (the same for a dictionary number its dictnums table lost)."""
    users = _users(s)
    out = []
    for h in s.block_keys:
        if t.header(h) is None and (n := t.lost_model_number(h)) is not None:
            out.append(
                Problem(
                    "block_headers",
                    f"block {h.hex()[:16]} names store-local model number {n}, which the store's "
                    f"modelnums table has lost: it cannot be decoded until the entry is restored; "
                    f"affected: {_files(s, users[h])}",
                )
            )
        elif t.header(h) is None and (n := t.lost_dictionary_number(h)) is not None:
            out.append(
                Problem(
                    "block_headers",
                    f"block {h.hex()[:16]} names store-local dictionary number {n}, which the "
                    f"store's dictnums table has lost: it cannot be decoded until the entry is "
                    f"restored; affected: {_files(s, users[h])}",
                )
            )
        elif t.header(h) is None:

            def repair(t, h=h):
                quarantine(t, h, users[h])

            out.append(
                Problem(
                    "block_headers",
                    f"block {h.hex()[:16]} has a damaged header; "
                    f"affected: {_files(s, users[h])}; repair quarantines it (its "
                    f"range reads as EIO until the file is rewritten)",
                    repair,
                )
            )
    return out


def quarantined(s: Snapshot, t: Txn) -> list[str]:
    """The files that use quarantined blocks: not problems, but worth saying."""
    users = _users(s)
    return [
        f"block {h.hex()[:16]}: {_files(s, users[h])}"
        for h in sorted(s.block_keys)
        if t.container_codec(h) == DAMAGED
    ]


def check_block_checksums(s: Snapshot, t: Txn, registry: Registry | None = None) -> list[Problem]:
    """Decode every block (LM blocks with the model that coded them, as one batch per model) and
    check it against its checksum and its content hash."""
    registry = registry or Registry(model_resolver=_models(s, t).resolve)
    users = defaultdict(list)
    for ino, idx, h in s.blockmap:
        users[h].append((ino, idx))
    out = []

    def verify(batch: list[tuple[bytes, bytes]]) -> None:
        error = None
        try:
            decoded = registry.decode_many([blob for _, blob in batch])
        except ContainerError as e:
            if len(batch) > 1:  # find the bad one(s)
                for item in batch:
                    verify([item])
                return
            decoded, error = [None], e
        for (h, _), data in zip(batch, decoded):
            if data is None or block_hash(data) != h:
                why = error if data is None else "content does not match its hash"
                files = ", ".join(sorted({f"{s.path(ino)} (block {idx})" for ino, idx in users[h]}))
                missing_model = isinstance(error, (ModelMismatch, UnsupportedVersion))

                def repair(t, h=h):
                    quarantine(t, h, users[h])

                out.append(
                    Problem(
                        "block_checksums",
                        f"block {h.hex()[:16]} is corrupt ({why}); affected: {files or 'no file'}",
                        None if missing_model else repair,
                    )
                )

    batch: list[tuple[bytes, bytes]] = []
    for h, blob in t.blocks():
        head = t.header(h)
        if head is None or head.codec_id == DAMAGED:
            continue  # a damaged header is check_block_headers' finding; quarantined is known
        batch.append((h, blob))
        if len(batch) == FSCK_BATCH:
            verify(batch)
            batch = []
    if batch:
        verify(batch)
    return out


CHECKS = [
    check_root,
    check_dirents,
    check_link_counts,
    check_orphans,
    check_unstored,
    check_blockmap,
    check_refcounts,
    check_pending,
    check_counters,
    check_models,
    check_dictionaries,
    check_model_files,
    check_model_embedding,
    check_block_headers,
    check_block_checksums,
]
# What a damaged stored byte can make a check find: the block's own problem, never the store's.
# A mount after a crash logs these and mounts (the reads of those blocks fail, nothing else).
DAMAGE_CHECKS = [check_counters, check_models, check_block_headers, check_block_checksums]
# what a mount runs after an unclean shutdown: nothing that loads a model
QUICK_CHECKS = [c for c in CHECKS if c not in (check_block_checksums, check_model_embedding)]


def run_checks(
    store: Store, checks=CHECKS, repair: bool = False, registry: Registry | None = None
) -> tuple[list[Problem], bool]:
    """Run the checks; with repair, apply every repair in one transaction. Returns (problems,
    whether all of them were repaired)."""
    with store.read() as t:
        snap = Snapshot(t)
        problems = []
        for check in checks:
            if check is check_block_checksums:
                problems += check(snap, t, registry)
            else:
                problems += check(snap, t)
    if repair and problems:
        with store.write() as t:
            for p in problems:
                if p.repair:
                    p.repair(t)
            if any(p.repair for p in problems):
                t.set_counters(_count(t))  # quarantines move blocks between codecs' counters
        store.sync()
    return problems, all(p.repair for p in problems)


def register(sub) -> None:
    p = sub.add_parser("fsck", help="check a store (not while mounted) and optionally repair it")
    p.add_argument("store")
    p.add_argument("--repair", action="store_true", help="fix what can be fixed")
    p.add_argument("--quick", action="store_true", help="skip decoding every block")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        store = Store(args.store)
    except StoreError as e:
        print(f"llmfs fsck: {e}", file=sys.stderr)
        return 8
    try:
        problems, repairable = run_checks(store, QUICK_CHECKS if args.quick else CHECKS, repair=args.repair)
        for p in problems:
            print(f"{p.check}: {p.message}")
        with store.read() as t:
            for line in quarantined(Snapshot(t), t):
                print(f"quarantined (reads as EIO until rewritten): {line}")
        for line in model_report(store):
            print(line)
        if not problems:
            if not store.was_clean():
                store.set_clean(True)
            print(f"{args.store}: clean")
            return 0
        if args.repair and repairable:
            store.set_clean(True)
            print(f"{args.store}: {len(problems)} problem(s) repaired")
            return 1
        left = [p for p in problems if not (args.repair and p.repair)]
        print(
            f"{args.store}: {len(left)} problem(s) left"
            + ("" if args.repair else "; run with --repair to fix what can be fixed")
        )
        return 4
    finally:
        store.close()
