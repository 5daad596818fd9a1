"""Fine-tuning a checkpoint for one of three tasks, fully or with LoRA.

Data: JSONL or CSV files, or any iterable of dicts, one record per example:

    causal-lm                {"text": "..."}  or  {"messages": [{"role": "user", "content": "..."}, ...]}
                             (chat: rendered with the chat template, the loss on the assistant turns only)
    sequence-classification  {"text": "...", "label": "comedy"}        (label: a name, or an index)
    token-classification     {"tokens": ["ROMEO", ":", ...], "labels": ["SPEAKER", "O", ...]}
                             (CSV: tokens and labels as space-separated strings)

Every record is checked before the first step; an error names the source, the record and what is wrong.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..auto import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification
from ..auto import AutoTokenizer
from ..models.config import MAX_LABELS
from ..layers import lora
from .train import _plot, autocast, resolve_precision

TASKS = {"causal-lm": AutoModelForCausalLM, "sequence-classification": AutoModelForSequenceClassification,
         "token-classification": AutoModelForTokenClassification}


@dataclass
class FinetuneOptions:
    task: str = "causal-lm"
    model: str | None = None  # a checkpoint folder or hub id; None = the bundled demo model
    out: str = "runs/finetune"
    method: str = "lora"  # "lora" or "full"
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = lora.DEFAULT_TARGETS
    int8_base: bool = False  # LoRA over int8 frozen projections (a quarter of the base's fp32 memory)
    labels: list[str] | None = None  # class names (classification); default: those in the training data
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None  # default 2e-4 for LoRA, 5e-5 for full fine-tuning
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of the steps with a linear warm-up
    max_length: int = 256
    eval_fraction: float = 0.1  # held out of the training data when no eval data is given
    eval_every: int | None = None  # steps; default: at the end of each epoch
    seed: int = 0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    progress: bool = True


@dataclass
class Result:
    out: Path
    metrics: dict
    history: dict = field(default_factory=dict)


# -- data ------------------------------------------------------------------------------------------
def read_records(source, task: str) -> tuple[list[dict], str]:
    """(records, a name for errors) from a .jsonl / .csv path or an iterable of dicts."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such data file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        if path.suffix == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
            if task == "token-classification":
                rows = [{**r, "tokens": (r.get("tokens") or "").split(), "labels": (r.get("labels") or "").split()}
                        for r in rows]
            return rows, str(path)
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as e:
                    raise ValueError(f"{path}:{n}: not a JSON object ({str(e)[:200]})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
                records.append(record)
        return records, str(path)
    records = list(source)
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"the data: record {i + 1}: expected an object, got {type(record).__name__}")
    return records, "the data"


def _label_names(task: str, records: list[dict], source: str) -> list[str]:
    """The class names the data uses: its names sorted, or 0..max for integer labels (at most MAX_LABELS)."""
    values = set()
    for i, record in enumerate(records):
        if task == "sequence-classification":  # a record without one is reported by `prepare`
            found = [record["label"]] if "label" in record else []
        else:
            found = record.get("labels") or []
        for value in found if isinstance(found, list) else []:
            _check_label(value, f"{source}: record {i + 1}")
            values.add(value)
    if any(isinstance(v, int) for v in values):
        if not all(isinstance(v, int) for v in values):
            raise ValueError(f"{source}: labels mix integers and names; use one or the other (or pass the names)")
        if max(values) >= MAX_LABELS:
            raise ValueError(f"{source}: label {max(values)} implies {max(values) + 1} classes, more than {MAX_LABELS}")
        return [str(i) for i in range(max(values) + 1)]
    return sorted(values)


