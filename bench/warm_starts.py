"""What a warm start is worth: the float32 model's bits for a block's later segments when each
starts cold (as the codec codes them: BOS, then the segment), when it is primed with the block's
first P tokens ("head": known early, so the segments could still decode side by side, each
starting P steps late), and when it is primed with the P tokens just before it ("prev": what a
longer segment would see — those tokens are the previous segment's last, so the segments could no
longer decode side by side). The first segment is cold in every column.

    python bench/warm_starts.py [--bytes N] [--prefix P,P,...] FILE...

Float32 reference model (codec/lm/reference.py), no container and no mixer: an upper bound on
what either start would give the codec, before what the mixer and the store dictionary already
take of it. One torch thread (a second thread only adds contention on a loaded 2-core machine).
"""

from __future__ import annotations

import argparse
import math

import torch
from llmfs.codec.lm import open_codec, reference
from llmfs.codec.lm.loader import resolve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--bytes", type=int, default=8192, help="first N bytes of each file (0: all)")
    ap.add_argument("--prefix", default="64,128,256", help="comma-separated priming lengths P")
    args = ap.parse_args()
    torch.set_num_threads(1)
    codec = open_codec(None, threads=1)
    model = reference._model(str(resolve(None)))
    bos = codec.engine.bos_id

    @torch.no_grad()
    def bits(ctx: list[int], seg: list[int]) -> float:
        ids = torch.tensor([[bos, *ctx, *seg]])
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        b = -logp.gather(-1, ids[0, 1:, None])[:, 0] / math.log(2)
        return b[len(ctx) :].sum().item()

    prefixes = [int(p) for p in args.prefix.split(",")]
    cpu = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(" :\t")
    print(f"CPU: {cpu}; float32 bytes of the later segments' code, against all-cold")
    for path in args.files:
        with open(path, "rb") as f:
            data = f.read(args.bytes or -1)
        segs = codec.segments(data)
        flat = [t for s in segs for t in s]
        cold = [bits([], s) for s in segs]
        row = {"cold": sum(cold)}
        starts = [sum(len(s) for s in segs[:k]) for k in range(len(segs))]
        for p in prefixes:
            row[f"head{p}"] = cold[0] + sum(bits(segs[0][:p], s) for s in segs[1:])
            row[f"prev{p}"] = cold[0] + sum(
                bits(flat[max(0, a - p) : a], s) for a, s in zip(starts[1:], segs[1:])
            )
        cells = " ".join(f"{k}={v / 8:.0f}B({v / row['cold'] - 1:+.2%})" for k, v in row.items())
        print(f"{path}: {len(data)} bytes, {len(flat)} tokens, {len(segs)} segments: {cells}", flush=True)


if __name__ == "__main__":
    main()
