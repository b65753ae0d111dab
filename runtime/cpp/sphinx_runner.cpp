// sphinx_runner: answer one request (runtime/request.py) with a SPHINX ExecuTorch program.
//
//   sphinx_runner PROGRAM.pte REQUEST.bin [--max-new-tokens N] [--threads N] [--ignore-eos]
//                 [--cache-dir DIR [--cache-mb N]]
//
// Drives the program exactly as the Python runtime does (runtime/pipeline.py with the pte
// backend), so the greedy tokens match: every view through `vision_encoder` in one batch, every
// token id through `token_embedding` in one call, the spliced sequence prefilled through
// `text_decoder` in one call at positions 0..L-1, then one token per call. Prints the answer,
// then SPHINX_TEXT / SPHINX_TOKENS / SPHINX_STAT lines (README.md; benchmarks/device_output.py).
// With --cache-dir, the encoded image part is kept there in the Python runtime's image cache
// format (image_cache.h): a new question about the same image skips the vision encoder.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include "image_cache.h"
#include "request.h"
#include "sha256.h"

#if __has_include(<executorch/extension/threadpool/threadpool.h>)
#include <executorch/extension/threadpool/threadpool.h>
#else
// The pip wheel ships libexecutorch_threadpool.so without this header; these are its exported
// declarations (ExecuTorch extension/threadpool/threadpool.h).
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool
#endif

using executorch::aten::ScalarType;
using executorch::extension::from_blob;
using executorch::extension::Module;
using executorch::runtime::EValue;
using sphinx::Error;

namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

struct Runner {
  Module module;
  int64_t dim = 0, vocab = 0, max_seq_len = 0, max_views = 0, tokens_per_view = 0;
  std::vector<int32_t> view_shape;  // [3, tile + dino, tile]

  explicit Runner(const std::string& path) : module(path, Module::LoadMode::Mmap) {
    check(module.load(), "load the program " + path + " (is it an ExecuTorch .pte?)");
    for (const char* name : {"vision_encoder", "token_embedding", "text_decoder"})
      check(module.load_method(name), std::string("load method ") + name + " (is this a SPHINX program?)");
    auto vision = module.method_meta("vision_encoder");
    auto decoder = module.method_meta("text_decoder");
    check(vision.error(), "read vision_encoder's signature");
    check(decoder.error(), "read text_decoder's signature");
    auto pixels = vision->input_tensor_meta(0), embeds = decoder->input_tensor_meta(0);
    check(pixels.error(), "read vision_encoder's input");
    check(embeds.error(), "read text_decoder's input");
    auto ps = pixels->sizes(), es = embeds->sizes();
    if (ps.size() != 4 || es.size() != 3)
      throw Error("the program's vision_encoder / text_decoder inputs are not 4-D / 3-D");
    max_views = ps[0];  // views per call: 1 in our exports, the upper bound of a dynamic view axis in older ones
    view_shape.assign(ps.begin() + 1, ps.end());
    dim = es[2];
    vocab = constant("get_vocab_size");
    max_seq_len = constant("get_max_seq_len");
    tokens_per_view = constant("get_tokens_per_view");
  }

  static void check(executorch::runtime::Error e, const std::string& what) {
    if (e != executorch::runtime::Error::Ok)
      throw Error("could not " + what + ": ExecuTorch error " + executorch::runtime::to_string(e));
  }

  std::vector<EValue> run(const std::string& method, const std::vector<EValue>& inputs) {
    auto out = module.execute(method, inputs);
    check(out.error(), "run " + method);
    return std::move(*out);
  }

  std::vector<int64_t> constants(const std::string& method) {
    std::vector<int64_t> values;
    for (const EValue& v : run(method, {})) values.push_back(v.toInt());
    return values;
  }
  int64_t constant(const std::string& method) { return constants(method).at(0); }

  // Copies the first output (method outputs live in planned memory the next call reuses).
  std::vector<float> first_output(const std::string& method, const std::vector<EValue>& inputs) {
    auto outputs = run(method, inputs);
    const auto& t = outputs.at(0).toTensor();
    return std::vector<float>(t.const_data_ptr<float>(), t.const_data_ptr<float>() + t.numel());
  }
};

