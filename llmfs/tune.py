"""`llmfs tune STORE [--files N]`: choose the store's LM dictionary from its own data.

The dictionary (codec/lm/dictionary.py) is the priming context every LM segment of the store
continues, so that no segment starts cold. `tune` samples the start of up to N of the store's
files (spread evenly over its inodes), lets dictionary.choose pick the lines they share, stores the
result (content-addressed, in the store's meta table) and makes it the one new LM blocks continue.
Blocks already coded keep the dictionary they name (the store keeps every one a block names);
`llmfs compact --recode` re-encodes them with the new one.

A dictionary can also hurt (docs/benchmarks.md, session 6: one drawn from other Python modules
made a module larger — the lines modules share are the ones the model predicts anyway, and 256
tokens of someone else's code shift its guesses), so `tune` holds every fourth sample back
(HELD_OUT), chooses from the others, codes the held-out ones with the new dictionary and with the
store's current one (or none), and makes the new one current only if it codes them smaller;
otherwise the store keeps what it has. `--force` skips the check.

A store of several kinds of text (code, prose, lists, other languages) gets a dictionary per kind:
`tune` sorts the samples into classes by their token bigrams (dictionary.classes), runs the choice
and the held-out check per class, and stores the classes (dictionary.Classes: each class's profile
and its dictionary, or none where it did not pay); the encoder then picks per block. The classes
are stored only if the saving measured on the held-out files, projected onto the store's bytes,
exceeds what their profiles and dictionaries take in the store (`classes_pay`: a small store can
lose more to them than they save). A single dictionary is weighed the same way against its own
bytes (with its mixer extension, several KB). Samples that form one class (or none) get the single
dictionary as before.

This is the adaptation step of the design: the model adapted to the user's data without touching
its weights (docs/design.md weighs a LoRA-style weight adaptation against it). The store must be
unmounted: a running daemon keeps coding with the dictionary it started with.
"""

from __future__ import annotations

import sys

from llmfs.codec import Registry

from .models import THREADS, Models
from .statcmd import find_store
from .store import Store, StoreError, StoreLocked
from .units import positive_int

SAMPLE_FILES = 64
HELD_OUT = 4  # every HELD_OUT-th sample measures the dictionary instead of shaping it


