"""The llama.cpp side of `stablelm bench --against llama.cpp`: converts the bench's checkpoint to GGUF (once,
cached beside it) with the `gguf` package and measures llama-cpp-python on it with the same prompts and
token counts as this library's side. Kept outside the package (an optional peer, never a dependency).

    python benchmarks/llamacpp_worker.py --checkpoint DIR --gguf-type q4_0 --threads 2

GGUF layout (llama.cpp's "stablelm" architecture): token_embd, blk.N.attn_norm (+bias), attn_q/k/v (+bias),
attn_output, attn_q_norm / attn_k_norm (per head, StableLM 2 12B), ffn_norm (+bias), ffn_gate/up/down,
output_norm (+bias), output. Every 2-D projection, the embedding and the output are stored in the chosen
type (F16, BF16, Q8_0 or Q4_0); norms and biases stay F32. The vocabulary is a list of placeholder tokens:
the bench feeds token ids, so no text is ever tokenized.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from stablelm.bench import _peak_rss_mb, add_arguments
from stablelm.io.checkpoint import read_tensors, weight_files
from stablelm.models.config import StableLmConfig

_NAMES = [  # our (the reference's) names -> GGUF names
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.(weight|bias)", r"output_norm.\1"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.(weight|bias)", r"blk.\1.attn_norm.\2"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.(weight|bias)", r"blk.\1.ffn_norm.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"blk.\1.attn_q.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"blk.\1.attn_k.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"blk.\1.attn_v.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"blk.\1.attn_output.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"blk.\1.ffn_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"blk.\1.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"blk.\1.ffn_down.weight"),
]
_QK_NORM = re.compile(r"model\.layers\.(\d+)\.self_attn\.(q|k)_layernorm\.norms\.(\d+)\.weight")


def gguf_name(name: str) -> str:
    for pattern, replacement in _NAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    raise ValueError(f"no GGUF name for {name!r}")


def convert(checkpoint: Path, kind: str, out: Path) -> Path:
    """Write `checkpoint` as a GGUF file of `kind` at `out` (through a temporary name)."""
    import gguf
    from gguf.quants import quantize

    config = StableLmConfig.from_json_file(checkpoint / "config.json")
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[kind]
    tmp = out.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), "stablelm")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_eps(config.layer_norm_eps)
    writer.add_parallel_residual(config.use_parallel_residual)
    writer.add_file_type({"f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2}[kind])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([f"<t{i}>" for i in range(config.vocab_size)])
    writer.add_token_types([1] * config.vocab_size)
    writer.add_token_merges(["<t5> <t6>"])  # llama.cpp insists on a merges list (an empty one is not written)
    writer.add_bos_token_id(config.bos_token_id or 0)
    writer.add_eos_token_id(config.eos_token_ids[0] if config.eos_token_ids else 0)

    files, _ = weight_files(checkpoint, allow_pickle=False)
    qk_norms: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for path in files:
        for name, handle in read_tensors(path, False, "cpu"):
            value = handle.read().float().numpy()
            norm = _QK_NORM.fullmatch(name)
            if norm:  # llama.cpp stores the per-head norms as one (n_head, head_dim) tensor
                qk_norms.setdefault(norm.group(1, 2), {})[int(norm.group(3))] = value
                continue
            target = gguf_name(name)
            if value.ndim == 2:
                if kind == "f16":
                    writer.add_tensor(target, value.astype(np.float16))
                else:
                    writer.add_tensor(target, quantize(value, qtype), raw_dtype=qtype)
            else:
                writer.add_tensor(target, value.astype(np.float32))
    if config.tie_word_embeddings:  # llama.cpp's stablelm graph always reads an output matrix
        embedding = next(handle for path in files for name, handle in read_tensors(path, False, "cpu")
                         if name == "model.embed_tokens.weight").read().float().numpy()
        writer.add_tensor("output.weight", embedding.astype(np.float16) if kind == "f16"
                          else quantize(embedding, qtype), raw_dtype=None if kind == "f16" else qtype)
    for (layer, which), heads in qk_norms.items():
        stacked = np.stack([heads[h] for h in range(len(heads))]).astype(np.float32)
        writer.add_tensor(f"blk.{layer}.attn_{which}_norm.weight", stacked)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out


def last_logits(llm, vocab: int) -> np.ndarray:
    """The logits of the last token evaluated (llama-cpp-python keeps them only with logits_all)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))


def measure(llm, args, vocab: int, load_s: float) -> dict:
    """Prefill and batch-1 decode with the same counts as stablelm.bench.measure (token ids fed directly)."""
    result = {"load_s": load_s}
    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(5, vocab, (n,), generator=gen).tolist()

    llm.reset()
    llm.eval(ids(8))  # warm-up
    for length in args.prompt_lengths:
        for key in (f"prefill_{length}_first_tok_s", f"prefill_{length}_tok_s"):  # as stablelm.bench.measure
            llm.reset()
            prompt = ids(length)
            t0 = time.perf_counter()
            llm.eval(prompt)
            result[key] = length / (time.perf_counter() - t0)
    llm.reset()
    llm.eval(ids(16))
    token = ids(1)[0]
    t0 = time.perf_counter()
    for _ in range(args.decode_tokens):
        llm.eval([token])
        token = int(np.argmax(last_logits(llm, vocab)))  # greedy, as our side
    result["decode_b1_tok_s"] = args.decode_tokens / (time.perf_counter() - t0)
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)  # --gguf-type among them
    parser.add_argument("--convert-only", action="store_true", help="write the GGUF file and stop")
    args = parser.parse_args()
    from llama_cpp import Llama

    checkpoint = Path(args.checkpoint)
    kind = args.gguf_type or "f16"
    path = checkpoint / f"model-{kind}.gguf"
    if not path.exists():
        print(f"converting {checkpoint} to {path.name} ...", file=sys.stderr)
        convert(checkpoint, kind, path)
    if args.convert_only:
        return
    config = StableLmConfig.from_json_file(checkpoint / "config.json")
    threads = args.threads or torch.get_num_threads()
    start = time.perf_counter()
    context = max(args.prompt_lengths) + args.decode_tokens + 32
    llm = Llama(str(path), n_ctx=context, n_batch=max(args.prompt_lengths), n_ubatch=max(args.prompt_lengths),
                n_threads=threads, n_threads_batch=threads, verbose=False)
    result = measure(llm, args, config.vocab_size, time.perf_counter() - start)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
