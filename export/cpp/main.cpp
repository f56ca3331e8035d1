// fastddpm_sample: the whole DDPM/DDIM/DPM-Solver++/UniPC/iPNDM sampling loop over an exported
// step graph, with the ONNX Runtime C++ API. The graph holds the sampler (timesteps and
// coefficients), so the host is a loop, a noise source and, for multistep samplers (metadata
// history K > 0), a ring of the x0 of the last K steps — the x0 of step s in slot s mod K, zero at
// the start:
//
//   x = x_T;  for step in 0..S-1:  (x, x0) = graph(x, step, z_step [, x0_history = ring]);
//                                  ring[step mod K] = x0
//
// or, where the metadata's history_kind is "eps" (iPNDM), a ring of the model's eps: the graph
// reads it as eps_history and returns its eps as a third output, kept the same way. A graph
// without history_kind (exported before it existed) has an x0 ring; any other kind is refused.
//
// Noise: seeded Gaussian (std::mt19937_64, drawn in the order of the noise file), or a noise
// file written by fastddpm.export.step_loop: raw little-endian float32 of shape
// (S + 1, N, C, H, W), x_T first. Output: an 8-bit PGM (1 channel) or PPM (3 channels) grid, and
// optionally the raw float32 samples (N, C, H, W).
//
// A model file is input like any other, so everything read from it is checked before it is used:
// the metadata (parsed strictly), the input and output names, element types and shapes the graph
// declares, and the type, shape and size of every tensor a Run returns (a declared shape is not a
// promise about what comes back). Every size is bounded before anything is allocated. Outputs go
// to `<path>.tmp.<pid>` and are renamed into place only after the whole run has succeeded. Any
// error is one line on stderr and exit code 2, with no output written.
#include <onnxruntime_cxx_api.h>

#include <unistd.h>  // getpid, fsync

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iostream>
#include <limits>
#include <mutex>
#include <new>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace fs = std::filesystem;

