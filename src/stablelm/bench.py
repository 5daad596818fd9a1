"""`stablelm bench`: load, prefill and decode speed of this library against transformers, same weights.

Each measurement runs in a fresh worker process (so peak RSS is that implementation's own), and the
two implementations alternate, repeat after repeat, so drift on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .layers.schemes import SCHEMES

# Exact shapes of the official checkpoints (see the reference doc's table).
SHAPES = {
    "stablelm-2-1_6b": dict(vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                            num_attention_heads=32, num_key_value_heads=32, use_qkv_bias=True,
                            bos_token_id=100257, eos_token_id=100257),
    "stablelm-3b-4e1t": dict(vocab_size=50304, hidden_size=2560, intermediate_size=6912, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32),
    "stablelm-2-12b": dict(vocab_size=100352, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                           num_attention_heads=32, num_key_value_heads=8, qk_layernorm=True,
                           use_parallel_residual=True, bos_token_id=100257, eos_token_id=100257),
}
IMPLEMENTATIONS = ("stablelm", "transformers")
# In a source checkout (pip install -e .), the reference side's script sits in the repository.
REFERENCE_WORKER = Path(__file__).resolve().parents[2] / "benchmarks" / "reference_worker.py"
LLAMACPP_WORKER = REFERENCE_WORKER.with_name("llamacpp_worker.py")
PEERS = {"transformers": ("transformers", REFERENCE_WORKER), "llama.cpp": ("llama_cpp", LLAMACPP_WORKER)}
GGUF_TYPE = {"none": "f16", **{name: s.gguf_peer for name, s in SCHEMES.items()}}  # llama.cpp's at each precision


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", choices=sorted(SHAPES), default="stablelm-2-1_6b", help="official model shape")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers (quicker runs)")
    p.add_argument("--dtype", default="bfloat16", help="weights dtype: bfloat16, float16 or float32")
    p.add_argument("--quantization", choices=["none", *SCHEMES], default="none",
                   help="weight-only quantization for this library's side")
    p.add_argument("--linear-format", default=None,
                   help="force this library's weight format (see stablelm.linear.FORMATS; default: the fastest here)")
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[128, 512],
                   help="prompt lengths whose prefill is timed (default 128 512)")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens generated per decode measurement")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="decode batch sizes")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds; the best of each is kept")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--no-reference", action="store_true", help="measure only this library")
    p.add_argument("--against", action="append", choices=sorted(PEERS), default=None,
                   help="the peers measured in the same run, alternating (repeatable; default transformers). "
                        "llama.cpp needs llama-cpp-python and gguf (pip install -e .[llama]); the checkpoint is "
                        "converted to GGUF once")
    p.add_argument("--gguf-type", default=None, choices=sorted(set(GGUF_TYPE.values()) | {"bf16"}),
                   help="llama.cpp's weights (default: f16, q8_0, q4_0 for --quantization none, int8, int4)")
    p.add_argument("--tp", type=int, default=None,
                   help="also measure this library split over N processes (tensor parallelism; torchrun, 1 thread "
                        "each unless --threads), alternating with one process")
    p.add_argument("--serving", action="store_true",
                   help="serving mode: aggregate tokens/s and time to first token of the continuous-batching "
                        "engine at --streams concurrent requests")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels (serving)")
    p.add_argument("--scenario", choices=["streams", "multi-turn", "long-prompt", "budget"], default="streams",
                   help="serving: aggregate tokens/s at --streams (streams); a chat resent every turn, with and "
                        "without the prefix cache (multi-turn); the running streams' token gaps while a long "
                        "prompt is prefilled, chunked and whole (long-prompt); --streams[-1] streams with prompts "
                        "of --prompt-lengths MIN..MAX tokens in a KV budget (budget)")
    p.add_argument("--turns", type=int, default=10, help="multi-turn: turns")
    p.add_argument("--turn-tokens", type=int, default=100, help="multi-turn: tokens per user turn and per reply")
    p.add_argument("--long-prompt-tokens", type=int, default=2000, help="long-prompt: its length")
    p.add_argument("--prefill-chunk", default="auto",
                   help="long-prompt: prompt tokens per engine round, or auto (the engine's default)")
    p.add_argument("--kv-cache-memory", type=int, default=None,
                   help="budget: KV cache bytes (default: a quarter of what one row per stream of the longest "
                        "sequence needs)")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/stablelm-bench"),
                   help="where the random-weight checkpoint is built once")
    p.add_argument("--json", default="bench.json", help="write the results here")
    p.add_argument("--chart", default="bench.png", help="draw a PNG chart here (needs matplotlib)")
    p.add_argument("--reference-worker", default=str(REFERENCE_WORKER),
                   help="the script that measures transformers (default: benchmarks/reference_worker.py)")
    p.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)


def build_checkpoint(shape: str, layers: int | None, dtype: str, cache_dir: str) -> Path:
    """A random-weight checkpoint of the named shape, built once and reused."""
    import torch

    from .models.config import StableLmConfig, dtype_from_name
    from .models.model import StableLmForCausalLM

    fields = dict(SHAPES[shape])
    if layers:
        fields["num_hidden_layers"] = layers
    path = Path(cache_dir) / f"{shape}-L{fields['num_hidden_layers']}-{dtype}"
    if (path / "config.json").exists():
        return path
    config = StableLmConfig(**fields)
    torch_dtype = dtype_from_name(dtype)
    with torch.device("meta"):
        model = StableLmForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    for name, param in list(model.named_parameters()):
        module = model.get_submodule(name.rpartition(".")[0])
        if "norm" in name:
            value = torch.ones(param.shape, dtype=torch_dtype) if name.endswith("weight") else \
                torch.zeros(param.shape, dtype=torch_dtype)
        else:
            value = (torch.randn(param.shape, generator=gen) * 0.02).to(torch_dtype)
        setattr(module, name.rpartition(".")[2], torch.nn.Parameter(value, requires_grad=False))
    model.save_pretrained(path)
    return path


def quantized_checkpoint(ckpt: Path, quantization: str, dtype: str) -> Path:
    """`ckpt` quantized once and saved beside it (then reused): our side loads a quantized file, as llama.cpp's
    loads its quantized GGUF, instead of quantizing at every load."""
    from .models.config import dtype_from_name
    from .models.model import StableLmForCausalLM

    path = ckpt.with_name(f"{ckpt.name}-{quantization}")
    if (path / "config.json").exists():
        return path
    partial = ckpt.with_name(f".{path.name}.{os.getpid()}.tmp")
    model = StableLmForCausalLM.from_pretrained(ckpt, dtype=dtype_from_name(dtype), quantization=quantization)
    model.save_pretrained(partial)
    del model
    try:
        os.replace(partial, path)  # whole or not at all
    except OSError:  # another bench saved it first
        shutil.rmtree(partial, ignore_errors=True)
        if not (path / "config.json").exists():
            raise
    return path


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would include the parent's before exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> dict:
    """Measure this library in this process; print and return its figures."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    from .models.model import StableLmForCausalLM

    start = time.perf_counter()
    quant = None if args.quantization == "none" else args.quantization
    model = StableLmForCausalLM.from_pretrained(args.checkpoint, dtype=args.dtype, quantization=quant,
                                                linear_format=args.linear_format, tp="auto")
    return measure(model, args, time.perf_counter() - start)


