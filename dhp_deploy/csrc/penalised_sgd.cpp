// A quadratic penalty's gradient and the plain-SGD update as one pass over the weights:
//
//     total = g + c ⊙ (θ − a);   θ ← θ − lr · total   (and for SI: ω ← ω + lr · g · total)
//
// for EWC, Online EWC, MAS and SI (c = 2·scale·strength·importance, a the anchor). In torch ops
// that is three passes (sub, addcmul, add_) over ~1 MB arrays each, memory-bound: on a 2-core
// Intel Xeon, one thread, they took a third of an EWC + DHP step. Here θ, a, c and g are read
// once and θ and total written once.
//
// The rounding is torch's on the CPU: θ − a rounded, then torch's vectorised addcmul and add_
// with alpha are fused multiply-adds (measured: fma(c, θ − a, g) and fma(total, −lr, θ), the
// alpha rounded to the weights' dtype first), so on a host with FMA units the results are
// bit-identical to the torch ops.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kGrain = 32768;  // ATen's elementwise grain: below it, one thread

// x86-64 glibc: one clone for AVX-512, one for FMA (which implies AVX), picked by the loader
// (ifunc; in target_clones each comma starts a clone); aarch64 has FMA in its baseline ISA.
// Without FMA units std::fma is a slow libm call per element: `vectorised()` then tells Python to
// keep the torch ops.
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && \
    (defined(__GNUC__) || defined(__clang__))
#define DHP_CLONES __attribute__((target_clones("avx512f", "fma", "default")))
bool vectorised() { return __builtin_cpu_supports("fma") || __builtin_cpu_supports("avx512f"); }
#elif defined(__aarch64__) || defined(__FMA__)
#define DHP_CLONES
bool vectorised() { return true; }
#else
#define DHP_CLONES
bool vectorised() { return false; }
#endif

// Inlined into each clone below, so each compiles for that clone's ISA. With `omega` (SI's path
// integral) also ω ← ω + lr·g·total, rounded as torch's addcmul_(g, total, value=lr) on the CPU
// (measured: fma(lr·g, total, ω), lr·g rounded first).
template <typename T, bool kIntegrate>
inline __attribute__((always_inline)) void penalised_sgd_loop(
    T* __restrict theta, T* __restrict total, const T* __restrict g, const T* __restrict c,
    const T* __restrict a, T* __restrict omega, T lr, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T t = std::fma(c[i], theta[i] - a[i], g[i]);
    total[i] = t;
    theta[i] = std::fma(t, -lr, theta[i]);
    if constexpr (kIntegrate) omega[i] = std::fma(lr * g[i], t, omega[i]);
  }
}

template <typename T>
inline __attribute__((always_inline)) void penalised_sgd_any(T* theta, T* total, const T* g,
                                                             const T* c, const T* a, T* omega,
                                                             T lr, int64_t n) {
  if (omega == nullptr) {
    penalised_sgd_loop<T, false>(theta, total, g, c, a, omega, lr, n);
  } else {
    penalised_sgd_loop<T, true>(theta, total, g, c, a, omega, lr, n);
  }
}

DHP_CLONES void penalised_sgd_f32(float* theta, float* total, const float* g, const float* c,
                                  const float* a, float* omega, float lr, int64_t n) {
  penalised_sgd_any(theta, total, g, c, a, omega, lr, n);
}

DHP_CLONES void penalised_sgd_f64(double* theta, double* total, const double* g,
                                  const double* c, const double* a, double* omega, double lr,
                                  int64_t n) {
  penalised_sgd_any(theta, total, g, c, a, omega, lr, n);
}

void check_operand(const at::Tensor& operand, const at::Tensor& param, size_t k,
                   const char* name) {
  TORCH_CHECK(operand.device().is_cpu() && operand.scalar_type() == param.scalar_type() &&
                  operand.is_contiguous() && operand.sizes() == param.sizes(),
              "penalised_sgd: ", name, " ", k, " must be a contiguous CPU tensor of parameter ",
              k, "'s dtype and shape (", param.scalar_type(), " ", param.sizes(), "), not ",
              operand.device(), " ", operand.scalar_type(), " ", operand.sizes(),
              operand.is_contiguous() ? "" : " non-contiguous");
}

// `omega` undefined: no path integral.
void update(at::Tensor& theta, at::Tensor& total, const at::Tensor& g, const at::Tensor& c,
            const at::Tensor& a, at::Tensor& omega, double lr) {
  const bool single = theta.scalar_type() == at::kFloat, integrate = omega.defined();
  at::parallel_for(0, theta.numel(), kGrain, [&](int64_t begin, int64_t end) {
    if (single) {
      penalised_sgd_f32(theta.data_ptr<float>() + begin, total.data_ptr<float>() + begin,
                        g.data_ptr<float>() + begin, c.data_ptr<float>() + begin,
                        a.data_ptr<float>() + begin,
                        integrate ? omega.data_ptr<float>() + begin : nullptr,
                        static_cast<float>(lr), end - begin);
    } else {
      penalised_sgd_f64(theta.data_ptr<double>() + begin, total.data_ptr<double>() + begin,
                        g.data_ptr<double>() + begin, c.data_ptr<double>() + begin,
                        a.data_ptr<double>() + begin,
                        integrate ? omega.data_ptr<double>() + begin : nullptr, lr, end - begin);
    }
  });
  theta.unsafeGetTensorImpl()->bump_version();  // as torch's in-place ops do
  if (integrate) omega.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

bool penalised_sgd_vectorised() { return vectorised(); }

// For each parameter θ_k (updated in place): returns the totals g_k + c_k ⊙ (θ_k − a_k), taken
// at the weights before the update. `path_integrals`: empty, or one ω_k per parameter (SI),
// each updated in place by lr·g_k·total_k. Every operand is checked before any weight moves.
std::vector<at::Tensor> penalised_sgd(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                                      std::vector<at::Tensor> curvatures,
                                      std::vector<at::Tensor> anchors, double lr,
                                      std::vector<at::Tensor> path_integrals) {
  TORCH_CHECK(grads.size() == params.size() && curvatures.size() == params.size() &&
                  anchors.size() == params.size() &&
                  (path_integrals.empty() || path_integrals.size() == params.size()),
              "penalised_sgd: one gradient, curvature and anchor (and path integral, if any) per "
              "parameter");
  std::vector<at::Tensor> contiguous_grads;
  for (size_t k = 0; k < params.size(); ++k) {
    const at::Tensor& theta = params[k];
    TORCH_CHECK(theta.device().is_cpu() && theta.is_contiguous() &&
                    (theta.scalar_type() == at::kFloat || theta.scalar_type() == at::kDouble),
                "penalised_sgd: parameter ", k, " must be a contiguous float32 or float64 CPU "
                "tensor");
    // A gradient may come transposed (the head's is computed in its (out, in) layout).
    contiguous_grads.push_back(grads[k].contiguous());
    check_operand(contiguous_grads[k], theta, k, "gradient");
    check_operand(curvatures[k], theta, k, "curvature");
    check_operand(anchors[k], theta, k, "anchor");
    if (!path_integrals.empty()) check_operand(path_integrals[k], theta, k, "path integral");
  }
  std::vector<at::Tensor> totals;
  for (size_t k = 0; k < params.size(); ++k) {
    at::Tensor omega = path_integrals.empty() ? at::Tensor() : path_integrals[k];
    totals.push_back(at::empty_like(params[k]));
    update(params[k], totals[k], contiguous_grads[k], curvatures[k], anchors[k], omega, lr);
  }
  return totals;
}
