"""The store's language models: which model compacts new blocks, and how a block coded by any model
the store has used is decoded again — from the store alone.

A store names its model at mkfs (`meta.model`; "" = the default model). Every LM block's container
carries its model's fingerprint. The store keeps the model itself: its model file (the engine-ready
integers, Config, canonical tokenizer and engine version: codec/lm/modelfile.py) under `modelfiles`,
and `modelkeys` maps each fingerprint the model answers to (its own and older releases' aliases) to
that file. So decoding a block needs this release's code and the store, nothing else: not the
installed transformers/tokenizers/gguf, not ~/.cache, not HOME, not the model's source file.

When models enter the store:
  * the compaction model, before its first LM block is stored (`compaction_codec`): converted from
    its spec (or read from the conversion cache) once, embedded, then always read from the store —
    a store whose model file has the current engine version never converts again;
  * models of blocks written before model files existed (store format 1): their fingerprint is found
    through the `models` table's spec, loaded from the environment if it can still build them, and
    embedded at the next compaction (`embed_pending`, called from the compaction path, which holds
    no transaction) or by `llmfs fsck --repair`.

Refusing to start: `Models(store)` checks that this release has the engine version of every model
file in the store and raises UndecodableStore (a StoreError: mount and compact print it and stop)
naming the release that wrote it. fsck and stat report instead (`Models(store, check=False)`).

Threading: models load lazily (seconds) on first use, once, under a lock; the loaded codec is shared.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass

from llmfs.codec.container import ModelMismatch
from llmfs.codec.lm import DECODE_BATCH, DEFAULT_MODEL  # plain values: importing them loads no torch
from llmfs.codec.registry import LM

from .store import Store, StoreError

log = logging.getLogger("llmfs")

# The engine's own threads (codec/lm/codec.py; --threads N). They never spin-wait (torch's OpenMP
# threads did, which on a loaded 2-core machine made the model many times slower, so torch keeps
# one): kernels.c keeps helper threads asleep on a condition variable between calls, one pool per
# nice value (the compactor's helpers run at its nice 19), and work goes in chunks from a shared
# counter. A call still waits for the helpers that took part to leave it, and on an oversubscribed
# machine a woken helper may wait a scheduler slice before it runs, per GEMM call
# (docs/design.md, "Threading and locks").
THREADS = 1
# Bytes of a model file read to find its manifest (the canonical tokenizer is ~1.6 MB of it).
_MANIFEST_PEEK = 8 << 20


class UndecodableStore(StoreError):
    """The store holds blocks this release cannot decode; the message says what to install."""


def store_spec(store: Store) -> str:
    return store.model_spec or DEFAULT_MODEL


@dataclass
class ModelUse:
    """One fingerprint found in a store's LM blocks (fsck and stat report these)."""

    fingerprint: bytes
    blocks: int  # LM blocks whose container carries it
    spec: str | None  # from the models table
    digest: bytes | None  # its model file, if embedded
    engine_version: int | None  # from the model file's manifest
    written_by: str
    decodable: bool  # whether this installation can decode them
    why: str  # what decodable rests on, in words


