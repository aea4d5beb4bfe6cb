// Fused CPU kernel for the Adam family (shardwise.optim.rule), one call per bucket.
//
// The per-element maths is `update_moments()` + `apply_step()` below: a line-for-line transcription
// of the rule in rule.py, computed in float (double for double parameters) whatever the storage
// dtype. Two drivers walk the bucket:
//   * adam_fused_       full-precision state (same dtype as the parameter, as torch.optim keeps it);
//                       work is split into ~64K-element chunks across all tensors of the bucket.
//   * adam_fused_8bit_  blockwise 8-bit state (quant.py's layout and code maps). Work is split by
//                       blocks of 256 elements within rows; each block is decoded, updated and
//                       re-encoded in one pass: codes and parameters are read and written once, the
//                       new moments stay in a 1 KiB stack buffer until the block's absmax is known.
//                       Second moments are kept there as square roots: the update computed them
//                       already, and the fourth-root code map needs only one more square root.
// Threads come from ATen (at::parallel_for), so torch.set_num_threads applies.
//
// Speed notes (measured, see bench/optim_step.py): the 8-bit step is bound by the square-root /
// divide unit, not by memory. Hence: AMSGrad derives sqrt(u) from sqrt(v) and the decoded code
// instead of a second root; absmax is an integer max over magnitude bits; and with AVX-512 or AVX2
// the encoders take square roots from the hardware reciprocal-root estimate refined by one Newton
// step (within a few ulp of sqrt, so a code differs from the exact map only at a rounding tie).
// Values the worker lambdas read in their loops are copied into them: captured by reference they
// may alias the parameter stores, and GCC then falls back to scalar code (4.7x slower, measured).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kBlock = 256;
constexpr int64_t kChunk = 1 << 16;
constexpr float kSignedMax = 127.0f;
constexpr float kUnsignedMax = 255.0f;

template <typename acc_t>
struct Scalars {
  acc_t beta2, one_minus_beta1, one_minus_beta2, weight_decay, decay_factor, eps, step_size,
      denom_scale, denom_eps, grad_factor;
};

// One element of the rule, in two halves so the 8-bit driver can get sqrt(v) its own way.
// DECOUPLED: AdamW-style decay, BELIEF: AdaBelief second moment.
template <bool DECOUPLED, bool BELIEF, typename acc_t>
inline void update_moments(acc_t& p, acc_t g, acc_t& m, acc_t& v, const Scalars<acc_t>& s) {
  g *= s.grad_factor;  // -1 for maximize, times 1/scale for GradScaler's scaled gradients
  if (DECOUPLED) {
    p *= s.decay_factor;
  } else {
    g += s.weight_decay * p;
  }
  m += s.one_minus_beta1 * (g - m);
  if (BELIEF) {
    const acc_t r = g - m;
    v = s.beta2 * v + s.one_minus_beta2 * r * r + s.eps;
  } else {
    v = s.beta2 * v + s.one_minus_beta2 * g * g;
  }
}

// The parameter step, given the square root of the second moment in use (v, or AMSGrad's max).
template <typename acc_t>
inline void apply_step(acc_t& p, acc_t m, acc_t root, const Scalars<acc_t>& s) {
  p -= s.step_size * m / (root * s.denom_scale + s.denom_eps);
}

template <typename acc_t>
Scalars<acc_t> make_scalars(double beta1, double beta2, double weight_decay, double decay_factor, double eps,
                            double step_size, double denom_scale, double denom_eps, double grad_factor) {
  // 1 - beta in double, then rounded once (as the other implementations compute it).
  return Scalars<acc_t>{acc_t(beta2),        acc_t(1.0 - beta1),   acc_t(1.0 - beta2), acc_t(weight_decay),
                        acc_t(decay_factor), acc_t(eps),           acc_t(step_size),   acc_t(denom_scale),
                        acc_t(denom_eps),    acc_t(grad_factor)};
}

