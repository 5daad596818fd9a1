"""GPTQ for int4 weights (round-to-nearest is in stablelm.layers.rounding).

GPTQ (Frantar et al., 2022) needs a little calibration
text: it quantizes one input column at a time and moves each column's rounding error onto the columns
not yet quantized, weighted by the inverse Hessian of the layer's inputs (H = X^T X), so the layer's
*outputs* on real activations stay close. It writes the same int4 format, so its checkpoints load
like any other int4 checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from . import fast
from .fused import FUSED, PROJECTIONS, layer_projections, parts
from .rounding import INT4_GROUP_SIZE, int4_params, int4_round
from .schemes import SCHEMES

# down_proj is the projection int4 hurts most (measured on the demo model, see tests/test_demo.py); as in
# llama.cpp's Q4_K_M it keeps more bits, at about 17 % more weight bytes than all-int4.
GPTQ_INT8_MODULES = ("down_proj",)


def calibration_windows(ids: list[int] | torch.Tensor, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """(samples, seq_len) windows of token ids at random (seeded) offsets of one long text."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if samples < 1 or seq_len < 1:
        raise ValueError(f"calibration needs samples >= 1 and seq_len >= 1, got {samples} and {seq_len}")
    if len(ids) < seq_len + 1:
        raise ValueError(f"calibration text has {len(ids)} tokens; it needs more than seq_len={seq_len}")
    starts = torch.randint(0, len(ids) - seq_len, (samples,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


# -- GPTQ ----------------------------------------------------------------------------------------
class _Collected(Exception):
    """Raised by the hook that has a projection's inputs, to stop the layer's forward there."""


def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, group_size: int = INT4_GROUP_SIZE,
              damp: float = 0.01, block: int = 128):
    """GPTQ for one (N, K) weight given H = X^T X / n (K, K) of its inputs; returns quantize_int4's triple.

    Groups stay contiguous (the kernel's layout); each group's grid is set from the error-updated
    weights when the sweep reaches it.
    """
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4 needs in_features ({k}) divisible by the group size {group_size}")
    block = group_size * max(1, block // group_size)  # a group never straddles two blocks
    w = weight.float().clone()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0  # inputs that are always zero: any value will do
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    # Upper Cholesky factor of H^-1: row i holds how column i's error spreads to the columns after it.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    q = torch.empty(n, k, dtype=torch.uint8)
    scales = torch.empty(n, k // group_size, dtype=torch.bfloat16)
    zeros = torch.empty_like(scales)
    for start in range(0, k, block):
        end = min(start + block, k)
        errors = torch.empty(n, end - start)
        for i in range(start, end):
            if i % group_size == 0:
                g = i // group_size
                scales[:, g], zeros[:, g] = int4_params(w[:, i:i + group_size])
            col = w[:, i]
            qcol = int4_round(col[:, None], scales[:, g], zeros[:, g])[:, 0]
            q[:, i] = qcol.to(torch.uint8)
            deq = (qcol - 8) * scales[:, g].float() + zeros[:, g].float()
            err = (col - deq) / hinv[i, i]
            w[:, i + 1:end] -= err[:, None] * hinv[i, i + 1:end][None, :]
            errors[:, i - start] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    return q, scales, zeros


@torch.no_grad()
def gptq_quantize(model: nn.Module, calibration: torch.Tensor, int8_modules: tuple[str, ...] = GPTQ_INT8_MODULES,
                  batch_size: int = 8, damp: float = 0.01, progress: bool = True) -> nn.Module:
    """Quantize a loaded StableLm model's projections to int4 with GPTQ, in place; returns the model.

    calibration: (N, T) token ids of representative text (tens of thousands of tokens are enough).
    int8_modules: projections kept at int8 (round-to-nearest), by name: "down_proj", "v_proj", ...
    Layer by layer, on that layer's inputs as the already quantized layers before it produce them;
    within a layer q/k/v, o, gate/up and down in turn, so each sees its quantized predecessors.
    """
    unknown = set(int8_modules) - set(PROJECTIONS)
    if unknown:
        raise ValueError(f"int8_modules: unknown projection(s) {sorted(unknown)}; expected names among {PROJECTIONS}")
    for fused_parts in FUSED.values():
        chosen = set(fused_parts) & set(int8_modules)
        if chosen and chosen != set(fused_parts):
            raise ValueError(f"int8_modules must name all of the fused {list(fused_parts)} or none, "
                             f"got {sorted(chosen)}")
    fast.restore(model)  # plain nn.Linear modules to hook
    names = {module: name.rpartition(".")[2] for name, module in model.named_modules()}
    backbone = model.model if hasattr(model, "model") else model
    dtype = backbone.embed_tokens.weight.dtype
    batches = [backbone.embed_tokens(ids) for ids in calibration.split(batch_size)]
    positions = torch.arange(calibration.shape[1])[None]
    cos, sin = backbone.rotary(positions, dtype)
    quantized: dict[nn.Linear, tuple[str, dict]] = {}  # (scheme name, its fields) per projection
    int8, int4 = SCHEMES["int8"], SCHEMES["int4"]
    layers = tqdm(backbone.layers, desc="GPTQ", unit="layer", disable=not progress)
    for layer in layers:
        for group in [[linear for _, linear in parts(name, getattr(owner, name))]
                      for owner, _, name in layer_projections(layer)]:
            if all(names[lin] in int8_modules for lin in group):  # rounded to nearest: needs no activations
                for linear in group:
                    fields = int8.quantize(linear.weight)
                    quantized[linear] = (int8.name, fields)
                    linear.weight.copy_(int8.dequantize(fields, linear.weight.dtype))
                continue
            hessian = torch.zeros(group[0].in_features, group[0].in_features)
            count = 0

            def collect(_module, inputs):
                nonlocal count
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                hessian.addmm_(x.T, x)
                count += x.shape[0]
                raise _Collected  # the rest of the layer is not needed for this group

            hook = group[0].register_forward_pre_hook(collect)
            for x in batches:
                try:
                    layer(x, cos, sin, None, None, True)
                except _Collected:
                    pass
            hook.remove()
            hessian /= count
            # GPTQ treats rows independently given H: the group's weights (q/k/v, gate/up) in one sweep
            rows = [linear.out_features for linear in group]
            swept = gptq_int4(torch.cat([linear.weight for linear in group]), hessian, int4.group_size, damp)
            for linear, q, scale, zero in zip(group, *(part.split(rows) for part in swept)):
                fields = {"q": q, "scale": scale, "zero": zero}
                quantized[linear] = (int4.name, fields)
                linear.weight.copy_(int4.dequantize(fields, linear.weight.dtype))  # later groups see the rounding
        batches = [layer(x, cos, sin, None, None, True) for x in batches]
    fast.optimize(model, "int4", quantized=quantized)
    return model
