// dhp_check: prove a dhp-export bundle's TorchScript model on this host with LibTorch.
//
//   dhp_check BUNDLE_DIR [--device cpu|cuda] [--atol A] [--rtol R] [--inputs X.npy --logits Y.npy]
//
// Loads BUNDLE_DIR/model.ts (eval mode), runs the golden inputs (golden_inputs.npy, float32
// [G, 784]) as one batch and one row at a time, and compares with the eager model's logits
// (golden_logits.npy, float32 [G, C]): passes when |out - golden| <= atol + rtol * |golden|
// everywhere and every argmax agrees. --inputs / --logits check another pair of float32 .npy files
// instead (e.g. a whole test set). Exit status: 0 pass, 1 parity failure, 2 usage or load error.
// Checksums are the Python runtime's job (dhp-serve check); this program needs no JSON library.

#include <torch/cuda.h>
#include <torch/script.h>
#include <torch/version.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
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

struct Npy {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// A C-order little-endian float32 .npy (format 1.0, 2.0 or 3.0), as numpy.save writes it.
Npy read_npy_f32(const std::string& path) {
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
  if (header.find("'descr': '<f4'") == std::string::npos)
    throw std::runtime_error(path + ": expected little-endian float32 ('<f4'), header " + header);
  if (header.find("'fortran_order': False") == std::string::npos)
    throw std::runtime_error(path + ": expected C order");
  std::smatch match;
  if (!std::regex_search(header, match, std::regex("'shape': \\(([0-9, ]*)\\)")))
    throw std::runtime_error(path + ": no shape in header");
  Npy npy;
  std::stringstream dims(match[1].str());
  for (std::string dim; std::getline(dims, dim, ',');)
    if (dim.find_first_not_of(' ') != std::string::npos) npy.shape.push_back(std::stoll(dim));
  int64_t count = 1;
  for (auto d : npy.shape) count *= d;
  const size_t start = offset + header_len;
  if (bytes.size() - start != static_cast<size_t>(count) * sizeof(float))
    throw std::runtime_error(path + ": data size does not match its shape");
  npy.data.resize(count);
  std::memcpy(npy.data.data(), bytes.data() + start, count * sizeof(float));
  return npy;
}

void check_manifest(const std::string& bundle) {
  const std::string manifest = read_file(bundle + "/manifest.json");
  if (manifest.find("\"format\": \"dhp-deploy-bundle\"") == std::string::npos)
    throw std::runtime_error(bundle + "/manifest.json is not a dhp-deploy-bundle manifest");
  std::smatch match;
  if (!std::regex_search(manifest, match, std::regex("\"format_version\": ([0-9]+)")) ||
      std::stoi(match[1].str()) != kBundleVersion)
    throw std::runtime_error(bundle + "/manifest.json: bundle format version is not " +
                             std::to_string(kBundleVersion));
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
  std::cerr << "usage: dhp_check BUNDLE_DIR [--device cpu|cuda] [--atol A] [--rtol R] "
               "[--inputs X.npy --logits Y.npy]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  std::string bundle = argv[1], device_name = "cpu";
  std::string inputs_path = bundle + "/golden_inputs.npy", logits_path = bundle + "/golden_logits.npy";
  double atol = kAtol, rtol = kRtol;
  for (int i = 2; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i + 1 >= argc) return usage();
    if (arg == "--device") device_name = argv[++i];
    else if (arg == "--atol") atol = std::atof(argv[++i]);
    else if (arg == "--rtol") rtol = std::atof(argv[++i]);
    else if (arg == "--inputs") inputs_path = argv[++i];
    else if (arg == "--logits") logits_path = argv[++i];
    else return usage();
  }
  try {
    check_manifest(bundle);
    const torch::Device device(device_name);
    if (device.is_cuda() && !torch::cuda::is_available())
      throw std::runtime_error("device cuda requested but LibTorch sees no CUDA device");
    torch::jit::script::Module module = torch::jit::load(bundle + "/model.ts", device);
    module.eval();  // a loaded module keeps the training flag it was saved with

    const Npy x = read_npy_f32(inputs_path);
    const Npy y = read_npy_f32(logits_path);
    if (x.shape.size() != 2 || y.shape.size() != 2 || x.shape[0] != y.shape[0])
      throw std::runtime_error("golden arrays have inconsistent shapes");
    const auto inputs = torch::from_blob(const_cast<float*>(x.data.data()), x.shape).clone();
    const auto golden = torch::from_blob(const_cast<float*>(y.data.data()), y.shape).clone();

    torch::InferenceMode guard;
    const auto batched = module.forward({inputs.to(device)}).toTensor().to(torch::kCPU);
    std::vector<at::Tensor> rows;
    for (int64_t i = 0; i < x.shape[0]; ++i)
      rows.push_back(module.forward({inputs.slice(0, i, i + 1).to(device)}).toTensor().to(torch::kCPU));
    const auto single = torch::cat(rows);
    if (batched.sizes() != golden.sizes() || single.sizes() != golden.sizes())
      throw std::runtime_error("model output shape does not match " + logits_path);

    const Errors a = compare(batched, golden, atol, rtol), b = compare(single, golden, atol, rtol);
    const int64_t n = x.shape[0];
    const bool ok = a.within && b.within && a.argmax_agree == n && b.argmax_agree == n;
    std::printf("libtorch %s/%s: max_abs_error=%.3e max_rel_error=%.3e argmax_agree=%lld/%lld "
                "batches=[%lld, 1] atol=%g rtol=%g %s\n",
                TORCH_VERSION, device_name.c_str(), std::max(a.max_abs, b.max_abs),
                std::max(a.max_rel, b.max_rel),
                static_cast<long long>(std::min(a.argmax_agree, b.argmax_agree)),
                static_cast<long long>(n), static_cast<long long>(n), atol, rtol,
                ok ? "OK" : "FAIL");
    return ok ? 0 : 1;
  } catch (const c10::Error& err) {
    std::cerr << "dhp_check: LibTorch error: " << err.what_without_backtrace() << "\n";
    return 2;
  } catch (const std::exception& err) {
    std::cerr << "dhp_check: " << err.what() << "\n";
    return 2;
  }
}
