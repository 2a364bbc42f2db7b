// The whole lean step's gradients in one call: dhp_deploy/lean_step.py's step_gradients on the
// CPU with the fused kernels, one process, written with the same ATen ops in the same order, so
// the results are bit-identical to the Python code. What it saves is the Python around them:
// about 25 tensor calls a step, each paying the interpreter and the binding's argument parsing
// (3–5 µs) on top of ATen's dispatch, on a step whose arithmetic takes ~0.7 ms on one core.

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <optional>
#include <vector>

// csrc/dhp_head.cpp
at::Tensor class_stats(const at::Tensor& h_in, const at::Tensor& y_in, int64_t classes);
std::vector<at::Tensor> head_forward(const at::Tensor& h, const at::Tensor& stats,
                                     const at::Tensor& w, const at::Tensor& alpha,
                                     const at::Tensor& eta, const at::Tensor& old);
std::vector<at::Tensor> head_backward(const at::Tensor& dz, const at::Tensor& y_in,
                                      const at::Tensor& d_effective_t, const at::Tensor& alpha,
                                      const at::Tensor& hebb, const at::Tensor& diff,
                                      const at::Tensor& effective_t, const at::Tensor& scale,
                                      const at::Tensor& present);
std::vector<at::Tensor> cross_entropy(const at::Tensor& logits_in, const at::Tensor& head_in,
                                      const at::Tensor& targets_in, int64_t batch_size);

namespace {

// The trunk's input and every layer's output (Linear, then ReLU): _trunk_forward.
std::vector<at::Tensor> trunk_forward(const std::vector<at::Tensor>& params, size_t layers,
                                      const at::Tensor& x) {
  std::vector<at::Tensor> activations{x};
  for (size_t l = 0; l < layers; ++l) {
    activations.push_back(
        at::addmm(params[2 * l + 1], activations.back(), params[2 * l].t()).clamp_min_(0));
  }
  return activations;
}

// Every trunk layer's weight and bias gradients, into grads[0 .. 2·layers): _trunk_backward.
void trunk_backward(at::Tensor dh, const std::vector<at::Tensor>& params, size_t layers,
                    const std::vector<at::Tensor>& activations, std::vector<at::Tensor>& grads) {
  for (size_t l = layers; l-- > 0;) {
    // ReLU's backward, as autograd computes it: the gradient where the output is > 0.
    const at::Tensor da = at::threshold_backward(dh, activations[l + 1], 0);
    grads[2 * l] = da.t().mm(activations[l]);
    grads[2 * l + 1] = da.sum(0);
    if (l > 0) dh = da.mm(params[2 * l]);  // the input needs no gradient
  }
}

// The trunk's backward from `dh`, then [loss, logits, hits, gradients...].
std::vector<at::Tensor> finish(const at::Tensor& dh, const std::vector<at::Tensor>& params,
                               size_t layers, const std::vector<at::Tensor>& activations,
                               std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& ce) {
  trunk_backward(dh, params, layers, activations, grads);
  std::vector<at::Tensor> results{ce[0], ce[2], ce[3]};
  results.insert(results.end(), grads.begin(), grads.end());
  return results;
}

}  // namespace

// params: a DHPNet's parameters in its own order (each trunk layer's weight and bias, then the
// DHP head's w, alpha, eta with its trace `hebb`, updated in place; or the plain head's weight
// with `hebb` None). `head`: the task's class ids, empty for all classes. Returns
// [loss, logits the loss used, hits, then the gradients in the parameters' order].
std::vector<at::Tensor> lean_step(const std::vector<at::Tensor>& params,
                                  const std::optional<at::Tensor>& hebb, const at::Tensor& x,
                                  const at::Tensor& y, const at::Tensor& head,
                                  const at::Tensor& targets, int64_t batch_size) {
  const c10::AutoGradMode no_grad(false);  // as torch.no_grad()
  const bool dhp = hebb.has_value();
  const size_t head_params = dhp ? 3 : 1;
  TORCH_CHECK(params.size() >= head_params && (params.size() - head_params) % 2 == 0,
              "lean_step: expected the trunk's (weight, bias) pairs and the head's parameters");
  const size_t layers = (params.size() - head_params) / 2;
  const std::vector<at::Tensor> activations = trunk_forward(params, layers, x);
  const at::Tensor& h = activations.back();
  std::vector<at::Tensor> grads(params.size());
  if (dhp) {  // _fused_dhp_head
    const at::Tensor &w = params[2 * layers], &alpha = params[2 * layers + 1];
    const at::Tensor& eta = params[2 * layers + 2];
    const at::Tensor stats = class_stats(h, y, w.size(1));
    const std::vector<at::Tensor> forward = head_forward(h, stats, w, alpha, eta, *hebb);
    const std::vector<at::Tensor> ce = cross_entropy(forward[0], head, targets, batch_size);
    const at::Tensor d_effective_t = ce[1].t().mm(h);  // (out, in)
    const std::vector<at::Tensor> backward =
        head_backward(ce[1], y, d_effective_t, alpha, forward[1], forward[2], forward[3],
                      forward[4], forward[5]);
    hebb->copy_(forward[1]);  // as the eager head: the stored trace keeps its buffer
    grads[2 * layers] = d_effective_t.t();
    grads[2 * layers + 1] = backward[1];
    grads[2 * layers + 2] = backward[2];
    return finish(backward[0], params, layers, activations, grads, ce);
  }
  const at::Tensor& weight = params[2 * layers];  // _plain_head
  const std::vector<at::Tensor> ce = cross_entropy(h.mm(weight.t()), head, targets, batch_size);
  grads[2 * layers] = ce[1].t().mm(h);
  return finish(ce[1].mm(weight), params, layers, activations, grads, ce);
}