std::string shape_str(const std::vector<int32_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

// The program must be the one the request was made for: compare what both declare.
void check_match(Runner& r, const sphinx::Request& req) {
  const sphinx::Json& want = req.header.at("program");
  auto expect = [&](const char* key, int64_t have) {
    int64_t w = want.at(key).integer();
    if (w != have)
      throw Error(std::string("the request was made for another model: it expects ") + key + " = " +
                  std::to_string(w) + ", the program has " + std::to_string(have));
  };
  expect("tokens_per_view", r.tokens_per_view);
  expect("tile_size", r.constant("get_tile_size"));
  expect("dino_size", r.constant("get_dino_size"));
  expect("skip_id", r.constant("get_skip_id"));
  expect("vocab_size", r.vocab);
  expect("max_seq_len", r.max_seq_len);
  for (const auto& s : req.segments)
    if (s.is_image() && s.shape != r.view_shape)
      throw Error("an image view of the request has shape " + shape_str(s.shape) +
                  "; the program's vision_encoder takes " + shape_str(r.view_shape));
  if (!req.image.key.empty() && req.image.dim != r.dim)
    throw Error("the request was made for another model: its image part has dim " + std::to_string(req.image.dim) +
                ", the program has " + std::to_string(r.dim));
  if (req.sequence_length >= r.max_seq_len)
    throw Error("the request's sequence (" + std::to_string(req.sequence_length) +
                " tokens) does not fit the context (" + std::to_string(r.max_seq_len) + ")");
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

// Peak resident memory in KiB: VmHWM, since getrusage's ru_maxrss keeps the peak of whatever
// process exec'd us (benchmarks/system.py peak_rss_mib does the same).
long peak_rss_kb() {
  if (FILE* f = std::fopen("/proc/self/status", "r")) {
    char line[256];
    long kb = -1;
    while (std::fgets(line, sizeof line, f))
      if (std::sscanf(line, "VmHWM: %ld kB", &kb) == 1) break;
    std::fclose(f);
    if (kb >= 0) return kb;
  }
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss;
}

int64_t argmax(const float* x, int64_t n) {  // the first maximum, as numpy's argmax
  return std::max_element(x, x + n) - x;
}

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "sphinx_runner: %s\n"
               "usage: sphinx_runner PROGRAM.pte REQUEST.bin [--max-new-tokens N] [--threads N] [--ignore-eos]\n"
               "                     [--cache-dir DIR [--cache-mb N]]\n"
               "       --ignore-eos: decode exactly the token budget, past EOS and stop strings (benchmarks)\n"
               "       --cache-dir: keep encoded images in DIR (shared with the Python runtime's --cache-dir):\n"
               "                    a new question about a cached image skips the vision encoder;\n"
               "                    --cache-mb bounds DIR (default 512), least recently used go first\n"
               "       sphinx_runner --detokenize REQUEST.bin ID...   (print the text of ids; for tests)\n"
               "       sphinx_runner --sha256 FILE...                 (print their SHA-256; for tests)\n"
               "Write REQUEST.bin with: sphinx-edge request EXPORT_DIR --image IMG Q --out REQUEST.bin\n",
               why);
  std::exit(2);
}

int64_t positive(const char* flag, const char* value) {
  char* end = nullptr;
  long long v = value ? std::strtoll(value, &end, 10) : 0;
  if (!value || *end || v < 1) usage((std::string(flag) + " takes a positive integer").c_str());
  return v;
}

