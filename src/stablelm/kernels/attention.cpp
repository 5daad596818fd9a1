// Attention over the serving engine's block pool (stablelm.serving.paged): each sequence's query tokens
// (one when decoding, a short prompt chunk) against the keys/values its block table names, read where they lie.
//
// torch would first gather every sequence's keys and values into a padded batch (a copy of the whole
// cache each layer) and then run a masked attention over the padding; here each (sequence, kv head) pair
// streams its blocks once, for all its query tokens and the query heads that share that kv head, with an
// online softmax in fp32 one block at a time.
//
// Layout: keys, values (H_kv, slots, D) in fp32, bf16 or fp16, slot = block * block_size + offset;
// q (T, H, D) fp32, the tokens of segment r at starts[r]..starts[r+1]-1; blocks (segments, max_blocks)
// int64; lengths (T,) int64, positions each token attends to. Returns (T, H, D) fp32.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

namespace {

enum Kind { kF32, kBF16, kF16 };

template <Kind kind>
inline float load1(const void* p, int64_t i) {
  if constexpr (kind == kF32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (kind == kBF16) {
    uint32_t bits = uint32_t(static_cast<const uint16_t*>(p)[i]) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  } else {
    return float(static_cast<const c10::Half*>(p)[i]);
  }
}

#define AVX2 __attribute__((target("avx2,fma,f16c")))

template <Kind kind>
AVX2 inline __m256 load8(const void* p, int64_t i) {
  if constexpr (kind == kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  } else if constexpr (kind == kBF16) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
  }
}

AVX2 inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Scores of `group` query rows q (group, d) against `count` key rows k (count, d): s (group, count).
template <Kind kind>
AVX2 void scores_avx2(const float* q, int64_t group, const void* k, int64_t count, int64_t d, float scale, float* s) {
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t g = 0; g < group; ++g) {
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 16 <= d; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * d + i), load8<kind>(k, t * d + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * d + i + 8), load8<kind>(k, t * d + i + 8), a1);
      }
      for (; i < d; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * d + i), load8<kind>(k, t * d + i), a0);
      s[g * count + t] = sum8(_mm256_add_ps(a0, a1)) * scale;
    }
  }
}

// acc (group, d) += p (group, count) @ v (count, d); four 8-wide column chunks at a time, so the FMAs of
// one key do not wait on each other.
template <Kind kind>
AVX2 void accumulate_avx2(const float* p, int64_t group, const void* v, int64_t count, int64_t d, float* acc) {
  for (int64_t g = 0; g < group; ++g) {
    float* ag = acc + g * d;
    const float* pg = p + g * count;
    int64_t i = 0;
    for (; i + 32 <= d; i += 32) {
      __m256 a0 = _mm256_loadu_ps(ag + i), a1 = _mm256_loadu_ps(ag + i + 8), a2 = _mm256_loadu_ps(ag + i + 16),
             a3 = _mm256_loadu_ps(ag + i + 24);
      for (int64_t t = 0; t < count; ++t) {
        const __m256 w = _mm256_set1_ps(pg[t]);
        a0 = _mm256_fmadd_ps(w, load8<kind>(v, t * d + i), a0);
        a1 = _mm256_fmadd_ps(w, load8<kind>(v, t * d + i + 8), a1);
        a2 = _mm256_fmadd_ps(w, load8<kind>(v, t * d + i + 16), a2);
        a3 = _mm256_fmadd_ps(w, load8<kind>(v, t * d + i + 24), a3);
      }
      _mm256_storeu_ps(ag + i, a0);
      _mm256_storeu_ps(ag + i + 8, a1);
      _mm256_storeu_ps(ag + i + 16, a2);
      _mm256_storeu_ps(ag + i + 24, a3);
    }
    for (; i < d; i += 8) {
      __m256 a = _mm256_loadu_ps(ag + i);
      for (int64_t t = 0; t < count; ++t) a = _mm256_fmadd_ps(_mm256_set1_ps(pg[t]), load8<kind>(v, t * d + i), a);
      _mm256_storeu_ps(ag + i, a);
    }
  }
}

// e^x for x <= 0 (scores after the running maximum is subtracted), Cephes' expf: within 2 ulp of std::exp.
AVX2 inline __m256 exp_avx2(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

// s[j] = e^(s[j] - top) for j < count; returns their sum.
AVX2 float exp_sum_avx2(float* s, int64_t count, float top) {
  const __m256 t = _mm256_set1_ps(top);
  __m256 total = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= count; j += 8) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), t));
    _mm256_storeu_ps(s + j, e);
    total = _mm256_add_ps(total, e);
  }
  float rest = 0.f;
  for (; j < count; ++j) rest += (s[j] = std::exp(s[j] - top));
  return sum8(total) + rest;
}