template <typename T>
using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ------------------------------------------------------------------------------- full precision
template <bool DECOUPLED, bool BELIEF, bool AMSGRAD, typename scalar_t>
void run_full(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
              const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
              const std::vector<at::Tensor>& max_exp_avg_sqs, const Scalars<acc_type_t<scalar_t>>& scalars) {
  using acc_t = acc_type_t<scalar_t>;
  struct Chunk {
    size_t t;
    int64_t begin, end;
  };
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t n = params[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({t, b, std::min(n, b + kChunk)});
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
    const Scalars<acc_t> s = scalars;  // local copy: see run_8bit
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      scalar_t* p = static_cast<scalar_t*>(params[ch.t].data_ptr());
      const scalar_t* g = static_cast<scalar_t*>(grads[ch.t].data_ptr());
      scalar_t* m = static_cast<scalar_t*>(exp_avgs[ch.t].data_ptr());
      scalar_t* v = static_cast<scalar_t*>(exp_avg_sqs[ch.t].data_ptr());
      scalar_t* um = AMSGRAD ? static_cast<scalar_t*>(max_exp_avg_sqs[ch.t].data_ptr()) : nullptr;
#pragma omp simd
      for (int64_t i = ch.begin; i < ch.end; ++i) {
        acc_t pi = p[i], mi = m[i], vi = v[i];
        update_moments<DECOUPLED, BELIEF, acc_t>(pi, acc_t(g[i]), mi, vi, s);
        acc_t second = vi;
        if (AMSGRAD) {
          const acc_t ui = acc_t(um[i]);
          second = ui > vi ? ui : vi;
          um[i] = scalar_t(second);
        }
        apply_step(pi, mi, std::sqrt(second), s);
        p[i] = scalar_t(pi);
        m[i] = scalar_t(mi);
        v[i] = scalar_t(vi);
      }
    }
  });
}

// ------------------------------------------------------------------------------- 8-bit state
// The bits of |x| as an unsigned integer. IEEE-754 magnitudes order like these integers and every
// NaN sorts above +inf, so an integer max over them is an absmax that keeps NaN, in two vector ops
// (a float max with an explicit NaN test takes five).
template <typename acc_t>
struct Bits;
template <>
struct Bits<float> {
  using type = uint32_t;
  static constexpr type magnitude = 0x7fffffffu;
};
template <>
struct Bits<double> {
  using type = uint64_t;
  static constexpr type magnitude = 0x7fffffffffffffffull;
};

template <typename acc_t>
inline typename Bits<acc_t>::type magnitude_bits(acc_t x) {
  return __builtin_bit_cast(typename Bits<acc_t>::type, x) & Bits<acc_t>::magnitude;
}

template <typename acc_t>
inline acc_t from_bits(typename Bits<acc_t>::type b) {
  return __builtin_bit_cast(acc_t, b);
}

// Round to nearest, ties to even (the default rounding mode, as torch.round), straight to int:
// GCC turns __builtin_irint into one vector convert; other compilers get the portable spelling.
#if defined(__GNUC__) && !defined(__clang__)
inline int32_t round_to_int(float x) { return __builtin_irintf(x); }
inline int32_t round_to_int(double x) { return __builtin_irint(x); }
#else
inline int32_t round_to_int(float x) { return static_cast<int32_t>(std::nearbyint(x)); }
inline int32_t round_to_int(double x) { return static_cast<int32_t>(std::nearbyint(x)); }
#endif

// quant.py's code maps, with the constants folded into one factor per block:
//   signed:   c = sign(x) * round(sqrt(|x| * (127^2 / a)))      = round(127 * sqrt(|x| / a))
//   unsigned: c = round(sqrt(sqrt(x) * (255^2 / sqrt(a))))       = round(255 * (x / a)^(1/4))
// The unsigned encoder takes sqrt(x): the update computed it already. 127^2 / a overflows for
// a < ~5e-35; such blocks are encoded from x * 2^64 and a * 2^64 instead (exact: a power of two),
// see signed_prescale().
template <typename acc_t>
inline int8_t encode_signed(acc_t x, acc_t factor) {
  return static_cast<int8_t>(round_to_int(std::copysign(std::sqrt(std::abs(x) * factor), x)));
}

template <typename acc_t>
inline uint8_t encode_unsigned(acc_t root, acc_t factor) {
  return static_cast<uint8_t>(round_to_int(std::sqrt(root * factor)));
}

constexpr double kTinyAbsmax = 0x1p-64, kPrescale = 0x1p64;

template <typename acc_t>
inline acc_t signed_prescale(acc_t absmax) {
  return absmax < acc_t(kTinyAbsmax) ? acc_t(kPrescale) : acc_t(1);
}

inline float stored_scale(double a) {
  return std::isfinite(a) ? static_cast<float>(a) : std::numeric_limits<float>::quiet_NaN();
}

