// CPU implementation of the capo policy-loss ops.
//
// Each row (token) of the logits is processed by one thread in vectorised sweeps over the vocabulary
// (ATen's at::vec::Vectorized, compiled for AVX2 on x86-64: see setup.py):
//   forward:  row maximum, then the softmax statistics (sum of exp and the shifted first moment, which
//             give log-sum-exp and entropy), then the per-token PPO terms;
//   backward: one sweep that writes d(loss)/d(logits) from the saved log-sum-exp and entropy.
// A row is re-read from cache within a sweep, so the default path moves two reads and one write of
// the logits through memory, the in-place path (gradient written over the logits in forward) one of
// each. The math mirrors kernels/policy_loss.py (Triton) and capo_fast.kernels.reference.

#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>

namespace capo {
namespace {

using fVec = at::vec::Vectorized<float>;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLogRatioClamp = 20.0f;  // keeps exp(logp - old) finite, as the Python paths do
constexpr int64_t kStep = 2 * fVec::size();  // elements per loop iteration: two float vectors

// Two float vectors from kStep elements of any floating type (bf16/fp16 are widened exactly).
template <typename scalar_t>
inline void load2(const scalar_t* p, fVec& a, fVec& b) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    a = fVec::loadu(p);
    b = fVec::loadu(p + fVec::size());
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    a = fVec(0.0f);  // double logits take the scalar path (kStep is never used for them)
    b = a;
  } else {
    at::vec::load_to_float<scalar_t>(p, a, b);
  }
}

template <typename scalar_t>
inline void store2(scalar_t* p, const fVec& a, const fVec& b) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    a.store(p);
    b.store(p + fVec::size());
  } else if constexpr (!std::is_same_v<scalar_t, double>) {
    at::vec::convert_from_float<scalar_t>(a, b).store(p);
  }
}

// Double logits are a test convenience, not a fast path: no vector sweep for them.
template <typename scalar_t>
constexpr int64_t vector_end(int64_t V) {
  return std::is_same_v<scalar_t, double> ? 0 : V - V % kStep;
}

struct RowStats {
  float lse;      // log-sum-exp of the scaled logits
  float entropy;  // entropy of softmax(scaled logits)
  float max;      // the row's largest raw logit (-inf for a row of -inf)
  float log_s;    // log sum exp((z - max) / T), so that log p_j = (z_j - max) / T - log_s
};

// Every scaled logit is formed as (z - max) * inv_t: z - max is exact wherever exp of it matters, so no
// rounding residue of z * inv_t (about |z| * 6e-8, nats for logits of 1e8) reaches the exponent.
template <typename scalar_t>
RowStats row_stats(const scalar_t* z, int64_t V, float inv_t) {
  const int64_t vend = vector_end<scalar_t>(V);
  fVec m0(kNegInf), m1(kNegInf);
  for (int64_t j = 0; j < vend; j += kStep) {
    fVec a, b;
    load2(z + j, a, b);
    m0 = at::vec::maximum(m0, a);
    m1 = at::vec::maximum(m1, b);
  }
  float m = at::vec::vec_reduce_all<float>([](fVec x, fVec y) { return at::vec::maximum(x, y); },
                                           at::vec::maximum(m0, m1));
  for (int64_t j = vend; j < V; ++j) m = std::max(m, static_cast<float>(z[j]));
  if (m == kNegInf) return {kNegInf, 0.0f, kNegInf, 0.0f};  // every logit is -inf: an empty distribution

  // s = sum exp(u), t = sum exp(u) * u with u = (z - m) / T <= 0. Shifting by m keeps t small, so
  // entropy = log s - t / s does not cancel for large logits. exp_u20 maps u < log(FLT_MIN) (-inf
  // included) to 0; u is clamped from below so exp(u) * u is 0, not NaN, there. Vector partial sums
  // are flushed to double every kFlush elements, so the rounding error does not grow with V.
  constexpr int64_t kFlush = 4096;
  const fVec vinv_t(inv_t), vm(m), vfloor(-1e4f), vzero(0.0f);
  double s_total = 0.0, t_total = 0.0;
  for (int64_t b0 = 0; b0 < vend; b0 += kFlush) {
    const int64_t b1 = std::min(vend, b0 + kFlush);
    fVec s(0.0f), t(0.0f);
    for (int64_t j = b0; j < b1; j += kStep) {
      fVec a, b;
      load2(z + j, a, b);
      const fVec ua = at::vec::maximum((a - vm) * vinv_t, vfloor);
      const fVec ub = at::vec::maximum((b - vm) * vinv_t, vfloor);
      const fVec ea = ua.exp_u20(), eb = ub.exp_u20();
      s = s + ea + eb;
      t = at::vec::fmadd(ea, ua, at::vec::fmadd(eb, ub, t));
    }
    s_total += at::vec::vec_reduce_all<float>(std::plus<fVec>(), s);
    t_total += at::vec::vec_reduce_all<float>(std::plus<fVec>(), t);
  }
  for (int64_t j = vend; j < V; ++j) {
    const float u = (static_cast<float>(z[j]) - m) * inv_t;
    if (u == kNegInf) continue;
    const float e = std::exp(u);
    s_total += e;
    t_total += static_cast<double>(e) * u;
  }
  const double log_s = std::log(s_total);
  return {static_cast<float>(static_cast<double>(m) * inv_t + log_s), static_cast<float>(log_s - t_total / s_total),
          m, static_cast<float>(log_s)};
}

