// Fused CPU kernel for the Adam family (shardwise.optim.rule), one call per bucket.
//
// The per-element maths is `update()` below: a line-for-line transcription of the rule in rule.py,
// computed in float (double for double parameters) whatever the storage dtype. Two drivers walk the
// bucket:
//   * adam_fused_       full-precision state (same dtype as the parameter, as torch.optim keeps it);
//                       work is split into ~64K-element chunks across all tensors of the bucket.
//   * adam_fused_8bit_  blockwise 8-bit state (quant.py's layout and code maps). Work is split by
//                       blocks of 256 elements within rows; each block is decoded, updated and
//                       re-encoded in one pass: codes and parameters are read and written once, the
//                       new moments stay in a 1 KiB stack buffer until the block's absmax is known.
//                       Second moments are kept there as square roots: the update computed them
//                       already, and the fourth-root code map needs only one more square root.
// Threads come from ATen (at::parallel_for), so torch.set_num_threads applies.

#include <torch/extension.h>
#include <ATen/Parallel.h>

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
  acc_t beta1, beta2, one_minus_beta1, one_minus_beta2, weight_decay, decay_factor, eps, step_size,
      denom_scale, denom_eps, grad_sign;
};

// One element of the rule. DECOUPLED: AdamW-style decay, BELIEF: AdaBelief second moment,
// AMSGRAD: use the running max of the second moment. Returns sqrt of the second moment used, which
// the 8-bit encoder reuses.
template <bool DECOUPLED, bool BELIEF, bool AMSGRAD, typename acc_t>
inline acc_t update(acc_t& p, acc_t g, acc_t& m, acc_t& v, acc_t& u, const Scalars<acc_t>& s) {
  g *= s.grad_sign;
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
  acc_t second = v;
  if (AMSGRAD) {
    u = u > v ? u : v;
    second = u;
  }
  const acc_t root = std::sqrt(second);
  p -= s.step_size * m / (root * s.denom_scale + s.denom_eps);
  return root;
}

template <typename acc_t>
Scalars<acc_t> make_scalars(double beta1, double beta2, double weight_decay, double decay_factor, double eps,
                            double step_size, double denom_scale, double denom_eps, bool maximize) {
  return Scalars<acc_t>{acc_t(beta1),        acc_t(beta2),     acc_t(1.0 - beta1), acc_t(1.0 - beta2),
                        acc_t(weight_decay), acc_t(decay_factor), acc_t(eps),     acc_t(step_size),
                        acc_t(denom_scale),  acc_t(denom_eps), acc_t(maximize ? -1.0 : 1.0)};
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
        acc_t pi = p[i], mi = m[i], vi = v[i], ui = AMSGRAD ? acc_t(um[i]) : acc_t(0);
        update<DECOUPLED, BELIEF, AMSGRAD, acc_t>(pi, acc_t(g[i]), mi, vi, ui, s);
        p[i] = scalar_t(pi);
        m[i] = scalar_t(mi);
        v[i] = scalar_t(vi);
        if (AMSGRAD) um[i] = scalar_t(ui);
      }
    }
  });
}

// ------------------------------------------------------------------------------- 8-bit state
template <typename acc_t>
inline int8_t encode_signed(acc_t x, acc_t inv) {
  const acc_t c = std::nearbyint(std::sqrt(std::abs(x) * inv) * acc_t(kSignedMax));
  return static_cast<int8_t>(x < 0 ? -c : c);
}

// Takes sqrt(x) (already computed for the update's denominator) and 1 / sqrt(absmax).
template <typename acc_t>
inline uint8_t encode_unsigned(acc_t root, acc_t inv_root_absmax) {
  return static_cast<uint8_t>(std::nearbyint(std::sqrt(root * inv_root_absmax) * acc_t(kUnsignedMax)));
}

// Absmax with NaN propagation: a non-finite block must not look valid after encoding.
template <typename acc_t>
inline acc_t absmax_step(acc_t a, acc_t x) {
  const acc_t ax = std::abs(x);
  return (ax > a || ax != ax) ? ax : a;
}

template <typename acc_t>
inline acc_t inverse_or_zero(acc_t a) {
  return (std::isfinite(a) && a > 0) ? acc_t(1) / a : acc_t(0);
}