// Several queries against one block: the block widened to fp32 once, keys transposed (d, width) so that
// one query's scores for 8 keys are 8-wide FMAs with no horizontal sums.
template <Kind kind>
void widen_block(const void* k, const void* v, int64_t count, int64_t d, int64_t width, float* kt, float* vb) {
  for (int64_t j = 0; j < count; ++j)
    for (int64_t i = 0; i < d; ++i) {
      kt[i * width + j] = load1<kind>(k, j * d + i);
      vb[j * d + i] = load1<kind>(v, j * d + i);
    }
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = count; j < width; ++j) kt[i * width + j] = 0.f;
}

AVX2 void scores_wide_avx2(const float* q, int64_t group, const float* kt, int64_t count, int64_t width, int64_t d,
                           float scale, float* s) {
  float lanes[8];
  for (int64_t g = 0; g < group; ++g)
    for (int64_t j = 0; j < width; j += 8) {  // four partial sums over d, so the FMAs do not wait on each other
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
      const float* qg = q + g * d;
      int64_t i = 0;
      for (; i + 4 <= d; i += 4) {
        a0 = _mm256_fmadd_ps(_mm256_set1_ps(qg[i]), _mm256_loadu_ps(kt + i * width + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_set1_ps(qg[i + 1]), _mm256_loadu_ps(kt + (i + 1) * width + j), a1);
        a2 = _mm256_fmadd_ps(_mm256_set1_ps(qg[i + 2]), _mm256_loadu_ps(kt + (i + 2) * width + j), a2);
        a3 = _mm256_fmadd_ps(_mm256_set1_ps(qg[i + 3]), _mm256_loadu_ps(kt + (i + 3) * width + j), a3);
      }
      for (; i < d; ++i) a0 = _mm256_fmadd_ps(_mm256_set1_ps(qg[i]), _mm256_loadu_ps(kt + i * width + j), a0);
      const __m256 sum = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
      _mm256_storeu_ps(lanes, _mm256_mul_ps(sum, _mm256_set1_ps(scale)));
      for (int64_t x = 0; x < 8 && j + x < count; ++x) s[g * count + j + x] = lanes[x];
    }
}

template <Kind kind>
void scores_scalar(const float* q, int64_t group, const void* k, int64_t count, int64_t d, float scale, float* s) {
  for (int64_t t = 0; t < count; ++t)
    for (int64_t g = 0; g < group; ++g) {
      float acc = 0.f;
      for (int64_t i = 0; i < d; ++i) acc += q[g * d + i] * load1<kind>(k, t * d + i);
      s[g * count + t] = acc * scale;
    }
}

template <Kind kind>
void accumulate_scalar(const float* p, int64_t group, const void* v, int64_t count, int64_t d, float* acc) {
  for (int64_t g = 0; g < group; ++g)
    for (int64_t t = 0; t < count; ++t)
      for (int64_t i = 0; i < d; ++i) acc[g * d + i] += p[g * count + t] * load1<kind>(v, t * d + i);
}

// Segment r holds query tokens starts[r]..starts[r+1]-1, all of table row r; token t attends to positions
// 0..lengths[t]-1 (a decode token to all its sequence holds, a prompt chunk's tokens causally).
template <Kind kind>
void run(const float* q, const void* keys, const void* values, const int64_t* blocks, const int64_t* starts,
         const int64_t* lengths, float* out, int64_t segments, int64_t h, int64_t hkv, int64_t d, int64_t slots,
         int64_t max_blocks, int64_t block_size, float scale, bool simd) {
  const int64_t group = h / hkv, elem = kind == kF32 ? 4 : 2;
  at::parallel_for(0, segments * hkv, 1, [&](int64_t begin, int64_t end) {
    const int64_t width = (block_size + 7) / 8 * 8;
    std::vector<float> s, acc, m, l, kt(d * width), vb(block_size * d);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seg = item / hkv, kv = item % hkv, first = starts[seg], tokens = starts[seg + 1] - first;
      const int64_t queries = tokens * group;
      s.resize(group * block_size);
      acc.assign(queries * d, 0.f);
      m.assign(queries, -std::numeric_limits<float>::infinity());
      l.assign(queries, 0.f);
      int64_t longest = 0;
      for (int64_t t = 0; t < tokens; ++t) longest = std::max(longest, lengths[first + t]);
      for (int64_t start = 0; start < longest; start += block_size) {  // each block read once, for every query
        const int64_t offset = (kv * slots + blocks[seg * max_blocks + start / block_size] * block_size) * d * elem;
        const void* k = static_cast<const char*>(keys) + offset;
        const void* v = static_cast<const char*>(values) + offset;
        const bool wide = simd && queries >= 2;
        if (wide) {
          const int64_t count = std::min(block_size, longest - start);
          widen_block<kind>(k, v, count, d, width, kt.data(), vb.data());
        }
        for (int64_t t = 0; t < tokens; ++t) {
          const int64_t length = lengths[first + t];
          if (length <= start) continue;
          const int64_t count = std::min(block_size, length - start);
          const float* qg = q + ((first + t) * h + kv * group) * d;
          float* ag = acc.data() + t * group * d;
          if (wide) scores_wide_avx2(qg, group, kt.data(), count, width, d, scale, s.data());
          else if (simd) scores_avx2<kind>(qg, group, k, count, d, scale, s.data());
          else scores_scalar<kind>(qg, group, k, count, d, scale, s.data());
          for (int64_t g = 0; g < group; ++g) {  // online softmax: rescale what came before once per block
            float* sg = s.data() + g * count;
            const int64_t qi = t * group + g;
            float top = m[qi];
            for (int64_t j = 0; j < count; ++j) top = std::max(top, sg[j]);
            const float correction = std::exp(m[qi] - top);
            float total = l[qi] * correction;
            if (simd) {
              total += exp_sum_avx2(sg, count, top);
            } else {
              for (int64_t j = 0; j < count; ++j) total += (sg[j] = std::exp(sg[j] - top));
            }
            for (int64_t i = 0; i < d; ++i) ag[g * d + i] *= correction;
            m[qi] = top;
            l[qi] = total;
          }
          if (wide) accumulate_avx2<kF32>(s.data(), group, vb.data(), count, d, ag);
          else if (simd) accumulate_avx2<kind>(s.data(), group, v, count, d, ag);
          else accumulate_scalar<kind>(s.data(), group, v, count, d, ag);
        }
      }
      for (int64_t t = 0; t < tokens; ++t) {
        float* o = out + ((first + t) * h + kv * group) * d;
        const float* ag = acc.data() + t * group * d;
        for (int64_t g = 0; g < group; ++g)
          for (int64_t i = 0; i < d; ++i) o[g * d + i] = l[t * group + g] > 0 ? ag[g * d + i] / l[t * group + g] : 0.f;
      }
    }
  });
}

bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                           const at::Tensor& blocks, const at::Tensor& starts, const at::Tensor& lengths,
                           int64_t block_size, double scale, int64_t isa) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "paged_attention: q must be a contiguous (T, H, D) float32 tensor");
  TORCH_CHECK(keys.dim() == 3 && keys.is_contiguous() && values.sizes() == keys.sizes() && values.is_contiguous() &&
                  values.scalar_type() == keys.scalar_type(),
              "paged_attention: keys and values must be contiguous (H_kv, slots, D) tensors of one shape and dtype");
  const int64_t t = q.size(0), h = q.size(1), d = q.size(2), hkv = keys.size(0), slots = keys.size(1);
  TORCH_CHECK(keys.size(2) == d && h % hkv == 0, "paged_attention: q has ", h, " heads of ", d, ", the pool ", hkv,
              " of ", keys.size(2));
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kLong && blocks.is_contiguous(),
              "paged_attention: blocks must be a contiguous (segments, max_blocks) int64 tensor");
  const int64_t segments = blocks.size(0), max_blocks = blocks.size(1), pool_blocks = slots / block_size;
  TORCH_CHECK(starts.dim() == 1 && starts.size(0) == segments + 1 && starts.scalar_type() == at::kLong &&
                  starts.is_contiguous() && lengths.dim() == 1 && lengths.size(0) == t &&
                  lengths.scalar_type() == at::kLong && lengths.is_contiguous(),
              "paged_attention: starts must be (segments + 1,) and lengths (T,) int64");
  TORCH_CHECK(block_size >= 1 && slots % block_size == 0, "paged_attention: block_size ", block_size,
              " must divide the pool's ", slots, " slots");
  const int64_t *sp = starts.data_ptr<int64_t>(), *lp = lengths.data_ptr<int64_t>(), *bp = blocks.data_ptr<int64_t>();
  TORCH_CHECK(sp[0] == 0 && sp[segments] == t, "paged_attention: starts must run from 0 to ", t);
  for (int64_t seg = 0; seg < segments; ++seg) {
    TORCH_CHECK(sp[seg] <= sp[seg + 1], "paged_attention: starts must not decrease");
    for (int64_t i = sp[seg]; i < sp[seg + 1]; ++i) {
      TORCH_CHECK(lp[i] >= 1 && lp[i] <= max_blocks * block_size, "paged_attention: token ", i, " has length ", lp[i],
                  ", its table holds ", max_blocks * block_size);
      for (int64_t j = 0; j < (lp[i] + block_size - 1) / block_size; ++j)
        TORCH_CHECK(bp[seg * max_blocks + j] >= 0 && bp[seg * max_blocks + j] < pool_blocks, "paged_attention: "
                    "segment ", seg, " names block ", bp[seg * max_blocks + j], " of a pool of ", pool_blocks);
    }
  }
  TORCH_CHECK(isa <= 0 || has_avx2(), "paged_attention: this CPU has no AVX2");
  const bool simd = (isa < 0 ? has_avx2() : isa >= 1) && d % 8 == 0;
  auto out = at::empty({t, h, d}, q.options());
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
#define STABLELM_RUN(kind) \
  run<kind>(qp, keys.data_ptr(), values.data_ptr(), bp, sp, lp, op, segments, h, hkv, d, slots, max_blocks, block_size, sc, simd)
  switch (keys.scalar_type()) {
    case at::kFloat: STABLELM_RUN(kF32); break;
    case at::kBFloat16: STABLELM_RUN(kBF16); break;
    case at::kHalf: STABLELM_RUN(kF16); break;
    default: TORCH_CHECK(false, "paged_attention: keys of dtype ", keys.scalar_type(), " are not fp32, bf16 or fp16");
  }
