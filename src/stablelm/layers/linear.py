"""Linear formats: how a projection's weight is stored and multiplied, one class per format.

Every format has the same small interface: build from a dense weight (`from_weight`) or from stored
quantized tensors (`from_quantized`), `forward`, back to dense (`dense_weight`), and the tensors a
checkpoint stores (`stored`). `FORMATS` is the registry; `choose_format` picks the fastest one that the
probes in `stablelm.kernels` say runs here, unless `STABLELM_LINEAR` or `linear_format=` forces one.
Adding a format is one class with `@register`.

One module may hold several fused projections (q/k/v, gate/up): `splits` are their output sizes and
`forward` then returns a tuple.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .schemes import SCHEMES
FORMATS: dict[str, type[LinearFormat]] = {}


def register(cls: type[LinearFormat]) -> type[LinearFormat]:
    FORMATS[cls.name] = cls
    return cls


class Workspace(threading.local):
    """Memory reused for weights converted per call, one buffer per thread: a fresh 46 MB tensor costs
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


def matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype prompts multiply in: the model's, unless this CPU has no fast 16-bit matmul (then fp32)."""
    return dtype if kernels.fast_16bit_matmul(dtype) else torch.float32


class _NoTraining(torch.autograd.Function):
    """Identity forward; a backward pass through it is an error that names the fix."""

    @staticmethod
    def forward(ctx, y, layout):
        ctx.layout = layout
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(f"backward through the inference layout ({ctx.layout!r}): its projection weights are "
                           "frozen, packed buffers, so they would not train. Call model.train() first (it restores "
                           "trainable nn.Linear weights), then create the optimizer from model.parameters(); or "
                           "load with fast_inference=False")


