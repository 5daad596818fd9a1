"""Inference layout: fused projections, each in the fastest linear format this machine runs.

`optimize(model)` rewrites a loaded model in place: each projection module the model declares (the fused
q/k/v and gate/up of stablelm.layers.fused, o_proj, down_proj, lm_head) becomes one linear format module
with a single matmul (oneDNN-prepacked, native bf16/fp16, int8 or int4 weight-only: see
`linear.choose_format`). Quantized weights are rounded here, or given by GPTQ (stablelm.layers.gptq).
When loading, weights still in the file are read group by group into one staging buffer and converted
from there. `restore(model)` turns it back into plain nn.Linear modules (training needs that). The
on-disk format never changes: `format_tensors` splits the fused weights back into the reference's names,
by the table in stablelm.layers.fused.
"""

from __future__ import annotations

import torch
from torch import nn

from .meta import skip_init
from .fused import FUSED, PROJECTIONS, Fused, layer_projections, parts, reference_name
from .linear import FORMATS, LinearFormat, choose_format, share_workspace
from .schemes import SCHEMES, Scheme, join, scheme_from_config



def largest_projection(model: nn.Module) -> int:
    """Elements of the biggest (fused) projection weight of a layer: q/k/v or gate/up, at this process's
    sizes (a tensor-parallel rank holds a slice)."""
    backbone = model.model if hasattr(model, "model") else model
    if not len(backbone.layers):
        return 0
    return max(sum(lin.in_features * lin.out_features for _, lin in parts(name, getattr(owner, name)))
               for owner, _, name in layer_projections(backbone.layers[0]))


# -- rewriting a model ---------------------------------------------------------------------------
def is_optimized(model: nn.Module) -> bool:
    return getattr(model, "inference_kind", None) is not None


def _format_class(model: nn.Module, quantization: str | None, linear_format: str | None) -> type[LinearFormat]:
    return FORMATS[choose_format(model.dtype, model.device, quantization, linear_format)]


@torch.no_grad()
def optimize(model: nn.Module, quantization: str | None = None, quantized: dict | None = None,
             fetch=None, linear_format: str | None = None) -> nn.Module:
    """Fuse projections and convert weights to a linear format for inference (in place); returns the model.

    quantization: None (16/32-bit weights), "int8" or "int4" (rounded to nearest here).
    quantized: {nn.Linear: (scheme name, its fields)} computed elsewhere (GPTQ).
    fetch: fetch(state-dict names, out) -> their weights concatenated by rows, for projections whose weights
    are still on the meta device (the loader reads them from the file only now, into `out` when given).
    linear_format: force a format by name (see stablelm.linear.FORMATS); by default the fastest that runs.
    """
    if any(hasattr(m, "lora_A") for m in model.modules()):
        raise ValueError("the model has LoRA adapters: merge them first (stablelm.layers.lora.merge_lora)")
    fmt = _format_class(model, quantization, linear_format)
    if is_optimized(model):
        if model.inference_kind == fmt.name and quantized is None:
            return model
        restore(model)
    backbone = model.model if hasattr(model, "model") else model
    names = {id(module): name for name, module in model.named_modules()}  # ids: replaced modules must be freed
    scratch = None
    if not fmt.keeps_weight:  # the converted weight is a copy: read and fuse through one reused buffer
        scratch = torch.empty(largest_projection(model), dtype=model.dtype, device=model.device)

    def fused(linears: list[nn.Linear]) -> LinearFormat:
        bias = None if linears[0].bias is None else torch.cat([lin.bias.detach() for lin in linears])
        splits = [lin.out_features for lin in linears] if len(linears) > 1 else None
        if quantized and all(lin in quantized for lin in linears):
            return _from_quantized([quantized[lin] for lin in linears], bias, splits, model)
        rows, cols = sum(lin.out_features for lin in linears), linears[0].in_features
        out = scratch[:rows * cols].view(rows, cols) if scratch is not None and scratch.numel() >= rows * cols else None
        if linears[0].weight.is_meta:
            if fetch is None:
                raise ValueError(f"{names[id(linears[0])]} has no weight to optimize")
            weight = fetch([reference_name(names[id(lin)]) + ".weight" for lin in linears], out)
        elif len(linears) > 1:
            weights = [lin.weight.detach() for lin in linears]
            weight = torch.cat(weights, out=out) if out is not None else torch.cat(weights)
        else:
            weight = linears[0].weight.detach()
        return fmt.from_weight(weight, bias, splits)

    if hasattr(model, "lm_head") and not model.config.tie_word_embeddings:
        # First: its weight does not fit the staging buffer, and a transient copy costs least while little is packed.
        model.lm_head = fused([model.lm_head])
    for layer in backbone.layers:
        for owner, _, name in layer_projections(layer):
            setattr(owner, name, fused([linear for _, linear in parts(name, getattr(owner, name))]))
    _mark(model, fmt.name, fmt.quantization)
    return model