namespace {

// What a command line or a model may ask for; anything above is refused before allocating.
constexpr int64_t kMaxCount = 1 << 16;                    // --count
constexpr int64_t kMaxThreads = 1024;                     // --threads
constexpr int64_t kMaxSteps = 100000;                     // fastddpm.num_steps
constexpr int64_t kMaxHistory = 8;                        // fastddpm.history: x0 ring slots
constexpr int64_t kMaxChannels = 4096;                    // unet.in_channels
constexpr int64_t kMaxImageSize = 1 << 16;                // unet.image_size
constexpr uint64_t kMaxBufferFloats = uint64_t{1} << 28;  // N*C*H*W: 1 GiB per float32 buffer
constexpr uint64_t kMaxGridBytes = uint64_t{1} << 31;     // the 8-bit PGM/PPM canvas
constexpr int kMaxJsonDepth = 64;                         // nesting of the "fastddpm" JSON

struct UsageError : std::runtime_error {  // a bad command line: the message points at --help
  using std::runtime_error::runtime_error;
};

[[noreturn]] void fail(const std::string& message) { throw std::runtime_error(message); }

// `text` for an error message: quoted, at most 40 characters, control characters escaped (a
// value from a model file may hold newlines, and an error is one line).
std::string quoted(const std::string& text) {
  std::string out = "\"";
  for (size_t i = 0; i < text.size() && i < 40; ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c < 0x20 || c == 0x7f || c == '"' || c == '\\') {
      char hex[8];
      std::snprintf(hex, sizeof hex, "\\x%02x", c);
      out += hex;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + (text.size() > 40 ? "...\"" : "\"");
}

// Control characters → spaces, so that any message (ONNX Runtime's included) prints as one line.
std::string one_line(std::string text) {
  for (char& c : text)
    if (static_cast<unsigned char>(c) < 0x20) c = ' ';
  while (!text.empty() && text.back() == ' ') text.pop_back();
  return text;
}

bool all_digits(const std::string& text, size_t from) {
  if (from >= text.size()) return false;
  for (size_t i = from; i < text.size(); ++i)
    if (text[i] < '0' || text[i] > '9') return false;
  return true;
}

// A whole decimal integer in [lo, hi]. std::stoll would take "4x" as 4, " 4" and "+4" as 4, and
// wrap nothing but throw a message-less out_of_range; here all of those are refused in one line.
int64_t parse_int(const std::string& what, const std::string& text, int64_t lo, int64_t hi) {
  const size_t first_digit = !text.empty() && text[0] == '-' ? 1 : 0;
  errno = 0;
  const long long value = all_digits(text, first_digit) ? std::strtoll(text.c_str(), nullptr, 10) : 0;
  if (!all_digits(text, first_digit) || errno == ERANGE || value < lo || value > hi)
    fail(what + " must be an integer in " + std::to_string(lo) + ".." + std::to_string(hi) + ", not " +
         quoted(text));
  return value;
}

// A seed is any 64-bit unsigned integer, written in decimal; std::stoull would turn "-1" into
// 2^64 - 1, so a sign is refused.
uint64_t parse_seed(const std::string& text) {
  errno = 0;
  const unsigned long long value = all_digits(text, 0) ? std::strtoull(text.c_str(), nullptr, 10) : 0;
  if (!all_digits(text, 0) || errno == ERANGE)
    fail("--seed must be an integer in 0.." + std::to_string(std::numeric_limits<uint64_t>::max()) +
         ", not " + quoted(text));
  return value;
}

// a * b * ... of non-negative factors, refused above `limit` (each step is checked before it can
// wrap), for every size computed from the command line or the model.
uint64_t checked_product(std::initializer_list<int64_t> factors, uint64_t limit, const std::string& what) {
  uint64_t product = 1;
  for (const int64_t f : factors) {
    const auto factor = static_cast<uint64_t>(f);
    if (f < 0 || (factor != 0 && product > limit / factor))
      fail(what + " is too large (more than " + std::to_string(limit) + ")");
    product *= factor;
  }
  return product;
}

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

bool same_file(const std::string& a, const std::string& b) {
  std::error_code ec1, ec2;  // paths that need not exist yet
  const fs::path pa = fs::weakly_canonical(fs::absolute(a), ec1), pb = fs::weakly_canonical(fs::absolute(b), ec2);
  return ec1 || ec2 ? a == b : pa == pb;
}

Args parse_args(int argc, char** argv) {
  Args a;
  std::vector<std::string> seen;
  for (int i = 1; i < argc; ++i) {
    const std::string key = argv[i];
    if (key == "-h" || key == "--help") {
      std::cout << kUsage;
      std::exit(0);
    }
    const char* const flags[] = {"--model", "--count", "--seed", "--threads", "--noise", "--out", "--raw-out"};
    if (std::find(std::begin(flags), std::end(flags), key) == std::end(flags))
      throw UsageError("unknown argument " + quoted(key));
    if (std::find(seen.begin(), seen.end(), key) != seen.end()) throw UsageError(key + " is given twice");
    seen.push_back(key);
    // a missing value: the end of the line, or the next flag (`--out --count 4`)
    if (i + 1 >= argc || std::string(argv[i + 1]).rfind("--", 0) == 0) throw UsageError(key + " needs a value");
    const std::string value = argv[++i];
    try {
      if (key == "--count") a.count = parse_int(key, value, 1, kMaxCount);
      else if (key == "--seed") a.seed = parse_seed(value);
      else if (key == "--threads") a.threads = static_cast<int>(parse_int(key, value, 0, kMaxThreads));
      else if (value.empty()) fail(key + " needs a file name, not \"\"");
      else if (key == "--model") a.model = value;
      else if (key == "--noise") a.noise_file = value;
      else if (key == "--out") a.out = value;
      else a.raw_out = value;
    } catch (const std::runtime_error& e) {
      throw UsageError(e.what());
    }
  }
  if (a.model.empty()) throw UsageError("--model is required");
  if (!a.raw_out.empty() && same_file(a.out, a.raw_out))
    throw UsageError("--out and --raw-out name the same file");
  return a;
}

void require_regular_file(const std::string& flag, const std::string& path) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (!fs::exists(st)) fail(flag + " " + path + ": no such file");
  if (!fs::is_regular_file(st)) fail(flag + " " + path + " is not a regular file");
}

// ---------------------------------------------------------------------------------------------
// Outputs: `<path>.tmp.<pid>` in the same folder (so the rename is atomic), created exclusively
// (never truncating a file that is someone else's), and removed by the destructor unless commit()
// renamed it onto `path` — an exception anywhere leaves no temp file behind.
class TempFile {
 public:
  explicit TempFile(std::string path) : path_(std::move(path)), tmp_(path_ + ".tmp." + std::to_string(getpid())) {
    file_ = std::fopen(tmp_.c_str(), "wbx");
    if (file_ == nullptr) fail_errno();
  }
  ~TempFile() {
    if (file_ != nullptr) std::fclose(file_);
    if (!committed_) std::remove(tmp_.c_str());
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;

  void write(const void* data, size_t bytes) {
    if (std::fwrite(data, 1, bytes, file_) != bytes) fail_errno();
  }
  // Flushed to disk and closed, so that a full disk shows here, before any output is renamed.
  void close() {
    std::FILE* f = std::exchange(file_, nullptr);
    if (std::fflush(f) != 0 || fsync(fileno(f)) != 0) {
      const int error = errno;  // fclose may set its own
      std::fclose(f);
      errno = error;
      fail_errno();
    }
    if (std::fclose(f) != 0) fail_errno();
  }
  void commit() {
    if (std::rename(tmp_.c_str(), path_.c_str()) != 0) fail_errno();
    committed_ = true;
  }

 private:
  [[noreturn]] void fail_errno() const { fail("cannot write " + path_ + ": " + std::strerror(errno)); }
  std::string path_, tmp_;
  std::FILE* file_ = nullptr;
  bool committed_ = false;
};

// Before the run, so that a bad --out fails at once rather than after sampling: the same temp
// file the final write uses, created and removed.
void check_writable(const std::string& flag, const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) fail(flag + " " + path + " is a directory");
  TempFile probe(path);
}

// ---------------------------------------------------------------------------------------------
// The "fastddpm" metadata is JSON. A strict reader (RFC 8259, whole text, bounded nesting, numbers
// kept as written so that an integer field can be told from 3.0 or 1e3) — enough to read the
// U-Net config and the sampler's table size, and to refuse anything malformed.
struct Json {
  enum class Kind { Null, Bool, Number, String, Array, Object } kind = Kind::Null;
  bool boolean = false;
  std::string text;                // a String's value, or a Number as written
  std::vector<std::string> keys;   // an Object's keys, in order
  std::vector<Json> values;        // an Object's values, or an Array's items

