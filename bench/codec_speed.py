"""Encode and decode CPU time of the LM payload variants on the same bytes, against the bare model,
in one process (speed ratios that a loaded machine does not distort as much as wall-clock times).

    python bench/codec_speed.py FILE [--bytes N] [--reps R] [--threads T] [--variants a,b,...]
                                [--mates FILE,FILE...]

Variants (name = payload version, segment tokens with BOS): bare = version 2 at 1,024 (the bare
model: the reference every ratio is against), v5 = version 5 (every group mixed), v6 = what the
codec writes (each group coded mixed and bare from one forward pass, the smaller kept), v6@2048 =
the same with 2,048-token segments (the engine's whole window: fewer cold starts, attention over
twice the keys, half the rows for a block's decode). Each round encodes and decodes every variant
once, interleaved, and checks the round trip; the figure per variant is its minimum CPU-seconds
over the rounds (load inflates the minimum least). Decode is one block alone (a cold read: its
segments are all the rows there are). With --mates (other files of the same kind, as `llmfs tune`
samples a store): v6+dict = v6 continuing the dictionary dictionary.choose picks from them without
its mixer extension, v6+ext = with it (what `tune` stores now).
"""

from __future__ import annotations

import argparse
import time

from llmfs.codec.lm import dictionary, open_codec

VARIANTS = {"bare": (2, 1024), "v5": (5, 1024), "v6": (6, 1024), "v6@2048": (6, 2048)}
WITH_MATES = {"v6+dict": 0, "v6+ext": dictionary.EXTENSION_TOKENS}  # extension tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--bytes", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default=None, help="default: all (those with mates if --mates)")
    ap.add_argument("--mates", default=None, help="comma-separated files to choose a dictionary from")
    args = ap.parse_args()
    with open(args.file, "rb") as f:
        data = f.read(args.bytes)
    codec = open_codec(None, threads=args.threads)
    dicts: dict[str, dictionary.Dictionary | None] = dict.fromkeys(VARIANTS)
    if args.mates:
        samples = []
        for m in args.mates.split(","):
            with open(m, "rb") as f:
                samples.append(f.read(dictionary.SAMPLE_BYTES))
        for name, ext in WITH_MATES.items():
            dicts[name] = dictionary.choose(samples, codec.tokenizer, codec.engine.max_seq_len, extension=ext)
    names = args.variants.split(",") if args.variants else list(dicts)
    cpu = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t")
    print(f"{args.file}: {len(data)} bytes; CPU {cpu}; {args.threads} engine thread(s)", flush=True)
    best: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}
    tokens = len(codec.tokenizer.encode(data))
    for r in range(args.reps):
        for name in names:
            codec.version, codec.segment_tokens = VARIANTS.get(name, VARIANTS["v6"])
            codec.use_dictionary(dicts[name])
            t = time.process_time()
            payload = codec.encode_payload(data)
            enc = time.process_time() - t
            t = time.process_time()
            back = codec.decode_many([(payload, len(data))])
            dec = time.process_time() - t
            assert back == [data], f"{name}: round trip failed"
            b = best.setdefault(name, [enc, dec])
            b[0], b[1] = min(b[0], enc), min(b[1], dec)
            sizes[name] = len(payload)
            print(
                f"round {r} {name}: {len(payload)} bytes, encode {enc:.2f} CPU-s, decode {dec:.2f} CPU-s",
                flush=True,
            )
    ref = best.get("bare", next(iter(best.values())))
    for name, (enc, dec) in best.items():
        print(
            f"{name}: {sizes[name]} bytes; encode {tokens / enc:.1f} tok/CPU-s ({ref[0] / enc:.3f} x bare's"
            f" speed), decode {tokens / dec:.1f} tok/CPU-s ({ref[1] / dec:.3f} x bare's speed)",
            flush=True,
        )


if __name__ == "__main__":
    main()
