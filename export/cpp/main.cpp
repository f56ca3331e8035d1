// fastddpm_sample: the whole DDPM/DDIM/DPM-Solver++ sampling loop over an exported step graph,
// with the ONNX Runtime C++ API. The graph holds the sampler (timesteps and coefficients), so
// the host is a loop and a noise source:
//
//   x = x_T;  for step in 0..S-1:  (x, x0) = graph(x, step, z_step [, x0_prev = previous x0])
//
// Noise: seeded Gaussian (std::mt19937_64, drawn in the order of the noise file), or a noise
// file written by fastddpm.export.step_loop: raw little-endian float32 of shape
// (S + 1, N, C, H, W), x_T first. Output: an 8-bit PGM (1 channel) or PPM (3 channels) grid, and
// optionally the raw float32 samples (N, C, H, W).
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Args {
  std::string model;
  int64_t count = 16;
  uint64_t seed = 0;
  int threads = 0;  // 0: ONNX Runtime's default
  std::string noise_file;
  std::string out = "samples.pgm";
  std::string raw_out;
};

const char* kUsage =
    "usage: fastddpm_sample --model STEP.onnx [--count N] [--seed S] [--threads T]\n"
    "                       [--noise FILE] [--out GRID.pgm|.ppm] [--raw-out FILE]\n";

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string key = argv[i];
    if (key == "-h" || key == "--help") {
      std::cout << kUsage;
      std::exit(0);
    }
    if (i + 1 >= argc) throw std::invalid_argument(key + " needs a value");
    std::string value = argv[++i];
    if (key == "--model") a.model = value;
    else if (key == "--count") a.count = std::stoll(value);
    else if (key == "--seed") a.seed = std::stoull(value);
    else if (key == "--threads") a.threads = std::stoi(value);
    else if (key == "--noise") a.noise_file = value;
    else if (key == "--out") a.out = value;
    else if (key == "--raw-out") a.raw_out = value;
    else throw std::invalid_argument("unknown argument " + key);
  }
  if (a.model.empty()) throw std::invalid_argument("--model is required");
  if (a.count <= 0) throw std::invalid_argument("--count must be positive");
  return a;
}

// Noise for the whole run, in noise-file order: x_T, then one z per step.
class NoiseSource {
 public:
  NoiseSource(const Args& a, size_t per_draw, int64_t steps) : per_draw_(per_draw), gen_(a.seed) {
    if (a.noise_file.empty()) return;
    std::ifstream f(a.noise_file, std::ios::binary | std::ios::ate);
    if (!f) throw std::runtime_error("cannot open noise file " + a.noise_file);
    const size_t want = per_draw * static_cast<size_t>(steps + 1);
    const auto bytes = static_cast<size_t>(f.tellg());
    if (bytes != want * sizeof(float))
      throw std::runtime_error("noise file " + a.noise_file + " holds " +
                               std::to_string(bytes / sizeof(float)) + " floats; this graph and --count need " +
                               std::to_string(want) + " = (steps + 1) x N x C x H x W");
    file_.resize(want);
    f.seekg(0);
    f.read(reinterpret_cast<char*>(file_.data()), static_cast<std::streamsize>(bytes));
  }

  // Fills `out` with draw number `k` (0: x_T, s + 1: the z of step s).
  void draw(size_t k, std::vector<float>& out) {
    if (!file_.empty()) {
      std::copy_n(file_.begin() + static_cast<std::ptrdiff_t>(k * per_draw_), per_draw_, out.begin());
      return;
    }
    for (float& v : out) v = normal_(gen_);
  }

 private:
  size_t per_draw_;
  std::vector<float> file_;
  std::mt19937_64 gen_;
  std::normal_distribution<float> normal_{0.0f, 1.0f};
};

std::string metadata(const Ort::Session& session, const char* key) {
  Ort::AllocatorWithDefaultOptions alloc;
  Ort::ModelMetadata meta = session.GetModelMetadata();
  Ort::AllocatedStringPtr value = meta.LookupCustomMetadataMapAllocated(key, alloc);
  if (!value) throw std::runtime_error(std::string("the model has no '") + key +
                                       "' metadata: export a step graph with fastddpm export --what step");
  return value.get();
}

// The same grid as fastddpm.images.grid: ceil(sqrt(N)) per row, 2 px padding, [-1, 1] → 0..255.
void write_grid(const std::string& path, const std::vector<float>& x, int64_t n, int64_t c,
                int64_t h, int64_t w) {
  if (c != 1 && c != 3) throw std::runtime_error("PGM/PPM output needs 1 or 3 channels");
  const int64_t pad = 2, nrow = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(n))));
  const int64_t rows = (n + nrow - 1) / nrow;
  const int64_t height = rows * (h + pad) + pad, width = nrow * (w + pad) + pad;
  std::vector<uint8_t> canvas(static_cast<size_t>(height * width * c), 0);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t top = pad + (k / nrow) * (h + pad), left = pad + (k % nrow) * (w + pad);
    for (int64_t ch = 0; ch < c; ++ch)
      for (int64_t i = 0; i < h; ++i)
        for (int64_t j = 0; j < w; ++j) {
          const float v = std::clamp(x[static_cast<size_t>(((k * c + ch) * h + i) * w + j)], -1.0f, 1.0f);
          canvas[static_cast<size_t>(((top + i) * width + left + j) * c + ch)] =
              static_cast<uint8_t>(std::nearbyint((v + 1.0f) * 127.5f));
        }
  }
  std::ofstream f(path, std::ios::binary);
  f << (c == 1 ? "P5" : "P6") << "\n" << width << " " << height << "\n255\n";
  f.write(reinterpret_cast<const char*>(canvas.data()), static_cast<std::streamsize>(canvas.size()));
  if (!f) throw std::runtime_error("cannot write " + path);
}

