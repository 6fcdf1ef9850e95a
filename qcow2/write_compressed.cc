// Compressed cluster writes (Image::write_compressed), as QEMU's compress
// filter makes them: every cluster is compressed on its own and its bytes
// are packed after the previous compressed cluster's, so that several
// compressed clusters share one host cluster (each counts once in the
// refcount of every host cluster its bytes touch, as check counts them).
//
// Per cluster: compress without the lock, then under the exclusive lock
// find the L2 entry and allocate the bytes, write the data without the
// lock (the guest cluster is in flight, so other metadata changes to it
// wait), and point the entry at the data under the lock again, releasing
// what the cluster used before. A failed data write leaks the bytes, never
// maps them. The L2 entry reaches the disk after the refcounts, in flush()'s
// usual order.
#include <algorithm>
#include <cstring>

#include "qcow2/internal.h"

namespace layerd::qcow2 {

// Bytes for `len` bytes of compressed data: after the last compressed
// cluster when its host cluster has room (or the next host cluster is free
// to continue into), else at the start of a new host cluster.
std::error_code Image::Impl::alloc_compressed_bytes(uint64_t len,
                                                    uint64_t* out) {
  uint64_t start = compressed_free;
  uint64_t rc = 0;
  if (start) {
    if (auto ec = get_refcount(start >> cb, &rc)) return ec;
    if (rc == 0 || rc >= refcount_max) start = 0;
  }
  const uint64_t room = start ? cs - (start & (cs - 1)) : 0;
  if (!start || room < len) {
    uint64_t fresh;  // counted once: for this compressed cluster
    if (auto ec = alloc_clusters(1, &fresh)) return ec;
    if (!start || fresh != start + room) start = fresh;
  }
  // The host cluster `start` is in, if it was in use before: one more.
  if (start & (cs - 1)) {
    if (auto ec = get_refcount(start >> cb, &rc)) return ec;
    if (auto ec = set_refcount(start >> cb, rc + 1)) return ec;
  }
  note_end(start + len);
  compressed_free = (start + len) & (cs - 1) ? start + len : 0;
  *out = start;
  return {};
}

std::error_code Image::Impl::write_compressed_cluster(
    uint64_t gc, std::span<const std::byte> compressed) {
  std::unique_lock<WriterPreferringMutex> lk;
  if (auto ec = lock_for_change(lk, gc, gc)) return ec;
  note_guest_change(gc << cb, cs);
  L2Table* t;
  if (auto ec = l2_for_write(gc >> l2_bits, &t)) return ec;
  const uint64_t k = (gc & (l2_size - 1)) * words;
  const uint64_t e0 = t->words[k], bm = words == 2 ? t->words[k + 1] : 0;
  if (e0 | bm) {
    if (auto ec = check_entry(e0, bm, gc << cb)) return ec;
  }
  uint64_t host;
  if (auto ec = alloc_compressed_bytes(compressed.size(), &host)) return ec;
  const uint32_t offset_bits = 62 - (cb - 8);
  if (host + compressed.size() > (1ull << offset_bits))
    return std::make_error_code(std::errc::file_too_large);
  if (auto ec = check_data_write(host, compressed.size())) return ec;

  inflight.push_back({gc, gc});
  lk.unlock();
  std::error_code ec = file->pwrite(compressed, host);
  lk.lock();
  inflight.erase(std::find(inflight.begin(), inflight.end(), std::make_pair(gc, gc)));
  if (!ec) ec = l2_for_write(gc >> l2_bits, &t);
  if (!ec) {
    // The entry: the offset, then the number of 512-byte sectors the data
    // reaches into after its first one.
    const uint64_t extra_sectors = (host + compressed.size() - 1) / 512 - host / 512;
    t->words[k] = fmt::kOflagCompressed | (extra_sectors << offset_bits) | host;
    if (words == 2) t->words[k + 1] = 0;
    t->dirty = true;
    if ((e0 & fmt::kOflagCompressed) || (e0 & fmt::kL2OffsetMask)) ec = release_entry(e0, bm);
  }
  lk.unlock();
  inflight_cv.notify_all();
  return ec;
}

std::error_code Image::write_compressed(uint64_t offset,
                                        std::span<const std::byte> data,
                                        bool fua) {
  Impl& I = *impl_;
  const uint64_t end = offset + data.size();
  if (end < offset || end > I.h.virtual_size) return einval();
  if (offset % I.cs != 0 || (data.size() % I.cs != 0 && end != I.h.virtual_size))
    return einval();
  if (I.corrupt) return eio();
  if (I.ro || I.is_view) return std::make_error_code(std::errc::operation_not_permitted);
  if (I.external) return std::make_error_code(std::errc::operation_not_supported);
  thread_local std::vector<std::byte> cluster, compressed;
  cluster.resize(I.cs);
  // Compressed data must save at least a byte, as in QEMU.
  compressed.resize(I.cs - 1);
  for (uint64_t done = 0; done < data.size(); done += I.cs) {
    const uint64_t n = std::min<uint64_t>(I.cs, data.size() - done);
    std::span<const std::byte> in = data.subspan(done, n);
    if (n < I.cs) {  // the end of the disk: the rest of the cluster is zeros
      std::memcpy(cluster.data(), in.data(), n);
      std::memset(cluster.data() + n, 0, I.cs - n);
      in = cluster;
    }
    std::optional<size_t> size = compress_cluster(I.h.compression_type, in, compressed);
    std::error_code ec =
        size ? I.write_compressed_cluster((offset + done) >> I.cb,
                                          std::span(compressed.data(), *size))
             : write(offset + done, data.subspan(done, n), zero_below());
    if (ec) return ec;
  }
  return fua ? flush() : std::error_code{};
}

}  // namespace layerd::qcow2
