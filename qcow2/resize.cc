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

// After a failed write of a step whose outcome on disk is unknown: the file
// is consistent either way, but which state it is in is not known, so
// nothing more may be written. The corrupt flag is set in memory only (so
// writes fail with EIO and close() leaves the dirty bit for the next open
// to repair).
Status lost_track(Image::Impl& I, std::error_code ec, const std::string& what) {
  {
    std::lock_guard rl(I.reason_mu);
    if (!I.corrupt) I.corrupt_reason = what + " failed";
  }
  I.corrupt = true;
  return Status::IoError(ec, what);
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
    return lost_track(I, ec, std::string("make_empty: ") + what);
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

namespace {

// The L1 entries the grown disk of `new_size` needs.
uint64_t l1_entries_for(const Image::Impl& I, uint64_t new_size) {
  return fmt::div_round_up(fmt::div_round_up(new_size, I.cs), I.l2_size);
}

// Why the image cannot grow to `new_size` now, or Ok. mu held.
Status grow_refusal(const Image::Impl& I, uint64_t new_size) {
  if (I.is_view || I.ro) return Status::Invalid("growing needs a writable image");
  if (new_size < I.h.virtual_size)
    return Status::Invalid("shrinking is not supported (size " +
                           std::to_string(I.h.virtual_size) + ", asked for " +
                           std::to_string(new_size) + ")");
  if (I.external)
    return Status::NotSupported("growing an image with an external data file");
  if (I.corrupt) return Status::IoError(eio(), "image is corrupt");
  if (!I.snaps.empty())
    return Status::Invalid("can't resize an image which has snapshots");
  if (!I.bitmaps.empty())
    return Status::Invalid("can't resize an image with persistent dirty bitmaps");
  const uint64_t need = l1_entries_for(I, new_size);
  if (new_size > (1ull << 62) || need > fmt::kMaxL1Bytes / 8)
    return Status::Invalid("virtual size " + std::to_string(new_size) +
                           " too large for the L1 table limit");
  return Status::Ok();
}

// Writes `words` (host order) to new clusters, counted in memory (durable
// with the next flush_locked); `*host` is where. The clusters are added to
// `*taken` (to be given back if the growth fails later).
std::error_code write_new_table(Image::Impl& I, const std::vector<uint64_t>& words,
                                uint64_t* host, std::vector<uint64_t>* taken) {
  const uint64_t clusters = std::max<uint64_t>(1, fmt::div_round_up(words.size() * 8, I.cs));
  if (auto ec = I.alloc_clusters(clusters, host)) return ec;
  for (uint64_t c = 0; c < clusters; ++c) taken->push_back(*host + c * I.cs);
  std::vector<std::byte> raw(clusters * I.cs);
  for (size_t i = 0; i < words.size(); ++i) fmt::store64(&raw[i * 8], words[i]);
  return I.file->pwrite(raw, *host);
}

// The one step that grows the disk: size, L1 size and L1 offset (bytes
// 24-48, in the first sector) in one synced header write.
std::error_code switch_size_and_l1(Image::Impl& I, uint64_t size, uint64_t l1_size,
                                   uint64_t l1_offset) {
  std::byte f[24];
  std::lock_guard hl(I.hdr_mu);
  if (auto ec = I.file->pread(f, fmt::kOffSize)) return ec;
  fmt::store64(f, size);
  fmt::store32(f + 12, static_cast<uint32_t>(l1_size));
  fmt::store64(f + 16, l1_offset);
  if (auto ec = I.file->pwrite(f, fmt::kOffSize)) return ec;
  return I.file->flush();
}

// When the disk ends inside a cluster with a host cluster of its own,
// zeroes that cluster's host bytes past the end: nothing reads them while
// the disk is this size, and once it grows they must read as zeros, not as
// what a larger disk left there (qemu-img resize --shrink keeps the
// cluster). `*host` is the host cluster (0: none, nothing to do: the
// tail reads from below, or the cluster is compressed, its tail part of
// the stream). mu held exclusively.
std::error_code zero_past_the_end(Image::Impl& I, uint64_t* host) {
  *host = 0;
  const uint64_t size = I.h.virtual_size, tail = size % I.cs;
  if (tail == 0) return {};
  const uint64_t gc = size / I.cs;
  L2Table* t;
  if (auto ec = I.load_l2(gc >> I.l2_bits, &t); ec || !t) return ec;
  const uint64_t e0 = t->words[(gc & (I.l2_size - 1)) * I.words];
  if (e0 & fmt::kOflagCompressed || !(e0 & fmt::kL2OffsetMask)) return {};
  *host = e0 & fmt::kL2OffsetMask;
  std::vector<std::byte> zeros(I.cs - tail);
  if (auto ec = I.check_data_write(*host + tail, zeros.size())) return ec;
  return I.file->pwrite(zeros, *host + tail);
}

// After switch_size_and_l1 to a new L1 table: the caches follow, the old
// table's clusters are freed.
std::error_code use_new_l1(Image::Impl& I, uint64_t size, std::vector<uint64_t> l1,
                           uint64_t l1_offset) {
  const uint64_t old_off = I.h.l1_table_offset;
  const uint64_t old_clusters =
      std::max<uint64_t>(1, fmt::div_round_up(uint64_t(I.h.l1_size) * 8, I.cs));
  I.set_size(size);
  I.h.l1_size = static_cast<uint32_t>(l1.size());
  I.h.l1_table_offset = l1_offset;
  I.l1 = std::move(l1);
  I.l2.resize(I.l1.size());
  I.rebuild_meta_ranges();
  if (old_off == 0) return {};
  for (uint64_t c = 0; c < old_clusters; ++c)
    if (auto ec = I.free_cluster_now(old_off + c * I.cs)) return ec;
  return {};
}

}  // namespace

// The L1 table grows like QEMU's qcow2_grow_l1_table: a new table in new
// clusters (counted and synced first), then one header write of the size,
// L1 size and L1 offset (the disk grows and gets its table in one step),
// then the old table's clusters are freed. A crash before the header
// write leaks the new table, after it the old one (the image is dirty
// meanwhile, so the next read-write open repairs the leak).
Status Image::grow(uint64_t new_size) {
  Impl& I = *impl_;
  std::unique_lock lk(I.mu);
  I.inflight_cv.wait(lk, [&] { return I.inflight.empty(); });
  if (Status st = grow_refusal(I, new_size); !st.ok()) return st;
  if (new_size == I.h.virtual_size) return Status::Ok();
  const uint64_t need = l1_entries_for(I, new_size);
  if (auto ec = I.begin_write()) return Status::IoError(ec, "setting the dirty bit");
  uint64_t last_host;
  if (auto ec = zero_past_the_end(I, &last_host))
    return Status::IoError(ec, "zeroing the last cluster past the end");
  if (need <= I.h.l1_size) {
    std::lock_guard hl(I.hdr_mu);
    if (auto ec = I.write_header_u64(fmt::kOffSize, new_size))
      return Status::IoError(ec, "writing the size");
    if (auto ec = I.file->flush()) return Status::IoError(ec, "flush");
    I.set_size(new_size);
    return Status::Ok();
  }
  // Everything the old L1 points at is on disk before it is copied.
  if (auto ec = I.flush_locked(true)) return Status::IoError(ec, "flush");
  std::vector<uint64_t> l1 = I.l1;
  l1.resize(need, 0);
  uint64_t host;
  std::vector<uint64_t> taken;
  if (auto ec = write_new_table(I, l1, &host, &taken)) {
    for (uint64_t c : taken) (void)I.free_cluster_now(c);
    return Status::IoError(ec, "writing the L1 table");
  }
  // Counts the new clusters durably (and syncs the table).
  if (auto ec = I.flush_locked(true)) return Status::IoError(ec, "flush");
  if (auto ec = switch_size_and_l1(I, new_size, need, host))
    return lost_track(I, ec, "grow: writing the header");
  if (auto ec = use_new_l1(I, new_size, std::move(l1), host))
    return Status::IoError(ec, "freeing the old L1 table");
  return Status::Ok();
}

// Growing with the gained area reading as zeros, in one crash-safe step
// (every step synced before the next; the image is dirty throughout, so a
// kill leaves the old disk, or the grown one, plus leaks that the next
// read-write open repairs):
//  1. When the old size ends inside a cluster, that cluster is rewritten
//     with what it reads (content unchanged; it is allocated here now),
//     and its host bytes past the old end are zeroed: beyond the disk,
//     nothing reads them yet.
//  2. New L2 tables map every gained cluster as a zero cluster: copies of
//     the tables that already map part of the disk (the old end's), fresh
//     ones for the rest. A new L1 table points at them and at every other
//     old table. All in new clusters, counted durably: nothing the image
//     uses has changed.
//  3. One header write of size, L1 size and L1 offset: the disk is grown
//     and its gained area zero, at once.
//  4. The old L1 table and the replaced L2 tables are freed.
// The same steps as grow() with the L1 table moving, plus the tables.
Status Image::grow_reading_zeros(uint64_t new_size, BelowReader below) {
  Impl& I = *impl_;
  const uint64_t old = size();
  if (new_size > old && !has_zero_clusters())
    return Status::NotSupported(
        "growing with the new area zeroed needs zero clusters, which a version 2 "
        "image does not have (upgrade it: qemu-img amend -o compat=v3)");
  {
    std::unique_lock lk(I.mu);
    if (Status st = grow_refusal(I, new_size); !st.ok()) return st;
  }
  const uint64_t last_start = old / I.cs * I.cs;
  if (new_size > old && old > last_start) {  // step 1, before taking mu
    std::vector<std::byte> last(old - last_start);
    if (auto ec = read(last_start, last, below))
      return Status::IoError(ec, "reading the last cluster");
    if (auto ec = write(last_start, last, below))
      return Status::IoError(ec, "rewriting the last cluster");
  }
  std::unique_lock lk(I.mu);
  I.inflight_cv.wait(lk, [&] { return I.inflight.empty(); });
  if (Status st = grow_refusal(I, new_size); !st.ok()) return st;
  if (I.h.virtual_size != old)
    return Status::Invalid("the image changed size while growing");
  if (new_size == old) return Status::Ok();
  if (auto ec = I.begin_write()) return Status::IoError(ec, "setting the dirty bit");
  if (auto ec = I.flush_locked(true)) return Status::IoError(ec, "flush");
  uint64_t last_host;
  if (auto ec = zero_past_the_end(I, &last_host))
    return Status::IoError(ec, "zeroing the last cluster past the end");

  const uint64_t gained0 = fmt::div_round_up(old, I.cs);  // first gained cluster
  const uint64_t gained1 = fmt::div_round_up(new_size, I.cs);
  const bool partial = old > last_start;
  std::vector<uint64_t> l1 = I.l1;
  l1.resize(std::max<uint64_t>(l1.size(), l1_entries_for(I, new_size)), 0);
  std::vector<uint64_t> replaced;   // old tables the new L1 no longer uses
  std::vector<uint64_t> taken;      // new tables' clusters, given back on failure
  auto fail = [&](std::error_code ec, const char* what) {
    for (uint64_t host : taken) (void)I.free_cluster_now(host);
    return Status::IoError(ec, what);
  };
  const uint64_t first_table = (partial ? gained0 - 1 : gained0) >> I.l2_bits;
  const uint64_t last_table = (gained1 - 1) >> I.l2_bits;
  for (uint64_t t = first_table; t <= last_table; ++t) {
    std::vector<uint64_t> words(I.cs / 8, 0);
    L2Table* old_table = nullptr;
    if (t < I.l1.size()) {
      if (auto ec = I.load_l2(t, &old_table)) return fail(ec, "reading an L2 table");
      if (old_table) words = old_table->words;
    }
    bool changed = false;
    const uint64_t c0 = t << I.l2_bits;
    if (partial && gained0 - 1 >= c0 && gained0 - 1 < c0 + I.l2_size) {
      const uint64_t k = (gained0 - 1 - c0) * I.words;
      // Rewritten in step 1: its own host cluster, zeroed past the end.
      if (last_host == 0 || !(words[k] & fmt::kOflagCopied))
        return fail(eio(), "the rewritten last cluster is not a plain data cluster");
      if (I.words == 2) {  // every subcluster: data (zeros past the old end)
        changed = words[k + 1] != 0xffffffffull;
        words[k + 1] = 0xffffffffull;
      }
    }
    for (uint64_t c = std::max(c0, gained0); c < std::min(c0 + I.l2_size, gained1); ++c) {
      const uint64_t k = (c - c0) * I.words;
      const uint64_t bm = I.words == 2 ? words[k + 1] : 0;
      const bool unset = words[k] == 0 && bm == 0;
      if (!unset && !(I.words == 1 && words[k] == fmt::kOflagZero) &&
          !(I.words == 2 && words[k] == 0 && bm == 0xffffffff00000000ull)) {
        for (uint64_t host : taken) (void)I.free_cluster_now(host);
        return Status::Invalid("guest cluster " + hex(c * I.cs) +
                               ", beyond the end of the disk, is mapped to data");
      }
      changed |= unset;
      if (I.words == 2) words[k] = 0, words[k + 1] = 0xffffffff00000000ull;
      else words[k] = fmt::kOflagZero;
    }
    if (!changed) continue;
    uint64_t host;
    if (auto ec = write_new_table(I, words, &host, &taken))
      return fail(ec, "writing an L2 table");
    if (old_table) replaced.push_back(old_table->offset);
    l1[t] = host | fmt::kOflagCopied;
  }
  uint64_t l1_host;
  if (auto ec = write_new_table(I, l1, &l1_host, &taken))
    return fail(ec, "writing the L1 table");
  if (auto ec = I.flush_locked(true)) return fail(ec, "flush");
  if (auto ec = switch_size_and_l1(I, new_size, l1.size(), l1_host))
    return lost_track(I, ec, "grow: writing the header");
  // The cached tables that were copied now live where the copies are.
  for (uint64_t t = first_table; t <= last_table && t < I.l2.size(); ++t)
    if (I.l2[t] && (l1[t] & fmt::kL1OffsetMask) != I.l2[t]->offset) I.l2[t].reset();
  std::erase_if(I.l2_resident, [&](uint64_t t) { return !I.l2[t]; });
  if (auto ec = use_new_l1(I, new_size, std::move(l1), l1_host))
    return Status::IoError(ec, "freeing the old L1 table");
  for (uint64_t host : replaced)
    if (auto ec = I.free_cluster_now(host)) return Status::IoError(ec, "freeing an L2 table");
  return Status::Ok();
}

}  // namespace layerd::qcow2
