// CPU implementation of the capo policy-loss ops.
//
// Each row (token) of the logits is processed by one thread: a pass for the row maximum, a pass for
// the softmax statistics (sum of exp and the shifted first moment, which give log-sum-exp and
// entropy), then the per-token PPO terms, and, when a gradient is asked for, one more pass that
// writes d(loss)/d(logits) either into a new buffer or over the logits themselves.
// The math mirrors kernels/policy_loss.py (Triton) and capo_fast.kernels.reference.

#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

namespace capo {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLogRatioClamp = 20.0f;  // keeps exp(logp - old) finite, as the Python paths do

// exp(x) for x in float, written so the compiler vectorises loops that call it (std::exp does not
// vectorise without -ffast-math). Cody-Waite range reduction and the Cephes expf polynomial;
// relative error about 2 ulp. Callers handle x = -inf themselves.
inline float vec_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

struct RowStats {
  float lse;      // log-sum-exp of the scaled logits
  float entropy;  // entropy of softmax(scaled logits)
};

template <typename scalar_t>
RowStats row_stats(const scalar_t* z, int64_t V, float inv_t) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < V; ++j) {
    m = std::max(m, static_cast<float>(z[j]) * inv_t);
  }
  if (m == kNegInf) {  // every logit is -inf: an empty distribution
    return {kNegInf, 0.0f};
  }
  // s = sum exp(z - m); t = sum exp(z - m) * (z - m). Shifting by m keeps t small, so
  // entropy = log s - t / s does not cancel catastrophically for large logits. Blocks are summed
  // in float (vectorised) and the block sums in double, so the error does not grow with V.
  constexpr int64_t kBlock = 1024;
  double s_total = 0.0;
  double t_total = 0.0;
  for (int64_t b = 0; b < V; b += kBlock) {
    const int64_t b_end = std::min(V, b + kBlock);
    float s = 0.0f;
    float t = 0.0f;
#pragma omp simd reduction(+ : s, t)
    for (int64_t j = b; j < b_end; ++j) {
      const float u = static_cast<float>(z[j]) * inv_t - m;
      const bool finite = u != kNegInf;
      const float e = finite ? vec_exp(u) : 0.0f;
      s += e;
      t += finite ? e * u : 0.0f;
    }
    s_total += s;
    t_total += t;
  }
  const float s = static_cast<float>(s_total);
  const float t = static_cast<float>(t_total);
  const float log_s = std::log(s);
  return {m + log_s, log_s - t / s};
}

// Writes g_label * onehot(label) - g_logp * p + g_ent * p * (log p + H), times 1/T, for one row.
template <typename scalar_t>
void row_grad(scalar_t* out, const scalar_t* z, int64_t V, int64_t label, float inv_t, RowStats st,
              float g_logp, float g_ent) {
  const float a = g_logp * inv_t;
  const float b = g_ent * inv_t;
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    const float zj = static_cast<float>(z[j]) * inv_t;
    const bool finite = zj != kNegInf;  // -inf logits (and rows of nothing else) get no gradient
    const float logp_j = zj - st.lse;
    const float p = finite ? vec_exp(logp_j) : 0.0f;
    const float g = finite ? p * (b * (logp_j + st.entropy) - a) : 0.0f;
    out[j] = static_cast<scalar_t>(g);
  }
  if (label >= 0) {
    out[label] = static_cast<scalar_t>(static_cast<float>(out[label]) + a);
  }
}

struct LossOptions {
  float inv_t;
  float eps_low;
  float eps_high;
  float dual_clip;  // <= 1 disables the dual clip
  float kl_coef;
  float entropy_coef;
};

// Per-token PPO terms; returns the token loss and writes d(token loss)/d(logp) and the clip code.
inline float token_loss(float logp, float entropy, float old_logp, float adv, const float* ref_logp,
                        const LossOptions& o, float* dloss_dlogp, int8_t* clip_code) {
  const float raw_log_ratio = logp - old_logp;
  const float log_ratio = std::min(std::max(raw_log_ratio, -kLogRatioClamp), kLogRatioClamp);
  const float ratio = std::exp(log_ratio);
  const float pg_unclipped = -adv * ratio;
  const float pg_clipped = -adv * std::min(std::max(ratio, 1.0f - o.eps_low), 1.0f + o.eps_high);
  const bool clipped = pg_clipped > pg_unclipped;
  const bool ratio_live = raw_log_ratio == log_ratio;
  float loss = clipped ? pg_clipped : pg_unclipped;
  float grad = (clipped || !ratio_live) ? 0.0f : -adv * ratio;
  int8_t code = clipped ? (adv < 0.0f ? 1 : 2) : 0;
  if (o.dual_clip > 1.0f && adv < 0.0f && -adv * o.dual_clip < loss) {
    loss = -adv * o.dual_clip;
    grad = 0.0f;
    code = 3;
  }
  if (ref_logp != nullptr) {  // k3 estimator of KL(pi || ref)
    const float d = *ref_logp - logp;
    const float ed = std::exp(d);
    loss += o.kl_coef * (ed - d - 1.0f);
    grad += o.kl_coef * (1.0f - ed);
  }
  loss -= o.entropy_coef * entropy;
  *dloss_dlogp = grad;
  *clip_code = code;
  return loss;
}

float* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

void check_inputs(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.dim() == 2, "capo: logits must be [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1, "capo: logits rows must be contiguous");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0),
              "capo: labels must be [N] with N = logits.size(0)");
}

// Per-token inputs as contiguous fp32 [N]; a wrong length would read past the end, so it is an error.
at::Tensor as_f32(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "capo: ", name, " must have shape [", n, "], got ", t.sizes());
  return t.to(at::kFloat).contiguous();
}

std::optional<at::Tensor> as_f32(const std::optional<at::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value()) return std::nullopt;
  return as_f32(*t, n, name);
}

// Shared by the functional op and the in-place one: grad_out may alias logits.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_impl(
    const at::Tensor& logits, const at::Tensor& labels_in, const at::Tensor& old_in,
    const at::Tensor& adv_in, const std::optional<at::Tensor>& credit_in,
    const std::optional<at::Tensor>& penalty_in, const std::optional<at::Tensor>& ref_in,
    const at::Tensor& weights_in, const LossOptions& opts, at::Tensor* grad_out) {
  check_inputs(logits, labels_in);
  TORCH_CHECK(credit_in.has_value() == penalty_in.has_value(),
              "capo: credit and penalty must be given together");
  const int64_t N = logits.size(0);
  const int64_t V = logits.size(1);
  const auto labels = labels_in.to(at::kLong).contiguous();
  const auto old_lp = as_f32(old_in, N, "old_logprobs");
  const auto adv = as_f32(adv_in, N, "advantages");
  const auto credit = as_f32(credit_in, N, "credit");
  const auto penalty = as_f32(penalty_in, N, "penalty");
  const auto ref = as_f32(ref_in, N, "ref_logprobs");
  const auto weights = as_f32(weights_in, N, "loss_weights");
  auto f32 = logits.options().dtype(at::kFloat);
  auto token_losses = at::empty({N}, f32);
  auto logprobs = at::empty({N}, f32);
  auto entropy = at::empty({N}, f32);
  auto clip = at::empty({N}, logits.options().dtype(at::kChar));

  const int64_t* lab = labels.data_ptr<int64_t>();
  const float *old_p = old_lp.data_ptr<float>(), *adv_p = adv.data_ptr<float>();
  const float *cred_p = opt_ptr(credit), *pen_p = opt_ptr(penalty), *ref_p = opt_ptr(ref);
  const float* w_p = weights.data_ptr<float>();
  float *tl_p = token_losses.data_ptr<float>(), *lp_p = logprobs.data_ptr<float>();
  float* ent_p = entropy.data_ptr<float>();
  int8_t* clip_p = clip.data_ptr<int8_t>();
  const int64_t z_stride = logits.stride(0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "capo_policy_loss", [&] {
    const scalar_t* z_base = logits.const_data_ptr<scalar_t>();
    scalar_t* g_base = grad_out ? grad_out->data_ptr<scalar_t>() : nullptr;
    const int64_t g_stride = grad_out ? grad_out->stride(0) : 0;
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* z = z_base + i * z_stride;
        const bool valid = lab[i] >= 0 && lab[i] < V;  // out-of-range labels (ignore_index) are masked
        const RowStats st = row_stats(z, V, opts.inv_t);
        const float logp = valid ? static_cast<float>(z[lab[i]]) * opts.inv_t - st.lse : 0.0f;
        const float a = cred_p ? adv_p[i] - pen_p[i] * cred_p[i] : adv_p[i];
        float dlogp = 0.0f;
        const float loss =
            token_loss(logp, st.entropy, old_p[i], a, ref_p ? ref_p + i : nullptr, opts, &dlogp, &clip_p[i]);
        const float w = valid ? w_p[i] : 0.0f;
        lp_p[i] = logp;
        ent_p[i] = st.entropy;
        tl_p[i] = w != 0.0f ? w * loss : 0.0f;
        if (g_base) {
          const float g_logp = w != 0.0f ? w * dlogp : 0.0f;
          const float g_ent = w != 0.0f ? w * opts.entropy_coef : 0.0f;
          row_grad(g_base + i * g_stride, z, V, valid ? lab[i] : -1, opts.inv_t, st, g_logp, g_ent);
        }
      }
    });
  });
  return {token_losses.sum(), logprobs, entropy, clip};
}

