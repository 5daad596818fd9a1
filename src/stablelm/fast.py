"""Inference layout: fused projections and weights prepared for the fastest CPU kernel.

`optimize(model)` rewrites a loaded model in place: q/k/v and gate/up become one matmul each, and
every projection's weight is either prepacked for oneDNN (bf16/fp32: streams weights near the
memory bandwidth, where plain torch bf16 matrix-vector reaches about half) or quantized to int8 /
int4 for torch's weight-only kernels (rounded here, or given by GPTQ: see stablelm.quantize). When loading,
weights still in the file are read group by group into one staging buffer and packed from there.
`restore(model)` turns it back into plain nn.Linear modules
(training needs that). The on-disk format never changes: `reference_state_dict` splits the fused
weights back into the reference's names.
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F
from torch import nn

from .quantize import INT4_GROUP_SIZE, quantize_int4, quantize_int8

QUANTIZATIONS = ("int8", "int4")
# From this many rows (prompt tokens) on, quantized layers dequantize their weight into a reused buffer and
# use the dense (AMX) matmul: torch's int8/int4 kernels are built for decoding. Measured on 2048x11264:
# int8 equal at 16 rows, 3.6x faster at 64; int4 (unpacking costs more) equal at 128, 1.5x faster at 256.
INT8_DENSE_MIN_ROWS = 16
INT4_DENSE_MIN_ROWS = 192  # in a whole model 128 rows were no faster


def unpack_int4(packed: torch.Tensor, n: int, k: int, dtype: torch.dtype = torch.uint8,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """The (n, k) values 0..15 of torch's CPU int4 packing, as `dtype` (into `out` when given).

    That packing stores each block of 64 rows as k x 32 bytes: byte i of column c holds row i in its low
    nibble and row 32 + i in its high nibble (checked against torch by `int4_layout_known`).
    """
    blocks = packed.view(n // 64, k, 32).transpose(1, 2)  # (n / 64, 32, k)
    values = torch.empty(n // 64, 64, k, dtype=dtype) if out is None else out.view(n // 64, 64, k)
    values[:, :32] = blocks & 0xF
    values[:, 32:] = blocks >> 4
    return values.view(n, k)


class Workspace(threading.local):
    """Memory reused for weights dequantized per call, one buffer per thread: a fresh 46 MB tensor costs
    ~20 ms of page faults, ten times the conversion itself."""

    def __init__(self, limit: int):
        self.limit, self.buffer = limit, None

    def take(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor | None:
        """A (rows, cols) view of the buffer, or None when it would be bigger than `limit` elements."""
        if rows * cols > self.limit:
            return None
        if self.buffer is None or self.buffer.dtype != dtype:
            self.buffer = torch.empty(self.limit, dtype=dtype)
        return self.buffer[:rows * cols].view(rows, cols)


def largest_projection(config) -> int:
    """Elements of the biggest fused projection weight (q/k/v or gate/up) of a layer."""
    return config.hidden_size * max(2 * config.intermediate_size,
                                    (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim)


def share_workspace(model: nn.Module) -> None:
    """Give every quantized FastLinear of `model` one Workspace sized for a layer's biggest projection."""
    workspace = Workspace(largest_projection(model.config))
    for module in model.modules():
        if isinstance(module, FastLinear) and module.kind in QUANTIZATIONS:
            module.workspace = workspace