def measure(model, args, load_s: float) -> dict:
    """Prefill, time to first token and decode figures of a loaded model (ours or the reference's)."""
    import torch

    torch.set_grad_enabled(False)
    result = {"load_s": load_s}
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def generate(ids, n):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)

    generate(torch.randint(5, vocab, (1, 8), generator=gen), 2)  # warm-up
    for length in args.prompt_lengths:
        # Each length twice, other tokens each time, as llama-bench warms up each test: the first prompt of a
        # new length in a fresh process pays for its memory's first touch (first_tok_s), the second does not.
        for key in (f"prefill_{length}_first_tok_s", f"prefill_{length}_tok_s"):
            ids = torch.randint(5, vocab, (1, length), generator=gen)
            t0 = time.perf_counter()
            model(ids, logits_to_keep=1)
            result[key] = length / (time.perf_counter() - t0)
    ids = torch.randint(5, vocab, (1, args.prompt_lengths[0]), generator=gen)
    t0 = time.perf_counter()
    generate(ids, 1)
    result["ttft_s"] = time.perf_counter() - t0
    for batch in args.batch_sizes:
        ids = torch.randint(5, vocab, (batch, 16), generator=gen)
        t0 = time.perf_counter()
        generate(ids, 1)
        t1 = time.perf_counter()
        out = generate(ids, args.decode_tokens + 1)
        t2 = time.perf_counter()
        assert out.shape[1] == 16 + args.decode_tokens + 1
        result[f"decode_b{batch}_tok_s"] = batch * args.decode_tokens / max((t2 - t1) - (t1 - t0), 1e-9)
    result["peak_rss_mb"] = _peak_rss_mb()
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    result["weights_mb"] = sum(t.numel() * t.element_size() for t in tensors) / 2**20
    tp = getattr(model, "tp", None)
    if tp is not None:  # each rank's memory; rank 0 reports
        import torch.distributed as dist

        ranks = [None] * tp.world
        dist.all_gather_object(ranks, {k: result[k] for k in ("peak_rss_mb", "weights_mb")})
        result["ranks"] = ranks
        if not tp.leader:
            return result
    print(json.dumps(result))
    return result


