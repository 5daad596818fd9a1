"""Linear formats and native kernels: every path this CPU can run, forced in turn, against plain torch.

Paths the CPU cannot run are skipped with the probe's reason; `test_every_available_format_runs` fails if a
path the probe calls available raises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import stablelm
from conftest import tiny_checkpoint, transformers_or_skip
from stablelm import kernels
from stablelm.layers import linear

CPU = torch.device("cpu")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IDS = torch.tensor([[5, 17, 33, 120, 200, 7, 9, 64, 3, 250, 11]])


def formats_for(quantization):
    return [name for name, fmt in linear.FORMATS.items() if fmt.quantization == quantization]


def cases():
    return list(_cases())


def _cases():
    for dtype in DTYPES:
        for quantization in (None, "int8", "int4"):
            for name in formats_for(quantization):
                if linear.FORMATS[name].dtypes and dtype not in linear.FORMATS[name].dtypes:
                    continue  # the format is for other weights, on any CPU
                yield pytest.param(name, dtype, id=f"{name}-{str(dtype).removeprefix('torch.')}")


def skip_unless_runs(name, dtype):
    reason = linear.FORMATS[name].unavailable(dtype, CPU)
    if reason:
        pytest.skip(f"{name} cannot run {dtype} on this CPU ({kernels.cpu_capability()}): {reason}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("linear") / "ckpt"
    # in_features 64 and 128 (int4 groups of 64); 200 and 136 rows: not multiples of any block
    tiny_checkpoint(path, use_qkv_bias=True, num_key_value_heads=2, hidden_size=64, intermediate_size=128)
    return path


@pytest.fixture(scope="module")
def plain_fp32(ckpt):
    return stablelm.StableLmForCausalLM.from_pretrained(ckpt, dtype=torch.float32, fast_inference=False)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


# Relative to the largest fp32 logit: 16-bit weights and activations, then rounding to 4 or 8 bits.
TOLERANCE = {None: {torch.float32: 1e-5, torch.bfloat16: 0.05, torch.float16: 0.01}, "int8": 0.06, "int4": 0.3}


@pytest.mark.parametrize("name,dtype", cases())
def test_every_available_format_runs_and_matches_fp32(ckpt, plain_fp32, name, dtype):
    skip_unless_runs(name, dtype)
    fmt = linear.FORMATS[name]
    model = stablelm.StableLmForCausalLM.from_pretrained(ckpt, dtype=dtype, quantization=fmt.quantization,
                                                         linear_format=name)
    assert model.inference_kind == name and model.lm_head.name == name
    reference = logits(plain_fp32)
    tol = TOLERANCE[None][dtype] if fmt.quantization is None else TOLERANCE[fmt.quantization]
    prompt = logits(model)  # 11 rows: the prompt path of every format
    assert (prompt - reference).abs().max() <= tol * reference.abs().max()
    # one row at a time through the cache: the decode path gives the same logits
    cache_logits = []
    cache = None
    for i in range(IDS.shape[1]):
        with torch.no_grad():
            out = model(IDS[:, i:i + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        cache_logits.append(out.logits.float())
    step = torch.cat(cache_logits, dim=1)
    # prompt and decode paths: fp32 accumulation in a different order, or (where the CPU multiplies 16-bit
    # natively) a 16-bit prompt matmul on a weight rounded to 16 bits, against fp32 widening for decode
    same = 1e-5 if dtype == torch.float32 else 0.04
    if fmt.activation_bits == 8:  # decoding rounds activations to int8 per block of 32: on this tiny random
        same = 0.1                # model up to 5.4 %; the demo's quality guard covers the decode path too
    elif fmt.activation_bits == 16:  # int16 per block of 128: a few parts in 1e5 of a block's largest value
        same = max(same, 1e-3)
    assert (step - prompt).abs().max() <= same * prompt.abs().max() + (1e-4 if dtype == torch.float32 else 0)
    generated = model.generate(IDS, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, IDS.shape[1] + 5)
    with torch.no_grad():  # a serving round whose prompt chunks need no logits
        none = model(IDS, logits_to_keep=torch.zeros(0, dtype=torch.long)).logits
    assert none.shape == (1, 0, model.config.vocab_size)


@pytest.mark.parametrize("name", [n for n in formats_for(None) if not linear.FORMATS[n].dtypes])
def test_fp32_formats_generate_what_transformers_generates(ckpt, name):
    skip_unless_runs(name, torch.float32)
    transformers = transformers_or_skip()
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ours = stablelm.StableLmForCausalLM.from_pretrained(ckpt, dtype=torch.float32, linear_format=name)
    greedy = dict(max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        assert torch.equal(ours.generate(IDS, **greedy), ref.generate(IDS, **greedy))


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_formats_save_the_same_checkpoint(ckpt, tmp_path, quantization):
    """Every format of a precision stores the same tensors, so a checkpoint never depends on the CPU."""
    saved = {}
    for name in formats_for(quantization):
        if linear.FORMATS[name].unavailable(torch.float32, CPU):
            continue
        model = stablelm.StableLmForCausalLM.from_pretrained(ckpt, dtype=torch.float32, quantization=quantization,
                                                             linear_format=name)
        saved[name] = model.state_dict()
        model.save_pretrained(tmp_path / name)
        again = stablelm.StableLmForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32, linear_format=name)
        assert again.quantization == quantization and torch.equal(logits(again), logits(model))
    if len(saved) < 2:
        pytest.skip(f"only {list(saved)} run {quantization} here")
    first, *rest = saved.values()
    for other in rest:
        assert sorted(first) == sorted(other) and all(torch.equal(first[k], other[k]) for k in first)


def test_forcing_an_unknown_or_impossible_format_says_why(ckpt):
    with pytest.raises(ValueError, match="unknown"):
        stablelm.StableLmForCausalLM.from_pretrained(ckpt, linear_format="int3")
    with pytest.raises(ValueError, match="bf16/fp16 weights only"):
        stablelm.StableLmForCausalLM.from_pretrained(ckpt, dtype=torch.float32, linear_format="native")
    with pytest.raises(ValueError, match="bf16 weights only"):
        stablelm.StableLmForCausalLM.from_pretrained(ckpt, dtype=torch.float16, linear_format="native-lossless")


def test_environment_variable_forces_the_format(ckpt):
    code = ("import torch, stablelm\n"
            f"m = stablelm.StableLmForCausalLM.from_pretrained({str(ckpt)!r}, dtype=torch.float32)\n"
            "print(m.inference_kind)\n")
    env = {**os.environ, "STABLELM_LINEAR": "dense"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "dense"


def test_torch_fallback_without_native_kernels(ckpt):
    """STABLELM_NATIVE=0: no build, bf16 and quantized models still load and agree with the native paths."""
    code = ("import torch, stablelm\nfrom stablelm import kernels\nfrom stablelm.layers import linear\n"
            "assert kernels.native_ops() is None\n"
            f"ids = torch.tensor({IDS.tolist()})\n"
            "for q in (None, 'int8', 'int4'):\n"
            f"    m = stablelm.StableLmForCausalLM.from_pretrained({str(ckpt)!r}, dtype=torch.bfloat16, quantization=q)\n"
            "    assert 'native' not in m.inference_kind, m.inference_kind\n"
            "    with torch.no_grad():\n"
            "        print(m.inference_kind, m(ids).logits.float().abs().max().item())\n")
    env = {**os.environ, "STABLELM_NATIVE": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()] == \
        [linear.choose_format(torch.bfloat16, CPU, q) if "native" not in linear.choose_format(torch.bfloat16, CPU, q)
         else {None: "dense", "int8": "int8-torch", "int4": "int4-torch"}[q] for q in (None, "int8", "int4")]


def test_describe_reports_the_choice(capsys):
    info = linear.describe()
    assert info["torch_capability"] == kernels.cpu_capability() and info["cpu"]
    assert info["chosen"]["float32"] in linear.FORMATS
    assert set(info["formats"]) == set(linear.FORMATS)
    from stablelm.kernels.__main__ import main  # `python -m stablelm.kernels`: builds, then prints the same

    assert main() == 0 and json.loads(capsys.readouterr().out) == info


def test_each_kernel_source_builds_in_its_own_folder(tmp_path):
    """Two checkouts of the same sources name the same library (built once, loaded by both); a changed
    source names another, so a build never rewrites a library another process loads."""
    from stablelm.kernels import build

    checkouts = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        checkouts.append([tmp_path / name / source.name for source in kernels._SOURCES])
        for source, copy in zip(kernels._SOURCES, checkouts[-1]):
            copy.write_bytes(source.read_bytes())
    paths = [build.library_path("stablelm_kernels", sources, kernels._CFLAGS, tmp_path) for sources in checkouts]
    assert paths[0] == paths[1] and paths[0].parent.parent == tmp_path
    checkouts[1][0].write_bytes(checkouts[1][0].read_bytes() + b"\n// changed\n")
    assert build.library_path("stablelm_kernels", checkouts[1], kernels._CFLAGS, tmp_path) != paths[0]


# -- the native kernels themselves, at every ISA level this CPU runs ---------------------------------
def native_levels():
    levels = kernels.native_isa_levels()
    if not levels:
        return [pytest.param(None, marks=pytest.mark.skip(reason="the native kernels are not built here"))]
    return [pytest.param(kernels.ISA_LEVELS.index(level), id=level) for level in levels] + [
        pytest.param(i, id=level, marks=pytest.mark.skip(reason=f"this CPU ({kernels.cpu_capability()}) "
                                                                f"cannot run {level}"))
        for i, level in enumerate(kernels.ISA_LEVELS) if level not in levels]


SHAPES = [(1, 1, 1), (1, 37, 100), (3, 64, 128), (8, 130, 264), (5, 17, 2050), (2, 200, 1031)]


@pytest.mark.parametrize("isa", native_levels())
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16, torch.int8])
def test_native_gemv_equals_torch(isa, wdtype):
    g = torch.Generator().manual_seed(0)
    for m, n, k in SHAPES:
        x = torch.randn(m, k, generator=g)
        if wdtype == torch.int8:
            w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
            scale = torch.rand(n, generator=g)
            expected = x.double() @ (w.double() * scale.double()[:, None]).T
        else:
            w = torch.randn(n, k, generator=g).to(wdtype)
            scale = None
            expected = x.double() @ w.double().T
        got = kernels.gemv(x, w, scale, isa)
        # fp32 accumulation of k products, against float64
        assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max() * max(1, k / 256), (m, n, k)


@pytest.mark.parametrize("isa", native_levels())
def test_native_int4_gemv_equals_torch(isa):
    g = torch.Generator().manual_seed(0)
    for m, n, k, group in [(1, 1, 64, 64), (1, 37, 128, 64), (3, 64, 256, 64), (8, 130, 192, 64), (5, 17, 96, 32)]:
        q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        scale, offset = torch.rand(n, k // group, generator=g), torch.randn(n, k // group, generator=g)
        blocks = q.view(n, k // 32, 2, 16)
        packed = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
        dense = (q.double().view(n, -1, group) * scale.double()[..., None] + offset.double()[..., None]).view(n, k)
        x = torch.randn(m, k, generator=g)
        expected = x.double() @ dense.T
        got = kernels.gemv_int4(x, packed, scale, offset, group, isa)
        assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max(), (m, n, k)


@pytest.mark.parametrize("isa", native_levels())
def test_native_q8_gemv_equals_torch(isa):
    """Activations rounded per block of 32 (the same rounding in torch), then the exact integer sums: the
    kernel equals the float64 product of the rounded activations, for int8 weights and for int4 weights with
    fp32 or bf16 group scales and zero points (the zero points meet the exact activations)."""
    g = torch.Generator().manual_seed(0)
    for m, n, k in [(1, 1, 64), (1, 37, 128), (2, 3, 32 * 7), (3, 64, 256), (8, 130, 192), (5, 17, 2048),
                    (7, 9, 64 * 13)]:
        x = torch.randn(m, k, generator=g) * torch.rand(m, k // 32, 1, generator=g).repeat(1, 1, 32).view(m, k)
        x[0, :32] = 0  # an all-zero block
        rounded = kernels.quantize_blocks_reference(x).double()
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(n, generator=g)
        expected = rounded @ (w.double() * scale.double()[:, None]).T
        got = kernels.gemv_q8(x, w, scale, isa=isa)
        assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max(), ("int8", m, n, k)
        for group in (32, 64, 96, 128):
            if k % group:
                continue
            for dtype in (torch.float32, torch.bfloat16):
                q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
                s, z = torch.rand(n, k // group, generator=g).to(dtype), torch.randn(n, k // group, generator=g).to(dtype)
                blocks = q.view(n, k // 32, 2, 16)
                packed = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
                # w = (q - 8) s + z = q s + (z - 8 s): q s over the rounded activations, (z - 8 s) over the exact
                scaled = (q.double().view(n, -1, group) * s.double()[..., None]).view(n, k)
                offsets = x.double().view(m, -1, group).sum(-1) @ (z.double() - 8 * s.double()).T
                expected = rounded @ scaled.T + offsets
                got = kernels.gemv_q8(x, packed, s, z, group, isa=isa)
                assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max(), \
                    ("int4", m, n, k, group, dtype)
    with pytest.raises(ValueError, match="multiple of the 32-input block"):
        kernels.gemv_q8(torch.randn(1, 48), torch.zeros(4, 48, dtype=torch.int8), torch.ones(4), isa=isa)
    with pytest.raises(ValueError, match="zero must be"):
        kernels.gemv_q8(torch.randn(1, 64), torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 1),
                        torch.ones(4, 1).bfloat16(), 64, isa=isa)


@pytest.mark.parametrize("isa", native_levels())
def test_native_q16_gemv_equals_torch(isa):
    """int8 weights against activations rounded to int16 per block of 128 (the last block shorter), the
    products summed exactly: the kernel equals the float64 product of the rounded activations, on K that is
    and is not a multiple of the block (K % 16 != 0 runs the scalar sums at every level)."""
    g = torch.Generator().manual_seed(0)
    for m, n, k in [(1, 1, 16), (1, 37, 128), (2, 3, 48), (3, 64, 256), (8, 130, 400), (5, 17, 2048),
                    (4, 5, 1000), (6, 7, 37)]:
        x = torch.randn(m, k, generator=g) * torch.rand(m, k, generator=g) ** 4 * 10
        x[0, :16] = 0
        rounded = kernels.quantize_blocks_reference(x, block=128, levels=32767).double()
        w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(n, generator=g)
        expected = rounded @ (w.double() * scale.double()[:, None]).T
        got = kernels.gemv_q16(x, w, scale, isa=isa)
        assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max(), (m, n, k)
        # and within the int16 rounding of the exact product
        exact = x.double() @ (w.double() * scale.double()[:, None]).T
        assert (got.double() - exact).abs().max() <= 1e-3 * exact.abs().max(), (m, n, k)


@pytest.mark.parametrize("isa", native_levels())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_kernels_take_16bit_rows_and_a_bias(isa, dtype):
    """16-bit x is widened in the kernel and the bias added in fp32 before one rounding to x's dtype: exactly
    `(kernel(x.float()) + bias).to(dtype)`, for every decode kernel."""
    g = torch.Generator().manual_seed(0)
    m, n, k = 3, 40, 256
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    w8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    q = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    s, z = torch.rand(n, k // 64, generator=g).bfloat16(), torch.randn(n, k // 64, generator=g).bfloat16()
    scale = torch.rand(n, generator=g)
    calls = [lambda xx, b=None: kernels.gemv(xx, torch.randn(n, k, generator=torch.Generator().manual_seed(1)).to(dtype),
                                             None, isa, b),
             lambda xx, b=None: kernels.gemv(xx, w8, scale, isa, b),
             lambda xx, b=None: kernels.gemv_q16(xx, w8, scale, isa, b)]
    if isa >= kernels.ISA_LEVELS.index("avx2"):
        calls.append(lambda xx, b=None: kernels.gemv_q8(xx, q, s, z, 64, isa, b))
    for call in calls:
        want = (call(x.float()) + bias.float()).to(dtype)
        got = call(x, bias)
        assert got.dtype == dtype and torch.equal(got, want)
        assert torch.equal(call(x), call(x.float()).to(dtype))


def simd_levels():
    """The native levels from AVX2 up (the GEMM's), each skipped with the reason where it cannot run."""
    return [level for level in native_levels() if level.values[0] != 0]


@pytest.mark.parametrize("isa", simd_levels())
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16, torch.int8, "int4"])
def test_native_gemm_equals_torch(isa, wdtype):
    """The prompt GEMM against float64: rows not a multiple of its 6-row strips, outputs not a multiple of its
    16-column panels, K not a multiple of 8 and past one 256-input block, int4 groups of 32 to 128; 16-bit x
    and a bias give exactly `(gemm(x.float()) + bias).to(dtype)`; every level gives the AVX2 level's bits."""
    g = torch.Generator().manual_seed(0)
    for m, n, k in [(1, 1, 64), (5, 17, 96), (7, 33, 264), (13, 50, 600), (40, 130, 512), (6, 16, 2048)]:
        x = torch.randn(m, k, generator=g)
        if wdtype == "int4":
            if k % 32:
                continue
            group = next(size for size in (128, 96, 64, 32) if k % size == 0)
            q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
            scale, offset = torch.rand(n, k // group, generator=g), torch.randn(n, k // group, generator=g)
            blocks = q.view(n, k // 32, 2, 16)
            weight = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
            dense = (q.double().view(n, -1, group) * scale.double()[..., None] + offset.double()[..., None])
            expected = x.double() @ dense.view(n, k).T
            args = (scale, offset, group)
        elif wdtype == torch.int8:
            weight = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
            scale = torch.rand(n, generator=g)
            expected = x.double() @ (weight.double() * scale.double()[:, None]).T
            args = (scale, None, 0)
        else:
            weight = torch.randn(n, k, generator=g).to(wdtype)
            expected = x.double() @ weight.double().T
            args = (None, None, 0)
        got = kernels.gemm(x, weight, *args, isa=isa)
        assert got.dtype == torch.float32
        assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max() * max(1, k / 256), (m, n, k)
        # AVX-512's 6 x 32 tiles sum each output in the AVX2 tiles' order
        assert torch.equal(got, kernels.gemm(x, weight, *args, isa=kernels.ISA_LEVELS.index("avx2"))), (m, n, k)
        for dtype in (torch.bfloat16, torch.float16):
            bias = torch.randn(n, generator=g).to(dtype)
            xs = x.to(dtype)
            assert torch.equal(kernels.gemm(xs, weight, *args, isa=isa, bias=bias),
                               (kernels.gemm(xs.float(), weight, *args, isa=isa) + bias.float()).to(dtype))


@pytest.mark.parametrize("isa", simd_levels())
def test_native_gemm_rows_do_not_depend_on_their_neighbours(isa):
    """Every output is summed in one order whatever rows share the call: a prompt's row equals the same row
    multiplied alone, bit for bit."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(23, 300, generator=g)
    weight = torch.randn(40, 300, generator=g).bfloat16()
    whole = kernels.gemm(x, weight, isa=isa)
    for i in (0, 5, 6, 22):
        assert torch.equal(kernels.gemm(x[i:i + 1].contiguous(), weight, isa=isa), whole[i:i + 1])
    assert torch.equal(kernels.gemm(x[7:20].contiguous(), weight, isa=isa), whole[7:20])


# -- bf16 in 12 bits, losslessly --------------------------------------------------------------------
def lossless_pack_reference(weight: torch.Tensor) -> kernels.Lossless:
    """The layout of linear.cpp in plain torch: per row, a table of 0x00 and the 15 commonest other high
    bytes (most first, ties to the smaller byte), 4-bit codes and low bytes in storage order, the rest apart."""
    n, k = weight.shape
    k64 = k - k % 64
    bits = weight.view(torch.int16).long() & 0xFFFF
    high, low = bits[:, :k64] >> 8, bits[:, :k64] & 0xFF
    count = torch.zeros(n, 256, dtype=torch.long).scatter_add_(1, high, torch.ones_like(high))
    count[:, 0] = k64 + 1  # entry 0 is always 0x00
    table = count.sort(dim=1, descending=True, stable=True).indices[:, :16]
    code = torch.full((n, 256), -1, dtype=torch.long).scatter_(1, table, torch.arange(16).expand(n, 16).contiguous())
    codes = code.gather(1, high)
    missing = codes < 0
    rows, columns = missing.nonzero(as_tuple=True)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), missing.sum(1).cumsum(0)])
    codes, low = codes.masked_fill(missing, 0), low.masked_fill(missing, 0)
    position = linear._LOSSLESS_POSITION
    stored = torch.empty_like(codes).view(n, -1, 64)
    stored[..., position] = codes.view(n, -1, 64)
    packed_low = torch.empty_like(low).view(n, -1, 64)
    packed_low[..., position] = low.view(n, -1, 64)
    values = torch.cat([stored[..., :32] | stored[..., 32:] << 4, packed_low], dim=-1).to(torch.uint8).view(n, -1)
    return kernels.Lossless(values, table.to(torch.uint8), weight[:, k64:].contiguous(), starts,
                            columns.to(torch.int32), weight[rows, columns])


def lossless_cases():
    """bf16 weights that a lossless layout must give back: Gaussian rows, K with and without a tail (and
    below one chunk), every special value, rows spanning more binades than 16 codes hold (exceptions)."""
    g = torch.Generator().manual_seed(0)
    for n, k in [(1, 64), (3, 7), (37, 200), (16, 2050), (130, 128)]:
        yield f"gaussian-{n}x{k}", (torch.randn(n, k, generator=g) * 0.02).bfloat16()
    special = (torch.randn(8, 192, generator=g) * 0.02).bfloat16()
    special[0, :6] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40]).bfloat16()
    # a NaN with a payload, a negative NaN, the smallest subnormal and its negative
    special.view(torch.int16)[1, :4] = torch.tensor([0x7FC1, -0x0001, 0x0001, -0x7FFF], dtype=torch.int16)
    special[2] = torch.logspace(-38, 38, 192).bfloat16() * torch.randn(192, generator=g).sign().bfloat16()
    special[3, ::7] = 1e-30
    yield "special", special
    wide = torch.randint(-32768, 32768, (5, 320), generator=g, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    yield "random-bits", wide.contiguous()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN payloads and the sign of zero included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(-1).view(torch.uint8),
                                                                     b.contiguous().view(-1).view(torch.uint8))


@pytest.mark.parametrize("isa", native_levels())
@pytest.mark.parametrize("name,weight", list(lossless_cases()), ids=[name for name, _ in lossless_cases()])
def test_lossless_pack_is_the_reference_layout_and_gives_the_bits_back(name, weight, isa):
    packed = kernels.lossless_pack(weight, isa)
    reference = lossless_pack_reference(weight)
    for field, got, expected in zip(kernels.Lossless._fields, packed, reference):
        assert same_bits(got, expected), field
    assert same_bits(kernels.lossless_unpack(packed), weight)
    assert same_bits(linear.unpack_lossless(packed), weight)  # what torch.compile traces
    numbers = ~weight.float().isnan()
    assert torch.equal(kernels.lossless_unpack(packed, torch.float32)[numbers], weight.float()[numbers])
    if name in ("special", "random-bits"):
        assert packed.columns.numel() > 0  # the exception path is exercised
    if name.startswith("gaussian") and weight.shape[1] >= 64:
        stored = sum(t.numel() * t.element_size() for t in packed)
        assert stored <= 0.8 * weight.numel() * 2 + weight.shape[0] * 32  # 12 bits a weight, and per-row overhead


@pytest.mark.parametrize("isa", native_levels())
def test_lossless_gemv_equals_torch(isa):
    """The decode product against float64, every row count of its tiles, K with a tail, exceptions; the
    bias and 16-bit x round once, as gemv does."""
    g = torch.Generator().manual_seed(0)
    for name, weight in lossless_cases():
        if name == "random-bits":
            continue  # magnitudes up to 3e38: the products overflow fp32
        weight = torch.where(weight.float().isfinite(), weight, torch.zeros_like(weight))  # no inf - inf
        packed = kernels.lossless_pack(weight)
        n, k = weight.shape
        for m in (1, 2, 3, 4, 5, 8):
            x = torch.randn(m, k, generator=g)
            expected = x.double() @ weight.double().T
            got = kernels.gemv_lossless(x, packed, isa)
            assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max() * max(1, k / 256), (name, m)
        bias = torch.randn(n, generator=g).bfloat16()
        xs = x.bfloat16()
        assert torch.equal(kernels.gemv_lossless(xs, packed, isa, bias=bias),
                           (kernels.gemv_lossless(xs.float(), packed, isa) + bias.float()).bfloat16())


def test_lossless_decoding_gives_the_native_formats_bits():
    """Batch-1 decoding sums a lossless row in the order the bf16 kernel does (K % 64 == 0, no exceptions):
    a model loaded either way generates the same logits, bit for bit."""
    if "avx2" not in kernels.native_isa_levels():
        pytest.skip(f"this CPU ({kernels.cpu_capability()}) has no AVX2, the level whose orders are equal")
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(300, 2048, generator=g) * 0.02).bfloat16()
    packed = kernels.lossless_pack(weight)
    rows = torch.repeat_interleave(torch.arange(300), packed.starts.diff())
    x = torch.randn(1, 2048, generator=g).bfloat16()
    plain = [r for r in range(300) if r not in set(rows.tolist())]
    assert len(plain) > 250
    avx2 = kernels.ISA_LEVELS.index("avx2")
    assert torch.equal(kernels.gemv_lossless(x, packed, avx2)[:, plain], kernels.gemv(x, weight, isa=avx2)[:, plain])


@pytest.mark.parametrize("isa", simd_levels())
def test_lossless_gemm_is_the_bf16_gemm(isa):
    """Prompt rows: each panel decoded exactly, so the product is the bf16 weight's GEMM bit for bit."""
    g = torch.Generator().manual_seed(0)
    for name, weight in lossless_cases():
        if name == "random-bits":
            continue
        weight = torch.where(weight.float().isfinite(), weight, torch.zeros_like(weight))
        packed = kernels.lossless_pack(weight)
        for m in (1, 7, 40):
            x = torch.randn(m, weight.shape[1], generator=g)
            assert torch.equal(kernels.gemm_lossless(x, packed, isa), kernels.gemm(x, weight, isa=isa)), (name, m)


def test_native_kernels_refuse_bad_input():
    if kernels.native_ops() is None:
        pytest.skip("the native kernels are not built here")
    with pytest.raises(ValueError, match="columns"):
        kernels.gemv(torch.randn(1, 8), torch.randn(4, 16).bfloat16())
    with pytest.raises(ValueError, match="rows"):
        kernels.gemv(torch.randn(0, 16), torch.randn(4, 16).bfloat16())
    with pytest.raises(ValueError, match="scale"):
        kernels.gemv(torch.randn(1, 16), torch.ones(4, 16, dtype=torch.int8))
    with pytest.raises(ValueError, match="float32"):
        kernels.gemv(torch.ones(1, 16, dtype=torch.int32), torch.randn(4, 16).bfloat16())
    with pytest.raises(ValueError, match="bias"):
        kernels.gemv(torch.randn(1, 16), torch.randn(4, 16).bfloat16(), bias=torch.ones(5))
    with pytest.raises(ValueError, match="not supported by this CPU"):
        kernels.gemv(torch.randn(1, 16), torch.randn(4, 16).bfloat16(), isa=99)
    with pytest.raises(ValueError, match="group"):
        kernels.gemv_int4(torch.randn(1, 64), torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 1),
                          torch.ones(4, 1), 48)
    with pytest.raises(ValueError, match="AVX2 and up, not scalar"):
        kernels.gemm(torch.randn(1, 16), torch.randn(4, 16).bfloat16(), isa=0)
    with pytest.raises(ValueError, match="offset"):
        kernels.gemm(torch.randn(1, 64), torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 1), None, 64)
    with pytest.raises(ValueError, match="scale of 4 rows"):
        kernels.gemm(torch.randn(1, 16), torch.ones(4, 16, dtype=torch.int8))
    with pytest.raises(ValueError, match="bfloat16"):
        kernels.lossless_pack(torch.randn(4, 64).half())
    packed = kernels.lossless_pack(torch.randn(4, 64).bfloat16())
    with pytest.raises(ValueError, match="columns"):
        kernels.gemv_lossless(torch.randn(1, 32), packed)
    with pytest.raises(ValueError, match="AVX2 and up"):
        kernels.gemm_lossless(torch.randn(1, 64), packed, isa=0)
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        kernels.lossless_unpack(packed, torch.float16)


