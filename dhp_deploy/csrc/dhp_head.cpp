// The DHP head's training step on the CPU as three kernels: the class statistics, the forward
// (trace update, W_eff, logits) and the backward; and the cross-entropy both heads' lean steps
// end with (a dozen small ATen ops as one call). The maths is dhp_deploy/lean_step.py's eager
// code; the rounding differs by an ulp here and there (torch's vectorised lerp fuses its
// multiply-add, this scalar one does not). The matmuls stay ATen's.
//
// Layouts: θ, α and the trace are (in, out) like the layer stores them; W_eff and dW are
// (out, in), the layout in which the CPU kernels run the 64×256×10 products fastest.

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <optional>
#include <vector>

namespace {

void check_labels(const at::Tensor& y, int64_t classes) {
  TORCH_CHECK(y.scalar_type() == at::kLong && y.dim() == 1, "labels must be int64 of shape (B,)");
  const int64_t* labels = y.data_ptr<int64_t>();
  for (int64_t b = 0; b < y.size(0); ++b) {
    TORCH_CHECK(labels[b] >= 0 && labels[b] < classes, "label ", labels[b], " is not in [0, ",
                classes, ")");
  }
}

// torch.lerp's formula: each half of [0, 1] is computed from its own end, so weight 1 gives `end`.
template <typename T>
T lerp(T start, T end, T weight) {
  const T diff = end - start;
  return std::abs(weight) < T(0.5) ? start + weight * diff : end - diff * (T(1) - weight);
}

}  // namespace

// [per-class sums of h's rows | class counts]: (classes, in + 1), one tensor so that one
// all-reduce shares both across data-parallel ranks.
at::Tensor class_stats(const at::Tensor& h_in, const at::Tensor& y_in, int64_t classes) {
  const at::Tensor h = h_in.contiguous(), y = y_in.contiguous();
  check_labels(y, classes);
  const int64_t rows = h.size(0), in = h.size(1);
  at::Tensor stats = at::zeros({classes, in + 1}, h.options());
  const int64_t* labels = y.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "class_stats", [&] {
    const scalar_t* hp = h.data_ptr<scalar_t>();
    scalar_t* sp = stats.data_ptr<scalar_t>();
    for (int64_t b = 0; b < rows; ++b) {
      scalar_t* row = sp + labels[b] * (in + 1);
      const scalar_t* x = hp + b * in;
      for (int64_t i = 0; i < in; ++i) row[i] += x[i];
      row[in] += scalar_t(1);
    }
  });
  return stats;
}

// Returns [logits, the updated trace H' (in, out), and what the backward needs: M − H (in, out),
// W_eff (out, in), η·[c present]/count (out), [c present] (out)].
std::vector<at::Tensor> head_forward(const at::Tensor& h, const at::Tensor& stats,
                                     const at::Tensor& w, const at::Tensor& alpha,
                                     const at::Tensor& eta, const at::Tensor& old) {
  const int64_t in = w.size(0), out = w.size(1);
  TORCH_CHECK(stats.is_contiguous() && stats.size(0) == out && stats.size(1) == in + 1,
              "stats must be (out_features, in_features + 1)");
  TORCH_CHECK(w.is_contiguous() && alpha.is_contiguous() && old.is_contiguous(),
              "θ, α and the trace must be contiguous");
  at::Tensor hebb = at::empty_like(w), diff = at::empty_like(w);
  at::Tensor effective_t = at::empty({out, in}, w.options());
  at::Tensor scale = at::empty({out}, w.options()), present = at::empty({out}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "head_forward", [&] {
    const scalar_t* sp = stats.data_ptr<scalar_t>();
    const scalar_t *wp = w.data_ptr<scalar_t>(), *ap = alpha.data_ptr<scalar_t>();
    const scalar_t* op = old.data_ptr<scalar_t>();
    const scalar_t rate_if_present = eta.item<scalar_t>();
    scalar_t *hp = hebb.data_ptr<scalar_t>(), *dp = diff.data_ptr<scalar_t>();
    scalar_t* ep = effective_t.data_ptr<scalar_t>();
    for (int64_t j = 0; j < out; ++j) {
      const scalar_t* sums = sp + j * (in + 1);
      const scalar_t count = sums[in];
      const scalar_t divisor = count > scalar_t(1) ? count : scalar_t(1);
      const scalar_t rate = rate_if_present * (count > scalar_t(0) ? scalar_t(1) : scalar_t(0));
      present.data_ptr<scalar_t>()[j] = count > scalar_t(0) ? scalar_t(1) : scalar_t(0);
      scale.data_ptr<scalar_t>()[j] = rate / divisor;
      for (int64_t i = 0; i < in; ++i) {
        const int64_t k = i * out + j;
        const scalar_t mean = sums[i] / divisor;
        dp[k] = mean - op[k];
        hp[k] = lerp(op[k], mean, rate);
        ep[j * in + i] = wp[k] + ap[k] * hp[k];
      }
    }
  });
  at::Tensor logits = at::mm(h, effective_t.t());
  return {logits, hebb, diff, effective_t, scale, present};
}