def run(args) -> int:
    if args.worker:
        worker(args)
        return 0
    machine = _machine(args)
    print(f"CPU: {machine['cpu']} (torch capability {machine['torch_capability']}, native kernels "
          f"{machine['native_kernels']}); this library runs {machine['linear_format']} weights", file=sys.stderr)
    if args.serving and args.scenario != "streams":
        from . import bench_serving

        ckpt = build_checkpoint(args.shape, args.layers, args.dtype, args.cache_dir)
        results = bench_serving.SCENARIOS[args.scenario](args, ckpt)
        for key, value in results.items():
            print(f"{key}: {json.dumps(value)}")
        Path(args.json).write_text(json.dumps({"shape": args.shape, "layers": args.layers, "dtype": args.dtype,
                                               "quantization": args.quantization, "machine": machine,
                                               "scenario": args.scenario, "serving": results}, indent=1))
        return 0
    if args.serving:
        from . import bench_serving

        ckpt = build_checkpoint(args.shape, args.layers, args.dtype, args.cache_dir)
        results = bench_serving.streams(args, ckpt)
        base = results["streams_1"]["aggregate_tok_s"]
        print(f"{'streams':>8}{'aggregate tok/s':>18}{'vs 1 stream':>13}{'mean TTFT s':>13}")
        for key, r in results.items():
            print(f"{key.split('_')[1]:>8}{r['aggregate_tok_s']:>18.2f}{r['aggregate_tok_s'] / base:>12.2f}x"
                  f"{r['mean_ttft_s']:>13.3f}")
        Path(args.json).write_text(json.dumps({"shape": args.shape, "layers": args.layers, "dtype": args.dtype,
                                               "quantization": args.quantization, "machine": machine,
                                               "serving": results}, indent=1))
        return 0
    from tqdm import tqdm

    impls = ["stablelm"]
    workers = {"transformers": Path(args.reference_worker), "llama.cpp": LLAMACPP_WORKER}
    for peer in [] if args.no_reference else (args.against or ["transformers"]):
        # The peers run from scripts beside the package: the library never imports them.
        module, script = PEERS[peer][0], workers[peer]
        if importlib.util.find_spec(module) is None:
            print(f"{module} is not installed: not measuring {peer}", file=sys.stderr)
        elif not script.exists():
            print(f"no {peer} worker at {script}: not measuring {peer}", file=sys.stderr)
        else:
            impls.append(peer)
    print(f"building the {args.shape} checkpoint (cached in {args.cache_dir}) ...", file=sys.stderr)
    ckpt = build_checkpoint(args.shape, args.layers, args.dtype, args.cache_dir)
    if "llama.cpp" in impls:  # its GGUF file, converted once before anything is timed
        subprocess.run(_worker_command("llama.cpp", args, ckpt, LLAMACPP_WORKER) + ["--convert-only"], check=True)
    # Quantized: ours loads a quantized checkpoint, saved once (tensor parallelism quantizes each rank's slice).
    ours = ckpt if args.quantization == "none" else quantized_checkpoint(ckpt, args.quantization, args.dtype)
    if args.tp and args.tp > 1:
        impls.insert(1, f"stablelm-tp{args.tp}")
    runs: dict[str, list[dict]] = {name: [] for name in impls}
    bar = tqdm(total=args.repeats * len(impls), desc="bench", unit="run")
    for _ in range(args.repeats):
        for name in impls:
            cmd = _worker_command(name, args, ours if name == "stablelm" else ckpt, workers.get(name))
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{name} worker failed:\n{proc.stderr[-3000:]}")
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            bar.update(1)
    bar.close()
    best = {name: _best(results) for name, results in runs.items()}
    report = {"shape": args.shape, "layers": args.layers, "dtype": args.dtype, "quantization": args.quantization,
              "machine": machine, "threads": args.threads, "repeats": args.repeats, "best": best, "runs": runs}
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(_table(best))
    if args.chart:
        _chart(best, args, Path(args.chart))
    return 0


