"""The reference side of `stablelm bench`: loads the checkpoint with transformers and measures it with the
same code as this library's side (stablelm.bench.measure). Kept outside the package, which never imports
transformers. Run by `stablelm bench`; by hand: python benchmarks/reference_worker.py --checkpoint DIR."""

from __future__ import annotations

import argparse
import time

import torch
import transformers

from stablelm.bench import add_arguments, measure


def main() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=getattr(torch, args.dtype))
    model.eval()
    measure(model, args, time.perf_counter() - start)


if __name__ == "__main__":
    main()
