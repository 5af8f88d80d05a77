// shipyard's native CPU linear kernels: y = x @ W^T + b for the few rows of a decode step.
//
// Built at run time by shipyard/kernels/native.py (x86-64 with AVX2, FMA and F16C, any C++17
// compiler) and registered as PyTorch operators, so the traced decode step calls them with no
// Python in between. The weights are packed once, by blocks of 16 output features:
// packed[block][k][16] (zero padded past N). One pass streams each block once and keeps
// 16 columns x up to 6 rows of accumulators in registers, so the weights are read from memory
// once per call whatever the number of rows: at one row this is bound by memory bandwidth
// (~2x MKL's sgemm on the same weights, which repacks them on every call), at 16 rows by the
// FMA units.
//
// Numerics: every output is acc = 0; for k in 0..K-1 in order: acc = fma(x[m,k], w[n,k], acc);
// then (int8: acc * scale[n]) + bias[n]. The order does not depend on the number of rows, the
// row's position in the batch or the thread count, so a row's result is the same whatever
// else is in the batch (bitwise). int8 weights are weight-only: activations stay float32.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/zeros.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t BW = 16;           // output features per packed block
constexpr int64_t MAX_TILE_ROWS = 6; // rows of accumulators kept in registers
constexpr int64_t PANEL_ROWS = 48;   // rows multiplied with a block while it is in cache

struct F32Weights {
  const float *w;
  int64_t K;
  int64_t first_block = 0;  // the block w points at (a one-block scratch copy: its index)
  inline void load(int64_t block, int64_t k, __m256 &lo, __m256 &hi) const {
    const float *p = w + ((block - first_block) * K + k) * BW;
    lo = _mm256_loadu_ps(p);
    hi = _mm256_loadu_ps(p + 8);
  }
  inline const void *block_start(int64_t block) const {
    return w + (block - first_block) * K * BW;
  }
  static constexpr int64_t bytes_per_k = BW * 4;
};

struct I8Weights {
  const int8_t *w;
  int64_t K;
  inline void load(int64_t block, int64_t k, __m256 &lo, __m256 &hi) const {
    __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i *>(w + (block * K + k) * BW));
    lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
  }
  inline const void *block_start(int64_t block) const { return w + block * K * BW; }
  static constexpr int64_t bytes_per_k = BW;
  // block `block` as float32 into out (K * 16 floats)
  inline void widen(int64_t block, float *out) const {
    for (int64_t k = 0; k < K; k++) {
      __m256 lo, hi;
      load(block, k, lo, hi);
      _mm256_storeu_ps(out + k * BW, lo);
      _mm256_storeu_ps(out + k * BW + 8, hi);
    }
  }
};

// R rows x C blocks of 16 columns; prefetch: a block to pull into L2 while this one computes.
template <int R, int C, typename W>
void tile(const float *x, int64_t ldx, const W &wt, int64_t block0, const float *scale,
          const float *bias, float *y, int64_t ldy, int64_t N, const char *prefetch) {
  __m256 acc[R][C][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; r++)
#pragma GCC unroll 8
    for (int c = 0; c < C; c++) {
      acc[r][c][0] = _mm256_setzero_ps();
      acc[r][c][1] = _mm256_setzero_ps();
    }
  const int64_t K = wt.K;
  for (int64_t k = 0; k < K; k++) {
    if (prefetch != nullptr && (k * W::bytes_per_k) % 64 == 0)
      _mm_prefetch(prefetch + k * W::bytes_per_k, _MM_HINT_T1);
    __m256 wv[C][2];
#pragma GCC unroll 8
    for (int c = 0; c < C; c++) wt.load(block0 + c, k, wv[c][0], wv[c][1]);
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
      const __m256 xv = _mm256_broadcast_ss(x + r * ldx + k);
#pragma GCC unroll 8
      for (int c = 0; c < C; c++) {
        acc[r][c][0] = _mm256_fmadd_ps(xv, wv[c][0], acc[r][c][0]);
        acc[r][c][1] = _mm256_fmadd_ps(xv, wv[c][1], acc[r][c][1]);
      }
    }
  }
  alignas(32) float out[BW];