class LinearFormat(nn.Module):
    """y = x W^T (+ b), W (out_features, in_features) kept in this format's layout.

    Subclasses set `name` (the registry key), `quantization` (None, or the name of the scheme in
    stablelm.layers.schemes whose fields `_build` takes) and implement `unavailable`, `_build`, `matmul` and
    `dense_weight` (quantized formats: `fields` too).
    """

    name: ClassVar[str]
    quantization: ClassVar[str | None] = None
    keeps_weight: ClassVar[bool] = False  # from_weight keeps the given tensor (it must not be a reused buffer)
    activation_bits: ClassVar[int | None] = None  # decoding rounds activations to this many bits per block (AVX2 and up)
    dtypes: ClassVar[tuple[torch.dtype, ...] | None] = None  # the model dtypes it serves (None: all)
    workspace: Workspace | None = None  # shared by a model's layers (see share_workspace)

    def __init__(self, in_features: int, out_features: int, splits: list[int] | None, bias: torch.Tensor | None,
                 dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.splits = in_features, out_features, splits
        self.compute_dtype = dtype
        self.register_buffer("bias", bias, persistent=False)

    # -- what every format answers ---------------------------------------------------------------
    @classmethod
    def unavailable(cls, dtype: torch.dtype, device: torch.device) -> str | None:
        """Why this format cannot run for `dtype` on `device` here, or None when it can."""
        raise NotImplementedError

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    splits: list[int] | None = None) -> LinearFormat:
        """From a dense (N, K) weight in the model's dtype (rounded here for quantized formats)."""
        dtype = weight.dtype
        module = cls(weight.shape[1], weight.shape[0], splits, None if bias is None else bias.to(dtype), dtype)
        if cls.quantization is None:
            module._build(weight=weight)
        else:
            scheme = SCHEMES[cls.quantization]
            scheme.check_shape(*weight.shape)
            module._build(**scheme.quantize(weight))
        return module

    @classmethod
    def from_quantized(cls, fields: dict[str, torch.Tensor], bias: torch.Tensor | None, splits: list[int] | None,
                       dtype: torch.dtype) -> LinearFormat:
        """From rounded values: the fields of the format's scheme (int8: q (N, K) and scale (N,); int4: q
        (N, K) in 0..15, scale and zero (N, K / 64) with w = (q - 8) * scale + zero)."""
        q = fields["q"]
        module = cls(q.shape[1], q.shape[0], splits, None if bias is None else bias.to(dtype), dtype)
        module._build(**fields)
        return module

    def fields(self) -> dict[str, torch.Tensor]:
        """A quantized format's weight as its scheme's fields (what `from_quantized` takes back)."""
        raise NotImplementedError

    def _build(self, **tensors) -> None:
        raise NotImplementedError

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) in the compute dtype -> (M, N), any floating dtype, without the bias."""
        raise NotImplementedError

    def native(self, x: torch.Tensor) -> torch.Tensor | None:
        """x (M, K) in the compute dtype -> (M, N) in that dtype with the bias added, when a native kernel
        takes these rows whole (it widens x, adds the bias and rounds once, as `(matmul(x) + bias).to(dtype)`
        does); None otherwise, and `matmul` runs."""
        return None

    def dense_weight(self) -> torch.Tensor:
        """The weight as a plain (N, K) tensor in the compute dtype (dequantized for int8/int4)."""
        raise NotImplementedError

    def traceable_weight(self) -> torch.Tensor:
        """The dense weight as torch.compile can trace it (formats whose storage it cannot read override)."""
        return self.dense_weight()

    def stored(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores for the whole (fused) weight, by key suffix: "weight" (dense), or what
        the scheme stores ("weight", "weight_scale", ...)."""
        if self.quantization is not None:
            return SCHEMES[self.quantization].to_stored(self.fields())
        return {"weight": self.dense_weight()}

    # -- shared --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor):
        shape = x.shape[:-1]
        if torch.compiler.is_compiling():  # torch.compile traces the plain product of the dense weight
            y = F.linear(x.reshape(-1, self.in_features).to(self.compute_dtype), self.traceable_weight())
        elif x.numel() == 0:  # no rows (a serving round that needs no logits): no kernel call
            y = x.new_zeros(0, self.out_features, dtype=self.compute_dtype)
        else:
            rows = x.reshape(-1, self.in_features)
            if rows.dtype != self.compute_dtype:  # skipped when it would be a no-op: ~1 us a projection
                rows = rows.to(self.compute_dtype)
            y = self.native(rows)
            if y is not None:  # bias added, in the compute dtype
                return self._finish(y, x, shape)
            y = self.matmul(rows)
        if self.bias is not None:
            y = y + self.bias
        return self._finish(y, x, shape)

    def _finish(self, y: torch.Tensor, x: torch.Tensor, shape: torch.Size):
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        y = y.view(*shape, self.out_features)
        if x.requires_grad:  # a gradient would reach no weight here: training would skip every projection
            y = _NoTraining.apply(y, self.name)
        # split_with_sizes: Tensor.split's Python wrapper costs 3 us more, and decoding calls this ~100 times a token
        return y.split_with_sizes(self.splits, dim=-1) if self.splits else y

    def _dense_matmul(self, x: torch.Tensor, convert) -> torch.Tensor:
        """Prompts: the weight converted (by `convert(out)`) into the shared buffer, then one dense matmul
        in the fastest dtype this CPU has."""
        dtype = matmul_dtype(self.compute_dtype)
        buffer = self.workspace.take(self.out_features, self.in_features, dtype) if self.workspace else None
        if buffer is None:
            buffer = torch.empty(self.out_features, self.in_features, dtype=dtype)
        return F.linear(x.to(dtype), convert(buffer))

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, format={self.name}, splits={self.splits}"


AVX2 = kernels.ISA_LEVELS.index("avx2")


def _cpu_only(device: torch.device) -> str | None:
    return None if device.type == "cpu" else f"runs on the CPU only, not {device.type}"


