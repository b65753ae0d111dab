// The request file that runtime/request.py writes (layout in README.md), and turning generated
// ids into text exactly as SentencePiece's DecodeIds does, so the runner needs no SentencePiece.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace sphinx {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---- a small JSON reader: enough for the header Python's json.dumps writes ----------------------

struct Json {
  enum Type { Null, Bool, Number, String, Array, Object } type = Null;
  bool boolean = false;
  double number = 0;
  std::string str;
  std::vector<Json> items;
  std::map<std::string, Json> fields;

  bool has(const std::string& key) const { return type == Object && fields.count(key); }
  const Json& at(const std::string& key) const {
    auto it = fields.find(key);
    if (type != Object || it == fields.end()) throw Error("the request header lacks \"" + key + "\"");
    return it->second;
  }
  int64_t integer() const {
    // Within +-2^53 a double holds every integer exactly, and the cast below is defined.
    if (type != Number || !std::isfinite(number) || std::fabs(number) > 9007199254740992.0 ||
        number != std::floor(number))
      throw Error("the request header has a non-integer where an integer belongs");
    return static_cast<int64_t>(number);
  }
  bool flag() const {
    if (type != Bool) throw Error("the request header has a non-boolean where true or false belongs");
    return boolean;
  }
  const std::vector<Json>& list() const {
    if (type != Array) throw Error("the request header has a non-list where a list belongs");
    return items;
  }
  std::vector<int64_t> integers() const {
    std::vector<int64_t> out;
    for (const Json& j : list()) out.push_back(j.integer());
    return out;
  }
  const std::string& string() const {
    if (type != String) throw Error("the request header has a non-string where a string belongs");
    return str;
  }

  static bool is_hex(char c) { return hex_digit(c) >= 0; }
  static constexpr int kMaxDepth = 64;  // our headers nest 4 deep; a deeper one is hostile

  static Json parse(const std::string& text) {
    size_t pos = 0;
    Json value = parse_value(text, pos, 0);
    skip_space(text, pos);
    if (pos != text.size()) fail(pos, "trailing characters");
    return value;
  }

 private:
  [[noreturn]] static void fail(size_t pos, const char* what) {
    throw Error("the request header is not valid JSON (" + std::string(what) + " at byte " +
                std::to_string(pos) + ")");
  }
  static void skip_space(const std::string& s, size_t& pos) {
    while (pos < s.size() && (s[pos] == ' ' || s[pos] == '\n' || s[pos] == '\r' || s[pos] == '\t')) ++pos;
  }
  static void expect(const std::string& s, size_t& pos, const char* word) {
    size_t n = std::strlen(word);
    if (s.compare(pos, n, word) != 0) fail(pos, "unexpected token");
    pos += n;
  }
  static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }
  static unsigned hex4(const std::string& s, size_t pos) {
    if (pos + 4 > s.size()) fail(pos, "short \\u escape");
    unsigned value = 0;
    for (size_t i = pos; i < pos + 4; ++i) {
      int d = hex_digit(s[i]);
      if (d < 0) fail(i, "bad \\u escape");
      value = value * 16 + static_cast<unsigned>(d);
    }
    return value;
  }
  static void append_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  static std::string parse_string(const std::string& s, size_t& pos) {
    std::string out;
    ++pos;  // the opening quote
    while (pos < s.size() && s[pos] != '"') {
      char c = s[pos++];
      if (c != '\\') {
        out += c;  // UTF-8 passes through (json.dumps(ensure_ascii=False))
        continue;
      }
      if (pos >= s.size()) fail(pos, "unterminated escape");
      char e = s[pos++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4(s, pos);
          pos += 4;
          if (cp >= 0xD800 && cp < 0xDC00 && s.compare(pos, 2, "\\u") == 0) {  // a surrogate pair
            unsigned low = hex4(s, pos + 2);
            if (low < 0xDC00 || low > 0xDFFF) fail(pos, "broken surrogate pair");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
            pos += 6;
          }
          if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0xFFFD;  // a lone surrogate: as Python's json with errors
          append_utf8(out, cp);
          break;
        }
        default: fail(pos, "unknown escape");
      }
    }
    if (pos >= s.size()) fail(pos, "unterminated string");
    ++pos;
    return out;
  }
  static Json parse_value(const std::string& s, size_t& pos, int depth) {
    skip_space(s, pos);
    if (pos >= s.size()) fail(pos, "unexpected end");
    if (depth > kMaxDepth) fail(pos, "nesting too deep");
    Json v;
    char c = s[pos];
    if (c == '{' || c == '[') {
      bool object = c == '{';
      v.type = object ? Object : Array;
      ++pos;
      skip_space(s, pos);
      if (pos < s.size() && s[pos] == (object ? '}' : ']')) return ++pos, v;
      while (true) {
        skip_space(s, pos);
        if (object) {
          if (pos >= s.size() || s[pos] != '"') fail(pos, "expected a key");
          std::string key = parse_string(s, pos);
          skip_space(s, pos);
          expect(s, pos, ":");
          v.fields[key] = parse_value(s, pos, depth + 1);
        } else {
          v.items.push_back(parse_value(s, pos, depth + 1));
        }
        skip_space(s, pos);
        if (pos < s.size() && s[pos] == ',') { ++pos; continue; }
        expect(s, pos, object ? "}" : "]");
        return v;
      }
    }
    if (c == '"') {
      v.type = String;
      v.str = parse_string(s, pos);
    } else if (c == 't' || c == 'f') {
      v.type = Bool;
      v.boolean = c == 't';
      expect(s, pos, v.boolean ? "true" : "false");
    } else if (c == 'n') {
      expect(s, pos, "null");
    } else {
      // JSON's number grammar only: stod alone would also take "nan", "inf", hex and spaces.
      size_t end = pos;
      while (end < s.size() && end - pos < 32 && std::strchr("0123456789+-.eE", s[end]) && s[end] != '\0') ++end;
      if (end == pos || !(s[pos] == '-' || (s[pos] >= '0' && s[pos] <= '9'))) fail(pos, "expected a value");
      size_t used = 0;
      try {
        v.number = std::stod(s.substr(pos, end - pos), &used);
      } catch (const std::exception&) {
        fail(pos, "bad number");
      }
      v.type = Number;
      pos += used;
    }
    return v;
  }
};