LossOptions make_options(double temperature, double eps_low, double eps_high, double dual_clip,
                         double kl_coef, double entropy_coef) {
  TORCH_CHECK(temperature > 0.0, "capo: temperature must be > 0, got ", temperature);
  return {static_cast<float>(1.0 / temperature), static_cast<float>(eps_low), static_cast<float>(eps_high),
          static_cast<float>(dual_clip), static_cast<float>(kl_coef), static_cast<float>(entropy_coef)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_cpu(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logprobs,
    const at::Tensor& advantages, const std::optional<at::Tensor>& credit,
    const std::optional<at::Tensor>& penalty, const std::optional<at::Tensor>& ref_logprobs,
    const at::Tensor& loss_weights, double temperature, double eps_low, double eps_high, double dual_clip,
    double kl_coef, double entropy_coef, bool compute_grad) {
  const auto opts = make_options(temperature, eps_low, eps_high, dual_clip, kl_coef, entropy_coef);
  at::Tensor grad = compute_grad ? at::empty_like(logits, at::MemoryFormat::Contiguous) : logits.new_empty({0});
  auto [loss, lp, ent, clip] = policy_loss_impl(logits, labels, old_logprobs, advantages, credit, penalty,
                                                ref_logprobs, loss_weights, opts, compute_grad ? &grad : nullptr);
  return {loss, lp, ent, clip, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_loss_inplace_cpu(
    at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old_logprobs,
    const at::Tensor& advantages, const std::optional<at::Tensor>& credit,
    const std::optional<at::Tensor>& penalty, const std::optional<at::Tensor>& ref_logprobs,
    const at::Tensor& loss_weights, double temperature, double eps_low, double eps_high, double dual_clip,
    double kl_coef, double entropy_coef) {
  const auto opts = make_options(temperature, eps_low, eps_high, dual_clip, kl_coef, entropy_coef);
  return policy_loss_impl(logits, labels, old_logprobs, advantages, credit, penalty, ref_logprobs,
                          loss_weights, opts, &logits);
}

std::tuple<at::Tensor, at::Tensor> logprobs_cpu(const at::Tensor& logits, const at::Tensor& labels_in,
                                                double temperature, bool with_entropy) {
  check_inputs(logits, labels_in);
  TORCH_CHECK(temperature > 0.0, "capo: temperature must be > 0, got ", temperature);
  const int64_t N = logits.size(0);
  const int64_t V = logits.size(1);
  const float inv_t = static_cast<float>(1.0 / temperature);
  const auto labels = labels_in.to(at::kLong).contiguous();
  auto f32 = logits.options().dtype(at::kFloat);
  auto logprobs = at::empty({N}, f32);
  auto entropy = with_entropy ? at::empty({N}, f32) : at::empty({0}, f32);
  const int64_t* lab = labels.data_ptr<int64_t>();
  float* lp_p = logprobs.data_ptr<float>();
  float* ent_p = with_entropy ? entropy.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "capo_logprobs", [&] {
    const scalar_t* z_base = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* z = z_base + i * logits.stride(0);
        const RowStats st = row_stats(z, V, inv_t);
        const bool valid = lab[i] >= 0 && lab[i] < V;
        lp_p[i] = valid ? static_cast<float>(z[lab[i]]) * inv_t - st.lse : 0.0f;
        if (ent_p) ent_p[i] = st.entropy;
      }
    });
  });
  return {logprobs, entropy};
}

}  // namespace

TORCH_LIBRARY(capo, m) {
  m.def(
      "policy_loss(Tensor logits, Tensor labels, Tensor old_logprobs, Tensor advantages, Tensor? credit, "
      "Tensor? penalty, Tensor? ref_logprobs, Tensor loss_weights, float temperature, float eps_low, "
      "float eps_high, float dual_clip, float kl_coef, float entropy_coef, bool compute_grad) "
      "-> (Tensor loss, Tensor logprobs, Tensor entropy, Tensor clipped, Tensor grad_logits)");
  m.def(
      "policy_loss_(Tensor(a!) logits, Tensor labels, Tensor old_logprobs, Tensor advantages, "
      "Tensor? credit, Tensor? penalty, Tensor? ref_logprobs, Tensor loss_weights, float temperature, "
      "float eps_low, float eps_high, float dual_clip, float kl_coef, float entropy_coef) "
      "-> (Tensor loss, Tensor logprobs, Tensor entropy, Tensor clipped)");
  m.def("logprobs(Tensor logits, Tensor labels, float temperature, bool with_entropy) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(capo, CPU, m) {
  m.impl("policy_loss", &policy_loss_cpu);
  m.impl("policy_loss_", &policy_loss_inplace_cpu);
  m.impl("logprobs", &logprobs_cpu);
}

}  // namespace capo

// The extension is a Python module only so that `import capo_fast._C` loads the op library.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