@functools.cache
def int4_layout_known() -> bool:
    q = torch.randint(0, 16, (128, 128), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return packed.shape == (128, 64) and torch.equal(unpack_int4(packed, 128, 128).int(), q)


def mkldnn_usable(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()


class FastLinear(nn.Module):
    """y = x W^T (+ b) for one or several fused projections; returns a tuple when fused.

    kind: "dense" (F.linear), "mkldnn" (prepacked oneDNN weight), "int8" (per-row scales),
    "int4" (asymmetric, per-row groups of `group_size` along the input).
    """

    workspace: Workspace | None = None  # shared by a model's quantized layers (see share_workspace)

    def __init__(self, kind: str, splits: list[int] | None, in_features: int, out_features: int,
                 bias: torch.Tensor | None, dtype: torch.dtype, group_size: int = INT4_GROUP_SIZE):
        super().__init__()
        self.kind, self.splits = kind, splits
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = dtype
        self.group_size = group_size
        self.register_buffer("bias", bias, persistent=False)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_linears(cls, linears: list[nn.Linear], kind: str, weight: torch.Tensor | None = None,
                     quantized: dict | None = None) -> FastLinear:
        """One module for `linears` (fused when several).

        weight: their concatenated (out, in) weight when the caller already has it (read from the file into
        a staging buffer); by default the linears' own weights are concatenated.
        quantized: {linear: ("int4", q, scale, zero) or ("int8", q, scale)} computed elsewhere (GPTQ), used
        instead of rounding here."""
        biases = [lin.bias for lin in linears]
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        splits = [lin.out_features for lin in linears] if len(linears) > 1 else None
        if quantized and all(lin in quantized for lin in linears):
            kinds = {quantized[lin][0] for lin in linears}
            if len(kinds) != 1:
                raise ValueError(f"fused projections must share one quantization, got {sorted(kinds)}")
            kind = kinds.pop()
            parts = [torch.cat(tensors) for tensors in zip(*(quantized[lin][1:] for lin in linears))]
            dtype = linears[0].weight.dtype
            in_features = linears[0].in_features
            module = cls(kind, splits, in_features, parts[0].shape[0], None if bias is None else bias.to(dtype), dtype)
            module.set_int4(*parts) if kind == "int4" else module.set_int8(*parts)
            return module
        if weight is None:
            weights = [lin.weight.detach() for lin in linears]
            weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        return cls.from_weight(weight, bias, splits, kind)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias, splits, kind: str) -> FastLinear:
        dtype = weight.dtype  # the kernels take activations in the model's dtype (fp32 too)
        module = cls(kind, splits, weight.shape[1], weight.shape[0], None if bias is None else bias.to(dtype), dtype)
        if kind == "dense":
            module.register_buffer("weight", weight, persistent=False)
        elif kind == "mkldnn":
            module.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1),
                                   persistent=False)
        elif kind == "int8":
            q, scale = quantize_int8(weight)
            module.set_int8(q, scale.to(dtype))
        elif kind == "int4":
            q, scale, zero = quantize_int4(weight, module.group_size)
            module.set_int4(q, scale, zero)
        else:
            raise ValueError(f"unknown linear kind {kind!r}")
        return module

    def set_int8(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        self.register_buffer("weight", q.contiguous(), persistent=False)
        self.register_buffer("scale", scale.to(self.compute_dtype).contiguous(), persistent=False)

    def set_int4(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """q (N, K) values 0..15; scale, zero (N, K / group_size)."""
        # The packed layout is blocks of 64 rows, so row chunks (multiples of 64) pack independently.
        packed = torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(chunk.to(torch.int32), 1)
                            for chunk in q.split(1024)])
        self.register_buffer("weight", packed, persistent=False)
        self.register_buffer("scale", scale.contiguous(), persistent=False)
        self.register_buffer("zero", zero.contiguous(), persistent=False)
        # The kernel's layout: (K / group, N, 2) pairs of (scale, zero) in the activation dtype.
        self.register_buffer("scales_and_zeros",
                             torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(self.compute_dtype),
                             persistent=False)
        # For prompts: w = q * scale + (zero - 8 * scale), one multiply-add over the unpacked values.
        self.unpackable = q.shape[0] % 64 == 0 and int4_layout_known()
        self.register_buffer("offset", (zero.float() - 8 * scale.float()).to(self.compute_dtype), persistent=False)

    def dequantized_int4(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The int4 weight as a dense (N, K) tensor in the compute dtype (written into `out` when given)."""
        n, k = self.out_features, self.in_features
        if not self.unpackable:  # the kernel applied to the identity returns it (transposed)
            eye = torch.eye(k, dtype=self.compute_dtype)
            return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, self.group_size,
                                                              self.scales_and_zeros).t().contiguous()
        values = unpack_int4(self.weight, n, k, self.compute_dtype, out).view(n, -1, self.group_size)
        return values.mul_(self.scale.to(self.compute_dtype)[..., None]).add_(self.offset[..., None]).view(n, k)

    # -- use ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor):
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.kind == "dense":
            y = F.linear(x2, self.weight, self.bias)
        elif self.kind == "mkldnn":
            y = torch.ops.mkldnn._linear_pointwise(x2.to(self.compute_dtype), self.weight, self.bias, "none", [], "")
        else:
            xq = x2.to(self.compute_dtype)
            if self.kind == "int8" and x2.shape[0] >= INT8_DENSE_MIN_ROWS:
                # q is exact in bf16: one conversion plus the dense (AMX) matmul beats the int8 kernel here
                buffer = self.workspace and self.workspace.take(*self.weight.shape, self.compute_dtype)
                weight = buffer.copy_(self.weight) if buffer is not None else self.weight.to(self.compute_dtype)
                y = F.linear(xq, weight) * self.scale
            elif self.kind == "int8":
                y = torch.ops.aten._weight_int8pack_mm(xq, self.weight, self.scale)
            elif x2.shape[0] >= INT4_DENSE_MIN_ROWS and self.unpackable:
                buffer = self.workspace and self.workspace.take(self.out_features, self.in_features,
                                                                self.compute_dtype)
                y = F.linear(xq, self.dequantized_int4(buffer))
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xq, self.weight, self.group_size, self.scales_and_zeros)
            if self.bias is not None:
                y = y + self.bias
            y = y.to(x.dtype)
        y = y.view(*shape, self.out_features)
        return y.split(self.splits, dim=-1) if self.splits else y

    def dense_weight(self) -> torch.Tensor:
        """The weight as a plain (N, K) tensor (dequantized for int8/int4)."""
        if self.kind == "dense":
            return self.weight
        if self.kind == "mkldnn":
            return self.weight.to_dense()
        if self.kind == "int8":
            return self.weight.to(self.compute_dtype) * self.scale[:, None]
        return self.dequantized_int4()

    def int4_values(self) -> torch.Tensor:
        """The 4-bit values q (N, K) in 0..15, recovered from the packed kernel weight."""
        if self.unpackable:
            return unpack_int4(self.weight, self.out_features, self.in_features)
        groups = self.dense_weight().float().view(self.out_features, -1, self.group_size)
        q = (groups - self.zero.float()[..., None]) / self.scale.float()[..., None] + 8
        return q.round().clamp(0, 15).to(torch.uint8).view(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, kind={self.kind}, splits={self.splits}"


# -- rewriting a model ---------------------------------------------------------------------------
def is_optimized(model: nn.Module) -> bool:
    return getattr(model, "inference_kind", None) is not None


def choose_kind(model: nn.Module, quantization: str | None) -> str:
    if quantization is not None:
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, got {quantization!r}")
        if model.device.type != "cpu":
            raise ValueError("int8/int4 weight-only kernels are used on the CPU only")
        return quantization
    return "mkldnn" if mkldnn_usable(model.dtype, model.device) else "dense"


@torch.no_grad()
def optimize(model: nn.Module, quantization: str | None = None, quantized: dict | None = None,
             fetch=None) -> nn.Module:
    """Fuse projections and prepare weights for inference (in place); returns the model.

    quantized: {nn.Linear: (kind, q, scale[, zero])} computed elsewhere (GPTQ); see FastLinear.from_linears.
    fetch: fetch(state-dict names, out) -> their weights concatenated by rows, for projections whose weights
    are still on the meta device (the loader reads them from the file only now, into `out` when given).
    """
    if is_optimized(model):
        if model.inference_kind == (quantization or model.inference_kind):
            return model
        restore(model)
    kind = choose_kind(model, quantization)
    backbone = model.model if hasattr(model, "model") else model
    config = model.config
    names = {id(module): name for name, module in model.named_modules()}  # ids: replaced modules must be freed
    scratch = None
    if kind != "dense":  # the packed / quantized weight is a copy: read and fuse through one reused buffer
        scratch = torch.empty(largest_projection(config), dtype=model.dtype, device=model.device)

    def fused(linears: list[nn.Linear]) -> FastLinear:
        if quantized and all(lin in quantized for lin in linears):
            return FastLinear.from_linears(linears, kind, quantized=quantized)
        rows, cols = sum(lin.out_features for lin in linears), linears[0].in_features
        out = scratch[:rows * cols].view(rows, cols) if scratch is not None and scratch.numel() >= rows * cols else None
        if linears[0].weight.is_meta:
            if fetch is None:
                raise ValueError(f"{names[id(linears[0])]} has no weight to optimize")
            weight = fetch([names[id(lin)] + ".weight" for lin in linears], out)
        elif len(linears) > 1:
            weights = [lin.weight.detach() for lin in linears]
            weight = torch.cat(weights, out=out) if out is not None else torch.cat(weights)
        else:
            weight = linears[0].weight.detach()
        return FastLinear.from_linears(linears, kind, weight)

    if hasattr(model, "lm_head") and not model.config.tie_word_embeddings:
        # First: its weight does not fit the staging buffer, and a transient copy costs least while little is packed.
        model.lm_head = fused([model.lm_head])
    for layer in backbone.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = fused([attn.q_proj, attn.k_proj, attn.v_proj])
        attn.o_proj = fused([attn.o_proj])
        del attn.q_proj, attn.k_proj, attn.v_proj
        mlp.gate_up_proj = fused([mlp.gate_proj, mlp.up_proj])
        mlp.down_proj = fused([mlp.down_proj])
        del mlp.gate_proj, mlp.up_proj
    model.inference_kind = backbone.inference_kind = kind
    share_workspace(model)
    return model


@torch.no_grad()
def restore(model: nn.Module) -> nn.Module:
    """Undo `optimize`: plain nn.Linear modules with dense (dequantized) weights."""
    if not is_optimized(model):
        return model
    backbone = model.model if hasattr(model, "model") else model
    for layer in backbone.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name, (module, parts) in {"attn": (attn.qkv_proj, ("q_proj", "k_proj", "v_proj")),
                                       "mlp": (mlp.gate_up_proj, ("gate_proj", "up_proj"))}.items():
            owner = attn if name == "attn" else mlp
            weights = module.dense_weight().split(module.splits)
            biases = module.bias.split(module.splits) if module.bias is not None else [None] * len(parts)
            for part, w, b in zip(parts, weights, biases):
                setattr(owner, part, _linear(w, b))
        del attn.qkv_proj, mlp.gate_up_proj
        attn.o_proj = _linear(attn.o_proj.dense_weight(), None)
        mlp.down_proj = _linear(mlp.down_proj.dense_weight(), None)
    if isinstance(getattr(model, "lm_head", None), FastLinear):
        model.lm_head = _linear(model.lm_head.dense_weight(), None)
    model.inference_kind = backbone.inference_kind = None
    return model


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    from .checkpoint import skip_init

    with skip_init():
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=True)
    if bias is not None:
        lin.bias = nn.Parameter(bias.contiguous().clone(), requires_grad=True)
    return lin


# -- saving --------------------------------------------------------------------------------------
def reference_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict under the reference's names; quantized weights as q + scale (+ zero) tensors."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, FastLinear):
            parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
            prefix, _, leaf = name.rpartition(".")
            names = [f"{prefix}.{p}" if prefix else p for p in parts.get(leaf, (leaf,))]
            for part, tensors in zip(names, _split_tensors(module)):
                for suffix, tensor in tensors.items():
                    state[f"{part}.{suffix}"] = tensor
        else:
            for pname, param in module.named_parameters(recurse=False):
                state[f"{name}.{pname}" if name else pname] = param.detach()
    return state


def _split_tensors(module: FastLinear) -> list[dict[str, torch.Tensor]]:
    splits = module.splits or [module.out_features]
    if module.kind == "int8":
        fields = {"weight": module.weight, "weight_scale": module.scale}
    elif module.kind == "int4":
        q = module.int4_values()
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()  # two 4-bit values per byte, low nibble first
        fields = {"weight": packed, "weight_scale": module.scale, "weight_zero": module.zero}
    else:
        fields = {"weight": module.dense_weight()}
    if module.bias is not None:
        fields["bias"] = module.bias
    pieces = [dict() for _ in splits]
    for key, tensor in fields.items():
        for piece, chunk in zip(pieces, tensor.split(splits, dim=0)):
            piece[key] = chunk.contiguous()
    return pieces


# -- loading a quantized checkpoint --------------------------------------------------------------
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantization_config(model: nn.Module) -> dict:
    """The `quantization_config` entry of config.json for a quantized model."""
    kind = model.inference_kind
    config = {"quant_method": "stablelm-weight-only", "bits": 8 if kind == "int8" else 4}
    if kind == "int4":
        config["group_size"] = INT4_GROUP_SIZE
        int8_modules = int8_projections(model)
        if int8_modules:
            config["int8_modules"] = int8_modules
    return config


def int8_projections(model: nn.Module) -> list[str]:
    """Projection names kept at int8 in an int4 model (a mixed recipe such as GPTQ's default)."""
    names = set()
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    for name, module in model.named_modules():
        if isinstance(module, FastLinear) and module.kind == "int8":
            leaf = name.rpartition(".")[2]
            names.update(fused.get(leaf, (leaf,)))
    return sorted(names)


def kind_from_config(qconfig: dict, source: str) -> tuple[str, tuple[str, ...]]:
    """(kind, projections kept at int8) from a `quantization_config`, or a ValueError naming what is wrong."""
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != "stablelm-weight-only" \
            or qconfig.get("bits") not in (8, 4):
        raise ValueError(f"{source}: unsupported quantization_config {qconfig!r} "
                         "(expected quant_method 'stablelm-weight-only' with bits 8 or 4)")
    if qconfig["bits"] == 4 and qconfig.get("group_size", INT4_GROUP_SIZE) != INT4_GROUP_SIZE:
        raise ValueError(f"{source}: int4 group_size {qconfig.get('group_size')} is not {INT4_GROUP_SIZE}")
    int8_modules = qconfig.get("int8_modules", [])
    if not isinstance(int8_modules, list) or any(name not in PROJECTIONS + ("lm_head",) for name in int8_modules):
        raise ValueError(f"{source}: quantization_config int8_modules {int8_modules!r} must list names among "
                         f"{PROJECTIONS + ('lm_head',)}")
    return ("int8" if qconfig["bits"] == 8 else "int4"), tuple(int8_modules)


@torch.no_grad()
def load_quantized(model: nn.Module, tensors: dict[str, torch.Tensor], kind: str, source: str,
                   int8_modules: tuple[str, ...] = ()) -> None:
    """Build the quantized FastLinear modules from saved q / scale / zero tensors (no re-quantizing).

    int8_modules: projection names stored at int8 in an int4 checkpoint."""
    backbone = model.model if hasattr(model, "model") else model
    prefix = getattr(model, "base_prefix", "")
    compute = backbone.embed_tokens.weight.dtype

    def take(name: str, suffix: str, required: bool = True):
        key = f"{name}.{suffix}"
        if key not in tensors:
            if required:
                raise ValueError(f"{source}: quantized checkpoint lacks {key}")
            return None
        return tensors.pop(key)

    def build(names: list[str]) -> FastLinear:
        leaves = {n.rpartition(".")[2] for n in names}
        mixed = kind == "int4" and leaves & set(int8_modules)
        if mixed and leaves - set(int8_modules):
            raise ValueError(f"{source}: int8_modules lists only part of the fused {sorted(leaves)}")
        module_kind = "int8" if mixed else kind
        stored = "int4" if f"{names[0]}.weight_zero" in tensors else "int8"
        if stored != module_kind:
            raise ValueError(f"{source}: {names[0]} is stored as {stored} but quantization_config implies {module_kind}")
        q = [take(n, "weight") for n in names]
        want = torch.uint8 if module_kind == "int4" else torch.int8
        if any(t.dtype != want for t in q):
            raise ValueError(f"{source}: {names[0]}.weight has dtype {q[0].dtype}, {module_kind} stores {want}")
        scale = torch.cat([take(n, "weight_scale") for n in names])
        biases = [take(n, "bias", required=False) for n in names]
        bias = None if biases[0] is None else torch.cat(biases).to(compute)
        splits = [t.shape[0] for t in q] if len(names) > 1 else None
        out_features = sum(t.shape[0] for t in q)
        in_features = q[0].shape[1] * (2 if module_kind == "int4" else 1)
        module = FastLinear(module_kind, splits, in_features, out_features, bias, compute)
        if module_kind == "int8":
            module.set_int8(torch.cat(q), scale)
        else:
            packed = torch.cat(q)
            unpacked = torch.stack([packed & 0xF, packed >> 4], dim=-1).view(out_features, in_features)
            module.set_int4(unpacked, scale, torch.cat([take(n, "weight_zero") for n in names]))
        return module

    for i, layer in enumerate(backbone.layers):
        base = f"{prefix}layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = build([f"{base}.self_attn.{p}_proj" for p in "qkv"])
        attn.o_proj = build([f"{base}.self_attn.o_proj"])
        mlp.gate_up_proj = build([f"{base}.mlp.gate_proj", f"{base}.mlp.up_proj"])
        mlp.down_proj = build([f"{base}.mlp.down_proj"])
        del attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj
    if hasattr(model, "lm_head") and not model.config.tie_word_embeddings:
        model.lm_head = build(["lm_head"])
    if tensors:
        raise ValueError(f"{source}: unexpected quantized tensor(s): {', '.join(sorted(tensors)[:5])}")
    model.inference_kind = backbone.inference_kind = kind
    share_workspace(model)