  // The member `key` of an Object, or nullptr where it has none; a repeated key is an error.
  const Json* find(const std::string& key, const std::string& where) const {
    const Json* found = nullptr;
    for (size_t i = 0; i < keys.size(); ++i)
      if (keys[i] == key) {
        if (found != nullptr) fail("the fastddpm metadata has " + where + key + " twice");
        found = &values[i];
      }
    return kind == Kind::Object ? found : nullptr;
  }
  // The member `key` of an Object; a missing or repeated key is an error.
  const Json& at(const std::string& key, const std::string& where) const {
    const Json* found = find(key, where);
    if (found == nullptr) fail("the fastddpm metadata has no " + where + key);
    return *found;
  }
};

class JsonReader {
 public:
  explicit JsonReader(const std::string& text) : s_(text) {}
  Json parse() {
    Json v = value(0);
    skip_space();
    if (i_ != s_.size()) error("text after the value");
    return v;
  }

 private:
  [[noreturn]] void error(const std::string& what) const {
    fail("the fastddpm metadata is not valid JSON (" + what + " at offset " + std::to_string(i_) + ")");
  }
  void skip_space() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  bool eat(char c) {
    skip_space();
    if (i_ < s_.size() && s_[i_] == c) return ++i_, true;
    return false;
  }
  bool eat_word(const char* word) {
    const size_t n = std::strlen(word);
    if (s_.compare(i_, n, word) != 0) return false;
    return i_ += n, true;
  }
  size_t digits() {
    const size_t start = i_;
    while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') ++i_;
    return i_ - start;
  }

  Json value(int depth) {
    if (depth > kMaxJsonDepth) error("nesting deeper than " + std::to_string(kMaxJsonDepth));
    skip_space();
    if (i_ == s_.size()) error("unexpected end");
    Json v;
    const char c = s_[i_];
    if (c == '{' || c == '[') {
      ++i_;
      v.kind = c == '{' ? Json::Kind::Object : Json::Kind::Array;
      const char close = c == '{' ? '}' : ']';
      if (eat(close)) return v;
      do {
        if (v.kind == Json::Kind::Object) {
          skip_space();
          if (i_ == s_.size() || s_[i_] != '"') error("expected a key");
          v.keys.push_back(string());
          if (!eat(':')) error("expected ':'");
        }
        v.values.push_back(value(depth + 1));
      } while (eat(','));
      if (!eat(close)) error(std::string("expected ',' or '") + close + "'");
    } else if (c == '"') {
      v.kind = Json::Kind::String;
      v.text = string();
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      v.kind = Json::Kind::Number;
      v.text = number();
    } else if (eat_word("true") || eat_word("false")) {
      v.kind = Json::Kind::Bool;
      v.boolean = c == 't';
    } else if (eat_word("null")) {
      v.kind = Json::Kind::Null;
    } else {
      error("unexpected character");
    }
    return v;
  }