def _from_quantized(parts: list[tuple[str, dict]], bias, splits, model) -> LinearFormat:
    """One format module from GPTQ's per-projection (scheme name, fields)."""
    kinds = {kind for kind, _ in parts}
    if len(kinds) != 1:
        raise ValueError(f"fused projections must share one quantization, got {sorted(kinds)}")
    kind = kinds.pop()
    return _format_class(model, kind, None).from_quantized(join([fields for _, fields in parts]), bias, splits,
                                                           model.dtype)


def _mark(model: nn.Module, format_name: str, quantization: str | None) -> None:
    backbone = model.model if hasattr(model, "model") else model
    for m in {model, backbone}:
        m.inference_kind, m.quantization = format_name, quantization
    share_workspace(model, largest_projection(model))


@torch.no_grad()
def restore(model: nn.Module) -> nn.Module:
    """Undo `optimize`: plain nn.Linear modules with dense (dequantized) weights."""
    if not is_optimized(model):
        return model
    backbone = model.model if hasattr(model, "model") else model
    for layer in backbone.layers:
        for owner, _, name in layer_projections(layer):
            module = getattr(owner, name)
            weights = module.dense_weight().split(module.splits or [module.out_features])
            biases = module.bias.split(module.splits or [module.out_features]) if module.bias is not None \
                else [None] * len(weights)
            linears = [_linear(w, b) for w, b in zip(weights, biases)]
            setattr(owner, name, Fused(**dict(zip(FUSED[name], linears))) if name in FUSED else linears[0])
    if isinstance(getattr(model, "lm_head", None), LinearFormat):
        model.lm_head = _linear(model.lm_head.dense_weight(), None)
    for m in {model, backbone}:
        m.inference_kind, m.quantization = None, None
    return model


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    with skip_init():
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=True)
    if bias is not None:
        lin.bias = nn.Parameter(bias.contiguous().clone(), requires_grad=True)
    return lin


# -- saving --------------------------------------------------------------------------------------
def format_tensors(model: nn.Module, present=lambda key: False):
    """(reference key, tensor) for what every linear format module of `model` stores, split back into the
    reference's projections (quantized weights as q + scale (+ zero)). A module whose first key `present`
    reports is skipped: a nested model's state-dict hook wrote it already."""
    for name, module in model.named_modules():
        if isinstance(module, LinearFormat):
            prefix, _, leaf = name.rpartition(".")
            names = [f"{prefix}.{p}" if prefix else p for p in FUSED.get(leaf, (leaf,))]
            if present(f"{names[0]}.weight"):
                continue
            for part, tensors in zip(names, _split_tensors(module)):
                for suffix, tensor in tensors.items():
                    yield f"{part}.{suffix}", tensor


def _split_tensors(module: LinearFormat) -> list[dict[str, torch.Tensor]]:
    splits = module.splits or [module.out_features]
    fields = module.stored()
    if module.bias is not None:
        fields["bias"] = module.bias
    pieces = [dict() for _ in splits]
    for key, tensor in fields.items():
        for piece, chunk in zip(pieces, tensor.split(splits, dim=0)):
            piece[key] = chunk.contiguous()
    return pieces


# -- loading a quantized checkpoint --------------------------------------------------------------
def _check_no_other_scheme(scheme: Scheme, name: str, tensors: dict, source: str) -> None:
    """A projection stored with tensors that `scheme` does not store was written by another scheme."""
    mine = set(scheme.stored_layout(1, 64))
    for other in SCHEMES.values():
        extra = [suffix for suffix in other.stored_layout(1, 64) if suffix not in mine and f"{name}.{suffix}" in tensors]
        if extra:
            raise ValueError(f"{source}: {name} is stored as {other.name} ({name}.{extra[0]}) but quantization_config "
                             f"implies {scheme.name}")


MIXED_SCHEME = "int8"  # what a mixed recipe (GPTQ's default) keeps some projections at: `int8_modules`


def quantization_config(model: nn.Module) -> dict:
    """The `quantization_config` entry of config.json for a quantized model: its scheme's entries, and the
    projections kept at int8 when there are any."""
    config = SCHEMES[model.quantization].config()
    mixed = int8_projections(model) if model.quantization != MIXED_SCHEME else []
    if mixed:
        config["int8_modules"] = mixed
    return config