def _native_16bit_prompts(dtype: torch.dtype) -> bool:
    """Whether a native format's prompts (past its decode rows) multiply in torch rather than in our GEMM:
    where the CPU multiplies the 16-bit `dtype` natively (AMX, AVX512-BF16: oneDNN's bf16 GEMM runs ~400
    GFLOP/s on the 2-core AMX Xeon of the README, our fp32 GEMM at most 2 cores' AVX2 FMAs, ~200). Decided
    once, when a format module is built. The quantized formats then hand prompts over from 16 rows, as
    torch's int8 format does there (measured there), not at the decode/GEMM crossover of a CPU without
    native bf16."""
    return dtype != torch.float32 and kernels.fast_16bit_matmul(dtype)


def _native_unavailable(device: torch.device) -> str | None:
    if device.type != "cpu":
        return _cpu_only(device)
    return None if kernels.native_ops() is not None else "the native kernels are not built"


# -- 16/32-bit formats -------------------------------------------------------------------------------
@register
class Dense(LinearFormat):
    """F.linear on the weight as loaded: runs everywhere; on CUDA the fastest."""

    name = "dense"
    keeps_weight = True

    @classmethod
    def unavailable(cls, dtype, device):
        return None

    def _build(self, weight):
        self.register_buffer("weight", weight, persistent=False)

    def matmul(self, x):
        return F.linear(x, self.weight)

    def dense_weight(self):
        return self.weight


@register
class Mkldnn(LinearFormat):
    """oneDNN's prepacked weight: streams fp32 near the memory bandwidth, and bf16 with AVX512-BF16/AMX."""

    name = "mkldnn"

    @classmethod
    def unavailable(cls, dtype, device):
        if device.type != "cpu":
            return _cpu_only(device)
        if not kernels.mkldnn_supports(dtype):
            return f"oneDNN has no {str(dtype).removeprefix('torch.')} linear on this CPU"
        return None

    def _build(self, weight):
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1),
                             persistent=False)

    def matmul(self, x):
        if torch.compiler.is_compiling():  # inductor cannot lower the packed op: torch.compile runs this eagerly
            raise RuntimeError("oneDNN's packed linear is not compiled")
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")

    def dense_weight(self):
        return self.weight.to_dense()

    def traceable_weight(self):
        raise RuntimeError("the mkldnn layout opts out of torch.compile: oneDNN's packed weights cannot be traced. "
                           "Compile a model loaded with fast_inference=False (or linear_format='dense')")


@register
class Native16(LinearFormat):
    """bf16/fp16 weights read as stored and widened to fp32 in registers (stablelm.kernels): the decode
    path for CPUs without native 16-bit matmuls, at half the bytes of fp32 weights. Prompts past
    `native_rows` rows take the blocked GEMM (AVX2 and up), which widens the weight one panel at a time;
    at the scalar level they convert the weight into the shared buffer and multiply in fp32 there."""

    name = "native"
    keeps_weight = True
    dtypes = (torch.bfloat16, torch.float16)
    # the GEMM (gemm) is as fast from here, and faster past it (AVX2 EPYC, 2048 -> 11264, bf16 and lossless alike,
    # GEMM / decode kernel: 12 rows 7.7 / 7.2 ms, 16 rows 9.4 / 9.3, 24 rows 11.0 / 15.5; benchmarks/crossover.py)
    native_rows = 16

    @classmethod
    def unavailable(cls, dtype, device):
        if dtype not in cls.dtypes:
            return "for bf16/fp16 weights only"
        return _native_unavailable(device)

    def _build(self, weight):
        self.register_buffer("weight", weight.contiguous(), persistent=False)
        self.isa = kernels.native_isa()
        self.torch_prompts = _native_16bit_prompts(self.compute_dtype)

    def native(self, x):
        if x.shape[0] <= self.native_rows:
            return torch.ops.stablelm_kernels.gemv(x.contiguous(), self.weight, None, self.isa, self.bias)
        if self.isa >= AVX2 and not self.torch_prompts:
            return torch.ops.stablelm_kernels.gemm(x.contiguous(), self.weight, None, None, 0, self.isa, self.bias)
        return None

    def matmul(self, x):  # prompts past native_rows, below AVX2 or where torch has a native 16-bit matmul
        if self.torch_prompts:
            return F.linear(x, self.weight)
        return self._dense_matmul(x, lambda out: out.copy_(self.weight))

    def dense_weight(self):
        return self.weight