def _worker_command(name: str, args, ckpt: Path, script: Path | None) -> list[str]:
    """The command that measures implementation `name` once, in a fresh process (or processes, for stablelm-tpN)."""
    if name == "llama.cpp":
        cmd = [sys.executable, str(script), "--checkpoint", str(ckpt), "--gguf-type",
               args.gguf_type or GGUF_TYPE[args.quantization], "--decode-tokens", str(args.decode_tokens),
               "--prompt-lengths", *map(str, args.prompt_lengths)]
    else:
        if name == "stablelm":
            entry = ["-m", "stablelm.cli", "bench"]
        elif name.startswith("stablelm-tp"):
            entry = ["-m", "torch.distributed.run", "--nproc-per-node", str(args.tp), "-m", "stablelm.cli", "bench"]
        else:
            entry = [str(script)]
        cmd = [sys.executable, *entry, "--worker", "stablelm" if name.startswith("stablelm") else name,
               "--checkpoint", str(ckpt), "--dtype", args.dtype, "--quantization", args.quantization,
               "--decode-tokens", str(args.decode_tokens), "--prompt-lengths", *map(str, args.prompt_lengths),
               "--batch-sizes", *map(str, args.batch_sizes)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.linear_format and name.startswith("stablelm"):
        cmd += ["--linear-format", args.linear_format]
    return cmd


def _machine(args) -> dict:
    """The CPU, torch's capability, the native kernels and the weight format this run's model gets."""
    import torch

    from .layers.linear import choose_format, describe
    from .models.config import dtype_from_name

    if args.threads:
        torch.set_num_threads(args.threads)
    info = describe()
    quant = None if args.quantization == "none" else args.quantization
    info["linear_format"] = choose_format(dtype_from_name(args.dtype), torch.device("cpu"), quant, args.linear_format)
    return {**info, **_provenance()}


def _provenance() -> dict:
    """Which code ran and how: the source checkout's commit (None outside one), whether it had uncommitted
    changes to tracked files, the command line, and when."""
    repo = Path(__file__).resolve().parents[2]

    def git(*words: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(repo), *words], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD") or None
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None,
            "command": " ".join(shlex.quote(word) for word in ["stablelm", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _best(results: list[dict]) -> dict:
    """Best of the repeats: the highest rate, the lowest time and memory."""
    out = {}
    for key in results[0]:
        values = [r[key] for r in results]
        if key == "ranks":  # per-rank memory of a tensor-parallel run: each rank's lowest
            out[key] = [{k: min(run[i][k] for run in values) for k in values[0][i]} for i in range(len(values[0]))]
            continue
        out[key] = max(values) if key.endswith("tok_s") else min(values)
        out[key + "_median"] = statistics.median(values)
    return out


def _table(best: dict) -> str:
    """Every metric of every implementation; each peer's column is followed by our ratio to it."""
    keys = [k for k in best["stablelm"] if not k.endswith("_median") and k != "ranks"]
    peers = [name for name in best if name in PEERS]
    ours_too = [name for name in best if name != "stablelm" and name not in PEERS]  # e.g. stablelm-tp2
    lines = [f"{'metric':<24}{'stablelm':>14}" + "".join(f"{name:>16}" for name in ours_too)
             + "".join(f"{name:>14}{'ratio':>9}" for name in peers)]
    for key in keys:
        ours = best["stablelm"][key]
        line = f"{key:<24}{ours:>14.2f}" + "".join(f"{best[name].get(key, float('nan')):>16.2f}" for name in ours_too)
        for name in peers:
            theirs = best[name].get(key)
            if theirs is None:
                line += f"{'-':>14}{'':>9}"
            else:
                better = ours / theirs if key.endswith("tok_s") else theirs / ours
                line += f"{theirs:>14.2f}{better:>8.2f}x"
        lines.append(line)
    for name in ours_too:
        for i, rank in enumerate(best[name].get("ranks", [])):
            lines.append(f"{name} rank {i}: weights {rank['weights_mb']:.0f} MB, peak RSS {rank['peak_rss_mb']:.0f} MB")
    if peers:
        lines.append("ratio > 1: this library is better (faster, or less time / memory)")
    return "\n".join(lines)


def _chart(best: dict, args, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return
    keys = [k for k in best["stablelm"] if k.endswith("tok_s") and not k.endswith("_median")]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(best)
    for i, (name, figures) in enumerate(best.items()):
        ax.bar([j + i * width for j in range(len(keys))], [figures.get(k, 0) for k in keys], width, label=name)
    ax.set_xticks([j + width * (len(best) - 1) / 2 for j in range(len(keys))])
    ax.set_xticklabels([k.removesuffix("_tok_s") for k in keys])
    ax.set_ylabel("tokens / s (higher is better)")
    ax.set_yscale("log")
    quant = "" if args.quantization == "none" else f", {args.quantization}"
    ax.set_title(f"{args.shape}{f' ({args.layers} layers)' if args.layers else ''}, {args.dtype}{quant}")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