#undef STABLELM_RUN
  return out;
}

// ---- one decode token at batch 1 over a contiguous cache, rotary included ----------------------------
// What the model's attention does for one token, in one call instead of ~20 small ops: rotate the first
// `r` dims of every q and k head (x * cos + rotate_half(x) * sin, rounding to the model's dtype after each
// product and the sum, exactly where torch rounds), store k and v in `slot`, attend to slots 0..slot.
template <Kind kind>
inline float round_to(float v) {
  if constexpr (kind == kBF16) return float(c10::BFloat16(v));
  else if constexpr (kind == kF16) return float(c10::Half(v));
  else return v;
}

template <Kind kind>
inline void store1(void* p, int64_t i, float v) {
  if constexpr (kind == kBF16) static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(v);
  else if constexpr (kind == kF16) static_cast<c10::Half*>(p)[i] = c10::Half(v);
  else static_cast<float*>(p)[i] = v;
}

inline float opaque(float v) {  // a product torch rounds on its own: never fused into the following add
  asm volatile("" : "+x"(v));
  return v;
}

template <Kind kind>
void rotate(const void* x, int64_t base, const void* cos, const void* sin, int64_t r, int64_t d, float* out) {
  const int64_t half = r / 2;
  for (int64_t j = 0; j < half; ++j) {
    const float x1 = load1<kind>(x, base + j), x2 = load1<kind>(x, base + j + half);
    out[j] = round_to<kind>(opaque(round_to<kind>(x1 * load1<kind>(cos, j))) +
                            opaque(round_to<kind>(-x2 * load1<kind>(sin, j))));
    out[j + half] = round_to<kind>(opaque(round_to<kind>(x2 * load1<kind>(cos, j + half))) +
                                   opaque(round_to<kind>(x1 * load1<kind>(sin, j + half))));
  }
  for (int64_t j = r; j < d; ++j) out[j] = load1<kind>(x, base + j);
}

