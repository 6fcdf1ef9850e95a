// Decompression of compressed clusters: raw deflate (compression type 0)
// and zstd (type 1). Compressed data may be followed by unrelated bytes up
// to the end of its last sector; decompression stops once a whole cluster
// has been produced.
#include <zlib.h>
#include <zstd.h>

#include "qcow2/internal.h"

namespace layerd::qcow2 {

namespace {

bool inflate_raw(std::span<const std::byte> in, std::span<std::byte> out) {
  z_stream s{};
  if (inflateInit2(&s, -15) != Z_OK) return false;
  s.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
  s.avail_in = static_cast<uInt>(in.size());
  s.next_out = reinterpret_cast<Bytef*>(out.data());
  s.avail_out = static_cast<uInt>(out.size());
  int r = inflate(&s, Z_FINISH);
  bool ok = (r == Z_STREAM_END || r == Z_BUF_ERROR || r == Z_OK) &&
            s.avail_out == 0;
  inflateEnd(&s);
  return ok;
}

bool zstd_decompress(std::span<const std::byte> in, std::span<std::byte> out) {
  ZSTD_DCtx* d = ZSTD_createDCtx();
  if (!d) return false;
  ZSTD_inBuffer ib{in.data(), in.size(), 0};
  ZSTD_outBuffer ob{out.data(), out.size(), 0};
  bool ok = true;
  while (ob.pos < ob.size) {
    size_t r = ZSTD_decompressStream(d, &ob, &ib);
    if (ZSTD_isError(r)) {
      ok = false;
      break;
    }
    if (r == 0 || ib.pos == ib.size) {  // frame ended or input exhausted
      if (ob.pos < ob.size) ok = false;
      break;
    }
  }
  ZSTD_freeDCtx(d);
  return ok;
}

}  // namespace

bool decompress_cluster(uint32_t type, std::span<const std::byte> in,
                        std::span<std::byte> out) {
  if (type == 0) return inflate_raw(in, out);
  if (type == 1) return zstd_decompress(in, out);
  return false;
}

}  // namespace layerd::qcow2