// ---- Vector encoders for whole float blocks (AVX-512: 16 lanes, AVX2 + FMA: 8 lanes). The square
// root comes from the reciprocal-root estimate r ~ 1/sqrt(y) refined by one Newton step,
// s = y*r, s' = s * (1.5 - 0.5*s*r), relative error 1.5*e^2 for an estimate off by e (2^-14 or
// 1.5*2^-12): a few ulp, so a code can differ from the exact map only at a rounding tie. Inputs
// below 0.25 give code 0 either way; they are masked to 0 because the estimate of a denormal or
// zero is infinite.
#if defined(__AVX512F__)
#define SHARDWISE_VECTOR_ENCODE 1
struct Lanes {
  using F = __m512;
  using I = __m512i;
  static constexpr int64_t kWidth = 16;
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F half_step(F h) { return _mm512_fnmadd_ps(set1(0.5f), h, set1(1.5f)); }  // 1.5 - 0.5h
  static F rsqrt_estimate(F y) { return _mm512_rsqrt14_ps(y); }
  static F where_above(F y, float floor, F r) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(y, set1(floor), _CMP_GT_OQ), r);
  }
  static I bits(F x) { return _mm512_castps_si512(x); }
  static F abs(F x) { return _mm512_castsi512_ps(_mm512_and_si512(bits(x), _mm512_set1_epi32(0x7fffffff))); }
  static F with_sign_of(F mag, F x) {
    return _mm512_castsi512_ps(_mm512_or_si512(bits(mag), _mm512_and_si512(bits(x), _mm512_set1_epi32(INT32_MIN))));
  }
  static I round(F x) { return _mm512_cvtps_epi32(x); }  // ties to even (MXCSR default)
  // Codes fit in 8 bits, so keeping the low byte is right for int8 and uint8 alike.
  static void store(int8_t* p, I c) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(c)); }
  static void store(uint8_t* p, I c) { store(reinterpret_cast<int8_t*>(p), c); }
};
#elif defined(__AVX2__) && defined(__FMA__)
#define SHARDWISE_VECTOR_ENCODE 1
struct Lanes {
  using F = __m256;
  using I = __m256i;
  static constexpr int64_t kWidth = 8;
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F half_step(F h) { return _mm256_fnmadd_ps(set1(0.5f), h, set1(1.5f)); }
  static F rsqrt_estimate(F y) { return _mm256_rsqrt_ps(y); }
  static F where_above(F y, float floor, F r) { return _mm256_and_ps(_mm256_cmp_ps(y, set1(floor), _CMP_GT_OQ), r); }
  static F abs(F x) { return _mm256_andnot_ps(set1(-0.0f), x); }
  static F with_sign_of(F mag, F x) { return _mm256_or_ps(mag, _mm256_and_ps(set1(-0.0f), x)); }
  static I round(F x) { return _mm256_cvtps_epi32(x); }
  static __m128i words(I c) {
    return _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
  }
  static void store(int8_t* p, I c) {
    const __m128i w = words(c);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(w, w));
  }
  static void store(uint8_t* p, I c) {
    const __m128i w = words(c);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(w, w));
  }
};
#endif

#ifdef SHARDWISE_VECTOR_ENCODE
inline Lanes::F vector_sqrt(Lanes::F y) {
  const Lanes::F r = Lanes::rsqrt_estimate(y);
  const Lanes::F s = Lanes::mul(y, r);
  return Lanes::where_above(y, 0.25f, Lanes::mul(s, Lanes::half_step(Lanes::mul(s, r))));
}

inline void encode_signed_block(const float* x, int8_t* codes, float factor) {
  const Lanes::F f = Lanes::set1(factor);
  for (int64_t i = 0; i < kBlock; i += Lanes::kWidth) {
    const Lanes::F m = Lanes::load(x + i);
    const Lanes::F c = Lanes::with_sign_of(vector_sqrt(Lanes::mul(Lanes::abs(m), f)), m);
    Lanes::store(codes + i, Lanes::round(c));
  }
}

inline void encode_unsigned_block(const float* roots, uint8_t* codes, float factor) {
  const Lanes::F f = Lanes::set1(factor);
  for (int64_t i = 0; i < kBlock; i += Lanes::kWidth) {
    Lanes::store(codes + i, Lanes::round(vector_sqrt(Lanes::mul(Lanes::load(roots + i), f))));
  }
}
#endif