def _check_label(value, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise ValueError(f"{where}: a label is a class name (a non-empty string) or an index, got {value!r}")
    if isinstance(value, int) and not 0 <= value < MAX_LABELS:
        raise ValueError(f"{where}: label {value} is outside [0, {MAX_LABELS})")


def _label_index(value, names: list[str], where: str) -> int:
    _check_label(value, where)
    if isinstance(value, int):
        if not 0 <= value < len(names):
            raise ValueError(f"{where}: label {value} is out of range (there are {len(names)} labels: {names})")
        return value
    if str(value) not in names:
        raise ValueError(f"{where}: label {value!r} is not one of {names}")
    return names.index(str(value))


def prepare(task: str, records: list[dict], tokenizer, names: list[str] | None, max_length: int,
            source: str) -> list[dict]:
    """Token ids and targets per record: {"input_ids": [...], "labels": [...] or int}."""
    if not records:
        raise ValueError(f"{source}: no records")
    examples = []
    for i, record in enumerate(records):
        where = f"{source}: record {i + 1}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
        if task == "causal-lm":
            examples.append(_causal(record, tokenizer, max_length, where))
        elif task == "sequence-classification":
            if not isinstance(record.get("text"), str) or not record["text"] or "label" not in record:
                raise ValueError(f"{where}: sequence-classification records need a non-empty 'text' and a 'label'")
            ids = tokenizer.encode(record["text"])[:max_length]
            examples.append({"input_ids": ids, "labels": _label_index(record["label"], names, where)})
        else:
            examples.append(_token_labels(record, tokenizer, names, max_length, where))
    return examples


def _causal(record: dict, tokenizer, max_length: int, where: str) -> dict:
    if isinstance(record.get("text"), str) and record["text"]:
        ids = tokenizer.encode(record["text"])[:max_length]
        return {"input_ids": ids, "labels": list(ids)}
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages):
        raise ValueError(f"{where}: causal-lm records need a non-empty 'text', or 'messages' "
                         "([{'role': ..., 'content': ...}, ...])")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: a chat record needs at least one assistant message to learn from")
    ids = tokenizer.apply_chat_template(messages, return_dict=False)
    labels = [-100] * len(ids)
    for i, message in enumerate(messages):  # each assistant turn: the tokens its message adds
        if message["role"] == "assistant":
            start = len(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, return_dict=False))
            end = len(tokenizer.apply_chat_template(messages[:i + 1], return_dict=False))
            labels[start:end] = ids[start:end]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def _token_labels(record: dict, tokenizer, names: list[str], max_length: int, where: str) -> dict:
    words, tags = record.get("tokens"), record.get("labels")
    if not isinstance(words, list) or not isinstance(tags, list) or not words or len(words) != len(tags):
        raise ValueError(f"{where}: token-classification records need 'tokens' and 'labels', lists of equal, "
                         "non-zero length")
    ids, labels = [], []
    for n, (word, tag) in enumerate(zip(words, tags)):
        pieces = tokenizer.encode(("" if n == 0 else " ") + str(word), add_special_tokens=False)
        index = _label_index(tag, names, where)
        ids += pieces
        labels += [index] + [-100] * (len(pieces) - 1)  # the label on a word's first token
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def collate(examples: list[dict], pad_id: int, task: str) -> dict:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        ids[row, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[row, :len(e["input_ids"])] = 1
    if task == "sequence-classification":
        labels = torch.tensor([e["labels"] for e in examples])
    else:
        labels = torch.full_like(ids, -100)
        for row, e in enumerate(examples):
            labels[row, :len(e["labels"])] = torch.tensor(e["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# -- training --------------------------------------------------------------------------------------
def finetune(opts: FinetuneOptions, train_data, eval_data=None) -> Result:
    """Fine-tune `opts.model` on `train_data` (a path or an iterable of records); writes `opts.out`:
    the adapter (LoRA) or the checkpoint (full), the tokenizer, metrics.json and loss.png."""
    if opts.task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {opts.task!r}")
    if opts.method not in ("lora", "full"):
        raise ValueError(f"method must be 'lora' or 'full', got {opts.method!r}")
    for name in ("batch_size", "grad_accum", "max_length"):
        if not isinstance(getattr(opts, name), int) or getattr(opts, name) < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {getattr(opts, name)!r}")
    lora_config = lora.LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                                  target_modules=opts.lora_targets) if opts.method == "lora" else None
    from ..io.hub import demo_model_path

    source = opts.model or demo_model_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    records, where = read_records(train_data, opts.task)
    names = None
    if opts.task != "causal-lm":
        names = list(opts.labels) if opts.labels else _label_names(opts.task, records, where)
        if len(names) > MAX_LABELS:
            raise ValueError(f"{where}: {len(names)} label names, more than {MAX_LABELS}")
    train = prepare(opts.task, records, tokenizer, names, opts.max_length, where)
    if eval_data is not None:
        eval_records, eval_where = read_records(eval_data, opts.task)
        held = prepare(opts.task, eval_records, tokenizer, names, opts.max_length, eval_where)
    else:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(opts.seed)).tolist()
        n_eval = int(len(train) * opts.eval_fraction)
        held, train = [train[i] for i in order[:n_eval]], [train[i] for i in order[n_eval:]]
    if not train:
        raise ValueError(f"{where}: no training records left after holding out {len(held)} for evaluation")

    torch.manual_seed(opts.seed)
    extra = {} if names is None else {"num_labels": len(names)}
    model = TASKS[opts.task].from_pretrained(source, fast_inference=False, dtype=torch.float32, **extra)
    if names is not None:
        model.config.id2label = dict(enumerate(names))
    if opts.int8_base and lora_config is None:
        raise ValueError("int8_base freezes the base weights: it needs method='lora'")
    if lora_config is not None:
        lora.add_lora(model, lora_config, int8_base=opts.int8_base)
    if opts.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    precision = resolve_precision(opts.precision)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = opts.lr if opts.lr is not None else (2e-4 if lora_config else 5e-5)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=opts.weight_decay)
    per_epoch = math.ceil(len(train) / (opts.batch_size * opts.grad_accum))
    total = opts.max_steps or max(1, round(per_epoch * opts.epochs))
    warm = max(1, int(total * opts.warmup))
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then linear decay to zero
        optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "finetune_state.pt"
    step, history, gen = 0, {"train": [], "eval": []}, torch.Generator().manual_seed(opts.seed)
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    identity = _resume_identity(opts, source, names)
    if state_path.exists():  # resume
        state = _read_state(state_path, identity, named)
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(state["params"][name])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, history = state["step"], state["history"]
        gen.set_state(state["generator"])
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    eval_every = opts.eval_every or per_epoch
    started = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc=f"finetune {opts.task} ({opts.method})", unit="step",
               disable=not opts.progress)
    queue: list[int] = []
    while step < total:
        optimizer.zero_grad()
        step_loss = 0.0
        for _ in range(opts.grad_accum):
            if len(queue) < opts.batch_size:
                queue += torch.randperm(len(train), generator=gen).tolist()
            batch = collate([train[i] for i in queue[:opts.batch_size]], pad, opts.task)
            del queue[:opts.batch_size]
            with autocast(precision):
                loss = model(**batch).loss / opts.grad_accum
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        history["train"].append((step, step_loss))
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}")
        if held and (step % eval_every == 0 or step == total):
            history["eval"].append((step, evaluate(model, held, opts, pad)["loss"]))
            model.train()
            _write_state(state_path, {"identity": identity, "params": {n: p.detach() for n, p in named.items()},
                                      "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                                      "step": step, "history": history, "generator": gen.get_state()})
    bar.close()
    metrics = evaluate(model, held, opts, pad) if held else {}
    metrics.update(steps=step, train_examples=len(train), eval_examples=len(held), seconds=round(
        time.perf_counter() - started, 1), options={k: v for k, v in asdict(opts).items() if k != "progress"})
    model.eval()
    if lora_config is not None:
        lora.save_adapter(model, out)
    else:
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    _plot(history, out / "loss.png")
    state_path.unlink(missing_ok=True)
    return Result(out, metrics, history)


# -- resume state ----------------------------------------------------------------------------------
RESUME_OPTIONS = ("task", "method", "lora_r", "lora_alpha", "lora_targets", "int8_base", "max_length", "labels",
                  "model")  # what a resumed run must share with the run that saved the state


def _resume_identity(opts: FinetuneOptions, source, names: list[str] | None) -> dict:
    identity = {k: getattr(opts, k) for k in RESUME_OPTIONS}
    identity.update(lora_targets=sorted(opts.lora_targets), labels=names, model=str(source))
    if opts.method != "lora":
        for k in ("lora_r", "lora_alpha", "lora_targets", "int8_base"):
            identity[k] = None
    return identity


def _write_state(path: Path, state: dict) -> None:
    """Whole or not at all: a temporary file, flushed to the disk, renamed over the old state."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(partial, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _read_state(path: Path, identity: dict, params: dict[str, torch.Tensor]) -> dict:
    """The saved state of an interrupted run, checked against this run's options and trainable tensors."""
    fix = f"delete {path} to start over, or pass another --out"
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, empty, not a torch file: all mean the same here
        raise ValueError(f"{path}: the saved fine-tuning state is damaged ({type(e).__name__}: {str(e)[:120]}); "
                         f"{fix}") from None
    keys = {"identity", "params", "optimizer", "schedule", "step", "history", "generator"}
    if not isinstance(state, dict) or not keys <= set(state) or not isinstance(state["params"], dict):
        raise ValueError(f"{path}: not a fine-tuning state of this version of stablelm; {fix}")
    for key in RESUME_OPTIONS:
        if state["identity"].get(key) != identity[key]:
            raise ValueError(f"{path}: this run's {key} ({identity[key]!r}) differs from the interrupted run's "
                             f"({state['identity'].get(key)!r}); resume with the same options, or {fix}")
    for name, p in params.items():
        saved = state["params"].get(name)
        if not isinstance(saved, torch.Tensor) or saved.shape != p.shape:
            raise ValueError(f"{path}: the saved state has no tensor {name} of shape {tuple(p.shape)}; {fix}")
    return state


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[dict], opts: FinetuneOptions, pad: int) -> dict:
    """Mean loss, and accuracy for the classification tasks (per token for token classification)."""
    model.eval()
    losses, correct, count = [], 0, 0
    for start in range(0, len(examples), opts.batch_size):
        batch = collate(examples[start:start + opts.batch_size], pad, opts.task)
        out = model(**batch)
        losses.append(out.loss.item() * len(batch["input_ids"]))
        if opts.task == "sequence-classification":
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            count += len(batch["labels"])
        elif opts.task == "token-classification":
            real = batch["labels"] != -100
            correct += int((out.logits.argmax(-1)[real] == batch["labels"][real]).sum())
            count += int(real.sum())
    result = {"loss": sum(losses) / len(examples)}
    if count:
        result["accuracy"] = correct / count
    return result