// ---- ids -> text, as SentencePiece's DecodeIds -----------------------------------------------

// Piece kinds as runtime/request.py writes them: n normal, c control, u unknown, b byte (<0xNN>).
struct Vocab {
  std::vector<std::string> pieces;
  std::string kinds;
  bool add_dummy_prefix = true;
  bool remove_extra_whitespaces = false;
  std::string unk_surface;

  std::string decode(const std::vector<int64_t>& ids) const {
    static const std::string kSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's space
    std::string text, bytes;
    bool is_bos_ws = true, bos_ws_seen = false;  // strip the dummy prefix of the first word only
    for (int64_t id : ids) {
      if (id < 0 || id >= static_cast<int64_t>(pieces.size())) continue;  // as Tokenizer.decode
      const std::string& piece = pieces[id];
      if (kinds[id] == 'b') {  // byte pieces gather, then decode together as UTF-8 (checked: <0xNN>)
        bytes += static_cast<char>(std::stoi(piece.substr(3, 2), nullptr, 16));
        continue;
      }
      text += utf8_or_replacement(bytes);
      bytes.clear();
      if (bos_ws_seen || !text.empty()) is_bos_ws = false;
      bos_ws_seen = false;
      if (kinds[id] == 'c') continue;
      if (kinds[id] == 'u') {
        text += unk_surface;
        continue;
      }
      size_t start = 0;
      if (is_bos_ws && (add_dummy_prefix || remove_extra_whitespaces) && piece.compare(0, 3, kSpace) == 0) {
        start = 3;
        bos_ws_seen = !remove_extra_whitespaces;  // that mode strips every leading space
      }
      for (size_t i = start; i < piece.size();) {
        if (piece.compare(i, 3, kSpace) == 0) {
          text += ' ';
          i += 3;
        } else {
          text += piece[i++];
        }
      }
    }
    return text + utf8_or_replacement(bytes);
  }

