"""GPU checks (run on a CUDA machine): parity with transformers in fp32/bf16/fp16 for head_dim 64, 80 (3B)
and 160 (12B), greedy generation, the flash_attention_2 switch, and decode/prefill speed on the
stablelm-2-1_6b shape. Prints one JSON object; usage: PYTHONPATH=src python tools/gpu_check.py [out.json]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import torch

import stablelm

DRY = "--dry-run" in sys.argv  # a quick CPU pass of the parity code, to catch mistakes before using a GPU
DEV = "cpu" if DRY else "cuda"
assert DRY or torch.cuda.is_available(), "needs a CUDA device"
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()
report: dict = {"device": "cpu (dry run)" if DRY else torch.cuda.get_device_name(), "torch": torch.__version__,
                "transformers": transformers.__version__}

SHAPES = {  # small layer counts, real head sizes
    "head_dim_64": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, intermediate_size=512),
    "3b_head_dim_80": dict(hidden_size=2560, num_attention_heads=32, num_key_value_heads=32, intermediate_size=6912),
    "12b_head_dim_160": dict(hidden_size=5120, num_attention_heads=32, num_key_value_heads=8, intermediate_size=13824,
                             qk_layernorm=True, use_parallel_residual=True),
    "1_6b_qkv_bias": dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=32, intermediate_size=5632,
                          use_qkv_bias=True),
}


def parity(name: str, fields: dict) -> dict:
    config = transformers.StableLmConfig(vocab_size=1024, num_hidden_layers=2, max_position_embeddings=256,
                                         pad_token_id=0, **fields)
    torch.manual_seed(0)
    ref = transformers.StableLmForCausalLM(config).eval()
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            if "norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ids = torch.randint(3, 1024, (3, 40), device=DEV)
        mask = torch.ones_like(ids)
        mask[1, :7] = 0  # left padding
        mask[2, :19] = 0
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            r = transformers.StableLmForCausalLM.from_pretrained(tmp, dtype=dtype).to(DEV).eval()
            o = stablelm.StableLmForCausalLM.from_pretrained(tmp, dtype=dtype, device=DEV)
            with torch.no_grad():
                rl = r(input_ids=ids, attention_mask=mask).logits.float()
                ol = o(input_ids=ids, attention_mask=mask).logits.float()
            real = mask.bool()
            diff = (rl[real] - ol[real]).abs().max().item()
            kw = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
            with torch.no_grad():
                rg = r.generate(ids, **kw)
            og = o.generate(ids, **kw)
            same = (rg == og).all(dim=1).tolist()
            first_diff = [int((a != b).nonzero()[0]) - ids.shape[1] if not s else None
                          for a, b, s in zip(rg, og, same)]
            out[str(dtype).removeprefix("torch.")] = {"max_abs_logit_diff": diff,
                                                      "logit_scale": rl[real].abs().max().item(),
                                                      "greedy_rows_identical": same,
                                                      "first_differing_new_token": first_diff}
            del r, o
            torch.cuda.empty_cache()
    return out


for name, fields in SHAPES.items():
    report[f"parity_{name}"] = parity(name, fields)
    if DRY:
        break

# flash_attention_2: used when the package exists, else a clear error.
try:
    with tempfile.TemporaryDirectory() as tmp:
        stablelm.StableLmForCausalLM.from_config(stablelm.StableLmConfig(
            vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=4)).save_pretrained(tmp)
        stablelm.StableLmForCausalLM.from_pretrained(tmp, device=DEV, dtype="bfloat16",
                                                     attn_implementation="flash_attention_2")
    report["flash_attention_2"] = "loaded"
except ValueError as e:
    report["flash_attention_2"] = f"ValueError: {e}"


def speed(impl: str, path: str) -> dict:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if impl == "stablelm":
        model = stablelm.StableLmForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device=DEV)
    else:
        model = transformers.StableLmForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(DEV).eval()
    torch.cuda.synchronize()
    res = {"load_s": time.perf_counter() - t0}
    g = torch.Generator(device=DEV).manual_seed(0)

    def gen(ids, n):
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0)

    gen(torch.randint(5, 1000, (1, 8), device=DEV, generator=g), 4)
    ids = torch.randint(5, 1000, (1, 512), device=DEV, generator=g)
    with torch.no_grad():
        model(ids, logits_to_keep=1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            model(ids, logits_to_keep=1)
        torch.cuda.synchronize()
    res["prefill_512_tok_s"] = 5 * 512 / (time.perf_counter() - t0)
    for batch in (1, 8):
        ids = torch.randint(5, 1000, (batch, 16), device=DEV, generator=g)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gen(ids, 1)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        gen(ids, 65)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        res[f"decode_b{batch}_tok_s"] = batch * 64 / ((t2 - t1) - (t1 - t0))
    model = None  # frees the weights before empty_cache (gen still refers to the name)
    torch.cuda.empty_cache()
    return res


with tempfile.TemporaryDirectory() as tmp:
    from stablelm.bench import build_checkpoint

    if DRY:
        print(json.dumps(report, indent=1))
        sys.exit(0)

    path = build_checkpoint("stablelm-2-1_6b", None, "bfloat16", tmp)
    rounds = {"stablelm": [], "transformers": []}
    for _ in range(2):
        for impl in rounds:
            rounds[impl].append(speed(impl, str(path)))
    report["speed_stablelm_2_1_6b_bf16"] = {
        impl: {k: (min if k == "load_s" else max)(r[k] for r in runs) for k in runs[0]} for impl, runs in rounds.items()}

text = json.dumps(report, indent=1)
print(text)
if len(sys.argv) > 1 and not DRY:
    open(sys.argv[1], "w").write(text)
