"""Worst max|diff| against transformers per class, over every architecture option, in fp32.

Usage: python tools/parity_report.py   (needs transformers; builds tiny seeded checkpoints in a temp dir)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import transformers

import stablelm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import TINY, VARIANTS  # noqa: E402

transformers.logging.set_verbosity_error()
CLASSES = {"StableLmModel": {}, "StableLmForCausalLM": {}, "StableLmForSequenceClassification": {"num_labels": 3},
           "StableLmForTokenClassification": {"num_labels": 5}}


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask


def main() -> None:
    ids, mask = batch()
    real = mask.bool()
    worst = {}
    for cls_name, extra in CLASSES.items():
        for variant, overrides in VARIANTS.items():
            if cls_name != "StableLmForCausalLM" and "tie_word_embeddings" in overrides:
                continue
            torch.manual_seed(0)
            config = transformers.StableLmConfig(**{**TINY, **overrides, **extra})
            ref = getattr(transformers, cls_name)(config).eval()
            with torch.no_grad():
                for name, p in ref.named_parameters():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
            with tempfile.TemporaryDirectory() as tmp:
                ref.save_pretrained(tmp)
                for fast in (True, False):
                    ours = getattr(stablelm, cls_name).from_pretrained(tmp, dtype=torch.float32, fast_inference=fast)
                    with torch.no_grad():
                        r = ref(input_ids=ids, attention_mask=mask)
                        o = ours(input_ids=ids, attention_mask=mask)
                    a = o.logits if hasattr(o, "logits") else o.last_hidden_state
                    b = r.logits if hasattr(r, "logits") else r.last_hidden_state
                    diff = (a - b).abs().max() if a.dim() == 2 else (a[real] - b[real]).abs().max()
                    key = (cls_name, "fast layout" if fast else "plain modules")
                    if diff > worst.get(key, (-1, ""))[0]:
                        worst[key] = (float(diff), variant)
    print(f"{'class':<36}{'layout':<16}{'worst max|diff|':>16}  variant")
    for (cls_name, layout), (diff, variant) in worst.items():
        print(f"{cls_name:<36}{layout:<16}{diff:>16.2e}  {variant}")


if __name__ == "__main__":
    main()