int run(const Args& a) {
  Ort::Env env{ORT_LOGGING_LEVEL_WARNING, "fastddpm"};
  Ort::SessionOptions options;
  if (a.threads > 0) options.SetIntraOpNumThreads(a.threads);
  options.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
  Ort::Session session{env, a.model.c_str(), options};

  if (metadata(session, "fastddpm.graph") != "step")
    throw std::runtime_error(a.model + " is not a step graph: export it with --what step");
  const int64_t steps = std::stoll(metadata(session, "fastddpm.num_steps"));

  // inputs by name; own the strings, ORT wants const char* arrays
  Ort::AllocatorWithDefaultOptions alloc;
  std::vector<std::string> input_names;
  for (size_t i = 0; i < session.GetInputCount(); ++i)
    input_names.emplace_back(session.GetInputNameAllocated(i, alloc).get());
  const bool uses_x0_prev =
      std::find(input_names.begin(), input_names.end(), "x0_prev") != input_names.end();

  const auto x_at = std::find(input_names.begin(), input_names.end(), "x") - input_names.begin();
  if (x_at == static_cast<std::ptrdiff_t>(input_names.size()))
    throw std::runtime_error(a.model + " has no input 'x'; export it with fastddpm export --what step");
  const Ort::TypeInfo x_type = session.GetInputTypeInfo(static_cast<size_t>(x_at));  // owns x_info
  const auto x_info = x_type.GetTensorTypeAndShapeInfo();
  if (x_info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
    throw std::runtime_error("this sampler runs fp32 step graphs (input 'x' float32); export with --dtype fp32");
  std::vector<int64_t> shape = x_info.GetShape();  // (N, C, H, W), N = -1 when dynamic
  if (shape[0] != -1 && shape[0] != a.count)
    throw std::runtime_error("the graph was exported for batch " + std::to_string(shape[0]) +
                             "; pass --count " + std::to_string(shape[0]) + " or export --batch dynamic");
  shape[0] = a.count;
  const size_t numel = static_cast<size_t>(shape[0] * shape[1] * shape[2] * shape[3]);

  NoiseSource noise(a, numel, steps);
  std::vector<float> x(numel), z(numel), x0_prev(numel, 0.0f);
  noise.draw(0, x);
  std::vector<int64_t> step_value{0}, step_shape{1};

  auto mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::vector<const char*> in_names, out_names{"x_prev", "x0"};
  for (const auto& name : input_names) in_names.push_back(name.c_str());
  for (int64_t s = 0; s < steps; ++s) {
    step_value[0] = s;
    noise.draw(static_cast<size_t>(s + 1), z);
    std::vector<Ort::Value> inputs;
    for (const auto& name : input_names) {
      if (name == "x") inputs.push_back(Ort::Value::CreateTensor<float>(mem, x.data(), numel, shape.data(), 4));
      else if (name == "step") inputs.push_back(Ort::Value::CreateTensor<int64_t>(mem, step_value.data(), 1, step_shape.data(), 1));
      else if (name == "noise") inputs.push_back(Ort::Value::CreateTensor<float>(mem, z.data(), numel, shape.data(), 4));
      else if (name == "x0_prev") inputs.push_back(Ort::Value::CreateTensor<float>(mem, x0_prev.data(), numel, shape.data(), 4));
      else throw std::runtime_error("unexpected graph input '" + name + "'");
    }
    auto outs = session.Run(Ort::RunOptions{nullptr}, in_names.data(), inputs.data(), inputs.size(),
                            out_names.data(), out_names.size());
    const float* x_prev = outs[0].GetTensorData<float>();
    std::copy_n(x_prev, numel, x.begin());
    if (uses_x0_prev) std::copy_n(outs[1].GetTensorData<float>(), numel, x0_prev.begin());
  }

  write_grid(a.out, x, shape[0], shape[1], shape[2], shape[3]);
  if (!a.raw_out.empty()) {
    std::ofstream f(a.raw_out, std::ios::binary);
    f.write(reinterpret_cast<const char*>(x.data()), static_cast<std::streamsize>(numel * sizeof(float)));
    if (!f) throw std::runtime_error("cannot write " + a.raw_out);
  }
  std::cerr << "wrote " << shape[0] << " images (" << steps << " steps) to " << a.out << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // the headers' API version must be one the loaded library serves, or every call would crash
  if (OrtGetApiBase()->GetApi(ORT_API_VERSION) == nullptr) {
    std::cerr << "fastddpm_sample: error: the ONNX Runtime library (" << OrtGetApiBase()->GetVersionString()
              << ") is older than the headers (API " << ORT_API_VERSION << "); use a newer library\n";
    return 2;
  }
  try {
    return run(parse_args(argc, argv));
  } catch (const std::invalid_argument& e) {  // bad command line (also std::stoll's)
    std::cerr << "fastddpm_sample: error: " << e.what() << "\n" << kUsage;
  } catch (const std::exception& e) {  // Ort::Exception included
    std::cerr << "fastddpm_sample: error: " << e.what() << "\n";
  }
  return 2;
}