// log p_j = (z_j - pivot) / T - offset: (max, log_s) when the row was just swept (exact for any logits),
// (0, lse) from a saved log-sum-exp. Clamped to <= 0, so extreme logits cannot make p_j exceed 1.
struct GradStats {
  float pivot;
  float offset;
  float entropy;
  bool empty;  // a row of -inf logits: no distribution, no gradient
};

inline GradStats from_sweep(const RowStats& st) { return {st.max, st.log_s, st.entropy, st.lse == kNegInf}; }
inline GradStats from_lse(float lse, float entropy) { return {0.0f, lse, entropy, lse == kNegInf}; }

// Writes d/dz of (g_lp * logp_label + g_h * H) for one row:
//   g_j = (g_lp * ([j == label] - p_j) - g_h * p_j * (log p_j + H)) / T.
// Each entry is computed in fp32, the label's term included, and rounded to scalar_t once.
template <typename scalar_t>
void row_grad(scalar_t* out, const scalar_t* z, int64_t V, int64_t label, float inv_t, GradStats st, float g_lp,
              float g_h) {
  if (st.empty) {
    std::fill(out, out + V, static_cast<scalar_t>(0.0f));
    return;
  }
  const int64_t vend = vector_end<scalar_t>(V);
  const float a = g_lp * inv_t;
  const float b = g_h * inv_t;
  const fVec vinv_t(inv_t), vpivot(st.pivot), voffset(st.offset), vneg_a(-a), vneg_b(-b), vent(st.entropy);
  const fVec vfloor(-1e4f), vzero(0.0f);
  // p * (-a - b * (logp + H)); logp is clamped like u above so -inf logits give exactly 0.
  auto grad = [&](fVec x) {
    // clamp: two instructions (vec256_float.h:598), where minimum/maximum add NaN handling to each
    const fVec logp = at::vec::clamp(at::vec::fmsub(x - vpivot, vinv_t, voffset), vfloor, vzero);
    return logp.exp_u20() * at::vec::fmadd(vneg_b, logp + vent, vneg_a);
  };
  auto sweep = [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; j += kStep) {
      fVec x0, x1;
      load2(z + j, x0, x1);
      store2(out + j, grad(x0), grad(x1));
    }
  };
  // The block holding the label is done apart, so the hot loops carry no test for it.
  const int64_t label_block = label >= 0 && label < vend ? label - label % kStep : vend;
  sweep(0, label_block);
  if (label_block < vend) {  // the label's [j == label] term is added in fp32, before the one rounding
    fVec x0, x1;
    load2(z + label_block, x0, x1);
    float lanes[kStep];
    grad(x0).store(lanes);
    grad(x1).store(lanes + fVec::size());
    lanes[label - label_block] += a;
    store2(out + label_block, fVec::loadu(lanes), fVec::loadu(lanes + fVec::size()));
  }
  sweep(std::min(label_block + kStep, vend), vend);
  for (int64_t j = vend; j < V; ++j) {
    const float zj = static_cast<float>(z[j]);
    const float logp = std::min((zj - st.pivot) * inv_t - st.offset, 0.0f);
    const float g = zj == kNegInf ? 0.0f : std::exp(logp) * (-a - b * (logp + st.entropy));
    out[j] = static_cast<scalar_t>(j == label ? g + a : g);
  }
}