#pragma GCC unroll 8
  for (int r = 0; r < R; r++)
#pragma GCC unroll 8
    for (int c = 0; c < C; c++) {
      _mm256_store_ps(out, acc[r][c][0]);
      _mm256_store_ps(out + 8, acc[r][c][1]);
      const int64_t n0 = (block0 + c) * BW;
      const int64_t width = N - n0 < BW ? N - n0 : BW;
      float *row = y + r * ldy + n0;
      for (int64_t j = 0; j < width; j++) {
        float v = out[j];
        if (scale != nullptr) v *= scale[n0 + j];
        if (bias != nullptr) v += bias[n0 + j];
        row[j] = v;
      }
    }
}

// Blocks [block_begin, block_end) of every row.
template <typename W>
void run_blocks(const float *x, int64_t M, const W &wt, const float *scale, const float *bias,
                float *y, int64_t N, int64_t block_begin, int64_t block_end);

// int8 weights and more rows than one tile: each block is widened to float32 once (into a
// scratch copy that stays in cache) rather than once per tile of rows.
void run_blocks_widened(const float *x, int64_t M, const I8Weights &wt, const float *scale,
                        const float *bias, float *y, int64_t N, int64_t block_begin,
                        int64_t block_end) {
  std::vector<float> scratch(static_cast<size_t>(wt.K * BW));
  for (int64_t b = block_begin; b < block_end; b++) {
    wt.widen(b, scratch.data());
    run_blocks(x, M, F32Weights{scratch.data(), wt.K, b}, scale, bias, y, N, b, b + 1);
  }
}

template <typename W>
void run_blocks(const float *x, int64_t M, const W &wt, const float *scale, const float *bias,
                float *y, int64_t N, int64_t block_begin, int64_t block_end) {
  const int64_t K = wt.K;
  if constexpr (std::is_same_v<W, I8Weights>) {
    if (M > MAX_TILE_ROWS) {
      run_blocks_widened(x, M, wt, scale, bias, y, N, block_begin, block_end);
      return;
    }
  }
  if (M == 1) {  // four blocks at once: 8 independent accumulators hide the FMA latency
    int64_t b = block_begin;
    for (; b + 4 <= block_end; b += 4) tile<1, 4>(x, K, wt, b, scale, bias, y, N, N, nullptr);
    for (; b < block_end; b++) tile<1, 1>(x, K, wt, b, scale, bias, y, N, N, nullptr);
    return;
  }
  for (int64_t b = block_begin; b < block_end; b++) {
    // the first pass over a block streams it from memory; the next block is prefetched into
    // L2 meanwhile, the other row tiles reread this one from cache
    const char *next = (b + 1 < block_end)
                           ? static_cast<const char *>(wt.block_start(b + 1))
                           : nullptr;
    int64_t m = 0;
    for (; m + 6 <= M; m += 6, next = nullptr)
      tile<6, 1>(x + m * K, K, wt, b, scale, bias, y + m * N, N, N, next);
    const int64_t rest = M - m;
    const float *xr = x + m * K;
    float *yr = y + m * N;
    switch (rest) {
      case 5: tile<5, 1>(xr, K, wt, b, scale, bias, yr, N, N, next); break;
      case 4: tile<4, 1>(xr, K, wt, b, scale, bias, yr, N, N, next); break;
      case 3: tile<3, 1>(xr, K, wt, b, scale, bias, yr, N, N, next); break;
      case 2: tile<2, 1>(xr, K, wt, b, scale, bias, yr, N, N, next); break;
      case 1: tile<1, 1>(xr, K, wt, b, scale, bias, yr, N, N, next); break;
      default: break;
    }
  }
}

