// dhp_check: prove a dhp-export bundle's model on this host from C++: model.ts with LibTorch, or
// model.pt2 with AOTInductor's package loader.
//
//   dhp_check BUNDLE_DIR [--backend torchscript|pt2] [--device cpu|cuda] [--atol A] [--rtol R]
//             [--inputs X.npy --logits Y.npy]
//
// A plastic bundle (manifest "plastic": true) replays its golden stream instead: from hebb.npy,
// each call's logits and the trace it returns against the eager layer's.
//
// Frozen bundles: loads the model (eval mode), runs the golden inputs (golden_inputs.npy, float32
// [G, 784]) as one batch and one row at a time, and compares with the eager model's logits
// (golden_logits.npy, float32 [G, C]): passes when |out - golden| <= atol + rtol * |golden|
// everywhere and every argmax agrees. --inputs / --logits check another pair of float32 .npy files
// instead (e.g. a whole test set). Exit status: 0 pass, 1 parity failure, 2 usage or load error.
// Checksums are the Python runtime's job (dhp-serve check); this program needs no JSON library.

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/cuda.h>
#include <torch/script.h>
#include <torch/version.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <iostream>
#include <iterator>
#include <regex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr double kAtol = 1e-5;  // the bundle format's fp32 tolerance (manifest golden.tolerance)
constexpr double kRtol = 1e-4;
constexpr int kBundleVersion = 1;

template <typename T>
struct NpyOf {
  std::vector<int64_t> shape;
  std::vector<T> data;
};
using Npy = NpyOf<float>;

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// A C-order little-endian float32 .npy (format 1.0, 2.0 or 3.0), as numpy.save writes it.
template <typename T>
NpyOf<T> read_npy(const std::string& path, const char* descr) {
  const std::string bytes = read_file(path);
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0)
    throw std::runtime_error(path + " is not a .npy file");
  const auto major = static_cast<unsigned char>(bytes[6]);
  size_t header_len = 0, offset = 0;
  auto byte = [&](size_t i) { return static_cast<size_t>(static_cast<unsigned char>(bytes[i])); };
  if (major == 1) {
    header_len = byte(8) | byte(9) << 8;
    offset = 10;
  } else if ((major == 2 || major == 3) && bytes.size() >= 12) {
    header_len = byte(8) | byte(9) << 8 | byte(10) << 16 | byte(11) << 24;
    offset = 12;
  } else {
    throw std::runtime_error(path + ": unsupported .npy version " + std::to_string(major));
  }
  if (offset + header_len > bytes.size()) throw std::runtime_error(path + ": truncated header");
  const std::string header = bytes.substr(offset, header_len);
  if (header.find(std::string("'descr': '") + descr + "'") == std::string::npos)
    throw std::runtime_error(path + ": expected dtype " + descr + ", header " + header);
  if (header.find("'fortran_order': False") == std::string::npos)
    throw std::runtime_error(path + ": expected C order");
  std::smatch match;
  if (!std::regex_search(header, match, std::regex("'shape': \\(([0-9, ]*)\\)")))
    throw std::runtime_error(path + ": no shape in header");
  NpyOf<T> npy;
  std::stringstream dims(match[1].str());
  for (std::string dim; std::getline(dims, dim, ',');)
    if (dim.find_first_not_of(' ') != std::string::npos) npy.shape.push_back(std::stoll(dim));
  int64_t count = 1;
  for (auto d : npy.shape) count *= d;
  const size_t start = offset + header_len;
  if (bytes.size() - start != static_cast<size_t>(count) * sizeof(T))
    throw std::runtime_error(path + ": data size does not match its shape");
  npy.data.resize(count);
  std::memcpy(npy.data.data(), bytes.data() + start, count * sizeof(T));
  return npy;
}

NpyOf<float> read_npy_f32(const std::string& path) { return read_npy<float>(path, "<f4"); }

// A float32 / int64 .npy file as a tensor (a copy: the tensor owns its memory).
at::Tensor load_f32(const std::string& path) {
  auto npy = read_npy_f32(path);
  return torch::from_blob(npy.data.data(), npy.shape, torch::kFloat32).clone();
}

at::Tensor load_i64(const std::string& path) {
  auto npy = read_npy<int64_t>(path, "<i8");
  return torch::from_blob(npy.data.data(), npy.shape, torch::kInt64).clone();
}