template <typename scalar_t>
inline float label_logprob(scalar_t z_label, float inv_t, const RowStats& st) {
  return (static_cast<float>(z_label) - st.max) * inv_t - st.log_s;
}

struct LossOptions {
  float inv_t;
  float eps_low;
  float eps_high;
  float dual_clip;  // <= 1 disables the dual clip
  float kl_coef;
  float entropy_coef;
};

struct TokenLoss {
  float loss;
  float dloss_dlogp;
  int8_t clip_code;
};

// Per-token PPO terms of one token with advantage `adv`.
inline TokenLoss token_loss(float logp, float entropy, float old_logp, float adv, const float* ref_logp,
                            const LossOptions& o) {
  const float raw_log_ratio = logp - old_logp;
  const float log_ratio = std::min(std::max(raw_log_ratio, -kLogRatioClamp), kLogRatioClamp);
  const float ratio = std::exp(log_ratio);
  const float pg_unclipped = -adv * ratio;
  const float pg_clipped = -adv * std::min(std::max(ratio, 1.0f - o.eps_low), 1.0f + o.eps_high);
  const bool clipped = pg_clipped > pg_unclipped;
  const bool ratio_live = raw_log_ratio == log_ratio;
  TokenLoss r{clipped ? pg_clipped : pg_unclipped, (clipped || !ratio_live) ? 0.0f : -adv * ratio,
              static_cast<int8_t>(clipped ? (adv < 0.0f ? 1 : 2) : 0)};
  if (o.dual_clip > 1.0f && adv < 0.0f && -adv * o.dual_clip < r.loss) {
    r = {-adv * o.dual_clip, 0.0f, 3};
  }
  if (ref_logp != nullptr) {  // k3 estimator of KL(pi || ref)
    const float d = *ref_logp - logp;
    const float ed = std::exp(d);
    r.loss += o.kl_coef * (ed - d - 1.0f);
    r.dloss_dlogp += o.kl_coef * (1.0f - ed);
  }
  r.loss -= o.entropy_coef * entropy;
  return r;
}

const float* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<float>() : nullptr;
}

// A row of one element (or no rows at all) is contiguous whatever its stride says.
bool rows_contiguous(const at::Tensor& t) { return t.size(0) == 0 || t.size(1) <= 1 || t.stride(1) == 1; }

// The checks of the fake kernels (kernels/policy_loss.py check_rows, check_per_token), with the same messages.
void check_inputs(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.dim() == 2, "capo: logits must be 2-D, got shape ", logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "capo: logits must be floating point, got ",
              logits.scalar_type());
  TORCH_CHECK(rows_contiguous(logits), "capo: logits rows must be contiguous (stride(1) == 1), got ",
              logits.strides());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), "capo: labels must have shape [",
              logits.size(0), "], got ", labels.sizes());
  TORCH_CHECK(labels.device() == logits.device(), "capo: labels is on ", labels.device(), ", the logits on ",
              logits.device());
  TORCH_CHECK(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false), "capo: labels must be integers, got ",
              labels.scalar_type());
}

