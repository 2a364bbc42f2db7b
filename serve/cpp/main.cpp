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
// everywhere and every argmax agrees. --inputs / --logits (always both) check another pair of
// float32 .npy files instead (e.g. a whole test set); a plastic bundle refuses them (its check is
// a stream of calls that feed the trace back, not a pair of arrays). Inputs are validated against
// the manifest before the model runs: width, at least one row, no NaN/inf, matching row counts.
// Exit status: 0 pass, 1 parity failure, 2 usage, load or input error (one line on stderr).
// Checksums are the Python runtime's job (dhp-serve check); this program needs no JSON library.

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/cuda.h>
#include <torch/script.h>
#include <torch/version.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
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

// What this program needs from manifest.json, read with regexes (the exporter writes it with
// json.dumps(indent=2); no JSON library needed).
struct Manifest {
  bool plastic = false;
  int64_t in_features = 0, num_classes = 0;  // the model's [N, in] -> [N, classes]
};

// The width in `"KEY": {... "shape": ["N", WIDTH] ...}`, the first such object in the manifest.
int64_t shape_width(const std::string& manifest, const std::string& key, const std::string& path) {
  const auto at = manifest.find("\"" + key + "\": {");
  std::smatch match;
  const std::string rest = at == std::string::npos ? "" : manifest.substr(at);
  if (!std::regex_search(rest, match, std::regex("\"shape\": \\[\\s*\"N\",\\s*([0-9]+)\\s*\\]")))
    throw std::runtime_error(path + " has no " + key + " shape [\"N\", width]");
  return std::stoll(match[1].str());
}

Manifest read_manifest(const std::string& bundle) {
  const std::string path = bundle + "/manifest.json";
  const std::string manifest = read_file(path);
  if (manifest.find("\"format\": \"dhp-deploy-bundle\"") == std::string::npos)
    throw std::runtime_error(path + " is not a dhp-deploy-bundle manifest");
  std::smatch match;
  if (!std::regex_search(manifest, match, std::regex("\"format_version\": ([0-9]+)")) ||
      std::stoi(match[1].str()) != kBundleVersion)
    throw std::runtime_error(path + ": bundle format version is not " +
                             std::to_string(kBundleVersion));
  Manifest m;
  m.plastic = manifest.find("\"plastic\": true") != std::string::npos;
  m.in_features = shape_width(manifest, "input", path);
  m.num_classes = shape_width(manifest, "output", path);
  return m;
}

std::string shape_of(const at::Tensor& t) {
  std::string out = "[";
  for (int64_t d = 0; d < t.dim(); ++d) out += (d ? ", " : "") + std::to_string(t.size(d));
  return out + "]";
}

// A pair to check (goldens or --inputs/--logits) against the model's I/O, before anything runs:
// a wrong width used to surface as a TorchScript traceback (or a C++ backtrace from .pt2), a NaN
// as a parity failure, an empty file as torch.cat's complaint.
void validate_pair(const at::Tensor& inputs, const at::Tensor& logits, const Manifest& m,
                   const std::string& inputs_path, const std::string& logits_path) {
  if (inputs.dim() != 2 || inputs.size(1) != m.in_features)
    throw std::runtime_error(inputs_path + " has shape " + shape_of(inputs) +
                             "; the model takes float32 [N, " + std::to_string(m.in_features) + "]");
  if (inputs.size(0) == 0) throw std::runtime_error(inputs_path + " has no rows (shape " +
                                                    shape_of(inputs) + ")");
  if (logits.dim() != 2 || logits.size(1) != m.num_classes)
    throw std::runtime_error(logits_path + " has shape " + shape_of(logits) +
                             "; the model returns float32 [N, " + std::to_string(m.num_classes) + "]");
  if (logits.size(0) != inputs.size(0))
    throw std::runtime_error(inputs_path + " has " + std::to_string(inputs.size(0)) + " rows but " +
                             logits_path + " has " + std::to_string(logits.size(0)));
  for (const auto& [t, path] : {std::pair{inputs, inputs_path}, std::pair{logits, logits_path}}) {
    const int64_t bad = (~torch::isfinite(t)).any(1).sum().item<int64_t>();
    if (bad) throw std::runtime_error(path + " has NaN or infinite values in " +
                                      std::to_string(bad) + " row(s)");
  }
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

constexpr const char* kUsage =
    "usage: dhp_check BUNDLE_DIR [--backend torchscript|pt2] [--device cpu|cuda] "
    "[--atol A] [--rtol R] [--inputs X.npy --logits Y.npy]";

// A command-line mistake: one line on stderr, exit status 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string bundle, device = "cpu", backend = "torchscript", inputs, logits;
  double atol = kAtol, rtol = kRtol;
};