// All rows, the blocks split over PyTorch's intra-op threads (in groups of 4: the one-row
// tile's width) when the product is large enough to pay for it.
template <typename W>
void run(const float *x, int64_t M, const W &wt, const float *scale, const float *bias,
         float *y, int64_t N) {
  const int64_t blocks = (N + BW - 1) / BW;
  const int64_t groups = (blocks + 3) / 4;
  const int64_t work_per_group = 4 * BW * wt.K * M;
  const int64_t grain = work_per_group >= (1 << 18) ? 1 : (1 << 18) / work_per_group;
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    const int64_t b1 = g1 * 4 < blocks ? g1 * 4 : blocks;
    // panels of rows, so the rows a block is multiplied with stay in cache (a long prompt)
    for (int64_t m0 = 0; m0 < M; m0 += PANEL_ROWS) {
      const int64_t rows = M - m0 < PANEL_ROWS ? M - m0 : PANEL_ROWS;
      run_blocks(x + m0 * wt.K, rows, wt, scale, bias, y + m0 * N, N, g0 * 4, b1);
    }
  });
}

void check_input(const at::Tensor &x, int64_t K, const c10::optional<at::Tensor> &bias,
                 int64_t N) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "shipyard native linear: x must be a float32 CPU tensor");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "shipyard native linear: x has ", x.size(-1),
              " features, the weight ", K);
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == N,
                "shipyard native linear: bias must be a contiguous float32 (", N, ",)");
}

std::vector<int64_t> out_shape(const at::Tensor &x, int64_t N) {
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = N;
  return sizes;
}

// (N, K) -> packed (ceil(N/16), K, 16), zero padded; float32 or int8 as given.
at::Tensor pack_weight(const at::Tensor &weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.device().is_cpu(),
              "shipyard pack_weight: a 2-D CPU weight (out, in)");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kChar,
              "shipyard pack_weight: float32 or int8 weights");
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), blocks = (N + BW - 1) / BW;
  at::Tensor packed = at::zeros({blocks, K, BW}, w.options());
  if (w.scalar_type() == at::kFloat) {
    const float *src = w.data_ptr<float>();
    float *dst = packed.data_ptr<float>();
    for (int64_t n = 0; n < N; n++)
      for (int64_t k = 0; k < K; k++) dst[((n / BW) * K + k) * BW + n % BW] = src[n * K + k];
  } else {
    const int8_t *src = w.data_ptr<int8_t>();
    int8_t *dst = packed.data_ptr<int8_t>();
    for (int64_t n = 0; n < N; n++)
      for (int64_t k = 0; k < K; k++) dst[((n / BW) * K + k) * BW + n % BW] = src[n * K + k];
  }
  return packed;
}

// y = x @ weight^T + bias from the packed float32 weight; more than max_rows rows (a long
// prompt: a large matrix product) go to PyTorch's own linear on `weight`.
at::Tensor linear_f32(const at::Tensor &x, const at::Tensor &weight, const at::Tensor &packed,
                      const c10::optional<at::Tensor> &bias, int64_t max_rows) {
  const int64_t N = weight.size(0), K = weight.size(1);
  check_input(x, K, bias, N);
  TORCH_CHECK(packed.scalar_type() == at::kFloat && packed.is_contiguous() &&
                  packed.dim() == 3 && packed.size(0) == (N + BW - 1) / BW &&
                  packed.size(1) == K && packed.size(2) == BW,
              "shipyard linear_f32: the packed weight does not match the weight");
  const int64_t M = x.numel() / K;
  if (M > max_rows) return at::linear(x, weight, bias);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(out_shape(x, N), x.options());
  const float *b = bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
  run(xc.data_ptr<float>(), M, F32Weights{packed.data_ptr<float>(), K}, nullptr, b,
      y.data_ptr<float>(), N);
  return y;
}