  std::string number() {  // -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
    const size_t start = i_;
    if (s_[i_] == '-') ++i_;
    if (i_ < s_.size() && s_[i_] == '0') ++i_;
    else if (digits() == 0) error("bad number");
    if (i_ < s_.size() && s_[i_] == '.' && (++i_, digits() == 0)) error("bad number");
    if (i_ < s_.size() && (s_[i_] == 'e' || s_[i_] == 'E')) {
      ++i_;
      if (i_ < s_.size() && (s_[i_] == '+' || s_[i_] == '-')) ++i_;
      if (digits() == 0) error("bad number");
    }
    return s_.substr(start, i_ - start);
  }

  std::string string() {  // at the opening quote; \u escapes of the BMP become UTF-8
    std::string out;
    for (++i_;;) {
      if (i_ == s_.size()) error("unterminated string");
      const auto c = static_cast<unsigned char>(s_[i_++]);
      if (c == '"') return out;
      if (c < 0x20) error("control character in a string");
      if (c != '\\') {
        out += static_cast<char>(c);
        continue;
      }
      if (i_ == s_.size()) error("unterminated string");
      const char e = s_[i_++];
      const char* const plain = std::strchr("\"\\/bfnrt", e);
      if (e != '\0' && plain != nullptr) {
        out += "\"\\/\b\f\n\r\t"[plain - "\"\\/bfnrt"];
      } else if (e == 'u') {
        unsigned code = 0;
        for (int k = 0; k < 4; ++k, ++i_) {
          const char h = i_ < s_.size() ? s_[i_] : '\0';
          const int digit = h >= '0' && h <= '9' ? h - '0'
                            : h >= 'a' && h <= 'f' ? h - 'a' + 10
                            : h >= 'A' && h <= 'F' ? h - 'A' + 10 : -1;
          if (digit < 0) error("bad \\u escape");
          code = code * 16 + static_cast<unsigned>(digit);
        }
        if (code < 0x80) {
          out += static_cast<char>(code);
        } else if (code < 0x800) {
          out += static_cast<char>(0xc0 | (code >> 6));
          out += static_cast<char>(0x80 | (code & 0x3f));
        } else {
          out += static_cast<char>(0xe0 | (code >> 12));
          out += static_cast<char>(0x80 | ((code >> 6) & 0x3f));
          out += static_cast<char>(0x80 | (code & 0x3f));
        }
      } else {
        error("bad escape");
      }
    }
  }

  const std::string& s_;
  size_t i_ = 0;
};

// An integer field of the metadata JSON, in [lo, hi] (3, not 3.0, "3" or 3e0).
int64_t json_int(const Json& v, const std::string& name, int64_t lo, int64_t hi) {
  if (v.kind != Json::Kind::Number) fail("the fastddpm metadata's " + name + " is not a number");
  return parse_int("the fastddpm metadata's " + name, v.text, lo, hi);
}

// ---------------------------------------------------------------------------------------------
// The model: metadata, and the inputs and outputs the graph declares.

// What the sampler needs to know about a step graph, every field checked.
struct StepGraph {
  int64_t steps = 0;    // S: the rows of the sampler table
  int64_t history = 0;  // K: slots of the ring, the graph's input ring_input (K, N, C, H, W)
  std::string history_kind = "x0";        // what the ring keeps: "x0" or "eps"
  std::string ring_input = "x0_history";  // x0_history, or eps_history for an eps ring
  std::vector<int64_t> image_shape;    // (N, C, H, W) with N = --count
  std::vector<int64_t> history_shape;  // (K, N, C, H, W)
  size_t numel = 0;                    // N*C*H*W, at most kMaxBufferFloats
  std::vector<std::string> inputs;   // the graph's input names, in its order
  std::vector<std::string> outputs;  // x_prev, x0 (, eps): the last one goes into the ring
};

std::string metadata(const Ort::ModelMetadata& meta, const char* key) {
  Ort::AllocatorWithDefaultOptions alloc;
  Ort::AllocatedStringPtr value = meta.LookupCustomMetadataMapAllocated(key, alloc);
  if (!value)
    fail(std::string("the model has no '") + key + "' metadata: export a step graph with fastddpm export --what step");
  return value.get();
}

// A metadata key that graphs exported before it existed lack: nullopt then.
std::optional<std::string> optional_metadata(const Ort::ModelMetadata& meta, const char* key) {
  Ort::AllocatorWithDefaultOptions alloc;
  Ort::AllocatedStringPtr value = meta.LookupCustomMetadataMapAllocated(key, alloc);
  if (!value) return std::nullopt;
  return std::string(value.get());
}

// What the ring keeps, from fastddpm.history_kind and the JSON's sampler.history_kind: both
// absent means x0 (graphs from before the key); otherwise they must agree on "x0" or "eps".
std::string read_history_kind(const Ort::ModelMetadata& meta, const Json& sampler) {
  const std::optional<std::string> flat = optional_metadata(meta, "fastddpm.history_kind");
  const Json* in_json = sampler.find("history_kind", "sampler.");
  if (flat && *flat != "x0" && *flat != "eps")
    fail("the metadata fastddpm.history_kind must be x0 or eps, not " + quoted(*flat) +
         "; this sampler knows no other history");
  if (in_json != nullptr && in_json->kind != Json::Kind::String)
    fail("the fastddpm metadata's sampler.history_kind is not a string");
  if (flat.has_value() != (in_json != nullptr) || (flat && *flat != in_json->text))
    fail("the metadata disagrees with itself: fastddpm.history_kind and the JSON's sampler.history_kind differ");
  return flat.value_or("x0");
}

std::string type_name(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    default: return "element type " + std::to_string(static_cast<int>(type));
  }
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i)
    out += (i ? ", " : "") + (shape[i] < 0 ? "?" : std::to_string(shape[i]));
  return out + (shape.size() == 1 ? ",)" : ")");
}