int run(int argc, char** argv) {
  if (argc >= 3 && std::string(argv[1]) == "--detokenize") {
    std::vector<int64_t> ids;
    for (int i = 3; i < argc; ++i) ids.push_back(std::strtoll(argv[i], nullptr, 10));
    std::printf("SPHINX_TEXT %s\n", json_string(sphinx::Request::load(argv[2]).vocab.decode(ids)).c_str());
    return 0;
  }
  if (argc >= 2 && std::string(argv[1]) == "--sha256") {
    for (int i = 2; i < argc; ++i) {
      std::ifstream f(argv[i], std::ios::binary);
      if (!f) throw Error(std::string("cannot open ") + argv[i]);
      std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
      std::printf("%s\n", sphinx::Sha256::hex(bytes.data(), bytes.size()).c_str());
    }
    return 0;
  }
  std::vector<std::string> files;
  std::string cache_dir;
  int64_t max_new_override = 0, threads = 0, cache_mb = 0;
  bool ignore_eos = false;  // benchmarks: every run decodes the same number of tokens
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--max-new-tokens") max_new_override = positive("--max-new-tokens", i + 1 < argc ? argv[++i] : nullptr);
    else if (a == "--threads") threads = positive("--threads", i + 1 < argc ? argv[++i] : nullptr);
    else if (a == "--cache-mb") cache_mb = positive("--cache-mb", i + 1 < argc ? argv[++i] : nullptr);
    else if (a == "--cache-dir" && i + 1 < argc && *argv[i + 1]) cache_dir = argv[++i];
    else if (a == "--cache-dir") usage("--cache-dir takes a folder");
    else if (a == "--ignore-eos") ignore_eos = true;
    else if (a == "-h" || a == "--help") usage("answer one SPHINX request with an ExecuTorch program");
    else if (a.rfind("--", 0) == 0) usage(("unknown option " + a).c_str());
    else files.push_back(a);
  }
  if (files.size() != 2) usage("expected PROGRAM.pte and REQUEST.bin");
  if (cache_mb && cache_dir.empty()) usage("--cache-mb bounds --cache-dir: give both");
  if (FILE* f = std::fopen(files[0].c_str(), "rb")) std::fclose(f);
  else throw Error("cannot open the program " + files[0]);

  sphinx::Request req = sphinx::Request::load(files[1]);
  auto pool = executorch::extension::threadpool::get_threadpool();
  if (threads && pool) pool->_unsafe_reset_threadpool(static_cast<uint32_t>(threads));

  auto t_load = Clock::now();
  Runner r(files[0]);
  check_match(r, req);
  std::vector<int64_t> eos = r.constants("get_eos_ids");
  eos.insert(eos.end(), req.eos_ids.begin(), req.eos_ids.end());
  const std::set<int64_t> eos_set(eos.begin(), eos.end());
  double load_ms = ms_since(t_load);

  std::vector<const sphinx::Segment*> views;
  for (const auto& s : req.segments)
    if (s.is_image()) views.push_back(&s);

  // The image part from the cache, when it holds a sound entry for this image: no view is encoded.
  auto t_start = Clock::now();
  const sphinx::CachedImage& part = req.image;
  std::optional<sphinx::ImageCache> cache;
  if (!cache_dir.empty() && !part.key.empty())
    cache.emplace(cache_dir, cache_mb ? uint64_t(cache_mb) << 20 : sphinx::ImageCache::kDefaultBytes);
  else if (!cache_dir.empty() && !views.empty())
    std::fprintf(stderr, "sphinx_runner: the request names no image cache key (written by an older sphinx-edge); "
                         "the image is not cached\n");
  std::vector<float> cached;  // [image tokens, dim]
  const bool image_cached = cache && cache->get(part.key, part.tokens, r.dim, cached);

  // Vision: the views in batches of the program's bound (one view per call in our exports, as in Python).
  auto t_vision = Clock::now();
  const int64_t view_numel = int64_t(r.view_shape[0]) * r.view_shape[1] * r.view_shape[2];
  const int64_t per_view = r.tokens_per_view;
  std::vector<float> view_embeds;  // [views, tokens_per_view, dim]
  for (size_t first = 0; !image_cached && first < views.size(); first += r.max_views) {
    size_t n = std::min<size_t>(r.max_views, views.size() - first);
    std::vector<float> pixels(n * view_numel);
    for (size_t i = 0; i < n; ++i) std::copy_n(views[first + i]->pixels, view_numel, pixels.begin() + i * view_numel);
    auto out = r.first_output("vision_encoder", {from_blob(pixels.data(), {int32_t(n), r.view_shape[0],
                                                                           r.view_shape[1], r.view_shape[2]})});
    view_embeds.insert(view_embeds.end(), out.begin(), out.end());
  }
  if (!image_cached && int64_t(view_embeds.size()) != int64_t(views.size()) * per_view * r.dim)
    throw Error("vision_encoder gave " + std::to_string(view_embeds.size()) + " floats for " +
                std::to_string(views.size()) + " views; the program declares " + std::to_string(per_view) +
                " tokens per view of dim " + std::to_string(r.dim));
  double vision_ms = image_cached ? 0.0 : ms_since(t_vision);

  // Prefill: embed every token id in one call, splice the views in, one decoder call.
  auto t_prefill = Clock::now();
  std::vector<int64_t> ids;
  for (const auto& s : req.segments) ids.insert(ids.end(), s.tokens.begin(), s.tokens.end());
  std::vector<float> token_embeds;
  if (!ids.empty())
    token_embeds = r.first_output("token_embedding",
                                  {from_blob(ids.data(), {1, int32_t(ids.size())}, ScalarType::Long)});
  std::vector<float> sequence;
  size_t next_token = 0, next_view = 0;
  for (const auto& s : req.segments) {
    size_t rows = s.is_image() ? per_view : s.tokens.size();
    if (s.is_image() && image_cached) {  // room for the view; the cached image part goes over it below
      sequence.resize(sequence.size() + rows * r.dim);
      continue;
    }
    const float* from = s.is_image() ? view_embeds.data() + next_view++ * per_view * r.dim
                                     : token_embeds.data() + next_token * r.dim;
    next_token += s.tokens.size();
    sequence.insert(sequence.end(), from, from + rows * r.dim);
  }
  int64_t length = int64_t(sequence.size()) / r.dim;
  if (length != req.sequence_length)
    throw Error("the spliced sequence has " + std::to_string(length) + " positions, the request says " +
                std::to_string(req.sequence_length) + " (the program has " + std::to_string(per_view) +
                " tokens per view)");
  // The views and the skip embeddings between them, as the cache holds them (request.h: CachedImage).
  if (image_cached) std::copy(cached.begin(), cached.end(), sequence.begin() + part.start * r.dim);
  std::vector<int64_t> positions(length);
  for (int64_t i = 0; i < length; ++i) positions[i] = i;
  auto logits = r.first_output("text_decoder", {from_blob(sequence.data(), {1, int32_t(length), int32_t(r.dim)}),
                                                from_blob(positions.data(), {int32_t(length)}, ScalarType::Long)});
  double prefill_ms = ms_since(t_prefill);
  double ttft_ms = ms_since(t_start);

  // Kept for the next question about this image, outside the timed stages. A folder that cannot be
  // written costs the next run its shortcut, not this answer.
  if (cache && !image_cached) {
    try {
      cache->put(part.key, sequence.data() + part.start * r.dim, part.tokens, r.dim, int64_t(views.size()));
    } catch (const Error& e) {
      std::fprintf(stderr, "sphinx_runner: warning: %s\n", e.what());
    }
  }

  // Greedy decoding, as sphinx_edge.decoding.decode_loop: EOS, a stop string, or the budget.
  int64_t budget = std::min(max_new_override ? max_new_override : req.max_new_tokens, r.max_seq_len - length);
  auto t_decode = Clock::now();
  std::vector<int64_t> generated;
  std::string text, stop_reason = "length";
  int64_t decode_calls = 0;
  for (int64_t step = 0; step < budget; ++step) {
    int64_t token = argmax(logits.data() + logits.size() - r.vocab, r.vocab);
    if (!ignore_eos && eos_set.count(token)) {
      stop_reason = "eos";
      break;
    }
    generated.push_back(token);
    text = req.vocab.decode(generated);
    size_t cut = std::string::npos;
    for (const auto& stop : req.stop_strings) cut = std::min(cut, text.find(stop));
    if (!ignore_eos && cut != std::string::npos) {
      text.resize(cut);
      stop_reason = "stop";
      break;
    }
    if (step + 1 < budget) {
      int64_t pos = length + decode_calls;
      auto embed = r.first_output("token_embedding", {from_blob(&token, {1, 1}, ScalarType::Long)});
      logits = r.first_output("text_decoder", {from_blob(embed.data(), {1, 1, int32_t(r.dim)}),
                                               from_blob(&pos, {1}, ScalarType::Long)});
      ++decode_calls;
    }
  }
  if (stop_reason != "stop") {  // an unfinished multi-byte character at the end is dropped
    text = req.vocab.decode(generated);
    while (text.size() >= 3 && text.compare(text.size() - 3, 3, "\xEF\xBF\xBD") == 0) text.resize(text.size() - 3);
  }
  double decode_ms = ms_since(t_decode);

  std::printf("%s\n", text.c_str());
  std::printf("SPHINX_TEXT %s\n", json_string(text).c_str());
  std::printf("SPHINX_TOKENS");
  for (int64_t t : generated) std::printf(" %lld", static_cast<long long>(t));
  std::printf("\nSPHINX_STAT load_ms=%.3f vision_ms=%.3f views=%zu prefill_ms=%.3f prefill_tokens=%lld ttft_ms=%.3f "
              "decode_ms=%.3f decode_tokens=%lld generated_tokens=%zu stop=%s threads=%zu peak_rss_kb=%ld "
              "image_cached=%d\n",
              load_ms, vision_ms, views.size(), prefill_ms, static_cast<long long>(length), ttft_ms, decode_ms,
              static_cast<long long>(decode_calls), generated.size(), stop_reason.c_str(),
              pool ? pool->get_thread_count() : size_t(1), peak_rss_kb(), int(image_cached));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sphinx_runner: error: %s\n", e.what());
    return 1;
  }
}