def test_int4_layout_of_torch_is_derived_not_assumed():
    block = linear.torch_int4_block()
    if block is None:
        pytest.skip("torch's int4 packing matches none of the known layouts here; the identity path is used")
    q = torch.randint(0, 16, (192, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    fields = {"q": q, "scale": torch.rand(192, 4).bfloat16(), "zero": torch.rand(192, 4).bfloat16()}
    module = linear.Int4Torch.from_quantized(fields, None, None, torch.float32)
    assert module.block == block and torch.equal(module.values(), q)
    module.block = None  # the fallback through the kernel gives the same values
    assert torch.equal(module.values(), q)


@pytest.mark.parametrize("name,dtype", [("native", torch.bfloat16), ("native-lossless", torch.bfloat16)] + [
    (name, dtype) for name in formats_for("int8") + formats_for("int4") for dtype in (torch.float32, torch.bfloat16)])
def test_prompt_path_matches_decode_path(name, dtype):
    """Many rows take the convert-and-matmul path, few rows the weight-streaming kernel: same numbers,
    whatever the shared buffer held before."""
    skip_unless_runs(name, dtype)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(128, 128, generator=g).to(dtype)
    module = linear.FORMATS[name].from_weight(weight)
    module.workspace = linear.Workspace(weight.numel())
    x = torch.randn(getattr(module, "native_rows", 128) + 72, 128, generator=g).to(dtype)  # past the kernels' rows
    many = module(x).float()
    few = torch.cat([module(row[None]) for row in x]).float()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: rounded in a different order
    if module.activation_bits:  # decoding rounds activations to int8 per block of 32, or int16 per 128
        tolerance = {8: 2e-2, 16: max(tolerance, 2e-4)}[module.activation_bits]
    assert (many - few).abs().max() <= tolerance * few.abs().max()
    if module.workspace.buffer is not None:
        module.workspace.buffer.fill_(7)
    assert torch.equal(module(x).float(), many)


@pytest.mark.parametrize("name", ["int8-native", "int4-native"])
def test_quantized_native_prompts_use_a_native_16bit_matmul(name, monkeypatch):
    """Where the CPU multiplies bf16 natively (AMX, AVX512-BF16: faked here), a bf16 model's quantized prompts
    from 17 rows dequantize into the shared buffer and multiply in torch; an fp32 model's still take our GEMM."""
    skip_unless_runs(name, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 128, generator=g)
    for dtype, in_torch in ((torch.bfloat16, True), (torch.float32, False)):
        ours = linear.FORMATS[name].from_weight(weight.to(dtype))  # this CPU: our GEMM past native_rows
        x = torch.randn(ours.native_rows + 1, 128, generator=g).to(dtype)
        expected = ours(x)
        with monkeypatch.context() as patch:
            patch.setattr(kernels, "fast_16bit_matmul", lambda d: True)
            module = linear.FORMATS[name].from_weight(weight.to(dtype))
            module.workspace = linear.Workspace(weight.numel())
            assert module.native_rows == (16 if in_torch else ours.native_rows)
            calls = []
            matmul = module.matmul
            patch.setattr(module, "matmul", lambda rows: calls.append(rows.shape[0]) or matmul(rows))
            got = module(x)
            assert calls == ([x.shape[0]] if in_torch else []), dtype
            assert (got.float() - expected.float()).abs().max() <= 2e-2 * expected.float().abs().max(), dtype
            assert not calls or torch.equal(got, matmul(x))
            calls.clear()
            module(x[:17])
            assert calls == ([17] if in_torch else []), dtype


@pytest.mark.parametrize("isa", native_levels())
@pytest.mark.parametrize("name", ["native", "native-lossless", "int8-native", "int4-native"])
def test_native_formats_decode_at_every_isa_level(name, isa):
    """A native format's decode path at each level this CPU runs, whatever level it would pick itself (the
    scalar level widens activations to fp32, AVX2 and up round them to int8 for int4 weights, int16 for int8
    weights): the prompt path's numbers (the GEMM from AVX2, torch's matmul at the scalar level)."""
    dtype = torch.bfloat16 if name.startswith("native") else torch.float32
    skip_unless_runs(name, dtype)
    g = torch.Generator().manual_seed(0)
    module = linear.FORMATS[name].from_weight(torch.randn(96, 128, generator=g).to(dtype))
    module.isa = isa
    x = torch.randn(module.native_rows + 1, 128, generator=g).to(dtype)
    many = module(x).float()
    few = torch.cat([module(rows) for rows in x.split(5)]).float()
    rounds = module.activation_bits if isa >= kernels.ISA_LEVELS.index("avx2") else None
    tolerance = {None: 1e-5 if dtype == torch.float32 else 1e-2, 8: 2e-2, 16: 2e-4}[rounds]
    assert (many - few).abs().max() <= tolerance * few.abs().max()