// A declared graph input or output must be a tensor of `type` whose rank is that of `want` and
// whose static dims equal `want`'s (a dynamic dim, -1, matches anything; the run checks it).
void check_declared(const char* kind, const std::string& name, const Ort::TypeInfo& info,
                    ONNXTensorElementDataType type, const std::vector<int64_t>& want) {
  const std::string what = std::string("graph ") + kind + " '" + name + "'";
  if (info.GetONNXType() != ONNX_TYPE_TENSOR) fail(what + " is not a tensor");
  const auto tensor = info.GetTensorTypeAndShapeInfo();
  if (tensor.GetElementType() != type)
    fail(what + " is " + type_name(tensor.GetElementType()) + ", not " + type_name(type) +
         (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
              ? " (this sampler runs fp32 step graphs; export with --dtype fp32)" : ""));
  const std::vector<int64_t> shape = tensor.GetShape();
  if (shape.size() != want.size())
    fail(what + " has rank " + std::to_string(shape.size()) + "; a step graph's is " +
         std::to_string(want.size()));
  if (want.size() == 4 && shape[0] != -1 && shape[0] != want[0])
    fail("the graph was exported for batch " + std::to_string(shape[0]) + "; pass --count " +
         std::to_string(shape[0]) + " or export --batch dynamic");
  for (size_t i = 0; i < shape.size(); ++i)
    if (shape[i] != -1 && shape[i] != want[i])
      fail(what + " has shape " + shape_text(shape) + "; the metadata's U-Net config and --count say " +
           shape_text(want));
}

