"""Container sizes of real files under the LM codec's payload versions, against the bare model's
float32 floor, xz and zstd — encode only (round trips are the tests' and `llmfs bench codec`'s),
so it fits a loaded machine — and the README's bits-per-byte plot.

    python bench/codec_sizes.py OUT.json [--bytes N] [--plot OUT.png] FILE[:MATE,MATE...] ...

Per file (its first N bytes): bare = payload version 2 (the model's rows), mix = version 3 (the
session 5 mixer, groups of 16 as it shipped), v5 = version 5 without a dictionary (every group
mixed), v6 = what the codec writes without a dictionary (version 5, or version 6 where a group
codes smaller bare), v5+dict / v6+dict = the same with the dictionary dictionary.choose picks from
the MATE files (the start of other
files of the same kind, as `llmfs tune` samples a store — never the file itself), tuned = what
`llmfs tune` would store: the dictionary chosen from three of every four mates, kept only if it
codes the held-out ones smaller (llmfs.tune.split_samples, coded_size), else none, written as the
codec writes (version 5 or 6). Sizes are whole
containers (payload + header); "lm" (the full codec, what --plot draws) is the tuned one; "store"
is that container as a store keeps it (the compact form, codec/container.py: a 4-byte header for
the 24 of a standalone container, the block's key its check, and a dictionary id kept as a
one-byte store-local number: 7 bytes less). "float
bpb" = reference.cross_entropy_bits of the bare model on the 1,024-token segments the default codec
codes (the floor every percentage is against); with `--segment N` (tokens per segment, BOS
included; the payload then carries its shape) the codec codes N-token segments and "float bpb at
S" is the same floor on those. `--replot ROWS.json --plot OUT.png`
redraws a plot from saved rows.
"""

from __future__ import annotations

import argparse
import json
import time

from llmfs.codec.bench import _plot, baselines
from llmfs.codec.container import compact_size, header_size
from llmfs.codec.lm import PAYLOAD_VERSION, dictionary, open_codec, reference
from llmfs.codec.lm.codec import payload_dictionary

from llmfs.tune import coded_size, split_samples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("files", nargs="*")
    ap.add_argument("--bytes", type=int, default=0, help="first N bytes of each file (0: all)")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--no-floor", action="store_true")
    ap.add_argument(
        "--variants", default="bare,mix,v5,v6,v5+dict,v6+dict,tuned", help="comma-separated subset"
    )
    ap.add_argument("--segment", type=int, default=0, help="tokens per segment, BOS included (0: default)")
    ap.add_argument("--replot", action="store_true", help="OUT is saved rows: only draw --plot")
    args = ap.parse_intermixed_args()  # OUT, options, then FILEs, as the usage above writes it
    if args.replot:
        with open(args.out) as f:
            _plot(json.load(f), args.plot)
        return
    codec = open_codec(None, threads=2)
    floor_segments = codec.segment_tokens
    if args.segment:
        codec.segment_tokens = min(args.segment, codec.engine.max_seq_len)
    rows = []
    for spec in args.files:
        path, _, mates = spec.partition(":")
        with open(path, "rb") as f:
            data = f.read(args.bytes) if args.bytes else f.read()
        d = tuned = None
        if mates:
            samples = []
            for m in mates.split(","):
                with open(m, "rb") as f:
                    samples.append(f.read(dictionary.SAMPLE_BYTES))
            samples = [x for x in samples if x]
            d = dictionary.choose(samples, codec.tokenizer, codec.engine.max_seq_len)
            if "tuned" in args.variants.split(","):
                train, held = split_samples(samples)
                tuned = dictionary.choose(train, codec.tokenizer, codec.engine.max_seq_len)
                codec.version, codec.group = PAYLOAD_VERSION, 32
                if held and coded_size(codec, tuned, held) >= coded_size(codec, None, held):
                    tuned = None
        head = header_size(len(data), has_fingerprint=True)
        sizes, cpu, numbered = {}, {}, {}
        variants = [("bare", 2, 32, None), ("mix", 3, 16, None), ("v5", 5, 32, None), ("v6", 6, 32, None)]
        if d is not None:
            variants += [("v5+dict", 5, 32, d), ("v6+dict", 6, 32, d), ("tuned", PAYLOAD_VERSION, 32, tuned)]
        variants = [v for v in variants if v[0] in args.variants.split(",")]
        for name, version, group, dic in variants:
            codec.version, codec.group = version, group
            codec.use_dictionary(dic)
            t = time.process_time()
            payload = codec.encode_payload(data)
            sizes[name] = len(payload) + head
            numbered[name] = 0 if payload_dictionary(payload) is not None else None
            cpu[name] = time.process_time() - t
        segments = codec.segments(data)
        floor = floor_s = float("nan")
        if not args.no_floor:
            own, codec.segment_tokens = codec.segment_tokens, floor_segments
            bare = codec.segments(data)
            codec.segment_tokens = own
            floor = reference.cross_entropy_bits(None, [[codec.engine.bos_id] + s for s in bare]) / len(data)
            floor_s = floor
            if own != floor_segments:
                floor_s = reference.cross_entropy_bits(
                    None, [[codec.engine.bos_id] + s for s in segments]
                ) / len(data)
        name = next((k for k in ("tuned", "v6+dict", "v6", "v5") if k in sizes), None)
        best = sizes.get(name, 0)
        # as a store keeps it: the compact header, and a dictionary id as its store-local number
        store = best - head + compact_size(len(data), 0, numbered.get(name))
        row = {
            "file": path,
            "raw": len(data),
            **baselines(data),
            **sizes,
            "lm": best,  # the full codec (what _plot draws)
            "store": store,  # the same, kept compact in a store
            "float bpb": floor,
            "segment tokens": codec.segment_tokens,
            "float bpb at S": floor_s,
            "tokens": sum(map(len, segments)),
            "dict tokens": len(d.tokens) if d else 0,
            "tuned keeps a dictionary": tuned is not None,
            "enc cpu s": cpu,
        }
        rows.append(row)
        n = len(data)
        vs = "  ".join(
            f"{k} {v} ({8 * v / n / floor - 1:+.2%})" for k, v in {**sizes, "store": store}.items()
        )
        print(
            f"{path} [{n} B]: xz {row['xz -9e']} zstd {row['zstd -19']}  {vs}  floor {floor:.4f} bpb"
            f" (at S={codec.segment_tokens}: {floor_s:.4f})",
            flush=True,
        )
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        _plot(rows, args.plot)


if __name__ == "__main__":
    main()