@register
class NativeLossless(LinearFormat):
    """bf16 weights in 12 bits a weight, exactly (stablelm.kernels.Lossless): each row's high bytes (sign and
    exponent) as 4-bit codes into a table of the row's 16 commonest, the rare others listed apart. Batch-1
    decoding reads a quarter fewer bytes than `native` for the same products; prompts past `native_rows`
    rows take the GEMM, which decodes each panel as it packs it. On CPUs with native bf16 matmuls (oneDNN's
    `mkldnn` format comes first there) or below AVX2, prompts multiply the unpacked weight in torch."""

    name = "native-lossless"
    dtypes = (torch.bfloat16,)
    native_rows = Native16.native_rows

    @classmethod
    def unavailable(cls, dtype, device):
        if dtype not in cls.dtypes:
            return "for bf16 weights only (fp16's high byte holds mantissa bits: it does not shrink)"
        return _native_unavailable(device)

    def _build(self, weight):
        for field, tensor in zip(kernels.Lossless._fields, kernels.lossless_pack(weight.contiguous())):
            self.register_buffer(field, tensor, persistent=False)
        self.isa = kernels.native_isa()
        self.torch_prompts = _native_16bit_prompts(self.compute_dtype)

    @property
    def packed(self) -> kernels.Lossless:
        return kernels.Lossless(self.values, self.table, self.tail, self.starts, self.columns, self.exceptions)

    def native(self, x):
        if x.shape[0] <= self.native_rows:
            return torch.ops.stablelm_kernels.gemv_lossless(x.contiguous(), *self.packed, self.isa, self.bias)
        if self.isa >= AVX2 and not self.torch_prompts:
            return torch.ops.stablelm_kernels.gemm_lossless(x.contiguous(), *self.packed, self.isa, self.bias)
        return None

    def matmul(self, x):  # prompts past native_rows, below AVX2 or where torch has a native 16-bit matmul
        return self._dense_matmul(x, self._unpack_into)

    def _unpack_into(self, out: torch.Tensor) -> torch.Tensor:
        torch.ops.stablelm_kernels.lossless_unpack(*self.packed, out)
        return out

    def dense_weight(self):
        return kernels.lossless_unpack(self.packed)

    def traceable_weight(self):
        return unpack_lossless(self.packed)


# Where each input of a 64-input chunk is stored (linear.cpp's ll_position).
_LOSSLESS_POSITION = torch.tensor([32 * (i >> 5) + (0 if i & 7 < 4 else 16) + 4 * ((i & 31) >> 3) + (i & 3)
                                   for i in range(64)])


def unpack_lossless(weight: kernels.Lossless) -> torch.Tensor:
    """The lossless layout's (N, K) bf16 weight in torch ops (what torch.compile traces; the kernel's
    lossless_unpack is the fast path): the same bits."""
    n = weight.values.shape[0]
    chunks = weight.values.view(n, -1, 96)
    codes = torch.cat([chunks[..., :32] & 15, chunks[..., :32] >> 4], dim=-1).long()
    high = weight.table.long().gather(1, codes.view(n, -1)).view_as(codes)
    bits = (high << 8 | chunks[..., 32:].long())[..., _LOSSLESS_POSITION].reshape(n, -1)
    out = torch.cat([(bits - (bits >> 15 << 16)).to(torch.int16).view(torch.bfloat16), weight.tail], dim=1)
    rows = torch.repeat_interleave(torch.arange(n), weight.starts.diff())
    return out.index_put((rows, weight.columns.long()), weight.exceptions)