// Encode `len` values of a block (pass 2 of step_block). LEN: the block length if known at compile
// time (0 otherwise); whole float blocks use the vector encoders.
template <int64_t LEN, typename acc_t>
inline void encode_signed_into(const acc_t* x, int8_t* codes, int64_t len, acc_t absmax) {
  if (!(absmax > 0)) {  // all zero (or NaN: the caller zeroes the codes anyway)
    std::fill(codes, codes + len, int8_t(0));
    return;
  }
  const acc_t pre = signed_prescale(absmax);
  const acc_t factor = acc_t(kSignedMax * kSignedMax) / (absmax * pre);
  if (pre != acc_t(1)) {
    for (int64_t i = 0; i < len; ++i) codes[i] = encode_signed(x[i] * pre, factor);
    return;
  }
#ifdef SHARDWISE_VECTOR_ENCODE
  if constexpr (LEN == kBlock && std::is_same_v<acc_t, float>) {
    encode_signed_block(x, codes, factor);
    return;
  }
#endif
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) codes[i] = encode_signed(x[i], factor);
}

template <int64_t LEN, typename acc_t>
inline void encode_unsigned_into(const acc_t* roots, uint8_t* codes, int64_t len, acc_t absmax) {
  const acc_t factor = absmax > 0 ? acc_t(kUnsignedMax * kUnsignedMax) / std::sqrt(absmax) : acc_t(0);
#ifdef SHARDWISE_VECTOR_ENCODE
  if constexpr (LEN == kBlock && std::is_same_v<acc_t, float>) {
    encode_unsigned_block(roots, codes, factor);
    return;
  }
#endif
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) codes[i] = encode_unsigned(roots[i], factor);
}

// Raw pointers of one tensor of an 8-bit bucket (Tensor::data_ptr() is not free, blocks are small).
template <typename scalar_t>
struct Tensor8bit {
  scalar_t* p;
  const scalar_t* g;
  int8_t* m;
  uint8_t* v;
  uint8_t* u;  // AMSGrad maximum, or nullptr
  float* m_absmax;
  float* v_absmax;
  float* u_absmax;
  int64_t row_len, blocks_per_row;
};

// Store a block's new absmax and encode it; a non-finite block stores NaN and zero codes.
template <int64_t LEN, typename acc_t, typename code_t>
inline void finish_block(const acc_t* values, code_t* codes, float* scale, int64_t len, acc_t absmax) {
  *scale = stored_scale(absmax);
  if (!std::isfinite(absmax)) {
    std::fill(codes, codes + len, code_t(0));
  } else if constexpr (std::is_same_v<code_t, int8_t>) {
    encode_signed_into<LEN>(values, codes, len, absmax);
  } else {
    encode_unsigned_into<LEN>(values, codes, len, absmax);
  }
}