// d_effective_t = dzᵀ h, (out, in) (all-reduced by the caller when data-parallel).
// Returns [dh, dα (in, out), dη (1)].
std::vector<at::Tensor> head_backward(const at::Tensor& dz, const at::Tensor& y_in,
                                      const at::Tensor& d_effective_t, const at::Tensor& alpha,
                                      const at::Tensor& hebb, const at::Tensor& diff,
                                      const at::Tensor& effective_t, const at::Tensor& scale,
                                      const at::Tensor& present) {
  const int64_t in = alpha.size(0), out = alpha.size(1);
  const at::Tensor y = y_in.contiguous(), grad = d_effective_t.contiguous();
  check_labels(y, out);
  at::Tensor d_alpha = at::empty_like(alpha);
  at::Tensor d_means = at::empty({out, in}, alpha.options());
  at::Tensor d_eta = at::empty({1}, alpha.options());
  at::Tensor dh = at::mm(dz, effective_t);  // fresh and contiguous: the means' term adds in place
  AT_DISPATCH_FLOATING_TYPES(alpha.scalar_type(), "head_backward", [&] {
    const scalar_t *gp = grad.data_ptr<scalar_t>(), *ap = alpha.data_ptr<scalar_t>();
    const scalar_t *hp = hebb.data_ptr<scalar_t>(), *dp = diff.data_ptr<scalar_t>();
    const scalar_t *sp = scale.data_ptr<scalar_t>(), *pp = present.data_ptr<scalar_t>();
    scalar_t *dap = d_alpha.data_ptr<scalar_t>(), *mp = d_means.data_ptr<scalar_t>();
    scalar_t total = 0;
    for (int64_t j = 0; j < out; ++j) {
      scalar_t column = 0;
      for (int64_t i = 0; i < in; ++i) {
        const int64_t k = i * out + j;
        const scalar_t g = gp[j * in + i];
        const scalar_t d_hebb = g * ap[k];
        dap[k] = g * hp[k];
        column += d_hebb * dp[k];
        mp[j * in + i] = d_hebb * sp[j];
      }
      total += column * pp[j];
    }
    d_eta.data_ptr<scalar_t>()[0] = total;
    // Through the class means: row b gets its class's dL/dmean divided by the class count.
    const int64_t* labels = y.data_ptr<int64_t>();
    scalar_t* dhp = dh.data_ptr<scalar_t>();
    for (int64_t b = 0; b < dz.size(0); ++b) {
      const scalar_t* m = mp + labels[b] * in;
      scalar_t* row = dhp + b * in;
      for (int64_t i = 0; i < in; ++i) row[i] += m[i];
    }
  });
  return {dh, d_alpha, d_eta};
}

