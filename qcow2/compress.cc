// Decompression of compressed clusters: raw deflate (compression type 0)
// and zstd (type 1). Compressed data may be followed by unrelated bytes up
// to the end of its last sector; decompression stops once a whole cluster
// has been produced. Decoder memory is bounded by the cluster size: deflate
// has a fixed 32 KiB window, and a zstd frame asking for a window larger
// than the cluster (up to 128 MiB by default, allocated per read) is refused.
#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <bit>

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

// zstd's smallest window (ZSTD_WINDOWLOG_ABSOLUTEMIN, outside its stable API).
constexpr int kZstdMinWindowLog = 10;

bool zstd_decompress(std::span<const std::byte> in, std::span<std::byte> out) {
  ZSTD_DCtx* d = ZSTD_createDCtx();
  if (!d) return false;
  // QEMU compresses one cluster in one call, so zstd sizes the window to the
  // cluster (at least the minimum window).
  const int window_log =
      std::max(kZstdMinWindowLog, int(std::bit_width(out.size() - 1)));
  if (ZSTD_isError(ZSTD_DCtx_setParameter(d, ZSTD_d_windowLogMax, window_log))) {
    ZSTD_freeDCtx(d);
    return false;
  }
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