// y = (x @ q^T) * scale + bias from the packed int8 weight q and per-output scales, float32
// activations (weight-only int8). More than max_rows rows go to `fallback` when there is one:
// PyTorch's packed int8 GEMM (quantized::linear_dynamic, activations quantized to 8 bits), which
// beats float32 FMAs once a handful of rows share each weight.
at::Tensor linear_i8_native(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &scale,
                            const c10::optional<at::Tensor> &bias) {
  const int64_t N = scale.numel(), K = packed.size(1);
  check_input(x, K, bias, N);
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.is_contiguous() && packed.dim() == 3 &&
                  packed.size(0) == (N + BW - 1) / BW && packed.size(2) == BW,
              "shipyard linear_i8: the packed weight does not match the scales");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous(),
              "shipyard linear_i8: scales must be contiguous float32");
  const int64_t M = x.numel() / K;
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(out_shape(x, N), x.options());
  const float *b = bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
  run(xc.data_ptr<float>(), M, I8Weights{packed.data_ptr<int8_t>(), K}, scale.data_ptr<float>(),
      b, y.data_ptr<float>(), N);
  return y;
}

// boxed: linear_i8(x, packed, scale, bias, fallback, max_rows)
void linear_i8_boxed(const c10::OperatorHandle &, torch::jit::Stack *stack) {
  const int64_t max_rows = stack->back().toInt();
  stack->pop_back();
  c10::IValue fallback = std::move(stack->back());
  stack->pop_back();
  c10::optional<at::Tensor> bias = stack->back().toOptional<at::Tensor>();
  stack->pop_back();
  const at::Tensor scale = stack->back().toTensor();
  stack->pop_back();
  const at::Tensor packed = stack->back().toTensor();
  stack->pop_back();
  const at::Tensor x = stack->back().toTensor();
  stack->pop_back();
  const int64_t K = packed.dim() == 3 ? packed.size(1) : 0;
  const int64_t M = K > 0 ? x.numel() / K : 0;
  if (M > max_rows && !fallback.isNone()) {
    static const auto gemm =
        c10::Dispatcher::singleton().findSchemaOrThrow("quantized::linear_dynamic", "");
    torch::jit::Stack call{x.contiguous(), std::move(fallback), c10::IValue(true)};
    gemm.callBoxed(&call);
    stack->push_back(std::move(call[0]));
    return;
  }
  stack->push_back(linear_i8_native(x, packed, scale, bias));
}

// ---------------------------------------------------------------------------------------------
// Attention of one new token per row over its cached keys/values (a decode step):
// y[b,h] = softmax(scale * q[b,h] . k[b,g,s] over the allowed slots s) @ v[b,g,s], g = h / (H/G)
// (grouped-query attention). Slots whose mask is false are skipped, keys and values unread (the
// left padding of a batch, the cache's spare slots). Each (row, head) is computed alone, in slot
// order, so its result does not depend on the rest of the batch. A row with no allowed slot
// gives NaN, as a softmax over nothing does. Keys and values are float32 or float16 (a half-size
// cache: converted to float32 as they are loaded, F16C; all arithmetic stays float32). At 16
// rows the cache is most of what a decode step reads, and it comes from memory: the values of
// the next slots are requested during the keys' pass, so both streams are in flight at once.

// Loads of 8 (or 1) cached floats from a float32 or a float16 (stored as uint16_t) cache.
inline __m256 load8(const float *p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t *p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
}
inline float load1(const float *p) { return *p; }
inline float load1(const uint16_t *p) { return _cvtsh_ss(*p); }

inline float hsum8(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

template <typename T>
inline float dot(const float *a, const T *b, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), load8(b + d), acc);
  float s = hsum8(acc);
  for (; d < D; d++) s += a[d] * load1(b + d);
  return s;
}

