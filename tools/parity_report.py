"""Worst max|diff| against transformers per class, over every architecture option, in fp32.

Usage: python tools/parity_report.py   (needs transformers; builds tiny seeded checkpoints in a temp dir)
"""

from __future__ import annotations

import tempfile

import torch
import transformers

import stablelm

transformers.logging.set_verbosity_error()
TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VARIANTS = {
    "base": {}, "qkv_bias": dict(use_qkv_bias=True), "qk_layernorm": dict(qk_layernorm=True),
    "parallel_residual": dict(use_parallel_residual=True), "gqa": dict(num_key_value_heads=2),
    "rope_linear": dict(rope_scaling={"type": "linear", "factor": 2.0}),
    "rope_dynamic": dict(rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=8,
                         partial_rotary_factor=0.5),
    "tied": dict(tie_word_embeddings=True),
    "12b_like": dict(num_key_value_heads=2, qk_layernorm=True, use_parallel_residual=True),
    "everything": dict(num_key_value_heads=1, use_qkv_bias=True, qk_layernorm=True, use_parallel_residual=True,
                       partial_rotary_factor=0.5, rope_scaling={"type": "linear", "factor": 3.0}),
}
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
            if cls_name != "StableLmForCausalLM" and variant == "tied":
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