  // Valid UTF-8 sequences are kept; every byte that starts no valid sequence becomes U+FFFD.
  static std::string utf8_or_replacement(const std::string& b) {
    std::string out;
    auto trail = [&](size_t i) { return i < b.size() && (static_cast<unsigned char>(b[i]) & 0xC0) == 0x80; };
    for (size_t i = 0; i < b.size();) {
      unsigned char c = static_cast<unsigned char>(b[i]);
      size_t n = 0;
      uint32_t cp = 0;
      if (c < 0x80) {
        n = 1, cp = c;
      } else if ((c & 0xE0) == 0xC0 && trail(i + 1)) {
        n = 2, cp = ((c & 0x1F) << 6) | (b[i + 1] & 0x3F);
        if (cp < 0x80) n = 0;
      } else if ((c & 0xF0) == 0xE0 && trail(i + 1) && trail(i + 2)) {
        n = 3, cp = ((c & 0x0F) << 12) | ((b[i + 1] & 0x3F) << 6) | (b[i + 2] & 0x3F);
        if (cp < 0x800) n = 0;
      } else if ((c & 0xF8) == 0xF0 && trail(i + 1) && trail(i + 2) && trail(i + 3)) {
        n = 4, cp = ((c & 0x07) << 18) | ((b[i + 1] & 0x3F) << 12) | ((b[i + 2] & 0x3F) << 6) | (b[i + 3] & 0x3F);
        if (cp < 0x10000) n = 0;
      }
      bool valid = n > 0 && (cp < 0xD800 || (cp >= 0xE000 && cp <= 0x10FFFF));
      out += valid ? b.substr(i, n) : std::string("\xEF\xBF\xBD");
      i += valid ? n : 1;
    }
    return out;
  }
};

// ---- the request ---------------------------------------------------------------------------

struct Segment {
  std::vector<int64_t> tokens;  // a token segment, or
  std::vector<int32_t> shape;   // an image view [3, tile + dino, tile] at `pixels`
  const float* pixels = nullptr;
  bool is_image() const { return !shape.empty(); }
};

// Where the request's image part is kept in the image cache (image_cache.h): the key the Python
// runtime gives the same image of the same export, and the part's shape [tokens, dim]. The part
// runs from the first view for `tokens` positions (BOS before it, the text after it).
struct CachedImage {
  std::string key;  // empty: the request names none (text only, or written before the cache)
  int64_t tokens = 0, dim = 0, start = 0;
};

struct Request {
  Json header;
  std::vector<Segment> segments;
  CachedImage image;
  std::vector<int64_t> eos_ids;
  std::vector<std::string> stop_strings;
  int64_t max_new_tokens = 0;
  int64_t sequence_length = 0;
  Vocab vocab;
  std::vector<float> data;  // every view, back to back