// Ask for the D elements at p (one request per 64-byte line).
template <typename T>
inline void prefetch_row(const T *p, int64_t D) {
  constexpr int64_t line = 64 / static_cast<int64_t>(sizeof(T));
  for (int64_t d = 0; d < D; d += line) _mm_prefetch(reinterpret_cast<const char *>(p + d), _MM_HINT_T0);
}

template <typename T>
inline void axpy(float a, const T *x, float *y, int64_t D) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    _mm256_storeu_ps(y + d, _mm256_fmadd_ps(av, load8(x + d), _mm256_loadu_ps(y + d)));
  for (; d < D; d++) y[d] += a * load1(x + d);
}

// exp(x) for 8 floats: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial (Cephes'
// coefficients), times 2^n; about 1 ulp, 0 below -87.3 (the softmax's far tail).
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f), hi = _mm256_set1_ps(88.3f);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// One (row, head) with D = 8 * NV: the allowed slots `slot[0..n)`, four keys at a time (four
// independent sums; the keys and values 8 slots ahead requested meanwhile), then the softmax
// weights 8 at a time, then the values into NV registers. T: float or uint16_t (float16).
template <int NV, typename T>
void attend(const float *q, const T *k, int64_t ks, const T *v, int64_t vs,
            const int64_t *slot, int64_t n, float scale, float *w, float *out) {
  __m256 qv[NV];
#pragma GCC unroll 16
  for (int j = 0; j < NV; j++) qv[j] = _mm256_loadu_ps(q + 8 * j);
  for (int64_t t = 0; t < n && t < 8; t++) {  // the first slots (later ones: in the loop)
    prefetch_row(k + slot[t] * ks, 8 * NV);
    prefetch_row(v + slot[t] * vs, 8 * NV);
  }
  float best = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const T *k0 = k + slot[i] * ks, *k1 = k + slot[i + 1] * ks;
    const T *k2 = k + slot[i + 2] * ks, *k3 = k + slot[i + 3] * ks;
    if (i + 12 <= n) {
      for (int t = 8; t < 12; t++) {
        prefetch_row(k + slot[i + t] * ks, 8 * NV);
        prefetch_row(v + slot[i + t] * vs, 8 * NV);
      }
    }
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#pragma GCC unroll 16
    for (int j = 0; j < NV; j++) {
      a0 = _mm256_fmadd_ps(qv[j], load8(k0 + 8 * j), a0);
      a1 = _mm256_fmadd_ps(qv[j], load8(k1 + 8 * j), a1);
      a2 = _mm256_fmadd_ps(qv[j], load8(k2 + 8 * j), a2);
      a3 = _mm256_fmadd_ps(qv[j], load8(k3 + 8 * j), a3);
    }
    w[i] = hsum8(a0) * scale;
    w[i + 1] = hsum8(a1) * scale;
    w[i + 2] = hsum8(a2) * scale;
    w[i + 3] = hsum8(a3) * scale;
    for (int t = 0; t < 4; t++) best = w[i + t] > best ? w[i + t] : best;
  }
  for (; i < n; i++) {
    const T *kr = k + slot[i] * ks;
    __m256 a = _mm256_setzero_ps();
#pragma GCC unroll 16
    for (int j = 0; j < NV; j++) a = _mm256_fmadd_ps(qv[j], load8(kr + 8 * j), a);
    w[i] = hsum8(a) * scale;
    best = w[i] > best ? w[i] : best;
  }
  if (n == 0 || best == -std::numeric_limits<float>::infinity()) {
    for (int64_t d = 0; d < 8 * NV; d++) out[d] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  const __m256 bv = _mm256_set1_ps(best);
  i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(w + i, exp8(_mm256_sub_ps(_mm256_loadu_ps(w + i), bv)));
  if (i < n) {
    alignas(32) float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t t = i; t < n; t++) tail[t - i] = w[t];
    _mm256_store_ps(tail, exp8(_mm256_sub_ps(_mm256_load_ps(tail), bv)));
    for (int64_t t = i; t < n; t++) w[t] = tail[t - i];
  }
  float total = 0.f;
  for (int64_t t = 0; t < n; t++) total += w[t];
  __m256 acc[NV];