// The mean cross-entropy's share of a batch of `batch_size` rows over the logits of the classes
// `head` (the task's class ids; empty: all classes), `targets` being positions within them.
// Returns [loss (0-dim), dz (B, out): (softmax − onehot) / batch_size within head, 0 outside,
// the logits the loss used (B, k), hits (0-dim int64: rows whose argmax is the target)].
std::vector<at::Tensor> cross_entropy(const at::Tensor& logits_in, const at::Tensor& head_in,
                                      const at::Tensor& targets_in, int64_t batch_size) {
  const at::Tensor logits_all = logits_in.contiguous(), targets = targets_in.contiguous();
  const int64_t rows = logits_all.size(0), out = logits_all.size(1);
  const at::Tensor head = head_in.numel() ? head_in.contiguous() : at::arange(out, targets.options());
  const int64_t k = head.size(0);
  check_labels(head, out);
  check_labels(targets, k);
  at::Tensor dz = at::zeros_like(logits_all), logits = at::empty({rows, k}, logits_all.options());
  at::Tensor loss = at::empty({}, logits_all.options());
  int64_t hits = 0;
  AT_DISPATCH_FLOATING_TYPES(logits_all.scalar_type(), "cross_entropy", [&] {
    const scalar_t* zp = logits_all.data_ptr<scalar_t>();
    const int64_t *hp = head.data_ptr<int64_t>(), *tp = targets.data_ptr<int64_t>();
    scalar_t *lp = logits.data_ptr<scalar_t>(), *dp = dz.data_ptr<scalar_t>();
    const scalar_t share = scalar_t(1) / scalar_t(batch_size);
    double total = 0;
    for (int64_t b = 0; b < rows; ++b) {
      scalar_t* z = lp + b * k;
      int64_t best = 0;
      for (int64_t c = 0; c < k; ++c) {
        z[c] = zp[b * out + hp[c]];
        if (z[c] > z[best]) best = c;  // the first of equal maxima, as argmax
      }
      scalar_t sum = 0;
      for (int64_t c = 0; c < k; ++c) sum += std::exp(z[c] - z[best]);
      const scalar_t log_sum = z[best] + std::log(sum);
      total += log_sum - z[tp[b]];
      hits += best == tp[b];
      for (int64_t c = 0; c < k; ++c) {
        const scalar_t p = std::exp(z[c] - log_sum) - (c == tp[b] ? scalar_t(1) : scalar_t(0));
        dp[b * out + hp[c]] = p * share;
      }
    }
    loss.fill_(total / static_cast<double>(batch_size));
  });
  return {loss, dz, logits, at::scalar_tensor(hits, targets.options())};
}

// csrc/penalised_sgd.cpp
std::vector<at::Tensor> penalised_sgd(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                                      std::vector<at::Tensor> curvatures,
                                      std::vector<at::Tensor> anchors, double lr,
                                      std::vector<at::Tensor> path_integrals);
bool penalised_sgd_vectorised();
// csrc/lean_step.cpp
std::vector<at::Tensor> lean_step(const std::vector<at::Tensor>& params,
                                  const std::optional<at::Tensor>& hebb, const at::Tensor& x,
                                  const at::Tensor& y, const at::Tensor& head,
                                  const at::Tensor& targets, int64_t batch_size);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cross_entropy", &cross_entropy);
  m.def("class_stats", &class_stats);
  m.def("head_forward", &head_forward);
  m.def("head_backward", &head_backward);
  m.def("penalised_sgd", &penalised_sgd, pybind11::arg("params"), pybind11::arg("grads"),
        pybind11::arg("curvatures"), pybind11::arg("anchors"), pybind11::arg("lr"),
        pybind11::arg("path_integrals") = std::vector<at::Tensor>());
  m.def("penalised_sgd_vectorised", &penalised_sgd_vectorised);
  m.def("lean_step", &lean_step);
}