// One block: decode, update, re-encode. LEN is the block length when known at compile time (every
// block of a tensor whose rows are whole blocks), 0 for a row's ragged last block (`len` then).
template <bool DECOUPLED, bool BELIEF, bool AMSGRAD, int64_t LEN, typename scalar_t>
inline void step_block(const Tensor8bit<scalar_t>& T, int64_t start, int64_t block, int64_t len,
                       const Scalars<acc_type_t<scalar_t>>& s) {
  using acc_t = acc_type_t<scalar_t>;
  using bits_t = typename Bits<acc_t>::type;
  if (LEN) len = LEN;
  scalar_t* p = T.p + start;
  const scalar_t* g = T.g + start;
  int8_t* mc = T.m + start;
  uint8_t* vc = T.v + start;
  uint8_t* uc = AMSGRAD ? T.u + start : nullptr;
  // Decode as quant.decode: normalize the code, then scale (no underflow for tiny blocks).
  const acc_t m_unit = acc_t(1) / acc_t(kSignedMax), v_unit = acc_t(1) / acc_t(kUnsignedMax);
  const acc_t ms = acc_t(T.m_absmax[block]), vs = acc_t(T.v_absmax[block]);
  const acc_t us = AMSGRAD ? acc_t(T.u_absmax[block]) : acc_t(0);
  // AMSGrad: sqrt(u) = max(sqrt(u_old), sqrt(v)) with sqrt(u_old) = q^2 * sqrt(us), so one square
  // root per element (sqrt(v)) serves the update and both second-moment encoders. And the new
  // absmax of u = max(u_old, v) is max(us, absmax of v): the encoder gives a block's largest element
  // code 255, which decodes to exactly us (us = 0 and NaN included), so no per-element max is needed.
  const acc_t root_us = AMSGRAD ? std::sqrt(us) : acc_t(0);

  acc_t mbuf[kBlock], rbuf[kBlock], ubuf[kBlock];
  bits_t m_max = 0, v_max = 0;
  // Pass 1: decode, update in registers, keep the new moments (second moments as square roots).
#pragma omp simd reduction(max : m_max, v_max)
  for (int64_t i = 0; i < len; ++i) {
    const acc_t qm = acc_t(mc[i]) * m_unit;
    const acc_t qv = acc_t(vc[i]) * v_unit, qv2 = qv * qv;
    acc_t pi = p[i], mi = qm * std::abs(qm) * ms, vi = qv2 * qv2 * vs;
    update_moments<DECOUPLED, BELIEF, acc_t>(pi, acc_t(g[i]), mi, vi, s);
    const acc_t root_v = std::sqrt(vi);
    if (AMSGRAD) {
      const acc_t qu = acc_t(uc[i]) * v_unit, root_old = qu * qu * root_us;
      const acc_t root_u = root_old > root_v ? root_old : root_v;
      apply_step(pi, mi, root_u, s);
      ubuf[i] = root_u;
    } else {
      apply_step(pi, mi, root_v, s);
    }
    p[i] = scalar_t(pi);
    mbuf[i] = mi;
    rbuf[i] = root_v;
    m_max = std::max(m_max, magnitude_bits(mi));
    v_max = std::max(v_max, magnitude_bits(vi));
  }
  // Pass 2: re-encode against the new absmax.
  finish_block<LEN>(mbuf, mc, T.m_absmax + block, len, from_bits<acc_t>(m_max));
  finish_block<LEN>(rbuf, vc, T.v_absmax + block, len, from_bits<acc_t>(v_max));
  if (AMSGRAD) {
    const acc_t u_abs = from_bits<acc_t>(std::max(magnitude_bits(us), v_max));
    finish_block<LEN>(ubuf, uc, T.u_absmax + block, len, u_abs);
  }
}

template <bool DECOUPLED, bool BELIEF, bool AMSGRAD, typename scalar_t>
void run_8bit(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
              const std::vector<at::Tensor>& m_codes, const std::vector<at::Tensor>& v_codes,
              const std::vector<at::Tensor>& u_codes, const std::vector<at::Tensor>& m_absmax,
              const std::vector<at::Tensor>& v_absmax, const std::vector<at::Tensor>& u_absmax,
              const Scalars<acc_type_t<scalar_t>>& scalars) {
  const size_t nt = params.size();
  std::vector<Tensor8bit<scalar_t>> tensors(nt);
  std::vector<int64_t> first_block(nt + 1, 0);
  for (size_t t = 0; t < nt; ++t) {
    const int64_t rows = params[t].size(0);
    const int64_t row_len = rows ? params[t].numel() / rows : 0;
    const int64_t blocks_per_row = (row_len + kBlock - 1) / kBlock;
    tensors[t] = {static_cast<scalar_t*>(params[t].data_ptr()),
                  static_cast<const scalar_t*>(grads[t].data_ptr()),
                  static_cast<int8_t*>(m_codes[t].data_ptr()),
                  static_cast<uint8_t*>(v_codes[t].data_ptr()),
                  AMSGRAD ? static_cast<uint8_t*>(u_codes[t].data_ptr()) : nullptr,
                  static_cast<float*>(m_absmax[t].data_ptr()),
                  static_cast<float*>(v_absmax[t].data_ptr()),
                  AMSGRAD ? static_cast<float*>(u_absmax[t].data_ptr()) : nullptr,
                  row_len,
                  blocks_per_row};
    first_block[t + 1] = first_block[t] + rows * blocks_per_row;
  }

  at::parallel_for(0, first_block[nt], 16, [&](int64_t b0, int64_t b1) {
    const Scalars<acc_type_t<scalar_t>> s = scalars;  // local copy: see the note at the top
    size_t t = std::upper_bound(first_block.begin(), first_block.end(), b0) - first_block.begin() - 1;
    for (int64_t b = b0; b < b1; ++b) {
      while (b >= first_block[t + 1]) ++t;
      const Tensor8bit<scalar_t>& T = tensors[t];
      const int64_t block = b - first_block[t];
      if (T.row_len % kBlock == 0) {  // rows are whole blocks: block k starts at k * 256
        step_block<DECOUPLED, BELIEF, AMSGRAD, kBlock>(T, block * kBlock, block, kBlock, s);
      } else {
        const int64_t row = block / T.blocks_per_row, col = block % T.blocks_per_row;
        const int64_t len = std::min(kBlock, T.row_len - col * kBlock);
        step_block<DECOUPLED, BELIEF, AMSGRAD, 0>(T, row * T.row_len + col * kBlock, block, len, s);
      }
    }
  });
}