template <typename acc_t>
inline acc_t inverse_root_or_zero(acc_t a) {
  return (std::isfinite(a) && a > 0) ? acc_t(1) / std::sqrt(a) : acc_t(0);
}

inline float stored_scale(double a) {
  return std::isfinite(a) ? static_cast<float>(a) : std::numeric_limits<float>::quiet_NaN();
}

template <bool DECOUPLED, bool BELIEF, bool AMSGRAD, typename scalar_t>
void run_8bit(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
              const std::vector<at::Tensor>& m_codes, const std::vector<at::Tensor>& v_codes,
              const std::vector<at::Tensor>& u_codes, const std::vector<at::Tensor>& m_absmax,
              const std::vector<at::Tensor>& v_absmax, const std::vector<at::Tensor>& u_absmax,
              const Scalars<acc_type_t<scalar_t>>& scalars) {
  using acc_t = acc_type_t<scalar_t>;
  const size_t nt = params.size();
  std::vector<int64_t> first_block(nt + 1, 0), row_len(nt), blocks_per_row(nt);
  for (size_t t = 0; t < nt; ++t) {
    const int64_t rows = params[t].size(0);
    row_len[t] = rows ? params[t].numel() / rows : 0;
    blocks_per_row[t] = (row_len[t] + kBlock - 1) / kBlock;
    first_block[t + 1] = first_block[t] + rows * blocks_per_row[t];
  }

  // Raw pointers up front: Tensor::data_ptr() is not free, and blocks are only 256 elements.
  std::vector<scalar_t*> P(nt);
  std::vector<const scalar_t*> G(nt);
  std::vector<int8_t*> MC(nt);
  std::vector<uint8_t*> VC(nt), UC(nt, nullptr);
  std::vector<float*> MA(nt), VA(nt), UA(nt, nullptr);
  for (size_t t = 0; t < nt; ++t) {
    P[t] = static_cast<scalar_t*>(params[t].data_ptr());
    G[t] = static_cast<const scalar_t*>(grads[t].data_ptr());
    MC[t] = static_cast<int8_t*>(m_codes[t].data_ptr());
    VC[t] = static_cast<uint8_t*>(v_codes[t].data_ptr());
    MA[t] = static_cast<float*>(m_absmax[t].data_ptr());
    VA[t] = static_cast<float*>(v_absmax[t].data_ptr());
    if (AMSGRAD) {
      UC[t] = static_cast<uint8_t*>(u_codes[t].data_ptr());
      UA[t] = static_cast<float*>(u_absmax[t].data_ptr());
    }
  }

  at::parallel_for(0, first_block[nt], 16, [&](int64_t b0, int64_t b1) {
    // A local copy: stores through the parameter pointer could alias a referenced struct, which
    // would keep the compiler from vectorizing the element loops.
    const Scalars<acc_t> s = scalars;
    // Same arithmetic as quant.decode: normalize the code, then scale (no underflow for tiny
    // blocks). Local too, for the same reason.
    const acc_t m_unit = acc_t(1.0 / kSignedMax), v_unit = acc_t(1.0 / kUnsignedMax);
    acc_t mbuf[kBlock], vbuf[kBlock], ubuf[kBlock];
    size_t t = std::upper_bound(first_block.begin(), first_block.end(), b0) - first_block.begin() - 1;
    for (int64_t b = b0; b < b1; ++b) {
      while (b >= first_block[t + 1]) ++t;
      const int64_t local = b - first_block[t];
      const int64_t row = local / blocks_per_row[t], col = local % blocks_per_row[t];
      const int64_t start = row * row_len[t] + col * kBlock;
      const int64_t len = std::min(kBlock, row_len[t] - col * kBlock);

      scalar_t* p = P[t] + start;
      const scalar_t* g = G[t] + start;
      int8_t* mc = MC[t] + start;
      uint8_t* vc = VC[t] + start;
      uint8_t* uc = AMSGRAD ? UC[t] + start : nullptr;
      float* ma = MA[t] + local;
      float* va = VA[t] + local;
      float* ua = AMSGRAD ? UA[t] + local : nullptr;

      const acc_t ms = acc_t(*ma), vs = acc_t(*va);
      const acc_t us = AMSGRAD ? acc_t(*ua) : acc_t(0);
      acc_t m_max = 0, v_max = 0, u_max = 0;
      // Pass 1: decode, update in registers, remember the new moments and their absmax.
#pragma omp simd reduction(max : m_max, v_max, u_max)
      for (int64_t i = 0; i < len; ++i) {
        const acc_t qm = acc_t(mc[i]) * m_unit;
        const acc_t qv = acc_t(vc[i]) * v_unit, qv2 = qv * qv;
        acc_t pi = p[i], mi = qm * std::abs(qm) * ms, vi = qv2 * qv2 * vs, ui = 0;
        if (AMSGRAD) {
          const acc_t qu = acc_t(uc[i]) * v_unit, qu2 = qu * qu;
          ui = qu2 * qu2 * us;
        }
        const acc_t root = update<DECOUPLED, BELIEF, AMSGRAD, acc_t>(pi, acc_t(g[i]), mi, vi, ui, s);
        p[i] = scalar_t(pi);
        mbuf[i] = mi;
        vbuf[i] = AMSGRAD ? std::sqrt(vi) : root;  // second moments are encoded from their roots
        m_max = absmax_step(m_max, mi);
        v_max = absmax_step(v_max, vi);
        if (AMSGRAD) {
          ubuf[i] = root;
          u_max = absmax_step(u_max, ui);
        }
      }
      // Pass 2: re-encode the block against its new absmax.
      const acc_t m_inv = inverse_or_zero(m_max), v_inv = inverse_root_or_zero(v_max);
      const acc_t u_inv = AMSGRAD ? inverse_root_or_zero(u_max) : acc_t(0);
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        mc[i] = encode_signed(mbuf[i], m_inv);
        vc[i] = encode_unsigned(vbuf[i], v_inv);
        if (AMSGRAD) uc[i] = encode_unsigned(ubuf[i], u_inv);
      }
      *ma = stored_scale(m_max);
      *va = stored_scale(v_max);
      if (!std::isfinite(m_max)) std::fill(mc, mc + len, int8_t(0));
      if (!std::isfinite(v_max)) std::fill(vc, vc + len, uint8_t(0));
      if (AMSGRAD) {
        *ua = stored_scale(u_max);
        if (!std::isfinite(u_max)) std::fill(uc, uc + len, uint8_t(0));
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
                 bool belief, bool amsgrad, bool maximize, double beta1, double beta2, double weight_decay,
                 double decay_factor, double eps, double step_size, double denom_scale, double denom_eps) {
  if (params.empty()) return;
  check_bucket(params, grads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "adam_fused_", [&] {
    const auto s = make_scalars<acc_type_t<scalar_t>>(beta1, beta2, weight_decay, decay_factor, eps, step_size,
                                                      denom_scale, denom_eps, maximize);
    SHARDWISE_DISPATCH_FLAGS(run_full, scalar_t, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, s);
  });
}

void adam_fused_8bit_(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                      std::vector<at::Tensor> m_codes, std::vector<at::Tensor> v_codes,
                      std::vector<at::Tensor> u_codes, std::vector<at::Tensor> m_absmax,
                      std::vector<at::Tensor> v_absmax, std::vector<at::Tensor> u_absmax, bool decoupled,
                      bool belief, bool amsgrad, bool maximize, double beta1, double beta2, double weight_decay,
                      double decay_factor, double eps, double step_size, double denom_scale, double denom_eps) {
  if (params.empty()) return;
  check_bucket(params, grads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "adam_fused_8bit_", [&] {
    const auto s = make_scalars<acc_type_t<scalar_t>>(beta1, beta2, weight_decay, decay_factor, eps, step_size,
                                                      denom_scale, denom_eps, maximize);
    SHARDWISE_DISPATCH_FLAGS(run_8bit, scalar_t, params, grads, m_codes, v_codes, u_codes, m_absmax, v_absmax,
                             u_absmax, s);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("adam_fused_", &adam_fused_, "Adam-family step, full-precision state (in place)");
  m.def("adam_fused_8bit_", &adam_fused_8bit_, "Adam-family step, blockwise 8-bit state (in place)");
}