class Models:
    def __init__(
        self,
        store: Store,
        threads: int | None = THREADS,
        batch: int = DECODE_BATCH,
        device: str = "auto",
        check: bool = True,
    ):
        """check: raise UndecodableStore if a model file of the store needs an engine version
        this release lacks (a mount or compaction must not start on such a store)."""
        self.store = store
        self.threads, self.batch, self.device = threads, batch, device
        self._lock = threading.Lock()
        self._codecs: dict[object, object] = {}  # model file digest or spec -> LM codec
        self._compaction = None
        self._to_embed: dict[bytes, tuple[object, str]] = {}  # fp -> (codec, spec)
        if check:
            self.check()

    # -- what the store holds ---------------------------------------------------------------------
    def manifests(self) -> dict[bytes, dict]:
        """digest -> manifest of every model file in the store (headers only, not verified)."""
        from llmfs.codec.lm import modelfile

        out = {}
        with self.store.read(buffers=True) as t:
            for d in t.model_file_digests():
                try:
                    out[d] = modelfile.read_manifest(t.model_file(d)[:_MANIFEST_PEEK])
                except modelfile.BadModelFile as e:
                    out[d] = {"error": str(e)}
        return out

    def check(self) -> None:
        from llmfs.codec.lm import engines

        for d, m in self.manifests().items():
            if "error" in m:
                continue  # a corrupt model file: its blocks read as EIO, fsck names them
            try:
                engines.check(int(m["engine_version"]), m.get("written_by", ""))
            except engines.UnsupportedEngine as e:
                raise UndecodableStore(
                    f"{self.store.path}: model {m.get('fingerprint', '?')} (file {d.hex()[:16]}): {e}"
                ) from None

    def usage(self) -> list[ModelUse]:
        """Per fingerprint of the store's LM blocks: how many blocks, which model file and engine
        version, and whether this installation can decode them (without loading any model)."""
        from llmfs.codec.lm import engines

        counts: Counter = Counter()
        with self.store.read(buffers=True) as t:
            for _h, head, _size in t.block_headers():  # head None: damaged (fsck reports it)
                if head is not None and head.codec_id == LM:
                    counts[head.fingerprint] += 1
            keys, specs = t.model_keys(), t.models()
        manifests = self.manifests()
        used = {keys.get(fp) for fp in counts}
        for d in set(keys.values()) - used:  # embedded models no block uses yet, too
            fp = bytes.fromhex(manifests.get(d, {}).get("fingerprint", "")) or None
            if fp is not None:
                counts[fp] = 0
        out = []
        for fp, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            d, spec = keys.get(fp), specs.get(fp)
            m = manifests.get(d, {}) if d else {}
            version, by = m.get("engine_version"), m.get("written_by", "")
            if d is None:
                ok = spec is not None
                why = (
                    f"not embedded: needs model {spec!r} buildable on this machine "
                    f"(`llmfs fsck --repair` embeds it)"
                    if ok
                    else "no model recorded for it: undecodable"
                )
            elif "error" in m:
                ok, why = False, f"model file corrupt: {m['error']}"
            else:
                ok = int(version) in engines.SUPPORTED
                why = (
                    "embedded"
                    if ok
                    else f"embedded, but engine version {version} is not in this release (written by {by})"
                )
            out.append(ModelUse(fp, n, spec, d, version, by, ok, why))
        return out

    # -- loading ----------------------------------------------------------------------------------
    def _file_codec(self, digest: bytes):
        """The codec of the store's model file `digest` (read, verified, built once)."""
        codec = self._codecs.get(digest)
        if codec is None:
            from llmfs.codec.lm import codec_of, modelfile

            with self.store.read(buffers=True) as t:
                raw = t.model_file(digest)
                blob = bytearray(raw) if raw is not None else None
            if blob is None:
                raise ModelMismatch(f"model file {digest.hex()[:16]} is missing from the store")
            log.info("loading model %s from the store", digest.hex()[:16])
            mf = modelfile.parse(blob, digest)
            codec = codec_of(
                mf,
                batch=self.batch,
                threads=self.threads,
                device=self.device,
                source=f"store model {digest.hex()[:16]}",
            )
            self._attach_dictionaries(codec)
            self._codecs[digest] = codec
        return codec

    def _spec_codec(self, spec: str):
        """The codec of `spec` built from the environment (conversion cache or source file)."""
        codec = self._codecs.get(spec)
        if codec is None:
            from llmfs.codec.lm import open_codec  # torch and the model: only when needed

            log.info("loading model %s", spec)
            codec = open_codec(spec, batch=self.batch, threads=self.threads, device=self.device)
            b = getattr(codec.engine, "backend", None)
            log.info(
                "model %s on %s, %d engine threads%s",
                spec,
                codec.engine.device,
                getattr(codec.engine, "threads", 1),
                f"; {b.describe()}" if b else "",
            )
            self._attach_dictionaries(codec)
            self._codecs[spec] = codec
            mf = getattr(codec, "model_file", None)
            if mf is not None:  # the same model read back from the store: not a second copy
                self._codecs.setdefault(mf.digest, codec)
        return codec

    def codec(self, spec: str):
        """The LM codec of `spec`, loaded on first use (from the environment)."""
        with self._lock:
            return self._spec_codec(spec)

    def compaction_codec(self):
        """The codec new LM blocks are coded with: the store's model at the current engine
        version, embedded in the store before it codes anything."""
        with self._lock:
            if self._compaction is None:
                codec = self._current_codec()
                self._use_store_dictionary(codec)
                self._compaction = codec
            codec = self._compaction
        self.embed_pending()
        return codec

    def _current_codec(self):
        from llmfs.codec.lm import engines

        spec = store_spec(self.store)
        with self.store.read() as t:
            specs, keys = t.models(), t.model_keys()
        manifests = self.manifests()
        for fp, s in specs.items():
            d = keys.get(fp)
            m = manifests.get(d, {}) if d else {}
            if (
                s == spec
                and m.get("engine_version") == engines.current_version()
                and m.get("fingerprint") == fp.hex()
            ):
                return self._file_codec(d)
        codec = self._spec_codec(spec)
        self._embed(codec, spec)
        return codec

    # -- dictionaries (codec/lm/dictionary.py) ------------------------------------------------------
    def _attach_dictionaries(self, codec) -> None:
        """Give `codec` every dictionary the store holds, so the blocks that name one decode. One
        that does not parse, hash to its key or fit the model is left out (its blocks read as EIO;
        fsck names it)."""
        if not hasattr(codec, "add_dictionary"):
            return
        from llmfs.codec.container import ContainerError
        from llmfs.codec.lm import dictionary

        with self.store.read() as t:
            blobs = t.dictionaries()
        for did, blob in blobs.items():
            try:
                d = dictionary.parse(blob)
                if d.id != did:
                    raise ContainerError("does not match its id")
                codec.add_dictionary(d)
            except (ContainerError, ValueError) as e:
                log.error("LM dictionary %s in %s is unusable: %s", did.hex(), self.store.path, e)

    def _use_store_dictionary(self, codec) -> None:
        """Make `codec` encode with the store's current dictionary (`llmfs tune`; none until one
        is set), or with its classes of dictionaries where tune stored several, and store that
        dictionary before any block names it."""
        if not hasattr(codec, "use_dictionary"):
            return
        with self.store.read() as t:
            cur, held, blob = t.current_dictionary(), t.dictionaries(), t.dictionary_classes()
        d = None
        if cur is not None:
            d = codec.dictionaries.get(cur)
            if d is None:
                log.error("the store's dictionary %s is missing or unusable; new blocks use none", cur.hex())
        codec.use_dictionary(d)
        if d is not None and d.id not in held:
            with self.store.write() as t:
                t.put_dictionary(d.id, d.blob)
        if blob is not None and hasattr(codec, "use_classes"):
            from llmfs.codec.container import ContainerError
            from llmfs.codec.lm import dictionary

            try:  # several dictionaries: each block continues its class's (tune stored them all)
                codec.use_classes(dictionary.parse_classes(blob, codec.dictionaries))
            except ContainerError as e:
                log.error(
                    "the store's dictionary classes are unusable (%s); new blocks use %s",
                    e,
                    "its current dictionary" if d is not None else "none",
                )

    def _embed(self, codec, spec: str) -> None:
        mf = codec.model_file
        with self.store.write() as t:
            t.put_model_file(mf.digest, memoryview(mf.blob), sorted(mf.fingerprints))
            t.add_model(mf.fingerprint, spec)
        log.info("model %s (%s) is now stored in %s", mf.fingerprint.hex(), spec, self.store.path)

    def embed_pending(self) -> None:
        """Embed the models that decoded blocks of a format 1 store (see resolve). Call only
        where no store transaction is open in this thread."""
        with self._lock:
            todo, self._to_embed = self._to_embed, {}
        for fp, (codec, spec) in todo.items():
            try:
                self._embed(codec, spec)
            except StoreError as e:
                log.error("could not store model %s: %s", fp.hex(), e)

    def retire_unused(self) -> list[bytes]:
        """Drop the store's model files that no LM block needs (after `llmfs compact --recode`),
        keeping the compaction model's. Returns the digests dropped."""
        current = getattr(self.compaction_codec(), "model_file", None)
        with self.store.read(buffers=True) as t:
            keys = t.model_keys()
            needed = {current.digest} if current is not None else set()
            for _h, head, _size in t.block_headers():  # head None: damaged (fsck reports it)
                if head is not None and head.codec_id == LM and head.fingerprint in keys:
                    needed.add(keys[head.fingerprint])
        with self.store.write() as t:
            doomed = [d for d in t.model_file_digests() if d not in needed]
            for d in doomed:
                t.delete_model_file(d)
        for d in doomed:
            log.info("retired model file %s: no block needs it", d.hex()[:16])
        return doomed

    def resolve(self, fingerprint: bytes):
        """For Registry(model_resolver=...): the codec that decodes blocks with this fingerprint:
        the store's model file for it, else (a format 1 block) the model its spec builds here."""
        with self.store.read() as t:
            digest, spec = t.model_key(fingerprint), t.model_spec(fingerprint)
        with self._lock:
            if digest is not None:
                try:
                    codec = self._file_codec(digest)
                except ModelMismatch:
                    raise
                except Exception as e:  # corrupt file, an engine version this release lacks
                    raise ModelMismatch(
                        f"blocks {fingerprint.hex()} need model file "
                        f"{digest.hex()[:16]} of the store, which cannot be "
                        f"used: {e}"
                    ) from None
            elif spec is None:
                raise ModelMismatch(
                    f"blocks were coded by model {fingerprint.hex()}, which this store does not record"
                )
            else:
                try:
                    codec = self._spec_codec(spec)
                except Exception as e:  # a missing file, an unsupported model
                    raise ModelMismatch(
                        f"model {spec} (needed by blocks {fingerprint.hex()}) "
                        f"is not stored in the store and cannot be loaded: "
                        f"{e}"
                    ) from None
                if fingerprint in codec.fingerprints:
                    self._to_embed[fingerprint] = (codec, spec)
        if fingerprint not in codec.fingerprints:
            raise ModelMismatch(
                f"model {spec or digest.hex()[:16]} now has fingerprint "
                f"{codec.fingerprint.hex()}, but blocks need "
                f"{fingerprint.hex()}: was the model file replaced?"
            )
        return codec


def model_report(store: Store) -> list[str]:
    """Per model and engine version: how many LM blocks depend on it and whether this
    installation can decode them (fsck and stat print these lines)."""
    lines = []
    for u in Models(store, check=False).usage():
        version = f"engine v{u.engine_version}" if u.engine_version is not None else "engine ?"
        lines.append(
            f"model {u.fingerprint.hex()} ({u.spec or 'unnamed'}, {version}): "
            f"{u.blocks} LM block(s), {'decodable' if u.decodable else 'NOT decodable'}"
            f" here ({u.why})"
        )
    return lines