// ------------------------------------------------------------------------------- dispatch
void check_bucket(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads) {
  TORCH_CHECK(params.size() == grads.size(), "shardwise fused: params and grads differ in length");
  for (size_t t = 0; t < params.size(); ++t) {
    TORCH_CHECK(params[t].device().is_cpu(), "shardwise fused CPU kernel got a non-CPU tensor");
    TORCH_CHECK(params[t].is_contiguous() && grads[t].is_contiguous(),
                "shardwise fused kernel needs contiguous params and grads");
    TORCH_CHECK(grads[t].scalar_type() == params[t].scalar_type(),
                "shardwise fused kernel needs grads in the parameter dtype");
  }
}

#define SHARDWISE_DISPATCH_FLAGS(FN, SCALAR, ...)                          \
  do {                                                                     \
    if (decoupled) {                                                       \
      if (belief) {                                                        \
        if (amsgrad) FN<true, true, true, SCALAR>(__VA_ARGS__);            \
        else FN<true, true, false, SCALAR>(__VA_ARGS__);                   \
      } else {                                                             \
        if (amsgrad) FN<true, false, true, SCALAR>(__VA_ARGS__);           \
        else FN<true, false, false, SCALAR>(__VA_ARGS__);                  \
      }                                                                    \
    } else {                                                               \
      if (belief) {                                                        \
        if (amsgrad) FN<false, true, true, SCALAR>(__VA_ARGS__);           \
        else FN<false, true, false, SCALAR>(__VA_ARGS__);                  \
      } else {                                                             \
        if (amsgrad) FN<false, false, true, SCALAR>(__VA_ARGS__);          \
        else FN<false, false, false, SCALAR>(__VA_ARGS__);                 \
      }                                                                    \
    }                                                                      \
  } while (0)

void adam_fused_(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> exp_avgs,
                 std::vector<at::Tensor> exp_avg_sqs, std::vector<at::Tensor> max_exp_avg_sqs, bool decoupled,
                 bool belief, bool amsgrad, double grad_factor, double beta1, double beta2, double weight_decay,
                 double decay_factor, double eps, double step_size, double denom_scale, double denom_eps) {
  if (params.empty()) return;
  check_bucket(params, grads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "adam_fused_", [&] {
    const auto s = make_scalars<acc_type_t<scalar_t>>(beta1, beta2, weight_decay, decay_factor, eps, step_size,
                                                      denom_scale, denom_eps, grad_factor);
    SHARDWISE_DISPATCH_FLAGS(run_full, scalar_t, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, s);
  });
}

void adam_fused_8bit_(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                      std::vector<at::Tensor> m_codes, std::vector<at::Tensor> v_codes,
                      std::vector<at::Tensor> u_codes, std::vector<at::Tensor> m_absmax,
                      std::vector<at::Tensor> v_absmax, std::vector<at::Tensor> u_absmax, bool decoupled,
                      bool belief, bool amsgrad, double grad_factor, double beta1, double beta2, double weight_decay,
                      double decay_factor, double eps, double step_size, double denom_scale, double denom_eps) {
  if (params.empty()) return;
  check_bucket(params, grads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "adam_fused_8bit_", [&] {
    const auto s = make_scalars<acc_type_t<scalar_t>>(beta1, beta2, weight_decay, decay_factor, eps, step_size,
                                                      denom_scale, denom_eps, grad_factor);
    SHARDWISE_DISPATCH_FLAGS(run_8bit, scalar_t, params, grads, m_codes, v_codes, u_codes, m_absmax, v_absmax,
                             u_absmax, s);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("adam_fused_", &adam_fused_, "Adam-family step, full-precision state (in place)");
  m.def("adam_fused_8bit_", &adam_fused_8bit_, "Adam-family step, blockwise 8-bit state (in place)");
}
