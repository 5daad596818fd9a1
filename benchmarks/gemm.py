"""Prompt products: our blocked GEMM (`stablelm.kernels.gemm`) against converting the weight to fp32 and
calling torch's matmul (MKL), on the stablelm-2-1_6b projections, in GFLOPS.

Each projection cycles through enough distinct weights to be out of the L3 cache, as in a forward, and
the two paths alternate so that the machine's drift hits both. A 2-core AMD EPYC (Zen 3) peaks near 198
GFLOPS of fp32 FMAs.

    python benchmarks/gemm.py --rows 128 512 --kinds bf16 int8 int4
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from stablelm.layers.linear import FORMATS

SHAPES = [(6144, 2048), (2048, 2048), (11264, 2048), (2048, 5632)]  # qkv, o, gate/up, down (N, K)
KINDS = {"bf16": "native", "bf16-lossless": "native-lossless", "int8": "int8-native", "int4": "int4-native"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", type=int, default=[128, 512])
    p.add_argument("--kinds", nargs="+", choices=list(KINDS), default=["bf16"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    for kind in args.kinds:
        for n, k in SHAPES:
            copies = max(2, (64 << 20) // (n * k))  # > 32 MB of bf16 weights in turn
            modules = [FORMATS[KINDS[kind]].from_weight(torch.randn(n, k, generator=g).bfloat16() * 0.02)
                       for _ in range(copies)]
            for rows in args.rows:
                x = torch.randn(rows, k, generator=g).bfloat16()
                ours = theirs = float("inf")
                with torch.inference_mode():
                    for _ in range(args.rounds):
                        start = time.perf_counter()
                        for m in modules:
                            m(x)  # past native_rows: the GEMM
                        ours = min(ours, (time.perf_counter() - start) / copies)
                        start = time.perf_counter()
                        for m in modules:
                            F.linear(x.float(), m.dense_weight().float())
                        theirs = min(theirs, (time.perf_counter() - start) / copies)
                flops = 2 * rows * n * k
                print(f"{kind:5s} {k:5d} -> {n:5d}, {rows:4d} rows: gemm {flops / ours / 1e9:6.1f} GFLOPS, "
                      f"convert + torch matmul {flops / theirs / 1e9:6.1f}")


if __name__ == "__main__":
    main()