def int8_projections(model: nn.Module) -> list[str]:
    """Projection names kept at int8 in a model of another scheme (a mixed recipe such as GPTQ's default)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, LinearFormat) and module.quantization == MIXED_SCHEME:
            leaf = name.rpartition(".")[2]
            names.update(FUSED.get(leaf, (leaf,)))
    return sorted(names)


def kind_from_config(qconfig: dict, source: str) -> tuple[str, tuple[str, ...]]:
    """(scheme name, projections kept at int8) from a `quantization_config`, or a ValueError naming what is
    wrong."""
    scheme = scheme_from_config(qconfig, source)
    int8_modules = qconfig.get("int8_modules", [])
    if not isinstance(int8_modules, list) or any(name not in PROJECTIONS + ("lm_head",) for name in int8_modules):
        raise ValueError(f"{source}: quantization_config int8_modules {int8_modules!r} must list names among "
                         f"{PROJECTIONS + ('lm_head',)}")
    return scheme.name, tuple(int8_modules)


@torch.no_grad()
def load_quantized(model: nn.Module, tensors: dict[str, torch.Tensor], kind: str, source: str,
                   int8_modules: tuple[str, ...] = (), linear_format: str | None = None) -> None:
    """Build the quantized format modules from saved q / scale / zero tensors (no re-quantizing), checking
    every tensor's dtype and shape against the model's projections.

    int8_modules: projection names stored at int8 in a checkpoint of another scheme."""
    backbone = model.model if hasattr(model, "model") else model
    prefix = getattr(model, "base_prefix", "")
    compute = backbone.embed_tokens.weight.dtype
    formats = {q: _format_class(model, q, linear_format) for q in {kind, MIXED_SCHEME}}

    def take(name: str, suffix: str, shape: tuple[int, ...] | None, required: bool = True):
        key = f"{name}.{suffix}"
        if key not in tensors:
            if required:
                raise ValueError(f"{source}: quantized checkpoint lacks {key}")
            return None
        tensor = tensors.pop(key)
        if shape is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, config.json implies {shape}")
        # still in the file (a FileTensor): read now, so only the module being built holds its stored copy
        tensor = tensor if isinstance(tensor, torch.Tensor) else tensor.read()
        if suffix != "weight":  # scales, zero points, biases: one NaN would silently empty every reply
            if not tensor.is_floating_point():
                raise ValueError(f"{source}: {key} has dtype {tensor.dtype}; scales, zero points and biases are "
                                 "floating point")
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{source}: {key} holds NaN or infinite values")
        return tensor

    def build(names: list[str], linears: list[nn.Linear]) -> LinearFormat:
        leaves = {n.rpartition(".")[2] for n in names}
        mixed = kind != MIXED_SCHEME and leaves & set(int8_modules)
        if mixed and leaves - set(int8_modules):
            raise ValueError(f"{source}: int8_modules lists only part of the fused {sorted(leaves)}")
        scheme = SCHEMES[MIXED_SCHEME if mixed else kind]
        _check_no_other_scheme(scheme, names[0], tensors, source)
        pieces, biases = [], []
        for name, lin in zip(names, linears):
            stored = {}
            for suffix, (shape, dtypes) in scheme.stored_layout(lin.out_features, lin.in_features).items():
                stored[suffix] = take(name, suffix, shape)
                if stored[suffix].dtype not in dtypes:
                    raise ValueError(f"{source}: {name}.{suffix} has dtype {stored[suffix].dtype}, {scheme.name} "
                                     f"stores {' or '.join(str(d) for d in dtypes)}")
            pieces.append(stored)
            biases.append(take(name, "bias", (lin.out_features,), required=lin.bias is not None))
        bias = None if biases[0] is None else (biases[0] if len(biases) == 1 else torch.cat(biases)).to(compute)
        splits = [lin.out_features for lin in linears] if len(names) > 1 else None
        stored = join(pieces)
        del pieces
        fields = scheme.from_stored(stored)
        del stored  # e.g. the stored int4 pairs, freed before the format packs its copy (100 MB for the 1.6B lm_head)
        return formats[scheme.name].from_quantized(fields, bias, splits, compute)

    for i, layer in enumerate(backbone.layers):
        for owner, path, name in layer_projections(layer):
            pieces = parts(name, getattr(owner, name))
            setattr(owner, name, build([f"{prefix}layers.{i}.{path}.{part}" for part, _ in pieces],
                                       [linear for _, linear in pieces]))
    if hasattr(model, "lm_head") and not model.config.tie_word_embeddings:
        model.lm_head = build(["lm_head"], [model.lm_head])
    if tensors:
        raise ValueError(f"{source}: unexpected quantized tensor(s): {', '.join(sorted(tensors)[:5])}")
    _mark(model, formats[kind].name, kind)
