"""Quantization schemes: how a weight is rounded, what a checkpoint stores for it, how config.json names it.

One class per scheme, registered in `SCHEMES` by the name `from_pretrained(..., quantization=...)` takes.
A scheme speaks in *fields*: the rounded values and their grid, e.g. {"q": (N, K) int8, "scale": (N,)} for
int8, the keywords a linear format's `_build` takes. It converts fields to and from the tensors a checkpoint
stores (by key suffix: "weight", "weight_scale", ...), checks stored shapes and dtypes before anything is
built, and writes / reads its entry of `quantization_config`. Linear formats declare the scheme they run
(`LinearFormat.quantization`); loading, saving, GPTQ, LoRA's frozen base, the CLI and the bench read this
registry, so a new scheme is one class here plus the formats that run it.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .rounding import INT4_GROUP_SIZE, quantize_int4, quantize_int8

QUANT_METHOD = "stablelm-weight-only"  # quantization_config's quant_method for every scheme here
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
SCHEMES: dict[str, Scheme] = {}


def register(cls: type[Scheme]) -> type[Scheme]:
    SCHEMES[cls.name] = cls()
    return cls


class Scheme:
    """Rounding of a (N, K) weight; subclasses set `name`, `bits` and implement the four conversions."""

    name: ClassVar[str]
    bits: ClassVar[int]
    gguf_peer: ClassVar[str]  # llama.cpp's nearest type: what `stablelm bench --against llama.cpp` compares with

    def check_shape(self, n: int, k: int) -> None:
        """ValueError when a (n, k) weight cannot take this scheme."""

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Round a dense (N, K) weight to nearest: the fields."""
        raise NotImplementedError

    def dequantize(self, fields: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (N, K) weight the fields stand for."""
        raise NotImplementedError

    def stored_layout(self, n: int, k: int) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]:
        """What a checkpoint stores for a (n, k) weight: key suffix -> (shape, allowed dtypes)."""
        raise NotImplementedError

    def to_stored(self, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of the fields, by key suffix."""
        raise NotImplementedError

    def from_stored(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The fields of checkpoint tensors (checked by `stored_layout` first)."""
        raise NotImplementedError

    def config(self) -> dict:
        """This scheme's quantization_config entries."""
        return {"quant_method": QUANT_METHOD, "scheme": self.name, "bits": self.bits}

    def check_config(self, qconfig: dict, source: str) -> None:
        """ValueError when a quantization_config naming this scheme asks for what it does not do."""


def join(pieces: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Fields of fused projections stacked by rows (a single piece is not copied: torch.cat would)."""
    return {key: pieces[0][key] if len(pieces) == 1 else torch.cat([p[key] for p in pieces]) for key in pieces[0]}


def scheme_from_config(qconfig, source: str) -> Scheme:
    """The scheme a config.json's quantization_config names (by `scheme`, or by `bits` in older files)."""
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{source}: unsupported quantization_config {qconfig!r} (expected quant_method "
                         f"{QUANT_METHOD!r} with a scheme among {sorted(SCHEMES)})")
    name = qconfig.get("scheme")
    if name is None:  # written before schemes were named: bits alone decides
        name = next((s.name for s in SCHEMES.values() if s.bits == qconfig.get("bits")), None)
    scheme = SCHEMES.get(name) if isinstance(name, str) else None
    if scheme is None or qconfig.get("bits", scheme.bits) != scheme.bits:
        raise ValueError(f"{source}: unsupported quantization_config {qconfig!r} (expected a scheme among "
                         f"{sorted(SCHEMES)} with its bits)")
    scheme.check_config(qconfig, source)
    return scheme


@register
class Int8Rows(Scheme):
    """Symmetric int8 per output row: w = q * scale, q in [-127, 127]."""

    name, bits, gguf_peer = "int8", 8, "q8_0"

    def quantize(self, weight):
        q, scale = quantize_int8(weight)
        return {"q": q, "scale": scale}

    def dequantize(self, fields, dtype=torch.float32):
        return (fields["q"].float() * fields["scale"].float()[:, None]).to(dtype)  # one rounding, to dtype

    def stored_layout(self, n, k):
        return {"weight": ((n, k), (torch.int8,)), "weight_scale": ((n,), FLOATS)}

    def to_stored(self, fields):
        return {"weight": fields["q"], "weight_scale": fields["scale"]}

    def from_stored(self, tensors):
        return {"q": tensors["weight"], "scale": tensors["weight_scale"]}


@register
class Int4Groups(Scheme):
    """Asymmetric int4 in groups of 64 inputs: w = (q - 8) * scale + zero, q in 0..15, scale and zero bf16.
    Stored two values a byte, low nibble first."""

    name, bits, gguf_peer, group_size = "int4", 4, "q4_0", INT4_GROUP_SIZE

    def check_shape(self, n, k):
        if k % self.group_size:
            raise ValueError(f"int4 needs in_features ({k}) divisible by the group size {self.group_size}")

    def quantize(self, weight):
        q, scale, zero = quantize_int4(weight, self.group_size)
        return {"q": q, "scale": scale, "zero": zero}

    def dequantize(self, fields, dtype=torch.float32):
        q, n = fields["q"].float(), fields["q"].shape[0]
        groups = q.view(n, -1, self.group_size)
        w = (groups - 8) * fields["scale"].float()[..., None] + fields["zero"].float()[..., None]
        return w.view(n, -1).to(dtype)

    def stored_layout(self, n, k):
        grid = ((n, k // self.group_size), FLOATS)
        return {"weight": ((n, k // 2), (torch.uint8,)), "weight_scale": grid, "weight_zero": grid}

    def to_stored(self, fields):
        return {"weight": pack_pairs(fields["q"]), "weight_scale": fields["scale"], "weight_zero": fields["zero"]}

    def from_stored(self, tensors):
        return {"q": unpack_pairs(tensors["weight"]), "scale": tensors["weight_scale"], "zero": tensors["weight_zero"]}

    def config(self):
        return {**super().config(), "group_size": self.group_size}

    def check_config(self, qconfig, source):
        if qconfig.get("group_size", self.group_size) != self.group_size:
            raise ValueError(f"{source}: int4 group_size {qconfig.get('group_size')} is not {self.group_size}")


def pack_pairs(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K / 2) bytes, two per byte, low nibble first: the checkpoint format."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_pairs(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).view(packed.shape[0], -1)