// A tolerance, all of the text a number (std::atof read "abc" as 0), finite and >= 0.
double parse_tolerance(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const double value = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || errno == ERANGE || !std::isfinite(value) || value < 0)
    throw UsageError(flag + " must be a finite number >= 0, got '" + text + "'");
  return value;
}

Options parse_options(int argc, char** argv) {
  if (argv[1][0] == '-') throw UsageError("the first argument must be BUNDLE_DIR");
  Options o;
  o.bundle = argv[1];
  for (int i = 2; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg != "--device" && arg != "--backend" && arg != "--atol" && arg != "--rtol" &&
        arg != "--inputs" && arg != "--logits")
      throw UsageError("unknown argument '" + arg + "'");
    if (i + 1 >= argc) throw UsageError(arg + " needs a value");
    const std::string value = argv[++i];
    if (arg == "--device") o.device = value;
    else if (arg == "--backend") o.backend = value;
    else if (arg == "--atol") o.atol = parse_tolerance(arg, value);
    else if (arg == "--rtol") o.rtol = parse_tolerance(arg, value);
    else if (arg == "--inputs") o.inputs = value;
    else o.logits = value;
  }
  if (o.inputs.empty() != o.logits.empty())
    throw UsageError("--inputs and --logits go together (the inputs and their expected logits)");
  return o;
}

// The gist of a LibTorch error on one line: TorchScript's message is a traceback whose last
// "RuntimeError: " line says what went wrong; anything else, its first line.
std::string one_line(const std::string& message) {
  const auto at = message.rfind("RuntimeError: ");
  std::stringstream rest(message.substr(at == std::string::npos ? 0 : at + 14));
  std::string line;
  while (std::getline(rest, line) && line.find_first_not_of(' ') == std::string::npos) {
  }
  return line;
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
    std::shared_ptr<torch::inductor::AOTIModelPackageLoader> loader;
    try {
      loader = std::make_shared<torch::inductor::AOTIModelPackageLoader>(bundle + "/model.pt2");
    } catch (const c10::Error& err) {
      throw std::runtime_error(bundle + "/model.pt2 is damaged or unreadable (" +
                               one_line(err.what_without_backtrace()) + ")");
    }
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
  std::shared_ptr<torch::jit::script::Module> module;
  try {
    module = std::make_shared<torch::jit::script::Module>(torch::jit::load(bundle + "/model.ts", device));
  } catch (const c10::Error& err) {
    throw std::runtime_error(bundle + "/model.ts is damaged or unreadable (" +
                             one_line(err.what_without_backtrace()) + ")");
  }
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
                 const Manifest& manifest, const std::string& inputs_path,
                 const std::string& logits_path, double atol, double rtol) {
  const auto inputs = load_f32(inputs_path), golden = load_f32(logits_path);
  validate_pair(inputs, golden, manifest, inputs_path, logits_path);
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
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      std::cout << kUsage << "\n";
      return 0;
    }
  }
  if (argc < 2) {
    std::cerr << kUsage << "\n";
    return 2;
  }
  Options o;
  try {
    o = parse_options(argc, argv);
  } catch (const UsageError& err) {
    std::cerr << "dhp_check: " << err.what() << " (dhp_check --help: usage)\n";
    return 2;
  }
  try {
    const Manifest manifest = read_manifest(o.bundle);
    if (manifest.plastic && !o.inputs.empty())
      throw std::runtime_error(o.bundle + " is a plastic bundle: it replays its golden stream of "
                               "calls; --inputs/--logits check frozen bundles only");
    const torch::Device device(o.device);
    if (device.is_cuda() && !torch::cuda::is_available())
      throw std::runtime_error("device cuda requested but LibTorch sees no CUDA device");
    std::shared_ptr<void> keep;
    const Call call = open_model(o.bundle, o.backend, device, keep);
    const std::string label = std::string(o.backend == "pt2" ? "aoti " : "libtorch ") +
                              TORCH_VERSION + "/" + o.device;
    if (manifest.plastic) return check_plastic(call, o.bundle, label, device, o.atol, o.rtol);
    const bool goldens = o.inputs.empty();
    return check_frozen(call, label, device, manifest,
                        goldens ? o.bundle + "/golden_inputs.npy" : o.inputs,
                        goldens ? o.bundle + "/golden_logits.npy" : o.logits, o.atol, o.rtol);
  } catch (const c10::Error& err) {
    std::cerr << "dhp_check: LibTorch error: " << one_line(err.what_without_backtrace()) << "\n";
    return 2;
  } catch (const std::exception& err) {
    std::cerr << "dhp_check: " << err.what() << "\n";
    return 2;
  }
}