// Reads and checks the metadata and the graph's declared inputs and outputs against each other.
StepGraph inspect(const Ort::Session& session, const Args& a) {
  const Ort::ModelMetadata meta = session.GetModelMetadata();
  if (metadata(meta, "fastddpm.graph") != "step")
    fail(a.model + " is not a step graph: export it with --what step");
  StepGraph g;
  g.steps = parse_int("the metadata fastddpm.num_steps", metadata(meta, "fastddpm.num_steps"), 1, kMaxSteps);
  g.history = parse_int("the metadata fastddpm.history", metadata(meta, "fastddpm.history"), 0, kMaxHistory);

  // the JSON must say the same as the flat keys, and gives the image shape
  const Json info = JsonReader(metadata(meta, "fastddpm")).parse();
  const Json& unet = info.at("unet", "");
  const Json& sampler = info.at("sampler", "");
  const int64_t channels = json_int(unet.at("in_channels", "unet."), "unet.in_channels", 1, kMaxChannels);
  const int64_t size = json_int(unet.at("image_size", "unet."), "unet.image_size", 1, kMaxImageSize);
  if (json_int(sampler.at("num_steps", "sampler."), "sampler.num_steps", 1, kMaxSteps) != g.steps)
    fail("the metadata disagrees with itself: fastddpm.num_steps and the JSON's sampler.num_steps differ");
  if (json_int(sampler.at("history", "sampler."), "sampler.history", 0, kMaxHistory) != g.history)
    fail("the metadata disagrees with itself: fastddpm.history and the JSON's sampler.history differ");
  g.history_kind = read_history_kind(meta, sampler);
  const bool eps_ring = g.history_kind == "eps";
  g.ring_input = eps_ring ? "eps_history" : "x0_history";
  if (channels != 1 && channels != 3)
    fail("the model has " + std::to_string(channels) + " channels; the PGM/PPM grid needs 1 or 3");
  g.image_shape = {a.count, channels, size, size};
  g.numel = static_cast<size_t>(checked_product(
      {a.count, channels, size, size}, kMaxBufferFloats,
      "a batch of " + std::to_string(a.count) + " images of " + std::to_string(channels) + " x " +
          std::to_string(size) + " x " + std::to_string(size) + " floats"));
  g.history_shape = {g.history, a.count, channels, size, size};
  checked_product({g.history, a.count, channels, size, size}, kMaxBufferFloats,
                  "the x0 history of " + std::to_string(g.history) + " batches");

  // each required input exactly once, and no other: history > 0 iff there is a ring input, the
  // one history_kind names
  Ort::AllocatorWithDefaultOptions alloc;
  std::vector<std::string> required = {"x", "step", "noise"};
  if (g.history > 0) required.push_back(g.ring_input);
  for (size_t i = 0; i < session.GetInputCount(); ++i) {
    const std::string name = session.GetInputNameAllocated(i, alloc).get();
    const auto it = std::find(required.begin(), required.end(), name);
    const bool a_ring = name == "x0_history" || name == "eps_history";
    if (it == required.end() && a_ring && g.history == 0)
      fail("the graph has an input " + name + " but its metadata fastddpm.history is 0");
    if (it == required.end() && a_ring)
      fail("the graph has an input " + name + " but its metadata's history_kind is " + g.history_kind);
    if (it == required.end()) fail("unexpected graph input " + quoted(name));
    required.erase(it);
    const Ort::TypeInfo type = session.GetInputTypeInfo(i);
    if (name == "step") check_declared("input", name, type, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, {1});
    else check_declared("input", name, type, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                        name == g.ring_input ? g.history_shape : g.image_shape);
    g.inputs.push_back(name);
  }
  if (!required.empty() && required[0] == g.ring_input)
    fail("the metadata fastddpm.history is " + std::to_string(g.history) + " but the graph has no input " +
         g.ring_input);
  if (!required.empty())
    fail("the graph has no input '" + required[0] + "'; export it with fastddpm export --what step");

  g.outputs = {"x_prev", "x0"};
  if (eps_ring && g.history > 0) g.outputs.push_back("eps");
  std::vector<std::string> outputs = g.outputs;
  for (size_t i = 0; i < session.GetOutputCount(); ++i) {
    const std::string name = session.GetOutputNameAllocated(i, alloc).get();
    const auto it = std::find(outputs.begin(), outputs.end(), name);
    if (it == outputs.end()) fail("unexpected graph output " + quoted(name));
    outputs.erase(it);
    check_declared("output", name, session.GetOutputTypeInfo(i), ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                   g.image_shape);
  }
  if (!outputs.empty())
    fail("the graph has no output '" + outputs[0] + "'; export it with fastddpm export --what step");
  return g;
}

// What Run returned as `name`: a float32 tensor of exactly `shape`, checked before a single
// element is read.
const float* checked_output(const Ort::Value& value, const char* name, const std::vector<int64_t>& shape,
                            size_t numel, int64_t step) {
  const std::string what = "at step " + std::to_string(step) + " the graph returned '" + name + "' ";
  if (static_cast<const OrtValue*>(value) == nullptr || !value.IsTensor()) fail(what + "as no tensor");
  const auto info = value.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
    fail(what + "as " + type_name(info.GetElementType()) + ", not float32");
  if (info.GetShape() != shape || info.GetElementCount() != numel)
    fail(what + "of shape " + shape_text(info.GetShape()) + ", not " + shape_text(shape));
  const float* data = value.GetTensorData<float>();
  if (data == nullptr) fail(what + "without data");
  return data;
}

// ---------------------------------------------------------------------------------------------
// Noise for the whole run, in noise-file order: x_T, then one z per step. A file is read one
// draw at a time, so its size costs no memory.
class NoiseSource {
 public:
  NoiseSource(const Args& a, size_t per_draw, int64_t steps) : per_draw_(per_draw), gen_(a.seed) {
    if (a.noise_file.empty()) return;
    require_regular_file("--noise", a.noise_file);
    const uint64_t want = checked_product({steps + 1, static_cast<int64_t>(per_draw)},
                                          std::numeric_limits<uint64_t>::max() / sizeof(float), "the noise file");
    std::error_code ec;
    const uintmax_t bytes = fs::file_size(a.noise_file, ec);
    if (ec) fail("cannot read noise file " + a.noise_file + ": " + ec.message());
    if (bytes != want * sizeof(float))
      fail("noise file " + a.noise_file + " holds " + std::to_string(bytes / sizeof(float)) +
           (bytes % sizeof(float) ? " floats and a partial one" : " floats") + "; this graph and --count need " +
           std::to_string(want) + " = (steps + 1) x N x C x H x W");
    file_.open(a.noise_file, std::ios::binary);
    if (!file_) fail("cannot open noise file " + a.noise_file);
    from_file_ = true;
  }

