"""Cold-weight decode products: the streaming rate of each native linear format, weights not in cache.

Cycles through the projections of three stablelm-2-1_6b layers (12 matrices, more than the L3 cache) so each
product reads its weight from memory, as decoding does, and prints the best of 5 passes as GB/s of what the
kernel reads (values plus scales / zero points). Compare with a plain memory read on the same machine
(`torch.ones(2**27).sum()`: 27 GB/s on the 2-core AMD EPYC of the README).

    python benchmarks/gemv_cold.py --formats int4-native int8-native native-lossless native --rows 1 8
    python benchmarks/gemv_cold.py --formats native-lossless --isa avx2 avx512 avx2 avx512   # the same weights
"""

from __future__ import annotations

import argparse
import time

import torch

from stablelm import kernels
from stablelm.layers.linear import FORMATS

SHAPES = [(6144, 2048), (2048, 2048), (11264, 2048), (2048, 5632)] * 3  # qkv, o, gate/up, down


def streamed_bytes(module) -> int:
    """The bytes a decode product reads: the weight and what the kernel reads beside it."""
    if hasattr(module, "packed"):  # native-lossless: codes, low bytes, tables, tails and exceptions
        return sum(t.numel() * t.element_size() for t in module.packed)
    names = ("weight", "kernel_scale", "kernel_zero") if hasattr(module, "kernel_scale") else ("weight", "scale32")
    return sum(getattr(module, n).numel() * getattr(module, n).element_size() for n in names if hasattr(module, n))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", nargs="+", default=["int4-native", "int8-native", "native-lossless", "native"])
    p.add_argument("--rows", nargs="+", type=int, default=[1, 8], help="activation rows (decode batch)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--isa", nargs="+", choices=kernels.ISA_LEVELS, default=[None],
                   help="native kernel levels to run in turn (default: the CPU's best, or STABLELM_ISA)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.formats:
        g = torch.Generator().manual_seed(0)
        modules = [FORMATS[name].from_weight(torch.randn(n, k, generator=g).bfloat16() * 0.02) for n, k in SHAPES]
        total = sum(streamed_bytes(m) for m in modules)
        for level in args.isa:
            if level is not None:
                if level not in kernels.native_isa_levels():
                    raise SystemExit(f"this CPU cannot run the native kernels at {level}")
                for m in modules:
                    m.isa = kernels.ISA_LEVELS.index(level)
            label = name if level is None else f"{name}@{level}"
            for rows in args.rows:
                xs = {k: torch.randn(rows, k, generator=g).bfloat16() for k in (2048, 5632)}
                best = float("inf")
                with torch.inference_mode():
                    for _ in range(5):
                        start = time.perf_counter()
                        for m in modules:
                            m(xs[m.in_features])
                        best = min(best, time.perf_counter() - start)
                print(f"{label:19s} rows={rows}: {best * 1e3:7.2f} ms for {total / 1e6:.0f} MB, "
                      f"{total / best / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()
