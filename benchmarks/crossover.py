"""Where prompts should leave the decode kernels for the GEMM: both run on the same rows of one
stablelm-2-1_6b gate/up projection (2048 -> 11264, 46 MB of bf16, past the L3 cache), alternating, best of 5
(ms). `native_rows` in stablelm/layers/linear.py is the last row count at which the decode kernel is as fast.

    python benchmarks/crossover.py --rows 8 12 16 20 24 32
"""

from __future__ import annotations

import argparse
import time

import torch

from stablelm import kernels


def best_ms(f, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", type=int, default=[8, 12, 16, 20, 24, 32])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(11264, 2048, generator=g) * 0.02).bfloat16()
    packed = kernels.lossless_pack(weight)
    for rows in args.rows:
        x = torch.randn(rows, 2048, generator=g).bfloat16()
        times = {
            "native: gemv": best_ms(lambda: kernels.gemv(x, weight)),
            "gemm": best_ms(lambda: kernels.gemm(x, weight)),
            "native-lossless: gemv": best_ms(lambda: kernels.gemv_lossless(x, packed)),
            "gemm ": best_ms(lambda: kernels.gemm_lossless(x, packed)),
        }
        print(f"{rows:3d} rows  " + "  ".join(f"{name} {ms:6.2f}" for name, ms in times.items()))


if __name__ == "__main__":
    main()
