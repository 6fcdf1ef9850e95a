// Compression and decompression of compressed clusters: raw deflate
// (compression type 0) and zstd (type 1). Clusters are compressed as QEMU
// compresses them (deflate: default level, 4 KiB window, no zlib header;
// zstd: default parameters, one frame), each stream state kept per thread
// and reset for every cluster, so compressing allocates nothing once a
// thread has compressed its first cluster. Compressed data may be followed by unrelated bytes up
// to the end of its last sector; decompression stops once a whole cluster
// has been produced. Decoder memory is bounded by the cluster size: deflate
// has a fixed 32 KiB window, and a zstd frame asking for a window larger
// than the cluster (up to 128 MiB by default, allocated per read) is refused.
#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <bit>
#include <optional>

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

// deflate's window for compressed clusters (QEMU's: 4 KiB, raw deflate).
constexpr int kDeflateWindowBits = -12;
constexpr int kDeflateMemLevel = 9;

std::optional<size_t> deflate_raw(std::span<const std::byte> in,
                                  std::span<std::byte> out) {
  struct Stream {
    z_stream s{};
    bool ok = deflateInit2(&s, Z_DEFAULT_COMPRESSION, Z_DEFLATED,
                           kDeflateWindowBits, kDeflateMemLevel,
                           Z_DEFAULT_STRATEGY) == Z_OK;
    ~Stream() {
      if (ok) deflateEnd(&s);
    }
  };
  thread_local Stream stream;
  if (!stream.ok || deflateReset(&stream.s) != Z_OK) return std::nullopt;
  z_stream& s = stream.s;
  s.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
  s.avail_in = static_cast<uInt>(in.size());
  s.next_out = reinterpret_cast<Bytef*>(out.data());
  s.avail_out = static_cast<uInt>(out.size());
  if (deflate(&s, Z_FINISH) != Z_STREAM_END) return std::nullopt;  // too big
  return out.size() - s.avail_out;
}

std::optional<size_t> zstd_compress(std::span<const std::byte> in,
                                    std::span<std::byte> out) {
  struct Context {
    ZSTD_CCtx* c = ZSTD_createCCtx();
    ~Context() { ZSTD_freeCCtx(c); }
  };
  thread_local Context ctx;
  if (!ctx.c || ZSTD_isError(ZSTD_CCtx_reset(ctx.c, ZSTD_reset_session_only)))
    return std::nullopt;
  // One call, as QEMU makes it: anything left over means it did not fit.
  ZSTD_inBuffer ib{in.data(), in.size(), 0};
  ZSTD_outBuffer ob{out.data(), out.size(), 0};
  size_t r = ZSTD_compressStream2(ctx.c, &ob, &ib, ZSTD_e_end);
  if (r != 0) return std::nullopt;
  return ob.pos;
}

}  // namespace

std::optional<size_t> compress_cluster(uint32_t type,
                                       std::span<const std::byte> in,
                                       std::span<std::byte> out) {
  if (type == 0) return deflate_raw(in, out);
  if (type == 1) return zstd_compress(in, out);
  return std::nullopt;
}

bool decompress_cluster(uint32_t type, std::span<const std::byte> in,
                        std::span<std::byte> out) {
  if (type == 0) return inflate_raw(in, out);
  if (type == 1) return zstd_decompress(in, out);
  return false;
}

}  // namespace layerd::qcow2