template <Kind kind>
void decode_run(const void* qp, const void* kp, const void* vp, const void* cos, const void* sin, void* keys,
                void* values, void* out, int64_t h, int64_t hkv, int64_t d, int64_t r, int64_t capacity, int64_t slot,
                float scale, bool simd) {
  const int64_t group = h / hkv, count = slot + 1, elem = kind == kF32 ? 4 : 2;
  std::vector<float> q(h * d), k(d);
  for (int64_t head = 0; head < h; ++head) rotate<kind>(qp, head * d, cos, sin, r, d, q.data() + head * d);
  for (int64_t kv = 0; kv < hkv; ++kv) {
    rotate<kind>(kp, kv * d, cos, sin, r, d, k.data());
    for (int64_t i = 0; i < d; ++i) {
      store1<kind>(keys, (kv * capacity + slot) * d + i, k[i]);
      store1<kind>(values, (kv * capacity + slot) * d + i, load1<kind>(vp, kv * d + i));
    }
  }
  // Threads only where the work pays for waking them (a short context is a few microseconds in one).
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, group * count * d));
  at::parallel_for(0, hkv, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> s(group * count), acc(group * d), total(group);
    for (int64_t kv = begin; kv < end; ++kv) {
      const void* kc = static_cast<const char*>(keys) + kv * capacity * d * elem;
      const void* vc = static_cast<const char*>(values) + kv * capacity * d * elem;
      const float* qg = q.data() + kv * group * d;
      if (simd) scores_avx2<kind>(qg, group, kc, count, d, scale, s.data());
      else scores_scalar<kind>(qg, group, kc, count, d, scale, s.data());
      for (int64_t g = 0; g < group; ++g) {
        float* sg = s.data() + g * count;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < count; ++j) top = std::max(top, sg[j]);
        if (simd) total[g] = exp_sum_avx2(sg, count, top);
        else {
          total[g] = 0.f;
          for (int64_t j = 0; j < count; ++j) total[g] += (sg[j] = std::exp(sg[j] - top));
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      if (simd) accumulate_avx2<kind>(s.data(), group, vc, count, d, acc.data());
      else accumulate_scalar<kind>(s.data(), group, vc, count, d, acc.data());
      for (int64_t g = 0; g < group; ++g)
        for (int64_t i = 0; i < d; ++i) store1<kind>(out, (kv * group + g) * d + i, acc[g * d + i] / total[g]);
    }
  });
}

// q (H * D), k and v (H_kv * D) of one token, cos and sin (r,), keys/values (H_kv, capacity, D): all contiguous,
// one dtype (fp32, bf16, fp16). Returns the attention output (H * D) in that dtype.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                            const at::Tensor& sin, const at::Tensor& keys, const at::Tensor& values, int64_t slot,
                            double scale, int64_t isa) {
  const auto dtype = keys.scalar_type();
  TORCH_CHECK(keys.dim() == 3 && keys.sizes() == values.sizes() && keys.is_contiguous() && values.is_contiguous(),
              "decode_attention: keys and values must be contiguous (H_kv, capacity, D) tensors of one shape");
  const int64_t hkv = keys.size(0), capacity = keys.size(1), d = keys.size(2), r = cos.numel();
  for (const at::Tensor* t : {&q, &k, &v, &cos, &sin, &values})
    TORCH_CHECK(t->scalar_type() == dtype && t->is_contiguous(), "decode_attention: every tensor must be contiguous ",
                dtype);
  TORCH_CHECK(k.numel() == hkv * d && v.numel() == hkv * d && q.numel() % (hkv * d) == 0,
              "decode_attention: q, k, v hold ", q.numel(), ", ", k.numel(), ", ", v.numel(), " values; the cache has ",
              hkv, " heads of ", d);
  TORCH_CHECK(sin.numel() == r && r % 2 == 0 && r <= d, "decode_attention: cos and sin must hold the same even number "
              "of rotated dims, at most ", d);
  TORCH_CHECK(slot >= 0 && slot < capacity, "decode_attention: slot ", slot, " outside the cache's ", capacity);
  TORCH_CHECK(isa <= 0 || has_avx2(), "decode_attention: this CPU has no AVX2");
  const bool simd = (isa < 0 ? has_avx2() : isa >= 1) && d % 8 == 0;
  const int64_t h = q.numel() / d;
  auto out = at::empty({h * d}, q.options());
  const float sc = static_cast<float>(scale);
#define STABLELM_RUN(kind)                                                                                          \
  decode_run<kind>(q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(), keys.data_ptr(),        \
                   values.data_ptr(), out.data_ptr(), h, hkv, d, r, capacity, slot, sc, simd)
  switch (dtype) {
    case at::kFloat: STABLELM_RUN(kF32); break;
    case at::kBFloat16: STABLELM_RUN(kBF16); break;
    case at::kHalf: STABLELM_RUN(kF16); break;
    default: TORCH_CHECK(false, "decode_attention: dtype ", dtype, " is not fp32, bf16 or fp16");
  }
#undef STABLELM_RUN
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(stablelm_kernels, m) {
  m.def("paged_attention(Tensor q, Tensor keys, Tensor values, Tensor blocks, Tensor starts, Tensor lengths, "
        "int block_size, float scale, int isa) -> Tensor", paged_attention);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor keys, Tensor values, int slot, "
        "float scale, int isa) -> Tensor", decode_attention);
}
