"""CPU <-> CUDA exactness of the LM codec, on a machine with an NVIDIA GPU.

A block compressed on one machine must decompress on any other (docs/design.md, "Exactness"): this
checks it between the CPU engine (C kernels) and the CUDA engine (torch ops) of one machine.

    .venv/bin/python bench/cuda_roundtrip.py [--devices cpu cuda] [--shape smollm2|tiny] [--kib 24]

Run it from a checkout where llmfs is installed in an environment whose torch has CUDA (`make setup`
installs the CPU build of torch; install a CUDA build of the same version into .venv first). It
builds the same deterministic random model on both devices (Engine.tiny from a seed: nothing to
download, and at --shape smollm2 it has SmolLM2-135M's shapes — 30 layers, 576 wide, 9/3 heads,
49,152-entry head — so both paths run their real kernels on real sizes), then on the same text:
  1. frequency tables of a batch (engine.freqs) and of incremental steps are bit-identical across
     the two devices;
  2. the payloads encoded on each device are byte-identical;
  3. each payload decodes on the other device (CPU -> CUDA and CUDA -> CPU) to the input bytes;
and reports encode/decode tokens/s per device against the int8 GEMM peak measured on that device in
the same run. It prints one line per check, writes the results as JSON to $OUT/cuda_roundtrip.json
when $OUT is set, and exits 0 only if every check passed.

The text is the project's README and source. The byte-level tokenizer keeps the check free of
tokenizer files; the real model's tokenizer is plain Python and the same on every device (tests
cover it). At --shape smollm2 and --kib 24 the CPU half takes a few minutes on 16 cores; --kib 8 or
--shape tiny for a quicker check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llmfs.codec.bench import int8_peak_ops, ops_per_token  # noqa: E402
from llmfs.codec.lm.codec import LMCodec  # noqa: E402
from llmfs.codec.lm.engine import Engine  # noqa: E402
from llmfs.codec.lm.tokenizer import ByteTokenizer  # noqa: E402

SHAPES = {
    "smollm2": dict(
        vocab_size=49152, dim=576, n_layer=30, n_head=9, n_kv_head=3, ffn_dim=1536, max_seq_len=1024
    ),
    "tiny": dict(vocab_size=259, dim=64, n_layer=2, n_head=4, n_kv_head=2, ffn_dim=128, max_seq_len=256),
}


def text(kib: int) -> bytes:
    root = Path(__file__).resolve().parent.parent
    out = b""
    for p in [root / "README.md", *sorted(root.glob("codec/**/*.py")), *sorted(root.glob("llmfs/*.py"))]:
        out += p.read_bytes()
        if len(out) >= kib * 1024:
            break
    return out[: kib * 1024]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", nargs=2, default=["cpu", "cuda"])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--kib", type=int, default=24, help="bytes of text to code, in KiB")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    shape = SHAPES[a.shape]
    base = Engine.tiny(seed=a.seed, bos_id=256, **shape)
    engines = {d: base.to(d) for d in a.devices}
    codecs = {d: LMCodec((e, ByteTokenizer()), batch=64) for d, e in engines.items()}
    data = text(a.kib)
    results: dict = {"shape": a.shape, "bytes": len(data), "devices": a.devices, "checks": {}}
    ok = True

    def check(name: str, passed: bool, detail: str = "") -> None:
        nonlocal ok
        ok &= passed
        results["checks"][name] = passed
        print(f"{'PASS' if passed else 'FAIL'}  {name}{'  ' + detail if detail else ''}", flush=True)

    d0, d1 = a.devices
    # 1. tables: a batch of 3 rows in one pass, then the same positions stepped one by one
    g = torch.Generator().manual_seed(a.seed)
    tokens = torch.randint(0, 256, (3, min(96, shape["max_seq_len"])), generator=g)
    tokens[:, 0] = 256
    f = {d: engines[d].freqs(tokens.to(d)).cpu() for d in a.devices}
    check("freqs identical across devices", torch.equal(f[d0], f[d1]))
    steps = {}
    for d in a.devices:
        st = engines[d].start(3, tokens.shape[1])
        steps[d] = torch.stack(
            [engines[d].step(st, tokens[:, t].to(d)).cpu() for t in range(tokens.shape[1])], dim=1
        )
    check(
        "incremental steps identical across devices and to freqs",
        torch.equal(steps[d0], steps[d1]) and torch.equal(steps[d0], f[d0]),
    )
    # 2. payloads, 3. cross-device decoding
    payload, speed = {}, {}
    segments = codecs[d0].segments(data)
    n_tokens = sum(len(s) for s in segments)
    for d in a.devices:
        sync(d)
        t = time.perf_counter()
        payload[d] = codecs[d].encode_payload(data)
        sync(d)
        speed[d] = {"encode_tok_s": n_tokens / (time.perf_counter() - t)}
    check(
        "payload bytes identical across devices",
        payload[d0] == payload[d1],
        f"{len(payload[d0])} B for {len(data)} B ({len(segments)} segments)",
    )
    for src, dst in ((d0, d1), (d1, d0)):
        sync(dst)
        t = time.perf_counter()
        back = codecs[dst].decode_many([(payload[src], len(data))])[0]
        sync(dst)
        speed[dst]["decode_tok_s"] = n_tokens / (time.perf_counter() - t)
        check(f"{src} -> {dst} round trip", back == data)
    opt = ops_per_token(base, codecs[d0].segment_tokens)
    for d in a.devices:
        peak = int8_peak_ops(d)
        s = speed[d]
        s.update(
            int8_peak_top_s=peak / 1e12,
            encode_pct_peak=100 * s["encode_tok_s"] * opt / peak,
            decode_pct_peak=100 * s["decode_tok_s"] * opt / peak,
        )
        print(
            f"{d}: encode {s['encode_tok_s']:.0f} tok/s = {s['encode_pct_peak']:.1f} % of its "
            f"int8 peak ({peak / 1e12:.2f} TOP/s), decode {s['decode_tok_s']:.0f} tok/s = "
            f"{s['decode_pct_peak']:.1f} %",
            flush=True,
        )
    results["speed"] = speed
    results["ok"] = ok
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "cuda_roundtrip.json").write_text(json.dumps(results, indent=1))
    print("ALL PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