// Per-token inputs as contiguous fp32 [N]; a wrong length would read past the end, so it is an error.
at::Tensor as_f32(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  const int64_t n = logits.size(0);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "capo: ", name, " must have shape [", n, "], got ", t.sizes());
  TORCH_CHECK(t.device() == logits.device(), "capo: ", name, " is on ", t.device(), ", the logits on ",
              logits.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "capo: ", name, " must be floating point, got ", t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

std::optional<at::Tensor> as_f32(const std::optional<at::Tensor>& t, const at::Tensor& logits, const char* name) {
  if (!t.has_value()) return std::nullopt;
  return as_f32(*t, logits, name);
}

// The per-token tensor arguments of the loss ops, in schema order (kLossArgs below; PolicyLossInputs in Python).
struct LossInputs {
  const at::Tensor& labels;
  const at::Tensor& old_logprobs;
  const at::Tensor& advantages;
  const at::Tensor& loss_weights;
  const std::optional<at::Tensor>& credit;
  const std::optional<at::Tensor>& group_penalty;
  const std::optional<at::Tensor>& ref_logprobs;
};

// `float[] options`: option k is field k of PolicyLossOptions (kernels/policy_loss.py OPTION_NAMES), one order
// for every op; tests/test_op_registration.py sets each option alone and checks its effect.
enum Option : size_t { kTemperature, kEpsLow, kEpsHigh, kDualClip, kKlCoef, kEntropyCoef, kNumOptions };

LossOptions make_options(at::ArrayRef<double> options) {
  TORCH_CHECK(options.size() == kNumOptions, "capo: options must hold ", static_cast<int64_t>(kNumOptions),
              " values (temperature, eps_low, eps_high, dual_clip, kl_coef, entropy_coef), got ", options.size());
  const double temperature = options[kTemperature];
  TORCH_CHECK(temperature > 0.0, "capo: temperature must be > 0, got ", temperature);
  return {static_cast<float>(1.0 / temperature), static_cast<float>(options[kEpsLow]),
          static_cast<float>(options[kEpsHigh]),  static_cast<float>(options[kDualClip]),
          static_cast<float>(options[kKlCoef]),   static_cast<float>(options[kEntropyCoef])};
}

struct LossOutputs {
  at::Tensor loss, logprobs, entropy, clip, lse, dloss_dlogp, dloss_dentropy;
};

// Shared by the functional op (no gradient sweep) and the in-place one (gradient over the logits).
LossOutputs policy_loss_impl(const at::Tensor& logits, const LossInputs& in, const LossOptions& opts, bool write_grad) {
  check_inputs(logits, in.labels);
  TORCH_CHECK(in.credit.has_value() == in.group_penalty.has_value(),
              "capo: credit and group_penalty must be given together");
  const int64_t N = logits.size(0);
  const int64_t V = logits.size(1);
  const auto labels = in.labels.to(at::kLong).contiguous();
  const auto old_lp = as_f32(in.old_logprobs, logits, "old_logprobs");
  const auto adv = as_f32(in.advantages, logits, "advantages");
  const auto weights = as_f32(in.loss_weights, logits, "loss_weights");
  const auto credit = as_f32(in.credit, logits, "credit");
  const auto group_penalty = as_f32(in.group_penalty, logits, "group_penalty");
  const auto ref = as_f32(in.ref_logprobs, logits, "ref_logprobs");
  const auto f32 = logits.options().dtype(at::kFloat);
  LossOutputs out{at::Tensor(),     at::empty({N}, f32), at::empty({N}, f32), at::empty({N}, f32.dtype(at::kChar)),
                  at::empty({N}, f32), at::empty({N}, f32), at::empty({N}, f32)};
  auto token_losses = at::empty({N}, f32);

  const int64_t* lab = labels.const_data_ptr<int64_t>();
  const float *old_p = old_lp.const_data_ptr<float>(), *adv_p = adv.const_data_ptr<float>();
  const float *cred_p = opt_ptr(credit), *gpen_p = opt_ptr(group_penalty), *ref_p = opt_ptr(ref);
  const float* w_p = weights.const_data_ptr<float>();
  float *tl_p = token_losses.data_ptr<float>(), *lp_p = out.logprobs.data_ptr<float>();
  float *ent_p = out.entropy.data_ptr<float>(), *lse_p = out.lse.data_ptr<float>();
  float *glp_p = out.dloss_dlogp.data_ptr<float>(), *gh_p = out.dloss_dentropy.data_ptr<float>();
  int8_t* clip_p = out.clip.data_ptr<int8_t>();
  const int64_t z_stride = logits.stride(0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "capo_policy_loss", [&] {
    // const_cast: the in-place op owns its logits (schema Tensor(a!)); the functional op never writes.
    scalar_t* z_base = const_cast<scalar_t*>(logits.const_data_ptr<scalar_t>());
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* z = z_base + i * z_stride;
        const bool valid = lab[i] >= 0 && lab[i] < V;  // out-of-range labels (ignore_index) are masked
        const RowStats st = row_stats(z, V, opts.inv_t);
        const float logp = valid ? label_logprob(z[lab[i]], opts.inv_t, st) : 0.0f;
        const float a = cred_p ? adv_p[i] - gpen_p[i] * cred_p[i] : adv_p[i];
        const TokenLoss t = token_loss(logp, st.entropy, old_p[i], a, ref_p ? ref_p + i : nullptr, opts);
        const float w = valid ? w_p[i] : 0.0f;
        const bool live = w != 0.0f;
        lp_p[i] = logp;
        ent_p[i] = st.entropy;
        lse_p[i] = st.lse;
        clip_p[i] = t.clip_code;
        tl_p[i] = live ? w * t.loss : 0.0f;
        glp_p[i] = live ? w * t.dloss_dlogp : 0.0f;
        gh_p[i] = live ? -w * opts.entropy_coef : 0.0f;
        if (write_grad) row_grad(z, z, V, valid ? lab[i] : -1, opts.inv_t, from_sweep(st), glp_p[i], gh_p[i]);
      }
    });
  });
  out.loss = token_losses.sum();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_cpu(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const at::Tensor& loss_weights, const std::optional<at::Tensor>& credit,
    const std::optional<at::Tensor>& group_penalty, const std::optional<at::Tensor>& ref_logprobs,
    at::ArrayRef<double> options) {
  const LossInputs in{labels, old_logprobs, advantages, loss_weights, credit, group_penalty, ref_logprobs};
  auto o = policy_loss_impl(logits, in, make_options(options), /*write_grad=*/false);
  return {o.loss, o.logprobs, o.entropy, o.clip, o.lse, o.dloss_dlogp, o.dloss_dentropy};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_inplace_cpu(
    at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logprobs, const at::Tensor& advantages,
    const at::Tensor& loss_weights, const std::optional<at::Tensor>& credit,
    const std::optional<at::Tensor>& group_penalty, const std::optional<at::Tensor>& ref_logprobs,
    at::ArrayRef<double> options) {
  const LossInputs in{labels, old_logprobs, advantages, loss_weights, credit, group_penalty, ref_logprobs};
  auto o = policy_loss_impl(logits, in, make_options(options), /*write_grad=*/true);
  return {o.loss, o.logprobs, o.entropy, o.clip};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_cpu(const at::Tensor& logits, const at::Tensor& labels_in,
                                                            double temperature) {
  check_inputs(logits, labels_in);
  TORCH_CHECK(temperature > 0.0, "capo: temperature must be > 0, got ", temperature);
  const int64_t N = logits.size(0);
  const int64_t V = logits.size(1);
  const float inv_t = static_cast<float>(1.0 / temperature);
  const auto labels = labels_in.to(at::kLong).contiguous();
  const auto f32 = logits.options().dtype(at::kFloat);
  auto logprobs = at::empty({N}, f32), entropy = at::empty({N}, f32), lse = at::empty({N}, f32);
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  float *lp_p = logprobs.data_ptr<float>(), *ent_p = entropy.data_ptr<float>(), *lse_p = lse.data_ptr<float>();
  const int64_t z_stride = logits.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "capo_logprobs", [&] {
    const scalar_t* z_base = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* z = z_base + i * z_stride;
        const RowStats st = row_stats(z, V, inv_t);
        const bool valid = lab[i] >= 0 && lab[i] < V;
        lp_p[i] = valid ? label_logprob(z[lab[i]], inv_t, st) : 0.0f;
        ent_p[i] = st.entropy;
        lse_p[i] = st.lse;
      }
    });
  });
  return {logprobs, entropy, lse};
}

