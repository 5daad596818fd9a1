"""Speed of every linear format on one projection of the stablelm-2-1_6b shape (gate/up: 2048 -> 11264).

    python benchmarks/kernels.py [--threads 2] [--rows 1 8 128] [--json out.json]

Prints milliseconds per product and the weight bytes streamed per second (decoding reads every weight once
per token, so GB/s against the machine's memory bandwidth is the figure that matters at 1-8 rows).
Formats that cannot run here are listed with the reason.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from stablelm import kernels
from stablelm.layers import linear


def timed(fn, seconds: float = 0.5) -> float:
    fn()
    fn()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 3:
        fn()
        count += 1
    return (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 128])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    dtype = getattr(torch, args.dtype)
    weight = (torch.randn(11264, 2048, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    info = linear.describe()
    print(f"CPU: {info['cpu']}, torch {info['torch']} capability {info['torch_capability']}, "
          f"native kernels: {info['native_kernels']}, {args.threads} threads")
    results = {}
    for name, fmt in linear.FORMATS.items():
        reason = fmt.unavailable(dtype, torch.device("cpu"))
        if reason:
            print(f"{name:<12} cannot run: {reason}")
            continue
        module = fmt.from_weight(weight)
        module.workspace = linear.Workspace(weight.numel())
        nbytes = sum(t.numel() * t.element_size() for t in module.buffers() if t.dim() == 2)
        row = {}
        for rows in args.rows:
            x = torch.randn(rows, 2048).to(dtype)
            seconds = timed(lambda: module(x))
            row[rows] = {"ms": seconds * 1e3, "GB_s": nbytes / seconds / 1e9}
        results[name] = row
        print(f"{name:<12} " + "  ".join(f"{rows} rows {r['ms']:8.2f} ms {r['GB_s']:6.1f} GB/s"
                                         for rows, r in row.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "threads": args.threads, "dtype": args.dtype, "results": results}, f, indent=1)


if __name__ == "__main__":
    kernels.native_ops()  # build before timing
    main()
