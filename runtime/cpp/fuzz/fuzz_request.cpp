// libFuzzer target for the request reader (request.h): any byte string must parse or be refused
// with sphinx::Error, and a request that parses must decode any ids, without a read out of bounds,
// undefined behaviour or another exception. Built and run by fuzz.sh (clang, ASan + UBSan).
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "../request.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    sphinx::Request r = sphinx::Request::parse(std::string(reinterpret_cast<const char*>(data), size), "input");
    std::vector<int64_t> ids = {-1, static_cast<int64_t>(r.vocab.pieces.size())};
    for (size_t i = 0; i < r.vocab.pieces.size() && i < 4096; ++i) ids.push_back(static_cast<int64_t>(i));
    (void)r.vocab.decode(ids);
    for (const sphinx::Segment& s : r.segments) {
      if (s.is_image()) {  // touch the first and last pixel the segment claims
        volatile float first = s.pixels[0];
        volatile float last = s.pixels[static_cast<size_t>(s.shape[0]) * s.shape[1] * s.shape[2] - 1];
        (void)first, (void)last;
      }
    }
  } catch (const sphinx::Error&) {
  }
  return 0;
}
