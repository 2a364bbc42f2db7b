// A quadratic penalty's gradient and the plain-SGD update as one pass over the weights:
//
//     total = g + c ⊙ (θ − a);   θ ← θ − lr · total
//
// for EWC, Online EWC, MAS and SI (c = 2·scale·strength·importance, a the anchor). In torch ops
// that is three passes (sub, addcmul, add_) over ~1 MB arrays each, memory-bound: on a 2-core
// Intel Xeon, one thread, they took a third of an EWC + DHP step. Here θ, a, c and g are read
// once and θ and total written once.
//
// The rounding is torch's on the CPU: θ − a rounded, then torch's vectorised addcmul and add_
// with alpha are fused multiply-adds (measured: fma(c, θ − a, g) and fma(total, −lr, θ), the
// alpha rounded to the weights' dtype first), so on a host with FMA units the results are
// bit-identical to the torch ops. The FMA clones are chosen at load time; the generic clone calls
// fma() from libm, slower but the same numbers.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kGrain = 32768;  // ATen's elementwise grain: below it, one thread

#define DHP_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))

DHP_CLONES void penalised_sgd_f32(float* __restrict theta, float* __restrict total,
                                  const float* __restrict g, const float* __restrict c,
                                  const float* __restrict a, float minus_lr, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float t = std::fma(c[i], theta[i] - a[i], g[i]);
    total[i] = t;
    theta[i] = std::fma(t, minus_lr, theta[i]);
  }
}

DHP_CLONES void penalised_sgd_f64(double* __restrict theta, double* __restrict total,
                                  const double* __restrict g, const double* __restrict c,
                                  const double* __restrict a, double minus_lr, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double t = std::fma(c[i], theta[i] - a[i], g[i]);
    total[i] = t;
    theta[i] = std::fma(t, minus_lr, theta[i]);
  }
}

void check_operand(const at::Tensor& operand, const at::Tensor& param, const char* name) {
  TORCH_CHECK(operand.device().is_cpu() && operand.scalar_type() == param.scalar_type() &&
                  operand.is_contiguous() && operand.numel() == param.numel(),
              "penalised_sgd: ", name, " must be a contiguous CPU tensor of the parameter's "
              "dtype and size");
}

}  // namespace

// For each parameter θ_k (updated in place): returns the totals g_k + c_k ⊙ (θ_k − a_k), taken
// at the weights before the update.
std::vector<at::Tensor> penalised_sgd(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                                      std::vector<at::Tensor> curvatures,
                                      std::vector<at::Tensor> anchors, double lr) {
  TORCH_CHECK(grads.size() == params.size() && curvatures.size() == params.size() &&
                  anchors.size() == params.size(),
              "penalised_sgd: one gradient, curvature and anchor per parameter");
  std::vector<at::Tensor> totals;
  totals.reserve(params.size());
  for (size_t k = 0; k < params.size(); ++k) {
    at::Tensor& theta = params[k];
    TORCH_CHECK(theta.device().is_cpu() && theta.is_contiguous() &&
                    (theta.scalar_type() == at::kFloat || theta.scalar_type() == at::kDouble),
                "penalised_sgd: parameters must be contiguous float32 or float64 CPU tensors");
    // A gradient may come transposed (the head's is computed in its (out, in) layout).
    const at::Tensor g = grads[k].contiguous();
    check_operand(g, theta, "a gradient");
    check_operand(curvatures[k], theta, "a curvature");
    check_operand(anchors[k], theta, "an anchor");
    at::Tensor total = at::empty_like(theta);
    const bool single = theta.scalar_type() == at::kFloat;
    at::parallel_for(0, theta.numel(), kGrain, [&](int64_t begin, int64_t end) {
      if (single) {
        penalised_sgd_f32(theta.data_ptr<float>() + begin, total.data_ptr<float>() + begin,
                          g.data_ptr<float>() + begin,
                          curvatures[k].data_ptr<float>() + begin,
                          anchors[k].data_ptr<float>() + begin, -static_cast<float>(lr),
                          end - begin);
      } else {
        penalised_sgd_f64(theta.data_ptr<double>() + begin, total.data_ptr<double>() + begin,
                          g.data_ptr<double>() + begin,
                          curvatures[k].data_ptr<double>() + begin,
                          anchors[k].data_ptr<double>() + begin, -lr, end - begin);
      }
    });
    theta.unsafeGetTensorImpl()->bump_version();  // as torch's in-place ops do
    totals.push_back(total);
  }
  return totals;
}