bool check_manifest(const std::string& bundle) {  // true for a plastic bundle
  const std::string manifest = read_file(bundle + "/manifest.json");
  if (manifest.find("\"format\": \"dhp-deploy-bundle\"") == std::string::npos)
    throw std::runtime_error(bundle + "/manifest.json is not a dhp-deploy-bundle manifest");
  std::smatch match;
  if (!std::regex_search(manifest, match, std::regex("\"format_version\": ([0-9]+)")) ||
      std::stoi(match[1].str()) != kBundleVersion)
    throw std::runtime_error(bundle + "/manifest.json: bundle format version is not " +
                             std::to_string(kBundleVersion));
  return manifest.find("\"plastic\": true") != std::string::npos;
}

struct Errors {
  double max_abs = 0, max_rel = 0;
  int64_t argmax_agree = 0;
  bool within = true;
};

Errors compare(const at::Tensor& out, const at::Tensor& golden, double atol, double rtol) {
  const auto diff = (out.to(torch::kDouble) - golden.to(torch::kDouble)).abs();
  const auto ref = golden.to(torch::kDouble).abs();
  Errors e;
  e.max_abs = diff.max().item<double>();
  const auto big = ref >= (rtol > 0 ? atol / rtol : 0.0);  // where the relative term governs
  if (big.any().item<bool>()) e.max_rel = (diff.masked_select(big) / ref.masked_select(big)).max().item<double>();
  e.within = (diff <= atol + rtol * ref).all().item<bool>();  // false on NaN
  e.argmax_agree = (out.argmax(1) == golden.argmax(1)).sum().item<int64_t>();
  return e;
}

int usage() {
  std::cerr << "usage: dhp_check BUNDLE_DIR [--backend torchscript|pt2] [--device cpu|cuda] "
               "[--atol A] [--rtol R] [--inputs X.npy --logits Y.npy]\n";
  return 2;
}

// One call of a bundle's model, whichever loader: the frozen model takes {input} and returns
// logits; the plastic model takes {input, labels, hebb} and returns {logits, hebb_out}.
using Call = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)>;

Call open_model(const std::string& bundle, const std::string& backend, const torch::Device& device,
                std::shared_ptr<void>& keep) {
  if (backend == "pt2") {
    if (device.is_cuda())
      throw std::runtime_error("the bundle's model.pt2 is compiled for cpu; re-export on a CUDA "
                               "host to run it there");
    auto loader = std::make_shared<torch::inductor::AOTIModelPackageLoader>(bundle + "/model.pt2");
    keep = loader;
    return [loader](const std::vector<at::Tensor>& in) {
      // The package assumes the example's row-major strides and reuses its output buffers.
      std::vector<at::Tensor> args, out;
      for (const auto& t : in) args.push_back(t.contiguous());
      for (const auto& t : loader->run(args)) out.push_back(t.clone(at::MemoryFormat::Contiguous));
      return out;
    };
  }
  if (backend != "torchscript") throw std::runtime_error("unknown backend " + backend);
  auto module = std::make_shared<torch::jit::script::Module>(torch::jit::load(bundle + "/model.ts", device));
  module->eval();  // a loaded module keeps the training flag it was saved with
  keep = module;
  return [module](const std::vector<at::Tensor>& in) {
    const auto result = module->forward(std::vector<torch::jit::IValue>(in.begin(), in.end()));
    if (!result.isTuple()) return std::vector<at::Tensor>{result.toTensor()};
    std::vector<at::Tensor> out;
    for (const auto& v : result.toTuple()->elements()) out.push_back(v.toTensor());
    return out;
  };
}

// Frozen bundle: the goldens as one batch and one row at a time.
int check_frozen(const Call& call, const std::string& label, const torch::Device& device,
                 const std::string& inputs_path, const std::string& logits_path, double atol,
                 double rtol) {
  const auto inputs = load_f32(inputs_path), golden = load_f32(logits_path);
  if (inputs.dim() != 2 || golden.dim() != 2 || inputs.size(0) != golden.size(0))
    throw std::runtime_error("golden arrays have inconsistent shapes");
  torch::InferenceMode guard;
  const auto batched = call({inputs.to(device)})[0].to(torch::kCPU);
  std::vector<at::Tensor> rows;
  for (int64_t i = 0; i < inputs.size(0); ++i)
    rows.push_back(call({inputs.slice(0, i, i + 1).to(device)})[0].to(torch::kCPU));
  const auto single = torch::cat(rows);
  if (batched.sizes() != golden.sizes() || single.sizes() != golden.sizes())
    throw std::runtime_error("model output shape does not match " + logits_path);
  const Errors a = compare(batched, golden, atol, rtol), b = compare(single, golden, atol, rtol);
  const int64_t n = inputs.size(0);
  const bool ok = a.within && b.within && a.argmax_agree == n && b.argmax_agree == n;
  std::printf("%s: max_abs_error=%.3e max_rel_error=%.3e argmax_agree=%lld/%lld "
              "batches=[%lld, 1] atol=%g rtol=%g %s\n",
              label.c_str(), std::max(a.max_abs, b.max_abs), std::max(a.max_rel, b.max_rel),
              static_cast<long long>(std::min(a.argmax_agree, b.argmax_agree)),
              static_cast<long long>(n), static_cast<long long>(n), atol, rtol, ok ? "OK" : "FAIL");
  return ok ? 0 : 1;
}