#pragma GCC unroll 16
  for (int j = 0; j < NV; j++) acc[j] = _mm256_setzero_ps();
  for (int64_t t = 0; t < n; t++) {
    const T *vr = v + slot[t] * vs;
    const __m256 p = _mm256_set1_ps(w[t]);
#pragma GCC unroll 16
    for (int j = 0; j < NV; j++) acc[j] = _mm256_fmadd_ps(p, load8(vr + 8 * j), acc[j]);
  }
  const __m256 inv = _mm256_set1_ps(1.f / total);
#pragma GCC unroll 16
  for (int j = 0; j < NV; j++) _mm256_storeu_ps(out + 8 * j, _mm256_mul_ps(acc[j], inv));
}

// GELU, tanh approximation (GPT-2's): 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3),
// computed as x * sigmoid(2u) = x / (1 + exp(-2u)); within a few ulp of PyTorch's.
at::Tensor gelu_tanh(const at::Tensor &x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "shipyard gelu_tanh: a float32 CPU tensor");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const float *xp = xc.data_ptr<float>();
  float *yp = y.data_ptr<float>();
  const int64_t n = xc.numel();
  at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
    const __m256 c = _mm256_set1_ps(2.f * 0.7978845608028654f);
    const __m256 c3 = _mm256_set1_ps(0.044715f), one = _mm256_set1_ps(1.f);
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) {
      const __m256 v = _mm256_loadu_ps(xp + i);
      const __m256 u2 = _mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(c3, v), _mm256_mul_ps(v, v), v));
      const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), u2));  // exp(-2u)
      _mm256_storeu_ps(yp + i, _mm256_div_ps(v, _mm256_add_ps(one, e)));
    }
    for (; i < i1; i++) {
      const float v = xp[i];
      yp[i] = 0.5f * v * (1.f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    }
  });
  return y;
}

// One call's (row, head) pairs from i0 to i1; T: the cache's element type.
template <typename T>
void decode_attention_rows(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                           const bool *mp, int64_t m_b, int64_t m_s, float sc, float *yp,
                           int64_t i0, int64_t i1) {
  const int64_t H = q.size(1), D = q.size(3), G = k.size(1), S = k.size(2);
  const int64_t group = H / G;
  const float *qp = q.data_ptr<float>();
  const T *kp = static_cast<const T *>(k.data_ptr()), *vp = static_cast<const T *>(v.data_ptr());
  const int64_t ks = k.stride(2), vs = v.stride(2);
  std::vector<float> scores(static_cast<size_t>(S));
  std::vector<int64_t> slots(static_cast<size_t>(S));
  for (int64_t i = i0; i < i1; i++) {
    const int64_t b = i / H, h = i % H, g = h / group;
    const float *qr = qp + b * q.stride(0) + h * q.stride(1);
    const T *kr = kp + b * k.stride(0) + g * k.stride(1);
    const T *vr = vp + b * v.stride(0) + g * v.stride(1);
    const bool *mr = mp != nullptr ? mp + b * m_b : nullptr;
    float *out = yp + i * D;
    if (D == 16 || D == 32 || D == 64 || D == 128) {
      int64_t n = 0;
      for (int64_t s = 0; s < S; s++)
        if (mr == nullptr || mr[s * m_s]) slots[n++] = s;
      switch (D) {
        case 16: attend<2>(qr, kr, ks, vr, vs, slots.data(), n, sc, scores.data(), out); break;
        case 32: attend<4>(qr, kr, ks, vr, vs, slots.data(), n, sc, scores.data(), out); break;
        case 64: attend<8>(qr, kr, ks, vr, vs, slots.data(), n, sc, scores.data(), out); break;
        default: attend<16>(qr, kr, ks, vr, vs, slots.data(), n, sc, scores.data(), out); break;
      }
      continue;
    }
    float best = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < S; s++) {
      if (mr != nullptr && !mr[s * m_s]) continue;
      // the cache is cold (every layer's keys and values of every row): ask for the keys a
      // few slots ahead, and for this slot's values, read in the second pass
      prefetch_row(kr + (s + 12) * ks, D);
      prefetch_row(vr + s * vs, D);
      const float x = dot(qr, kr + s * ks, D) * sc;
      scores[s] = x;
      if (x > best) best = x;
    }
    for (int64_t d = 0; d < D; d++) out[d] = 0.f;
    if (best == -std::numeric_limits<float>::infinity()) {  // nothing allowed (or all -inf)
      for (int64_t d = 0; d < D; d++) out[d] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    float total = 0.f;
    for (int64_t s = 0; s < S; s++) {
      if (mr != nullptr && !mr[s * m_s]) continue;
      const float p = std::exp(scores[s] - best);
      total += p;
      axpy(p, vr + s * vs, out, D);
    }
    const float inv = 1.f / total;
    for (int64_t d = 0; d < D; d++) out[d] *= inv;
  }
}