# -- int8, per output row: w = q * scale -------------------------------------------------------------
class Int8Base(LinearFormat):
    quantization = "int8"

    def _build(self, q, scale):
        self.register_buffer("weight", q.contiguous(), persistent=False)
        self.register_buffer("scale", scale.to(self.compute_dtype).contiguous(), persistent=False)

    def dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self.weight)  # q is exact in bf16 and fp32; the scale is applied to the output

    def prompt_matmul(self, x):
        return self._dense_matmul(x, self.dequantize_into) * self.scale

    def dense_weight(self):
        return self.weight.to(self.compute_dtype) * self.scale[:, None]

    def fields(self):
        return {"q": self.weight, "scale": self.scale}


@register
class Int8Torch(Int8Base):
    """torch's weight-only int8 kernel (aten._weight_int8pack_mm); prompts from 16 rows use the dense
    matmul on the converted weight (3.6x faster at 64 rows on the AMX machine)."""

    name = "int8-torch"
    DENSE_MIN_ROWS = 16

    @classmethod
    def unavailable(cls, dtype, device):
        if device.type != "cpu":
            return _cpu_only(device)
        return None if kernels.int8_op_works() else "torch's int8 weight-only kernel fails its trial here"

    def matmul(self, x):
        if x.shape[0] >= self.DENSE_MIN_ROWS:
            return self.prompt_matmul(x)
        return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scale)


@register
class Int8Native(Int8Base):
    """int8 weights, 1 byte per weight per token (stablelm.kernels). At AVX2 and up the activations are
    rounded to int16 per block of 128 (15 bits: more than their bf16 values hold) and the products summed in
    integers (vpmaddwd), 1.6x faster than widening every weight to fp32, which the scalar level still does.
    (Rounding the activations to int8, as int4-native does, drops the demo's decode-path agreement to
    98.98 %, under the 99 % guard.) Prompts past `native_rows` take the blocked GEMM (AVX2 and up)."""

    name = "int8-native"
    activation_bits = 16
    native_rows = 48  # the GEMM (gemm) is faster from here (AVX2 EPYC: 12.5 vs 13.7 ms at 32 rows, 37 vs 49 at 128)

    @classmethod
    def unavailable(cls, dtype, device):
        return _native_unavailable(device)

    def _build(self, q, scale):
        super()._build(q, scale)
        self.register_buffer("scale32", self.scale.float(), persistent=False)
        self.isa = kernels.native_isa()
        self.torch_prompts = _native_16bit_prompts(self.compute_dtype)
        if self.torch_prompts:
            self.native_rows = Int8Torch.DENSE_MIN_ROWS

    def native(self, x):
        if x.shape[0] > self.native_rows:
            if self.isa < AVX2 or self.torch_prompts:
                return None
            return torch.ops.stablelm_kernels.gemm(x.contiguous(), self.weight, self.scale32, None, 0, self.isa,
                                                   self.bias)
        if self.isa >= AVX2:
            return torch.ops.stablelm_kernels.gemv_q16(x.contiguous(), self.weight, self.scale32, self.isa, self.bias)
        return torch.ops.stablelm_kernels.gemv(x.contiguous(), self.weight, self.scale32, self.isa, self.bias)

    def matmul(self, x):  # prompts past native_rows below AVX2, or in the CPU's native 16-bit matmul
        return self.prompt_matmul(x)