// Plastic bundle: replay the golden stream from hebb.npy; every call's logits and trace.
int check_plastic(const Call& call, const std::string& bundle, const std::string& label,
                  const torch::Device& device, double atol, double rtol) {
  const auto inputs = load_f32(bundle + "/golden_inputs.npy");
  const auto labels = load_i64(bundle + "/golden_stream_labels.npy");
  const auto sizes = load_i64(bundle + "/golden_stream_batch_sizes.npy");
  const auto golden = load_f32(bundle + "/golden_logits.npy");
  const auto traces = load_f32(bundle + "/golden_stream_traces.npy");
  auto hebb = load_f32(bundle + "/hebb.npy").to(device);
  torch::InferenceMode guard;
  std::vector<at::Tensor> logits;
  double max_trace = 0;
  bool traces_ok = true;
  int64_t start = 0;
  for (int64_t i = 0; i < sizes.size(0); ++i) {
    const int64_t n = sizes[i].item<int64_t>();
    auto out = call({inputs.slice(0, start, start + n).to(device),
                     labels.slice(0, start, start + n).to(device), hebb});
    logits.push_back(out[0].to(torch::kCPU));
    hebb = out[1];
    const auto got = hebb.to(torch::kCPU).to(torch::kDouble), want = traces[i].to(torch::kDouble);
    const auto diff = (got - want).abs();
    max_trace = std::max(max_trace, diff.max().item<double>());
    traces_ok = traces_ok && (diff <= atol + rtol * want.abs()).all().item<bool>();
    start += n;
  }
  const Errors e = compare(torch::cat(logits), golden, atol, rtol);
  const bool ok = e.within && traces_ok && e.argmax_agree == golden.size(0);
  std::printf("%s (plastic): %lld calls, max_abs_error=%.3e max_trace_error=%.3e "
              "argmax_agree=%lld/%lld atol=%g rtol=%g %s\n",
              label.c_str(), static_cast<long long>(sizes.size(0)), e.max_abs, max_trace,
              static_cast<long long>(e.argmax_agree), static_cast<long long>(golden.size(0)), atol,
              rtol, ok ? "OK" : "FAIL");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  std::string bundle = argv[1], device_name = "cpu", backend = "torchscript";
  std::string inputs_path = bundle + "/golden_inputs.npy", logits_path = bundle + "/golden_logits.npy";
  double atol = kAtol, rtol = kRtol;
  for (int i = 2; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i + 1 >= argc) return usage();
    if (arg == "--device") device_name = argv[++i];
    else if (arg == "--backend") backend = argv[++i];
    else if (arg == "--atol") atol = std::atof(argv[++i]);
    else if (arg == "--rtol") rtol = std::atof(argv[++i]);
    else if (arg == "--inputs") inputs_path = argv[++i];
    else if (arg == "--logits") logits_path = argv[++i];
    else return usage();
  }
  try {
    const bool plastic = check_manifest(bundle);
    const torch::Device device(device_name);
    if (device.is_cuda() && !torch::cuda::is_available())
      throw std::runtime_error("device cuda requested but LibTorch sees no CUDA device");
    std::shared_ptr<void> keep;
    const Call call = open_model(bundle, backend, device, keep);
    const std::string label = std::string(backend == "pt2" ? "aoti " : "libtorch ") +
                              TORCH_VERSION + "/" + device_name;
    return plastic ? check_plastic(call, bundle, label, device, atol, rtol)
                   : check_frozen(call, label, device, inputs_path, logits_path, atol, rtol);
  } catch (const c10::Error& err) {
    std::cerr << "dhp_check: LibTorch error: " << err.what_without_backtrace() << "\n";
    return 2;
  } catch (const std::exception& err) {
    std::cerr << "dhp_check: " << err.what() << "\n";
    return 2;
  }
}