  // Fills `out` (per_draw floats) with the next draw.
  void draw(std::vector<float>& out) {
    if (!from_file_) {
      for (float& v : out) v = normal_(gen_);
      return;
    }
    const auto bytes = static_cast<std::streamsize>(per_draw_ * sizeof(float));
    file_.read(reinterpret_cast<char*>(out.data()), bytes);  // little-endian hosts: x86-64, arm64
    if (file_.gcount() != bytes) fail("the noise file ended early (did it change during the run?)");
  }

 private:
  size_t per_draw_;
  bool from_file_ = false;
  std::ifstream file_;
  std::mt19937_64 gen_;
  std::normal_distribution<float> normal_{0.0f, 1.0f};
};

// The whole loop; returns x_0 (N, C, H, W).
std::vector<float> sample(Ort::Session& session, const StepGraph& g, NoiseSource& noise) {
  const size_t numel = g.numel;
  std::vector<int64_t> shape = g.image_shape, ring_shape = g.history_shape;  // Ort wants non-const pointers
  std::vector<float> x(numel), z(numel), ring(static_cast<size_t>(g.history) * numel, 0.0f);
  noise.draw(x);
  std::vector<int64_t> step_value{0}, step_shape{1};

  auto mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::vector<const char*> in_names, out_names;
  for (const auto& name : g.inputs) in_names.push_back(name.c_str());
  for (const auto& name : g.outputs) out_names.push_back(name.c_str());
  for (int64_t s = 0; s < g.steps; ++s) {
    step_value[0] = s;
    noise.draw(z);
    std::vector<Ort::Value> inputs;
    for (const auto& name : g.inputs) {  // x, step, noise or the ring: inspect() allowed no other
      if (name == "step") {
        inputs.push_back(Ort::Value::CreateTensor<int64_t>(mem, step_value.data(), 1, step_shape.data(), 1));
      } else if (name == g.ring_input) {
        inputs.push_back(Ort::Value::CreateTensor<float>(mem, ring.data(), ring.size(), ring_shape.data(),
                                                         ring_shape.size()));
      } else {
        float* data = name == "x" ? x.data() : z.data();
        inputs.push_back(Ort::Value::CreateTensor<float>(mem, data, numel, shape.data(), shape.size()));
      }
    }
    auto outs = session.Run(Ort::RunOptions{nullptr}, in_names.data(), inputs.data(), inputs.size(),
                            out_names.data(), out_names.size());
    if (outs.size() != out_names.size())
      fail("the graph returned " + std::to_string(outs.size()) + " outputs, not " + std::to_string(out_names.size()));
    std::vector<const float*> data;  // every output checked, whether the loop reads it or not
    for (size_t k = 0; k < outs.size(); ++k) data.push_back(checked_output(outs[k], out_names[k], shape, numel, s));
    std::copy_n(data[0], numel, x.begin());
    if (g.history > 0) {  // the last output (x0, or eps) into the slot of `history` steps ago, read by now
      const size_t slot = static_cast<size_t>(s % g.history);
      std::copy_n(data.back(), numel, ring.begin() + static_cast<std::ptrdiff_t>(slot * numel));
    }
  }
  // NaN would have no pixel value (casting it to uint8 is undefined), and is a failed run anyway
  for (const float v : x)
    if (!std::isfinite(v)) fail("the samples hold NaN or infinity: the step graph diverged");
  return x;
}

// The same grid as fastddpm.images.grid: ceil(sqrt(N)) per row, 2 px padding, [-1, 1] → 0..255;
// a whole PGM (1 channel) or PPM (3 channels) file.
struct Grid {
  int64_t n, c, h, w, nrow, width, height;
};