  static Request load(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw Error("cannot open the request file " + path);
    std::string file((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    return parse(file, path);
  }

  // Every size, offset and index in `file` is checked before use: a hostile or damaged request is
  // an Error, never a read out of bounds (runtime/cpp/fuzz_request.cpp keeps it that way).
  static Request parse(const std::string& file, const std::string& path) {
    static const std::string kMagic = "SPHXREQ1";
    if (file.size() < kMagic.size() + 4 || file.compare(0, kMagic.size(), kMagic) != 0)
      throw Error(path + " is not a sphinx-edge request file (write one with `sphinx-edge request`)");
    uint32_t header_len = 0;
    std::memcpy(&header_len, file.data() + kMagic.size(), 4);  // little-endian, as every target is
    if (kMagic.size() + 4 + static_cast<size_t>(header_len) > file.size())
      throw Error(path + " is truncated: its header runs past the end of the file");

    Request r;
    r.header = Json::parse(file.substr(kMagic.size() + 4, header_len));
    const Json& h = r.header;
    if (h.at("version").integer() != 1)
      throw Error(path + " is request version " + std::to_string(h.at("version").integer()) +
                  "; this runner reads version 1");
    int64_t data_offset = h.at("data_offset").integer(), data_bytes = h.at("data_bytes").integer();
    const int64_t file_size = static_cast<int64_t>(file.size());
    if (data_offset < 0 || data_bytes < 0 || data_bytes % 4 != 0 || data_offset > file_size ||
        data_bytes > file_size - data_offset)
      throw Error(path + " is truncated: the header promises " + std::to_string(data_bytes) +
                  " bytes of image data at offset " + std::to_string(data_offset) + ", the file has " +
                  std::to_string(file.size()) + " bytes");
    r.data.resize(static_cast<size_t>(data_bytes / 4));
    if (data_bytes) std::memcpy(r.data.data(), file.data() + data_offset, static_cast<size_t>(data_bytes));

    // Ids index the program's embedding table (the text vocabulary, then the skip / start / end ids):
    // every one must lie inside it. Requests of earlier versions name only the text vocabulary.
    const Json& program = h.at("program");
    const int64_t embedding_rows = program.has("embedding_rows") ? program.at("embedding_rows").integer()
                                                                 : program.at("vocab_size").integer() + 3;
    for (const Json& s : h.at("segments").list()) {
      Segment seg;
      if (s.has("tokens")) {
        seg.tokens = s.at("tokens").integers();
        if (seg.tokens.empty()) throw Error(path + ": a token segment is empty");
        for (int64_t id : seg.tokens)
          if (id < 0 || id >= embedding_rows)
            throw Error(path + ": token id " + std::to_string(id) + " is outside the embedding table (" +
                        std::to_string(embedding_rows) + " rows)");
      } else {
        const Json& image = s.at("image");
        const int64_t floats = data_bytes / 4;
        int64_t numel = 1;
        for (int64_t d : image.at("shape").integers()) {
          // Each dimension and the running product stay within the data: no overflow, no int32 wrap.
          if (d <= 0 || d > floats || numel > floats / d)
            throw Error(path + ": an image segment's shape does not fit the image data");
          seg.shape.push_back(static_cast<int32_t>(d));
          numel *= d;
        }
        int64_t offset = image.at("offset").integer();
        if (seg.shape.size() != 3 || offset < 0 || offset % 4 != 0 || offset > data_bytes ||
            numel > (data_bytes - offset) / 4)
          throw Error(path + ": an image segment's shape or offset does not fit the image data");
        seg.pixels = r.data.data() + offset / 4;
      }
      r.segments.push_back(std::move(seg));
    }
    if (r.segments.empty()) throw Error(path + " holds no segments");
    r.eos_ids = h.at("eos_ids").integers();
    for (const Json& s : h.at("stop_strings").list()) r.stop_strings.push_back(s.string());
    r.max_new_tokens = h.at("max_new_tokens").integer();
    r.sequence_length = h.at("sequence_length").integer();
    if (r.max_new_tokens < 0 || r.sequence_length < 1)
      throw Error(path + ": max_new_tokens must be >= 0 and sequence_length >= 1");
    if (h.has("image_cache")) r.image = cached_image(h.at("image_cache"), r, path);

    const Json& v = h.at("vocab");
    for (const Json& p : v.at("pieces").list()) r.vocab.pieces.push_back(p.string());
    r.vocab.kinds = v.at("kinds").string();
    r.vocab.add_dummy_prefix = v.at("add_dummy_prefix").flag();
    r.vocab.remove_extra_whitespaces = v.at("remove_extra_whitespaces").flag();
    r.vocab.unk_surface = v.at("unk_surface").string();
    if (r.vocab.kinds.size() != r.vocab.pieces.size())
      throw Error(path + ": the vocabulary's kinds and pieces differ in length");
    for (size_t i = 0; i < r.vocab.pieces.size(); ++i) {
      const std::string& piece = r.vocab.pieces[i];
      if (r.vocab.kinds[i] == 'b' && (piece.size() != 6 || piece.compare(0, 3, "<0x") != 0 || piece[5] != '>' ||
                                      Json::is_hex(piece[3]) == false || Json::is_hex(piece[4]) == false))
        throw Error(path + ": byte piece " + std::to_string(i) + " is not of the form <0xNN>");
    }
    return r;
  }

 private:
  // The key names a file in the cache folder: 64 hex digits, nothing else (no path can sneak in).
  static CachedImage cached_image(const Json& entry, const Request& r, const std::string& path) {
    CachedImage image;
    image.key = entry.at("key").string();
    std::vector<int64_t> shape = entry.at("shape").integers();
    bool hex = image.key.size() == 64 && std::all_of(image.key.begin(), image.key.end(), [](char c) {
      return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
    });
    if (!hex || shape.size() != 2 || shape[0] < 1 || shape[1] < 1)
      throw Error(path + ": image_cache needs a key of 64 hex digits and a shape [tokens, dim]");
    auto first_view = std::find_if(r.segments.begin(), r.segments.end(), [](const Segment& s) { return s.is_image(); });
    if (first_view == r.segments.end()) throw Error(path + ": image_cache names an image, the request has none");
    for (auto s = r.segments.begin(); s != first_view; ++s) image.start += int64_t(s->tokens.size());
    image.tokens = shape[0], image.dim = shape[1];
    if (image.tokens > r.sequence_length - image.start)
      throw Error(path + ": the image part (" + std::to_string(image.tokens) + " tokens) runs past the sequence");
    return image;
  }
};

}  // namespace sphinx
