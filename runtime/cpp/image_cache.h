// The encoded image part ([image tokens, dim] after the vision encoder, skip embeddings in place),
// kept on disk in runtime/image_cache.py's format, so that this runner and the Python runtime read
// each other's entries. One file per image, DIR/<key>.img:
//
//   MAGIC "SPHINX-EDGE-IMAGE-1\n", uint32 little-endian header length, the JSON header
//   {"shape": [tokens, dim], "dtype": "float32", "info": {"views": N}, "sha256": <of the data>},
//   then the float32 data.
//
// Written atomically (a temporary file, then a rename); a corrupt entry is refused, removed and the
// image encoded again; the folder is bounded, the entries used least recently (mtime) going first.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <tuple>
#include <vector>

#include "request.h"
#include "sha256.h"

namespace sphinx {

namespace fs = std::filesystem;

class ImageCache {
 public:
  static constexpr uint64_t kDefaultBytes = uint64_t(512) << 20;  // image_cache.DEFAULT_DISK_BYTES

  ImageCache(std::string directory, uint64_t max_bytes) : dir_(std::move(directory)), max_bytes_(max_bytes) {}

  // The entry's data when it is there and sound ([tokens, dim] float32); a corrupt one is refused
  // with one line on stderr and removed, so the caller encodes the image again.
  bool get(const std::string& key, int64_t tokens, int64_t dim, std::vector<float>& out) const {
    const std::string path = entry(key);
    std::ifstream f(path, std::ios::binary);
    if (!f) return false;
    std::string raw((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    f.close();
    std::string why = check(raw, tokens, dim);
    if (!why.empty()) {
      std::fprintf(stderr, "sphinx_runner: refused the cached image %s (%s); removed it, encoding the image again\n",
                   path.c_str(), why.c_str());
      std::error_code ignored;
      fs::remove(path, ignored);
      return false;
    }
    out.resize(size_t(tokens * dim));
    std::memcpy(out.data(), raw.data() + raw.size() - out.size() * 4, out.size() * 4);
    std::error_code ignored;  // most recently used (os.utime in Python); a read-only cache still serves
    fs::last_write_time(path, fs::file_time_type::clock::now(), ignored);
    return true;
  }

  // Writes the entry atomically, exactly as ImageCache._write does (same header bytes), then bounds
  // the folder. Throws Error when the folder cannot be written.
  void put(const std::string& key, const float* data, int64_t tokens, int64_t dim, int64_t views) const {
    const size_t nbytes = size_t(tokens * dim) * 4;
    // json.dumps' default separators, and `views` as the float Python keeps it (5.0).
    const std::string header = "{\"shape\": [" + std::to_string(tokens) + ", " + std::to_string(dim) +
                               "], \"dtype\": \"float32\", \"info\": {\"views\": " + std::to_string(views) +
                               ".0}, \"sha256\": \"" + Sha256::hex(data, nbytes) + "\"}";
    const uint32_t length = uint32_t(header.size());  // little-endian, as every target is
    std::string head = kMagic;
    head.append(reinterpret_cast<const char*>(&length), 4).append(header);

    std::error_code ec;
    fs::create_directories(dir_, ec);
    const std::string path = entry(key), tmp = dir_ + "/." + key + ".img.tmp-" + std::to_string(getpid());
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0666);  // 0666 less the umask, as Python's
    bool ok = fd >= 0 && write_all(fd, head.data(), head.size()) && write_all(fd, data, nbytes) && ::fsync(fd) == 0;
    const int err = errno;
    if (fd >= 0) ok = ::close(fd) == 0 && ok;
    if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
      std::string why = std::strerror(ok ? errno : err);
      ::unlink(tmp.c_str());
      throw Error("could not save the encoded image to " + path + ": " + why);
    }
    evict();
  }

 private:
  static constexpr const char* kMagic = "SPHINX-EDGE-IMAGE-1\n";

  std::string entry(const std::string& key) const { return dir_ + "/" + key + ".img"; }

  // Why `raw` is not a sound entry of [tokens, dim] float32, or "" when it is one.
  static std::string check(const std::string& raw, int64_t tokens, int64_t dim) {
    const size_t magic = std::strlen(kMagic);
    if (raw.compare(0, magic, kMagic) != 0) return "not a sphinx-edge image cache entry";
    uint32_t length = 0;
    if (raw.size() < magic + 4) return "cut short";
    std::memcpy(&length, raw.data() + magic, 4);
    if (raw.size() - magic - 4 < length) return "cut short: its header runs past the end";
    Json h;
    try {
      h = Json::parse(raw.substr(magic + 4, length));
    } catch (const Error&) {
      return "its header is not valid JSON";
    }
    const Json* shape = h.has("shape") ? &h.at("shape") : nullptr;
    const Json* dtype = h.has("dtype") ? &h.at("dtype") : nullptr;
    const Json* sha = h.has("sha256") ? &h.at("sha256") : nullptr;
    if (!shape || !dtype || !sha || sha->type != Json::String) return "its header lacks shape, dtype or sha256";
    if (dtype->type != Json::String || dtype->str != "float32") return "its data is not float32";
    auto is = [](const Json& j, int64_t v) { return j.type == Json::Number && j.number == double(v); };
    if (shape->type != Json::Array || shape->items.size() != 2 || !is(shape->items[0], tokens) ||
        !is(shape->items[1], dim))
      return "its shape is not the [" + std::to_string(tokens) + ", " + std::to_string(dim) + "] this request needs";
    const size_t data = raw.size() - magic - 4 - length;
    const size_t want = size_t(tokens * dim) * 4;
    if (data != want)
      return std::string(data < want ? "cut short: " : "") + "its data is " + std::to_string(data) +
             " bytes, its shape needs " + std::to_string(want);
    if (Sha256::hex(raw.data() + raw.size() - data, data) != sha->str) return "its checksum does not match";
    return "";
  }

  static bool write_all(int fd, const void* data, size_t size) {
    const char* p = static_cast<const char*>(data);
    while (size) {
      ssize_t n = ::write(fd, p, size);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return false;
      p += n, size -= size_t(n);
    }
    return true;
  }

  // Python's _evict: every *.img by (mtime, size, name), the oldest removed until the rest fit.
  void evict() const {
    std::vector<std::tuple<fs::file_time_type, uintmax_t, std::string>> entries;
    uintmax_t total = 0;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(dir_, ec)) {
      std::error_code err;
      if (e.path().extension() != ".img" || !e.is_regular_file(err)) continue;
      auto mtime = e.last_write_time(err);
      auto size = e.file_size(err);
      if (err) continue;  // gone meanwhile (another process evicting)
      entries.emplace_back(mtime, size, e.path().string());
      total += size;
    }
    std::sort(entries.begin(), entries.end());
    for (const auto& [mtime, size, path] : entries) {
      if (total <= max_bytes_) break;
      fs::remove(path, ec);
      total -= size;
    }
  }

  std::string dir_;
  uint64_t max_bytes_;
};

}  // namespace sphinx