at::Tensor decode_attention(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                            const c10::optional<at::Tensor> &mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1,
              "shipyard decode_attention: q (B, H, 1, D), k and v (B, G, S, D)");
  const bool half = k.scalar_type() == at::kHalf;
  TORCH_CHECK(q.scalar_type() == at::kFloat && v.scalar_type() == k.scalar_type() &&
                  (half || k.scalar_type() == at::kFloat) && q.device().is_cpu() &&
                  k.device().is_cpu() && v.device().is_cpu(),
              "shipyard decode_attention: float32 CPU q, float32 or float16 k and v");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), G = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == G && v.size(2) == S &&
                  k.size(3) == D && v.size(3) == D && G > 0 && H % G == 0,
              "shipyard decode_attention: shapes do not match");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "shipyard decode_attention: the head dimension must be contiguous");
  const bool *mp = nullptr;
  int64_t m_b = 0, m_s = 0;
  at::Tensor m;
  if (mask.has_value() && mask->defined()) {
    m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4 && m.size(1) == 1 &&
                    m.size(2) == 1 && m.size(3) == S && (m.size(0) == B || m.size(0) == 1),
                "shipyard decode_attention: mask must be bool (B or 1, 1, 1, S)");
    mp = m.data_ptr<bool>();
    m_b = m.size(0) == 1 ? 0 : m.stride(0);
    m_s = m.stride(3);
  }
  at::Tensor y = at::empty({B, H, 1, D}, q.options());
  float *yp = y.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t grain = S * D >= 4096 ? 1 : 4096 / (S * D + 1) + 1;
  at::parallel_for(0, B * H, grain, [&](int64_t i0, int64_t i1) {
    if (half)
      decode_attention_rows<uint16_t>(q, k, v, mp, m_b, m_s, sc, yp, i0, i1);
    else
      decode_attention_rows<float>(q, k, v, mp, m_b, m_s, sc, yp, i0, i1);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(shipyard, m) {
  m.def("pack_weight(Tensor weight) -> Tensor");
  m.def("gelu_tanh(Tensor x) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
  m.def("linear_f32(Tensor x, Tensor weight, Tensor packed, Tensor? bias, int max_rows) -> Tensor");
  m.def(
      "linear_i8(Tensor x, Tensor packed, Tensor scale, Tensor? bias, "
      "__torch__.torch.classes.quantized.LinearPackedParamsBase? fallback, int max_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(shipyard, CPU, m) {
  m.impl("pack_weight", pack_weight);
  m.impl("gelu_tanh", gelu_tanh);
  m.impl("decode_attention", decode_attention);
  m.impl("linear_f32", linear_f32);
  m.impl("linear_i8", torch::CppFunction::makeFromBoxedFunction<&linear_i8_boxed>());
}