def split_samples(samples: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """(samples to choose from, held-out samples to measure with): every HELD_OUT-th one held out,
    the last one if there are fewer than HELD_OUT, none if there is only one."""
    if len(samples) < 2:
        return samples, []
    held = set(range(HELD_OUT - 1, len(samples), HELD_OUT)) or {len(samples) - 1}
    return [s for i, s in enumerate(samples) if i not in held], [
        s for i, s in enumerate(samples) if i in held
    ]


def coded_size(codec, d, samples: list[bytes]) -> int:
    """Bytes of the LM payloads of `samples` coded with dictionary `d` (None: without one)."""
    before, classes = codec.dictionary, getattr(codec, "classes", None)
    try:
        codec.use_dictionary(d)
        return sum(len(codec.encode_payload(s)) for s in samples)
    finally:
        codec.use_dictionary(before)
        if classes is not None:
            codec.use_classes(classes)


def tune_classes(codec, samples: list[bytes], groups: list[list[int]], force: bool = False):
    """One dictionary per class of samples (`groups`: dictionary.classes' index lists): chosen
    from three of every four of the class's samples and kept only if it codes the class's
    held-out ones smaller than no dictionary (`force`: from all, unmeasured). The Classes (each
    class's profile and kept dictionary or None), a line per class saying what was measured, and
    the held-out bytes measured with the bytes the kept dictionaries saved on them (0, 0 with
    `force`): what `_tune_classes` weighs against the classes' own stored bytes."""
    from llmfs.codec.lm import dictionary

    tokens = [codec.tokenizer.encode(s) for s in samples]
    profiles, kept, lines = [], [], []
    held_bytes = saved = 0
    for n, group in enumerate(groups, 1):
        mine = [samples[i] for i in group]
        train, held = (mine, []) if force else split_samples(mine)
        d = dictionary.choose(train, codec.tokenizer, codec.engine.max_seq_len)
        what = f"class {n} ({len(group)} files)"
        if d is not None and held:
            new, old = coded_size(codec, d, held), coded_size(codec, None, held)
            what += f": {len(held)} held-out files {new} bytes with its dictionary, {old} without"
            held_bytes += sum(map(len, held))
            if new >= old:
                d = None
            else:
                saved += old - new
        lines.append(what + (f": dictionary {d.id.hex()} ({len(d.tokens)} tokens)" if d else ": none"))
        profiles.append(dictionary.profile([tokens[i] for i in group]))
        kept.append(d)
    return dictionary.Classes(tuple(profiles), tuple(kept)), lines, held_bytes, saved


def classes_pay(saved: int, held_bytes: int, store_bytes: int, cost: int) -> tuple[bool, int]:
    """Whether dictionaries that saved `saved` bytes on `held_bytes` of held-out samples are
    worth `cost` stored bytes (the classes' profiles and the dictionaries) in a store of
    `store_bytes` file bytes, and the saving projected onto the whole store. The projection is
    proportional: a dictionary saves at the start of every segment, so a store's saving grows
    with its bytes, while the classes cost the same in a store of 256 KiB as in one of 1 TiB —
    in a small store they can cost more than they save."""
    projected = saved * store_bytes // max(1, held_bytes)
    return projected > cost, projected


def sample_files(store: Store, registry: Registry, limit: int, nbytes: int) -> list[bytes]:
    """The first `nbytes` of up to `limit` regular files, spread evenly over the store's inodes
    (their first block only; unreadable ones are skipped)."""
    with store.read() as t:
        inos = [ino for ino, inode in t.inodes() if inode.is_reg and inode.size > 0]
        step = max(1, len(inos) // max(1, limit))
        hashes = []
        for ino in inos[::step][:limit]:
            h = t.block_hashes(ino, 0, 0).get(0)
            blob = t.container(h) if h is not None else None
            if blob is not None:
                hashes.append(bytes(blob))
    out = []
    for blob in hashes:
        try:
            out.append(registry.decode_many([blob], store.block_size)[0][:nbytes])
        except Exception as e:  # a damaged block: not a sample (fsck reports it)
            print(f"llmfs tune: skipping an unreadable block ({e})", file=sys.stderr)
    return out


def tune(
    store_path: str,
    files: int = SAMPLE_FILES,
    threads: int | None = None,
    default: bool = False,
    force: bool = False,
) -> str:
    """Choose and store the dictionary of the unmounted store at `store_path` (`default`: the
    codec's built-in one instead of one from the files; `force`: without the held-out check);
    what was done, in words. StoreError when the store is in use or holds no file to sample."""
    from llmfs.codec.lm import dictionary

    store = Store(store_path)
    try:
        models = Models(store, threads=threads or THREADS)
        registry = Registry(model_resolver=models.resolve)
        codec = models.compaction_codec()
        samples = [] if default else sample_files(store, registry, files, dictionary.SAMPLE_BYTES)
        groups = dictionary.classes([codec.tokenizer.encode(x) for x in samples]) if samples else []
        if len(groups) >= 2:  # several kinds of text: a dictionary per kind
            return _tune_classes(store, codec, samples, groups, force, store_path)
        train, held = (samples, []) if force else split_samples(samples)
        d = (
            codec.default_dictionary
            if default
            else dictionary.choose(train, codec.tokenizer, codec.engine.max_seq_len)
        )
        if d is None:
            raise StoreError(
                f"{store_path}: "
                + (
                    "this model has no built-in dictionary"
                    if default
                    else "no file to learn a dictionary from"
                )
            )
        codec.add_dictionary(d)
        current = codec.dictionary  # the store's current one (Models gave it to the codec)
        if held and d != current:
            new, old = coded_size(codec, d, held), coded_size(codec, current, held)
            if new >= old:
                return (
                    f"dictionary {d.id.hex()} ({len(d.tokens)} tokens) codes {len(held)} held-out "
                    f"files to {new} bytes, the store's "
                    f"{'current dictionary' if current else 'codec without one'} to {old}: kept "
                    f"{'the current dictionary' if current else 'no dictionary'} (--force makes it current)"
                )
            with store.read() as t:  # a dictionary costs its bytes once; the saving grows with the data
                store_bytes = t.counters.logical
                known = d.id in t.dictionaries()
            pays, projected = classes_pay(
                old - new, sum(map(len, held)), store_bytes, 0 if known else len(d.blob)
            )
            if not pays:
                return (
                    f"dictionary {d.id.hex()} ({len(d.tokens)} tokens) would save about {projected} "
                    f"bytes on this store's {store_bytes} but takes {len(d.blob)} bytes to store: kept "
                    f"{'the current dictionary' if current else 'no dictionary'} (--force makes it current)"
                )
        with store.write() as t:
            old = t.current_dictionary() if t.dictionary_classes() is None else None
            t.put_dictionary(d.id, d.blob)
            t.set_current_dictionary(d.id)
            t.set_dictionary_classes(None)
        if old == d.id:
            return f"dictionary {d.id.hex()} ({len(d.tokens)} tokens) is already current"
        return (
            f"dictionary {d.id.hex()} ({len(d.tokens)} tokens, "
            f"{'built in' if default else f'from {len(samples)} files'}) is now "
            f"current; `llmfs compact --recode {store_path}` re-encodes the blocks coded before"
        )
    finally:
        store.close()


def _tune_classes(store: Store, codec, samples, groups, force: bool, store_path: str) -> str:
    classes, lines, held_bytes, saved = tune_classes(codec, samples, groups, force)
    head = f"{len(groups)} classes of text in {len(samples)} files:\n  " + "\n  ".join(lines)
    kept = [d for d in classes.dictionaries if d is not None]
    if not kept:
        return head + "\nno class's dictionary codes its held-out files smaller: kept what the store has"
    if not force:
        with store.read() as t:
            store_bytes = t.counters.logical
        cost = len(classes.blob) + sum(len(d.blob) for d in kept)
        pays, projected = classes_pay(saved, held_bytes, store_bytes, cost)
        if not pays:
            return head + (
                f"\nthe dictionaries would save about {projected} bytes on this store's {store_bytes} "
                f"but take {cost} bytes to store: kept what the store has (--force stores them)"
            )
    with store.write() as t:
        for d in kept:
            t.put_dictionary(d.id, d.blob)
        t.set_current_dictionary(kept[0].id)  # what a release without classes continues
        t.set_dictionary_classes(classes.blob)
    return (
        head + f"\n{len(kept)} dictionaries are now current, each block continuing its class's; "
        f"`llmfs compact --recode {store_path}` re-encodes the blocks coded before"
    )


def register(sub) -> None:
    p = sub.add_parser("tune", help="choose the store's LM dictionary from its data")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--files", type=positive_int, default=SAMPLE_FILES, help="files to sample")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads of the LM")
    p.add_argument(
        "--default",
        action="store_true",
        help="use the built-in dictionary (generic prose, code, configuration and log lines)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="make the chosen dictionary current without measuring it on held-out files",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        store_path, _ = find_store(args.store)
        print(tune(store_path, args.files, args.threads, args.default, args.force))
    except StoreLocked:
        print(f"llmfs tune: {args.store} is mounted; unmount it first", file=sys.stderr)
        return 1
    except (StoreError, OSError) as e:
        print(f"llmfs tune: {e}", file=sys.stderr)
        return 1
    return 0
