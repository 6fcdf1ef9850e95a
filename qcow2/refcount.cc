// Refcount blocks, the cluster allocator, refcount table growth, and the
// write-back order of metadata on flush.
//
// Ordering rules (see image.h):
//  1. refcount blocks holding increments are written and synced before any
//     L2 table that may point at the newly counted clusters; a new refcount
//     block is written and synced before the reftable entry that points at
//     it, and that entry before such L2 tables (persist_refcounts);
//  2. L2 tables are written (and synced) before the L1 table points at them;
//  3. decrements for clusters that L2 tables stopped pointing at (COW,
//     discard) wait in `pending_free` until those L2 tables are on disk.
// A crash therefore leaks clusters at worst.
#include <algorithm>
#include <cstring>

#include "qcow2/internal.h"

namespace layerd::qcow2 {

uint64_t Image::Impl::rb_get(const RefBlock& b, uint64_t i) const {
  switch (rb_order) {
    case 3:
      return static_cast<uint64_t>(b.raw[i]);
    case 4:
      return fmt::load16(&b.raw[i * 2]);
    case 5:
      return fmt::load32(&b.raw[i * 4]);
    case 6:
      return fmt::load64(&b.raw[i * 8]);
    default: {
      uint64_t bit = i << rb_order;
      unsigned v = static_cast<unsigned>(b.raw[bit >> 3]);
      return (v >> (bit & 7)) & ((1u << (1u << rb_order)) - 1);
    }
  }
}

void Image::Impl::rb_set(RefBlock& b, uint64_t i, uint64_t v) const {
  switch (rb_order) {
    case 3:
      b.raw[i] = static_cast<std::byte>(v);
      break;
    case 4:
      fmt::store16(&b.raw[i * 2], static_cast<uint16_t>(v));
      break;
    case 5:
      fmt::store32(&b.raw[i * 4], static_cast<uint32_t>(v));
      break;
    case 6:
      fmt::store64(&b.raw[i * 8], v);
      break;
    default: {
      uint64_t bit = i << rb_order;
      unsigned mask = ((1u << (1u << rb_order)) - 1) << (bit & 7);
      unsigned old = static_cast<unsigned>(b.raw[bit >> 3]);
      b.raw[bit >> 3] = static_cast<std::byte>(
          (old & ~mask) | ((static_cast<unsigned>(v) << (bit & 7)) & mask));
    }
  }
}

void Image::Impl::note_end(uint64_t host_end) {
  end_cluster = std::max(end_cluster, fmt::div_round_up(host_end, cs));
}

void Image::Impl::evict_refblocks_if_needed() {
  while (rb_resident.size() >= rb_max_blocks) {
    size_t victim = 0;
    uint64_t best = ~0ull;
    for (size_t k = 0; k < rb_resident.size(); ++k) {
      uint64_t u = refblocks[rb_resident[k]]->last_use;
      if (u < best) best = u, victim = k;
    }
    uint64_t idx = rb_resident[victim];
    RefBlock* b = refblocks[idx].get();
    if (b->dirty) {
      if (file->pwrite(b->raw, b->offset)) return;
      b->dirty = false;
    }
    refblocks[idx].reset();
    rb_resident[victim] = rb_resident.back();
    rb_resident.pop_back();
  }
}

std::error_code Image::Impl::load_refblock(uint64_t idx, RefBlock** out) {
  *out = nullptr;
  if (idx >= reftable.size()) return {};
  if (RefBlock* b = refblocks[idx].get()) {
    b->last_use = clock.fetch_add(1, std::memory_order_relaxed);
    *out = b;
    return {};
  }
  uint64_t e = reftable[idx];
  uint64_t off = e & fmt::kRefTableOffsetMask;
  if (!off) return {};
  if (e & fmt::kRefTableReservedMask)
    return mark_corrupt("refcount table entry " + std::to_string(idx) +
                        " has reserved bits set");
  if (off % cs)
    return mark_corrupt("refcount block offset " + hex(off) +
                        " not cluster aligned");
  if (off + cs > file->size())
    return mark_corrupt("refcount block offset " + hex(off) +
                        " beyond end of file");
  evict_refblocks_if_needed();
  auto b = std::make_unique<RefBlock>();
  b->offset = off;
  b->raw.resize(cs);
  if (auto ec = file->pread(b->raw, off)) return ec;
  b->last_use = clock.fetch_add(1, std::memory_order_relaxed);
  *out = b.get();
  refblocks[idx] = std::move(b);
  rb_resident.push_back(idx);
  return {};
}

std::error_code Image::Impl::get_refcount(uint64_t cluster, uint64_t* rc) {
  RefBlock* b;
  if (auto ec = load_refblock(cluster / rb_entries, &b)) return ec;
  *rc = b ? rb_get(*b, cluster % rb_entries) : 0;
  return {};
}

std::error_code Image::Impl::create_refblock(uint64_t idx, uint64_t cluster) {
  evict_refblocks_if_needed();
  auto b = std::make_unique<RefBlock>();
  b->offset = cluster << cb;
  b->raw.assign(cs, std::byte{0});
  if (cluster / rb_entries == idx) rb_set(*b, cluster % rb_entries, 1);
  // Written now, so that its space is taken (a full disk fails the request
  // that needs the block, not a later flush), and again at the next
  // persist_refcounts(): the block first, then (after a flush) its
  // reftable entry. Nothing on disk refers to the clusters it counts
  // before then, so a crash in between leaves unused clusters.
  if (auto ec = file->pwrite(b->raw, b->offset)) return ec;
  b->dirty = true;
  reftable[idx] = b->offset;
  reftable_pending.push_back(idx);
  note_end(b->offset + cs);
  b->last_use = clock.fetch_add(1, std::memory_order_relaxed);
  refblocks[idx] = std::move(b);
  rb_resident.push_back(idx);
  return {};
}

std::error_code Image::Impl::set_refcount(uint64_t cluster, uint64_t rc) {
  // Not corruption: this image's refcount width cannot count that high.
  if (rc > refcount_max) return std::make_error_code(std::errc::value_too_large);
  uint64_t idx = cluster / rb_entries;
  if (idx >= reftable.size()) {
    if (rc == 0) return {};
    if (auto ec = grow_reftable(idx)) return ec;
  }
  RefBlock* b;
  if (auto ec = load_refblock(idx, &b)) return ec;
  if (!b) {
    if (rc == 0) return {};
    // Place the new block in the range it covers, on a cluster nobody uses.
    uint64_t c = idx * rb_entries;
    for (;; ++c) {
      if (c == cluster || c == 0) continue;
      if (reserved && c < reserved->size() && (*reserved)[c]) continue;
      break;
    }
    if (auto ec = create_refblock(idx, c)) return ec;
    b = refblocks[idx].get();
  }
  rb_set(*b, cluster % rb_entries, rc);
  b->dirty = true;
  if (rc) note_end((cluster + 1) << cb);
  return {};
}

std::error_code Image::Impl::grow_reftable(uint64_t need_index) {
  const uint64_t per_cluster = cs / 8;
  uint64_t old_n = reftable.size();
  uint64_t new_n = std::max(need_index + 1, old_n * 2);
  std::vector<uint64_t> missing;
  uint64_t T, s, B;
  for (int round = 0;; ++round) {
    if (round > 64) return mark_corrupt("cannot size the refcount table");
    new_n = fmt::round_up(new_n, per_cluster);
    T = new_n / per_cluster;
    if (T * cs > fmt::kMaxRefcountTableBytes * 4)
      return std::make_error_code(std::errc::file_too_large);
    s = std::max<uint64_t>(end_cluster, fmt::div_round_up(file->size(), cs));
    B = 0;
    for (;;) {
      missing.clear();
      uint64_t first = s / rb_entries, last = (s + T + B - 1) / rb_entries;
      for (uint64_t i = first; i <= last; ++i)
        if (i >= old_n || reftable[i] == 0) missing.push_back(i);
      if (missing.size() == B) break;
      B = missing.size();
    }
    if (!missing.empty() && missing.back() >= new_n) {
      new_n = missing.back() + 1;
      continue;
    }
    break;
  }
  // New refcount blocks, counting the new table and themselves.
  std::vector<std::unique_ptr<RefBlock>> fresh;
  for (uint64_t k = 0; k < B; ++k) {
    auto b = std::make_unique<RefBlock>();
    b->offset = (s + T + k) << cb;
    b->raw.assign(cs, std::byte{0});
    fresh.push_back(std::move(b));
  }
  for (uint64_t c = s; c < s + T + B; ++c) {
    uint64_t idx = c / rb_entries;
    auto it = std::find(missing.begin(), missing.end(), idx);
    if (it != missing.end()) {
      rb_set(*fresh[it - missing.begin()], c % rb_entries, 1);
    } else {
      RefBlock* b;
      if (auto ec = load_refblock(idx, &b)) return ec;
      if (!b) return mark_corrupt("refcount block vanished during growth");
      rb_set(*b, c % rb_entries, 1);
      b->dirty = true;
    }
  }
  for (auto& b : fresh)
    if (auto ec = file->pwrite(b->raw, b->offset)) return ec;
  if (auto ec = write_refblocks()) return ec;
  std::vector<uint64_t> table = reftable;
  table.resize(new_n, 0);
  for (uint64_t k = 0; k < B; ++k) table[missing[k]] = fresh[k]->offset;
  std::vector<std::byte> raw(T * cs);
  for (uint64_t i = 0; i < new_n; ++i) fmt::store64(&raw[i * 8], table[i]);
  if (auto ec = file->pwrite(raw, s << cb)) return ec;
  if (auto ec = file->flush()) return ec;
  std::byte hdr[12];
  fmt::store64(hdr, s << cb);
  fmt::store32(hdr + 8, static_cast<uint32_t>(T));
  if (auto ec = file->pwrite(hdr, fmt::kOffRefcountTableOffset)) return ec;
  if (auto ec = file->flush()) return ec;

  uint64_t old_off = h.refcount_table_offset;
  uint64_t old_clusters = h.refcount_table_clusters;
  h.refcount_table_offset = s << cb;
  h.refcount_table_clusters = static_cast<uint32_t>(T);
  rebuild_meta_ranges();
  reftable = std::move(table);
  reftable_pending.clear();  // the new table holds their entries
  refblocks.resize(new_n);
  for (uint64_t k = 0; k < B; ++k) {
    evict_refblocks_if_needed();
    fresh[k]->last_use = clock.fetch_add(1, std::memory_order_relaxed);
    refblocks[missing[k]] = std::move(fresh[k]);
    rb_resident.push_back(missing[k]);
  }
  note_end((s + T + B) << cb);
  for (uint64_t c = 0; c < old_clusters; ++c)
    if (auto ec = free_cluster_now(old_off + (c << cb))) return ec;
  return {};
}

std::error_code Image::Impl::alloc_clusters(uint64_t n, uint64_t* host) {
  for (int guard = 0;; ++guard) {
    if (guard > 1 << 20) return mark_corrupt("allocator does not converge");
    // Find n free clusters in a row.
    uint64_t s = std::max<uint64_t>(free_hint, 1), len = 0;
    for (uint64_t c = s;; ++c) {
      uint64_t rc = 0;
      bool res = reserved && c < reserved->size() && (*reserved)[c];
      if (!res) {
        if (auto ec = get_refcount(c, &rc)) return ec;
      }
      if (res || rc) {
        s = c + 1;
        len = 0;
        continue;
      }
      if (++len == n) break;
    }
    // Make sure every refcount block for the run exists.
    bool again = false;
    for (uint64_t idx = s / rb_entries; idx <= (s + n - 1) / rb_entries; ++idx) {
      if (idx >= reftable.size()) {
        if (auto ec = grow_reftable(idx)) return ec;
        again = true;
        break;
      }
      RefBlock* b;
      if (auto ec = load_refblock(idx, &b)) return ec;
      if (!b) {
        if (auto ec = create_refblock(idx, std::max(s, idx * rb_entries)))
          return ec;
        again = true;
        break;
      }
    }
    if (again) continue;
    for (uint64_t c = s; c < s + n; ++c)
      if (auto ec = set_refcount(c, 1)) return ec;
    free_hint = s + n;
    *host = s << cb;
    return {};
  }
}

std::error_code Image::Impl::free_cluster_now(uint64_t host,
                                              std::vector<uint64_t>* punch) {
  uint64_t c = host >> cb;
  uint64_t rc;
  if (auto ec = get_refcount(c, &rc)) return ec;
  if (rc == 0)
    return mark_corrupt("freeing cluster " + hex(host) +
                        " whose refcount is already 0");
  if (auto ec = set_refcount(c, rc - 1)) return ec;
  if (rc == 1) {
    if (punch)
      punch->push_back(c);
    else
      (void)file->punch_hole(c << cb, cs);
    free_hint = std::min(free_hint, c);
    if (compressed_free >> cb == c) compressed_free = 0;
  }
  return {};
}

std::error_code Image::Impl::persist_refcounts() {
  if (auto ec = write_refblocks()) return ec;
  if (reftable_pending.empty()) return {};
  if (auto ec = file->flush()) return ec;
  for (uint64_t idx : reftable_pending) {
    std::byte e[8];
    fmt::store64(e, reftable[idx]);
    if (auto ec = file->pwrite(e, h.refcount_table_offset + idx * 8)) return ec;
  }
  reftable_pending.clear();
  return {};
}

std::error_code Image::Impl::write_refblocks() {
  for (uint64_t idx : rb_resident) {
    RefBlock* b = refblocks[idx].get();
    if (!b->dirty) continue;
    if (auto ec = file->pwrite(b->raw, b->offset)) return ec;
    b->dirty = false;
  }
  return {};
}

std::error_code Image::Impl::write_l2s() {
  std::vector<std::byte> raw;
  for (uint64_t idx : l2_resident) {
    L2Table* t = l2[idx].get();
    if (!t->dirty) continue;
    raw.resize(cs);
    for (uint64_t k = 0; k < t->words.size(); ++k)
      fmt::store64(&raw[k * 8], t->words[k]);
    if (auto ec = file->pwrite(raw, t->offset)) return ec;
    t->dirty = false;
  }
  return {};
}

std::error_code Image::Impl::write_l1() {
  if (!l1_dirty) return {};
  std::vector<std::byte> raw(l1.size() * 8);
  for (uint64_t i = 0; i < l1.size(); ++i) fmt::store64(&raw[i * 8], l1[i]);
  if (auto ec = file->pwrite(raw, h.l1_table_offset)) return ec;
  l1_dirty = false;
  return {};
}

std::error_code Image::Impl::flush_locked(bool sync) {
  if (ro || is_view) return {};
  if (auto ec = refresh_copied_flags()) return ec;
  return write_back(sync);
}

std::error_code Image::Impl::write_back(bool sync) {
  bool any_rb = false, any_l2 = false;
  for (uint64_t idx : rb_resident) any_rb |= refblocks[idx]->dirty;
  for (uint64_t idx : l2_resident) any_l2 |= l2[idx]->dirty;
  if (external && (any_l2 || l1_dirty)) {
    if (auto ec = data_file->flush()) return ec;
  }
  if (any_rb || !reftable_pending.empty()) {
    if (auto ec = persist_refcounts()) return ec;
    if (any_l2 || l1_dirty) {
      if (auto ec = file->flush()) return ec;
    }
  }
  if (any_l2) {
    if (auto ec = write_l2s()) return ec;
    if (l1_dirty) {
      if (auto ec = file->flush()) return ec;
    }
  }
  if (auto ec = write_l1()) return ec;
  if (!pending_free.empty()) {
    if (auto ec = file->flush()) return ec;
    if (auto ec = apply_pending_frees()) return ec;
  }
  if (!sync) return {};
  if (external) {
    if (auto ec = data_file->flush()) return ec;
  }
  return file->flush();
}

std::error_code Image::Impl::apply_pending_frees() {
  std::vector<uint64_t> todo, punch;
  todo.swap(pending_free);
  for (uint64_t host : todo)
    if (auto ec = free_cluster_now(host, &punch)) return ec;
  if (auto ec = write_refblocks()) return ec;
  // Give the freed clusters back to the filesystem, one call per run.
  std::sort(punch.begin(), punch.end());
  for (size_t i = 0; i < punch.size();) {
    size_t j = i + 1;
    while (j < punch.size() && punch[j] == punch[j - 1] + 1) ++j;
    (void)file->punch_hole(punch[i] << cb, (punch[j - 1] - punch[i] + 1) << cb);
    i = j;
  }
  return {};
}

}  // namespace layerd::qcow2