// d/d logits of sum_t (grad_logprobs_t * logp_t + grad_entropy_t * H_t), written into `out`.
void logits_grad_impl(const at::Tensor& logits, const at::Tensor& labels_in, const at::Tensor& lse_in,
                      const at::Tensor& entropy_in, const at::Tensor& glp_in, const at::Tensor& gh_in,
                      double temperature, at::Tensor& out) {
  check_inputs(logits, labels_in);
  TORCH_CHECK(out.sizes() == logits.sizes() && rows_contiguous(out), "capo: gradient buffer must match logits");
  TORCH_CHECK(temperature > 0.0, "capo: temperature must be > 0, got ", temperature);
  const int64_t N = logits.size(0);
  const int64_t V = logits.size(1);
  const float inv_t = static_cast<float>(1.0 / temperature);
  const auto labels = labels_in.to(at::kLong).contiguous();
  const auto lse = as_f32(lse_in, logits, "lse"), entropy = as_f32(entropy_in, logits, "entropy");
  const auto glp = as_f32(glp_in, logits, "grad_logprobs"), gh = as_f32(gh_in, logits, "grad_entropy");
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  const float *lse_p = lse.const_data_ptr<float>(), *ent_p = entropy.const_data_ptr<float>();
  const float *glp_p = glp.const_data_ptr<float>(), *gh_p = gh.const_data_ptr<float>();
  const int64_t z_stride = logits.stride(0), g_stride = out.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "capo_logits_grad", [&] {
    const scalar_t* z_base = logits.const_data_ptr<scalar_t>();
    scalar_t* g_base = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const bool valid = lab[i] >= 0 && lab[i] < V;
        const float g_lp = valid ? glp_p[i] : 0.0f;
        row_grad(g_base + i * g_stride, z_base + i * z_stride, V, valid ? lab[i] : -1, inv_t,
                 from_lse(lse_p[i], ent_p[i]), g_lp, gh_p[i]);
      }
    });
  });
}