# -- int4, asymmetric, groups of 64 inputs: w = (q - 8) * scale + zero --------------------------------
class Int4Base(LinearFormat):
    quantization = "int4"
    group_size = SCHEMES["int4"].group_size

    def _keep_grid(self, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self.register_buffer("scale", scale.contiguous(), persistent=False)
        self.register_buffer("zero", zero.contiguous(), persistent=False)
        # w = q * scale + offset, one multiply-add over the values
        self.register_buffer("offset", zero.float() - 8 * scale.float(), persistent=False)

    def values_into(self, out: torch.Tensor) -> torch.Tensor:
        """The 4-bit values q (N, K) in 0..15, written into `out` (any dtype) with no temporary of that size."""
        raise NotImplementedError

    def values(self) -> torch.Tensor:
        return self.values_into(torch.empty(self.out_features, self.in_features, dtype=torch.uint8))

    def dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        groups = self.values_into(out).view(n, -1, self.group_size)
        return groups.mul_(self.scale.to(out.dtype)[..., None]).add_(self.offset.to(out.dtype)[..., None]).view(n, k)

    def dense_weight(self):
        return self.dequantize_into(torch.empty(self.out_features, self.in_features, dtype=torch.float32)) \
            .to(self.compute_dtype)

    def fields(self):
        return {"q": self.values(), "scale": self.scale, "zero": self.zero}


def unpack_int4_blocks(packed: torch.Tensor, n: int, k: int, block: int,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """The (n, k) values of torch's CPU int4 packing with `block` rows per block (into `out` when given): each
    block is stored as k x block/2 bytes, byte i of column c holding row i (low nibble) and row block/2 + i
    (high nibble)."""
    half = block // 2
    blocks = packed.view(n // block, k, half).transpose(1, 2)  # (n / block, half, k)
    values = (torch.empty(n, k, dtype=torch.uint8) if out is None else out).view(n // block, block, k)
    values[:, :half] = blocks & 0xF
    values[:, half:] = blocks >> 4
    return values.view(n, k)


@functools.cache
def torch_int4_block() -> int | None:
    """Rows per block of torch's CPU int4 packing on this CPU (64 with AVX-512, 32 with AVX2), found by
    packing known values; None when none of the known layouts matches."""
    q = torch.randint(0, 16, (128, 128), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    except RuntimeError:
        return None
    for block in (64, 32, 16):
        if packed.shape == (128, 64) and torch.equal(unpack_int4_blocks(packed, 128, 128, block).int(), q):
            return block
    return None


@functools.cache
def int4_op_works() -> bool:
    """Whether torch's int4 kernel multiplies right here: a tiny trial against the dense product."""
    try:
        g = torch.Generator().manual_seed(0)
        q = torch.randint(0, 16, (64, 64), generator=g, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        scale, zero = torch.full((1, 64), 0.5), torch.full((1, 64), 0.25)
        scales_and_zeros = torch.stack([scale, zero], dim=-1).contiguous()
        x = torch.randn(2, 64, generator=g)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 64, scales_and_zeros)
        return bool(torch.allclose(y, x @ ((q.float() - 8) * 0.5 + 0.25).T, atol=1e-3))
    except RuntimeError:
        return False


@register
class Int4Torch(Int4Base):
    """torch's weight-only int4 kernel (aten._weight_int4pack_mm_for_cpu). From 192 rows, prompts unpack
    the values (layout found by `torch_int4_block`) into the shared buffer and use the dense matmul."""

    name = "int4-torch"
    DENSE_MIN_ROWS = 192  # unpacking costs more than int8's conversion; measured on the AMX machine

    @classmethod
    def unavailable(cls, dtype, device):
        if device.type != "cpu":
            return _cpu_only(device)
        return None if int4_op_works() else "torch's int4 kernel fails its trial here"

    def _build(self, q, scale, zero):
        # Blocks of rows pack independently, so row chunks (multiples of 64) keep the temporaries small.
        packed = torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(chunk.to(torch.int32), 1)
                            for chunk in q.split(1024)])
        self.register_buffer("weight", packed, persistent=False)
        self._keep_grid(scale, zero)
        # The kernel's layout: (K / group, N, 2) pairs of (scale, zero) in the activation dtype.
        self.register_buffer("scales_and_zeros",
                             torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(self.compute_dtype),
                             persistent=False)
        block = torch_int4_block()
        self.block = block if block is not None and q.shape[0] % block == 0 else None

    def values_into(self, out):
        n, k = self.out_features, self.in_features
        if self.block is not None:
            return unpack_int4_blocks(self.weight, n, k, self.block, out)
        # The kernel applied to the identity returns the dequantized weight (transposed): round it back.
        eye = torch.eye(k, dtype=torch.float32)
        dense = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, self.group_size,
                                                          self.scales_and_zeros.float()).t()
        groups = dense.reshape(n, -1, self.group_size)
        q = (groups - self.offset[..., None]) / self.scale.float()[..., None]
        return out.copy_(q.round().clamp(0, 15).view(n, k))

    def matmul(self, x):
        if x.shape[0] >= self.DENSE_MIN_ROWS and self.block is not None:
            return self._dense_matmul(x, self.dequantize_into)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, self.scales_and_zeros)


@register
class Int4Native(Int4Base):
    """int4 values in blocks of 32 inputs (byte j: input j low, input 16 + j high; ggml's Q4_0 order).
    Decoding rounds the activations to int8 per block of 32 (llama.cpp's Q8_0 trick) and sums the products
    in integers (AVX2 vpmaddubsw): 2.6x faster than widening every weight to fp32, which the scalar level
    still does. Prompts past `native_rows` take the blocked GEMM on the exact activations (AVX2 and up), or
    dequantize into the shared buffer and multiply in floating point (scalar level)."""

    name = "int4-native"
    activation_bits = 8
    native_rows = 96  # the GEMM (gemm) is faster from here (AVX2 EPYC: 21 vs 18 ms at 64 rows, 37 vs 42 at 128)

    @classmethod
    def unavailable(cls, dtype, device):
        return _native_unavailable(device)

    def _build(self, q, scale, zero):
        n, k = q.shape
        blocks = q.view(n, k // 32, 2, 16)
        self.register_buffer("weight", (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous(),
                             persistent=False)
        self._keep_grid(scale, zero)
        self.register_buffer("scale32", scale.float().contiguous(), persistent=False)
        # What decoding reads beside the values: the stored grid when it is bf16 (2 + 2 bytes a group), else fp32.
        kernel_dtype = torch.bfloat16 if scale.dtype == zero.dtype == torch.bfloat16 else torch.float32
        self.register_buffer("kernel_scale", scale.to(kernel_dtype).contiguous(), persistent=False)
        self.register_buffer("kernel_zero", zero.to(kernel_dtype).contiguous(), persistent=False)
        self.isa = kernels.native_isa()
        self.torch_prompts = _native_16bit_prompts(self.compute_dtype)
        if self.torch_prompts:
            self.native_rows = Int8Torch.DENSE_MIN_ROWS

    def values_into(self, out):
        n, k = self.out_features, self.in_features
        blocks = self.weight.view(n, k // 32, 16)
        values = out.view(n, k // 32, 32)
        values[..., :16] = blocks & 0xF
        values[..., 16:] = blocks >> 4
        return out

    def native(self, x):
        if x.shape[0] > self.native_rows:
            if self.isa < AVX2 or self.torch_prompts:
                return None
            return torch.ops.stablelm_kernels.gemm(x.contiguous(), self.weight, self.scale32, self.offset,
                                                   self.group_size, self.isa, self.bias)
        if self.isa >= AVX2:  # int8 activations, integer dot products
            return torch.ops.stablelm_kernels.gemv_q8(x.contiguous(), self.weight, self.kernel_scale, self.kernel_zero,
                                                      self.group_size, self.isa, self.bias)
        y = torch.ops.stablelm_kernels.gemv_int4(x.float().contiguous(), self.weight, self.scale32, self.offset,
                                                 self.group_size, self.isa)
        return (y if self.bias is None else y + self.bias).to(x.dtype)

    def matmul(self, x):  # prompts past native_rows below AVX2, or in the CPU's native 16-bit matmul
        return self._dense_matmul(x, self.dequantize_into)


# -- choosing ------------------------------------------------------------------------------------------
def preference(dtype: torch.dtype, device: torch.device, quantization: str | None) -> tuple[str, ...]:
    """Formats to try, fastest first, for this CPU kind (figures in README.md, per CPU kind).

    Quantized weights take our kernels on every x86 CPU, torch's where they cannot run. With AVX2 only,
    torch's int8/int4 kernels are 10x slower than ours (int8: 33 ms vs 2.8 ms for a 2048 x 11264
    matrix-vector product). On the AMX Xeon, even the first int8-native kernel (fp32 widening, since
    replaced by integer sums 1.6x faster) beat torch's at 1 and 8 rows (docs/measurements/
    kernels_xeon_amx_2threads.json: 0.63 vs 0.79 ms, 2.41 vs 2.80); its int4 kernel then lost (1.08 vs 0.78
    ms) and has since become 2.6x faster. torch's int8 decoded at 0.63x llama.cpp's Q8_0 there. Prompts of
    bf16 models go to oneDNN where the CPU has native bf16, as torch's formats' do."""
    ordered = {None: ("mkldnn", "native-lossless", "native", "dense"), "int8": ("int8-native", "int8-torch"),
               "int4": ("int4-native", "int4-torch")}
    if device.type == "cpu" and quantization in ordered:
        return ordered[quantization]
    if quantization is None:
        return ("dense",)
    return tuple(n for n, f in FORMATS.items() if f.quantization == quantization)  # another scheme: as registered


def choose_format(dtype: torch.dtype, device: torch.device | str, quantization: str | None = None,
                  forced: str | None = None) -> str:
    """The format name for weights of `dtype` on `device`: `forced` (or STABLELM_LINEAR) when given, else
    the first of `preference` that runs here. A forced format that cannot run is an error that says why."""
    device = torch.device(device)
    if quantization is not None and quantization not in SCHEMES:
        raise ValueError(f"quantization must be one of {tuple(SCHEMES)} or None, got {quantization!r}")
    forced = forced or os.environ.get("STABLELM_LINEAR") or None
    if forced is not None:
        fmt = FORMATS.get(forced)
        if fmt is None:
            raise ValueError(f"linear format {forced!r} is unknown; expected one of {sorted(FORMATS)}")
        if fmt.quantization == quantization:
            reason = fmt.unavailable(dtype, device)
            if reason:
                raise ValueError(f"linear format {forced!r} cannot run here: {reason}")
            return forced
        # A forced 16-bit format says nothing about quantized layers (an int4 model's int8 projections...)
    for name in preference(dtype, device, quantization):
        if FORMATS[name].unavailable(dtype, device) is None:
            return name
    raise ValueError(f"no linear format runs {quantization or dtype} weights on {device} here")


def share_workspace(model: nn.Module, limit: int) -> None:
    """Give every format module of `model` one Workspace of `limit` elements (a layer's biggest projection)."""
    workspace = Workspace(limit)
    for module in model.modules():
        if isinstance(module, LinearFormat):
            module.workspace = workspace


def describe() -> dict:
    """What this machine runs: the CPU, torch's capability, the native kernels and each format's status."""
    cpu = torch.device("cpu")
    chosen = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        chosen[name] = choose_format(dtype, cpu)
        chosen[f"{name}, prompts"] = str(matmul_dtype(dtype)).removeprefix("torch.")
    for quantization in SCHEMES:
        chosen[quantization] = choose_format(torch.bfloat16, cpu, quantization)
    isa = kernels.native_isa()
    return {
        "cpu": kernels.cpu_name(),
        "cpu_flags": kernels.cpu_flags(),
        "torch_capability": kernels.cpu_capability(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "native_kernels": None if isa is None else kernels.ISA_LEVELS[isa],
        "formats": {name: {str(d).removeprefix("torch."): fmt.unavailable(d, cpu) or "runs"
                           for d in (torch.float32, torch.bfloat16)} for name, fmt in FORMATS.items()},
        "chosen": chosen,
    }