Grid grid_layout(const std::vector<int64_t>& shape) {
  Grid g{shape[0], shape[1], shape[2], shape[3], 1, 0, 0};
  const int64_t pad = 2;
  while (g.nrow * g.nrow < g.n) ++g.nrow;  // ceil(sqrt(n)) without floating point; n <= kMaxCount
  g.height = (g.n + g.nrow - 1) / g.nrow * (g.h + pad) + pad;
  g.width = g.nrow * (g.w + pad) + pad;
  checked_product({g.height, g.width, g.c}, kMaxGridBytes, "the image grid (bytes)");
  return g;
}

std::vector<uint8_t> encode_grid(const Grid& g, const std::vector<float>& x) {
  const int64_t pad = 2;
  const std::string header = std::string(g.c == 1 ? "P5" : "P6") + "\n" + std::to_string(g.width) + " " +
                             std::to_string(g.height) + "\n255\n";
  std::vector<uint8_t> file(header.begin(), header.end());
  const size_t at = file.size();
  file.resize(at + static_cast<size_t>(g.height * g.width * g.c), 0);
  uint8_t* canvas = file.data() + at;
  for (int64_t k = 0; k < g.n; ++k) {
    const int64_t top = pad + (k / g.nrow) * (g.h + pad), left = pad + (k % g.nrow) * (g.w + pad);
    for (int64_t ch = 0; ch < g.c; ++ch)
      for (int64_t i = 0; i < g.h; ++i)
        for (int64_t j = 0; j < g.w; ++j) {
          const float v = std::clamp(x[static_cast<size_t>(((k * g.c + ch) * g.h + i) * g.w + j)], -1.0f, 1.0f);
          const int64_t at_pixel = ((top + i) * g.width + left + j) * g.c + ch;
          canvas[at_pixel] = static_cast<uint8_t>(std::nearbyint((v + 1.0f) * 127.5f));
        }
  }
  return file;
}

// ONNX Runtime's log is kept, not printed as it comes: a failed run then reports one line (the
// error), and a successful one prints what ORT warned about at the end.
struct OrtLog {
  std::mutex mutex;
  std::vector<std::string> lines;
  static void keep(void* param, OrtLoggingLevel, const char*, const char*, const char*, const char* message) {
    auto* log = static_cast<OrtLog*>(param);
    std::lock_guard<std::mutex> lock(log->mutex);
    if (log->lines.size() < 20) log->lines.push_back(one_line(message != nullptr ? message : ""));
  }
};

int run(const Args& a) {
  // everything that can be checked without running the graph comes first
  require_regular_file("--model", a.model);
  check_writable("--out", a.out);
  if (!a.raw_out.empty()) check_writable("--raw-out", a.raw_out);

  OrtLog log;
  Ort::Env env{ORT_LOGGING_LEVEL_WARNING, "fastddpm", &OrtLog::keep, &log};
  Ort::SessionOptions options;
  if (a.threads > 0) options.SetIntraOpNumThreads(a.threads);
  options.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
#ifdef FASTDDPM_SANITIZE
  // ONNX Runtime's library is not instrumented, so ASan sees its tensors only as whole arena
  // chunks; one malloc per tensor gives each its own red zones, and a read past an output shows
  options.DisableCpuMemArena();
  options.DisableMemPattern();
#endif
  Ort::Session session{env, a.model.c_str(), options};

  const StepGraph g = inspect(session, a);
  const Grid grid = grid_layout(g.image_shape);
  NoiseSource noise(a, g.numel, g.steps);
  const std::vector<float> x = sample(session, g, noise);

  // Both outputs are complete in memory: write both temp files, and only then rename them (a
  // rename cannot run out of space, and the folder was writable a moment ago).
  const std::vector<uint8_t> pnm = encode_grid(grid, x);
  TempFile out(a.out);
  out.write(pnm.data(), pnm.size());
  out.close();
  std::optional<TempFile> raw;
  if (!a.raw_out.empty()) {
    raw.emplace(a.raw_out);
    raw->write(x.data(), x.size() * sizeof(float));
    raw->close();
  }
  out.commit();
  if (raw) raw->commit();

  for (const auto& line : log.lines) std::cerr << "fastddpm_sample: onnxruntime: " << line << "\n";
  std::cerr << "wrote " << g.image_shape[0] << " images (" << g.steps << " steps) to " << a.out << "\n";
  return 0;
}

void report(const std::string& message) { std::cerr << "fastddpm_sample: error: " << one_line(message) << "\n"; }

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
  } catch (const UsageError& e) {
    report(std::string(e.what()) + " (fastddpm_sample --help for usage)");
  } catch (const std::bad_alloc&) {
    report("out of memory");
  } catch (const std::exception& e) {  // Ort::Exception included
    report(e.what());
  } catch (...) {
    report("unknown error");
  }
  return 2;
}
