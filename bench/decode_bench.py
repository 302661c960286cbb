"""Measure the LM codec's real decode throughput: LMCodec.decode_many over 64 KiB blocks of real text
(full 1023-token segments, so every row walks positions 0..1023 as in real use), for one decode batch
size per run, with the process's peak RSS. Payloads are encoded once and cached (--payloads).

    .venv/bin/python bench/decode_bench.py --batch 64 [--segments 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import glob
import os
import pickle
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmfs.codec.lm import open_codec  # noqa: E402

from bench.engine_bench import int8_peak, ops_per_token  # noqa: E402

BLOCK = 64 * 1024


def corpus(limit: int) -> bytes:
    files = ["/usr/share/common-licenses/GPL-3"] + sorted(glob.glob("/usr/lib/python3.11/*.py"))
    out = b""
    for f in files:
        out += open(f, "rb").read()
        if len(out) >= limit:
            break
    return out[:limit]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--segments", type=int, default=64, help="segments to decode (about)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--payloads",
        default="/tmp/llmfs-decode-bench-{fingerprint}.pkl",
        help="cache of the encoded blocks, per codec fingerprint (payloads of another "
        "engine version do not decode)",
    )
    a = ap.parse_args(argv)
    codec = open_codec(None, batch=a.batch, threads=a.threads, device="cpu")
    a.payloads = a.payloads.format(fingerprint=codec.fingerprint.hex())
    if os.path.exists(a.payloads):
        blocks, payloads = pickle.load(open(a.payloads, "rb"))
    else:
        text = corpus(a.segments * 1023 * 4)  # ~3.5 bytes/token: cut to whole segments below
        blocks = [text[i : i + BLOCK] for i in range(0, len(text), BLOCK)]
        t0 = time.perf_counter()
        payloads = [codec.encode_payload(b) for b in blocks]
        print(f"encoded {len(blocks)} blocks in {time.perf_counter() - t0:.0f} s")
        pickle.dump((blocks, payloads), open(a.payloads, "wb"))
    segs = [codec.segments(b) for b in blocks]
    ntok = sum(len(s) for ss in segs for s in ss)
    nseg = sum(len(ss) for ss in segs)
    opt = ops_per_token(codec.engine.config)
    peak = int8_peak()
    t0 = time.perf_counter()
    out = codec.decode_many([(p, len(b)) for p, b in zip(payloads, blocks)])
    dt = time.perf_counter() - t0
    assert out == blocks
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tps = ntok / dt
    print(
        f"decode_many batch {a.batch}: {nseg} segments, {ntok} tokens in {dt:.1f} s = "
        f"{tps:.0f} tokens/s = {tps * opt / peak * 100:.1f} % of int8 peak "
        f"({peak / 1e9:.0f} GOP/s); peak RSS {rss:.0f} MiB"
    )


if __name__ == "__main__":
    main()