// A fresh gradient buffer is first touched by the gradient sweep. With 4 KiB pages that costs one page
// fault per 4 KiB (about 110 ms per 0.5 GB on a 2-core machine, twice the sweep itself); asking for
// transparent huge pages on the buffer's 2 MiB-aligned interior makes it 512 times fewer faults.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = 2u << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice only
#endif
}

at::Tensor logits_grad_cpu(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                           const at::Tensor& entropy, const at::Tensor& grad_logprobs,
                           const at::Tensor& grad_entropy, double temperature) {
  at::Tensor out = at::empty_like(logits, at::MemoryFormat::Contiguous);
  advise_huge_pages(out);
  logits_grad_impl(logits, labels, lse, entropy, grad_logprobs, grad_entropy, temperature, out);
  return out;
}

void logits_grad_inplace_cpu(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                             const at::Tensor& entropy, const at::Tensor& grad_logprobs,
                             const at::Tensor& grad_entropy, double temperature) {
  logits_grad_impl(logits, labels, lse, entropy, grad_logprobs, grad_entropy, temperature, logits);
}

// The per-token inputs (LossInputs) and the options (Option) of the loss, written once for both loss schemas.
const std::string kLossArgs =
    "Tensor labels, Tensor old_logprobs, Tensor advantages, Tensor loss_weights, Tensor? credit, "
    "Tensor? group_penalty, Tensor? ref_logprobs, float[] options";
const std::string kGradArgs =
    "Tensor labels, Tensor lse, Tensor entropy, Tensor grad_logprobs, Tensor grad_entropy, float temperature";

}  // namespace

TORCH_LIBRARY(capo, m) {
  m.def(("policy_loss(Tensor logits, " + kLossArgs +
         ") -> (Tensor loss, Tensor logprobs, Tensor entropy, Tensor clipped, Tensor lse, Tensor dloss_dlogp, "
         "Tensor dloss_dentropy)")
            .c_str());
  m.def(("policy_loss_(Tensor(a!) logits, " + kLossArgs +
         ") -> (Tensor loss, Tensor logprobs, Tensor entropy, Tensor clipped)")
            .c_str());
  m.def("logprobs(Tensor logits, Tensor labels, float temperature) -> (Tensor logprobs, Tensor entropy, Tensor lse)");
  m.def(("logits_grad(Tensor logits, " + kGradArgs + ") -> Tensor").c_str());
  m.def(("logits_grad_(Tensor(a!) logits, " + kGradArgs + ") -> ()").c_str());
}

TORCH_LIBRARY_IMPL(capo, CPU, m) {
  m.impl("policy_loss", &policy_loss_cpu);
  m.impl("policy_loss_", &policy_loss_inplace_cpu);
  m.impl("logprobs", &logprobs_cpu);
  m.impl("logits_grad", &logits_grad_cpu);
  m.impl("logits_grad_", &logits_grad_inplace_cpu);
}

}  // namespace capo

// The extension is a Python module only so that `import capo_fast._C` loads the op library.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
