// Changing the shape of an open image for the live jobs: growing the
// virtual disk (a commit's base smaller than what is committed into it) and
// emptying the image ("commit and empty").
#include <algorithm>
#include <cstring>

#include "qcow2/internal.h"

namespace layerd::qcow2 {

namespace {

// A fresh, self-contained set of tables for an empty image: a refcount
// table, the refcount blocks it needs and a zero L1 table, laid out from
// cluster `start` on. Its refcounts count cluster 0 (the header) and the
// clusters of the layout itself, nothing else: every other cluster of the
// file is free (refcount 0 and unreferenced, so not even a leak).
struct EmptyLayout {
  uint64_t start = 0;  // first cluster
  uint64_t tc = 1;     // refcount table clusters
  uint64_t nb = 1;     // clusters set aside for refcount blocks
  uint64_t l1c = 0;    // L1 table clusters
  std::vector<uint64_t> blocks;  // reftable indices of the blocks, in order
  uint64_t clusters() const { return tc + nb + l1c; }
  uint64_t reftable_cluster() const { return start; }
  uint64_t l1_cluster() const { return start + tc + nb; }
};

EmptyLayout plan_empty(const Image::Impl& I, uint64_t start, uint64_t l1c) {
  EmptyLayout L;
  L.start = start;
  L.l1c = l1c;
  // The table and the blocks must cover the layout, which grows with them:
  // iterate to a fixed point (sizes only grow, so it ends).
  for (;;) {
    const uint64_t last = start + L.clusters() - 1;
    const uint64_t first_idx = start / I.rb_entries, last_idx = last / I.rb_entries;
    const uint64_t tc = fmt::div_round_up((last_idx + 1) * 8, I.cs);
    const uint64_t nb = last_idx - first_idx + 1 + (first_idx != 0 ? 1 : 0);
    if (tc <= L.tc && nb <= L.nb) {
      L.blocks.clear();
      if (first_idx != 0) L.blocks.push_back(0);
      for (uint64_t i = first_idx; i <= last_idx; ++i) L.blocks.push_back(i);
      return L;
    }
    L.tc = std::max(L.tc, tc);
    L.nb = std::max(L.nb, nb);
  }
}

// The bytes of the layout's clusters. Spare block clusters (when fewer
// blocks than set aside are needed) stay free and zero.
std::vector<std::byte> encode_empty(Image::Impl& I, const EmptyLayout& L) {
  std::vector<std::byte> out(L.clusters() * I.cs);
  auto counted = [&](uint64_t c) {
    if (c == 0) return true;
    if (c < L.start || c >= L.start + L.clusters()) return false;
    uint64_t k = c - L.start;
    return k < L.tc || (k >= L.tc && k < L.tc + L.blocks.size()) ||
           k >= L.tc + L.nb;
  };
  RefBlock b;
  for (size_t k = 0; k < L.blocks.size(); ++k) {
    const uint64_t idx = L.blocks[k];
    const uint64_t cluster = L.start + L.tc + k;
    fmt::store64(&out[idx * 8], cluster * I.cs);
    b.raw.assign(I.cs, std::byte{0});
    const uint64_t c0 = idx * I.rb_entries;
    // Only cluster 0 and the layout can be counted: visit just those.
    auto mark = [&](uint64_t c) {
      if (c >= c0 && c < c0 + I.rb_entries && counted(c)) I.rb_set(b, c - c0, 1);
    };
    mark(0);
    for (uint64_t c = L.start; c < L.start + L.clusters(); ++c) mark(c);
    std::memcpy(&out[(L.tc + k) * I.cs], b.raw.data(), I.cs);
  }
  return out;
}

// Points the header at `L`'s L1 and refcount tables: one 20-byte write in
// the first sector (L1 offset, refcount table offset and clusters are
// adjacent), so a crash leaves either the old tables or the new ones.
std::error_code switch_tables(Image::Impl& I, const EmptyLayout& L) {
  std::byte f[20];
  fmt::store64(f, L.l1_cluster() * I.cs);
  fmt::store64(f + 8, L.reftable_cluster() * I.cs);
  fmt::store32(f + 16, static_cast<uint32_t>(L.tc));
  std::lock_guard lk(I.hdr_mu);
  if (auto ec = I.file->pwrite(f, fmt::kOffL1Offset)) return ec;
  return I.file->flush();
}

}  // namespace

// Crash safety, step by step (every step is synced before the next; a
// kill between any two leaves an image that opens and checks clean, or at
// worst dirty with leaks, repaired by the next read-write open):
//  0. dirty bit set (as before any metadata change), cached metadata
//     flushed: the file holds the old content, consistent.
//  1. An empty layout (EmptyLayout above) is written past everything the
//     file uses, at cluster E. Nothing references it yet: the old image is
//     untouched.
//  2. The header is switched to it with one small write in its first
//     sector. This is the one moment the guest content changes, from all
//     old to all from below, atomically. The image is consistent: the old
//     clusters are all free (refcount 0 in the new blocks, referenced by
//     nothing), not leaks.
//  3. A second empty layout is written at cluster 1, in clusters that are
//     free in the image of step 2 (E lies beyond the second layout too).
//  4. The header is switched to it, again in one write: consistent, empty.
//  5. The file is truncated after it (or, where it cannot be, left long:
//     the clusters past the tables are free either way).
// Unlike QEMU's make_completely_empty, which zeroes the L1 table in place
// (several sectors: a torn write could mix old and empty) and then
// overwrites tables the header still points at (relying on the dirty bit
// and a repair), every state here is consistent on its own.
Status Image::make_empty() {
  Impl& I = *impl_;
  if (I.is_view || I.ro) return Status::Invalid("emptying needs a writable image");
  if (I.external)
    return Status::NotSupported("emptying an image with an external data file");
  std::unique_lock lk(I.mu);
  I.inflight_cv.wait(lk, [&] { return I.inflight.empty(); });
  if (I.corrupt) return Status::IoError(eio(), "image is corrupt");
  if (!I.snaps.empty())
    return Status::Invalid("image has internal snapshots: their clusters must be kept");
  if (!I.bitmaps.empty())
    return Status::Invalid(
        "image has persistent dirty bitmaps: their clusters must be kept "
        "(remove them first)");
  if (auto ec = I.begin_write()) return Status::IoError(ec, "setting the dirty bit");
  if (auto ec = I.flush_locked(true)) return Status::IoError(ec, "flush");
  const uint64_t l1c =
      std::max<uint64_t>(1, fmt::div_round_up(uint64_t(I.h.l1_size) * 8, I.cs));
  const EmptyLayout front = plan_empty(I, 1, l1c);
  const uint64_t e = std::max({fmt::div_round_up(I.file->size(), I.cs),
                               I.end_cluster, 1 + front.clusters()});
  const EmptyLayout tail = plan_empty(I, e, l1c);
  // From the first write on, the caches no longer describe the file.
  auto drop_caches = [&] {
    I.l1.assign(I.h.l1_size, 0);
    I.l1_dirty = false;
    I.l2.clear();
    I.l2.resize(I.h.l1_size);
    I.l2_resident.clear();
    I.refblocks.clear();
    I.rb_resident.clear();
    I.pending_free.clear();
    I.reftable_pending.clear();
    I.free_hint = 0;
    I.compressed_free = 0;
  };
  auto use = [&](const EmptyLayout& L) {
    I.h.l1_table_offset = L.l1_cluster() * I.cs;
    I.h.refcount_table_offset = L.reftable_cluster() * I.cs;
    I.h.refcount_table_clusters = static_cast<uint32_t>(L.tc);
    I.reftable.assign(L.tc * I.cs / 8, 0);
    for (size_t k = 0; k < L.blocks.size(); ++k)
      I.reftable[L.blocks[k]] = (L.start + L.tc + k) * I.cs;
    I.refblocks.clear();
    I.refblocks.resize(I.reftable.size());
    I.rb_resident.clear();
    I.end_cluster = L.start + L.clusters();
    I.rebuild_meta_ranges();
  };
  auto fail = [&](std::error_code ec, const char* what) {
    // The file is consistent in every state, but which one we are in is
    // unknown after a failed write: nothing more may be written.
    // The corrupt flag is set in memory only (so writes fail with EIO and
    // close() leaves the dirty bit for the next open to repair).
    {
      std::lock_guard rl(I.reason_mu);
      if (!I.corrupt) I.corrupt_reason = std::string("make_empty: ") + what + " failed";
    }
    I.corrupt = true;
    return Status::IoError(ec, what);
  };
  {
    auto raw = encode_empty(I, tail);
    if (auto ec = I.file->pwrite(raw, tail.start * I.cs))
      return fail(ec, "writing the new tables");
    if (auto ec = I.file->flush()) return fail(ec, "flush");
  }
  drop_caches();
  if (auto ec = switch_tables(I, tail)) return fail(ec, "switching the tables");
  use(tail);
  // Empty now. Move the tables to the front so the file can shrink.
  {
    auto raw = encode_empty(I, front);
    if (auto ec = I.file->pwrite(raw, front.start * I.cs))
      return fail(ec, "writing the new tables");
    if (auto ec = I.file->flush()) return fail(ec, "flush");
  }
  if (auto ec = switch_tables(I, front)) return fail(ec, "switching the tables");
  use(front);
  const uint64_t end = (front.start + front.clusters()) * I.cs;
  if (I.file->truncate(end)) {
    // A block device: give the space back where it can be.
    if (I.file->size() > end) (void)I.file->punch_hole(end, I.file->size() - end);
  } else if (auto ec = I.file->flush()) {
    return Status::IoError(ec, "flush");
  }
  return Status::Ok();
}

// The L1 table grows like QEMU's qcow2_grow_l1_table: a new table in new
// clusters (counted and synced first), then one header write of the size,
// L1 size and L1 offset (bytes 24-48, in the first sector: the disk grows
// and gets its table in one step), then the old table's clusters are
// freed. A crash before the header write leaks the new table, after it the
// old one (the image is dirty meanwhile, so the next read-write open
// repairs the leak).
Status Image::grow(uint64_t new_size) {
  Impl& I = *impl_;
  if (I.is_view || I.ro) return Status::Invalid("growing needs a writable image");
  if (new_size < I.h.virtual_size)
    return Status::Invalid("shrinking is not supported (size " +
                           std::to_string(I.h.virtual_size) + ", asked for " +
                           std::to_string(new_size) + ")");
  if (I.external)
    return Status::NotSupported("growing an image with an external data file");
  std::unique_lock lk(I.mu);
  I.inflight_cv.wait(lk, [&] { return I.inflight.empty(); });
  if (I.corrupt) return Status::IoError(eio(), "image is corrupt");
  if (!I.snaps.empty())
    return Status::Invalid("can't resize an image which has snapshots");
  if (!I.bitmaps.empty())
    return Status::Invalid("can't resize an image with persistent dirty bitmaps");
  if (new_size == I.h.virtual_size) return Status::Ok();
  const uint64_t need = fmt::div_round_up(fmt::div_round_up(new_size, I.cs), I.l2_size);
  if (new_size > (1ull << 62) || need > fmt::kMaxL1Bytes / 8)
    return Status::Invalid("virtual size " + std::to_string(new_size) +
                           " too large for the L1 table limit");
  if (auto ec = I.begin_write()) return Status::IoError(ec, "setting the dirty bit");
  if (need <= I.h.l1_size) {
    std::lock_guard hl(I.hdr_mu);
    if (auto ec = I.write_header_u64(fmt::kOffSize, new_size))
      return Status::IoError(ec, "writing the size");
    if (auto ec = I.file->flush()) return Status::IoError(ec, "flush");
    I.h.virtual_size = new_size;
    return Status::Ok();
  }
  // Everything the old L1 points at is on disk before it is copied.
  if (auto ec = I.flush_locked(true)) return Status::IoError(ec, "flush");
  const uint64_t old_off = I.h.l1_table_offset;
  const uint64_t old_clusters = fmt::div_round_up(uint64_t(I.h.l1_size) * 8, I.cs);
  const uint64_t new_clusters = fmt::div_round_up(need * 8, I.cs);
  uint64_t host;
  if (auto ec = I.alloc_clusters(new_clusters, &host))
    return Status::IoError(ec, "allocating the L1 table");
  std::vector<std::byte> raw(new_clusters * I.cs);
  for (uint64_t i = 0; i < I.l1.size(); ++i) fmt::store64(&raw[i * 8], I.l1[i]);
  if (auto ec = I.file->pwrite(raw, host))
    return Status::IoError(ec, "writing the L1 table");
  // Counts the new clusters durably (and syncs the table).
  if (auto ec = I.flush_locked(true)) return Status::IoError(ec, "flush");
  {
    std::byte f[24];
    std::lock_guard hl(I.hdr_mu);
    if (auto ec = I.file->pread(f, fmt::kOffSize))
      return Status::IoError(ec, "reading the header");
    fmt::store64(f, new_size);
    fmt::store32(f + 12, static_cast<uint32_t>(need));
    fmt::store64(f + 16, host);
    if (auto ec = I.file->pwrite(f, fmt::kOffSize))
      return Status::IoError(ec, "writing the header");
    if (auto ec = I.file->flush()) return Status::IoError(ec, "flush");
  }
  I.h.virtual_size = new_size;
  I.h.l1_size = static_cast<uint32_t>(need);
  I.h.l1_table_offset = host;
  I.l1.resize(need, 0);
  I.l2.resize(need);
  I.rebuild_meta_ranges();
  for (uint64_t c = 0; c < old_clusters; ++c)
    if (auto ec = I.free_cluster_now(old_off + c * I.cs))
      return Status::IoError(ec, "freeing the old L1 table");
  return Status::Ok();
}

}  // namespace layerd::qcow2
