// Internal snapshots: taking and deleting them. (Listing happens at open in
// header.cc; snapshot views are Images opened on a snapshot's L1 table.)
//
// Crash safety: every refcount increment reaches the disk before the header
// names the new snapshot table; every decrement happens after the header
// stopped naming the old one. A crash leaks clusters at worst.
#include <algorithm>
#include <ctime>

#include "qcow2/internal.h"

namespace layerd::qcow2 {

SnapshotInfo decode_snapshot(const std::vector<std::byte>& raw,
                             uint64_t default_size) {
  SnapshotInfo si;
  const std::byte* f = raw.data();
  si.l1_table_offset = fmt::load64(f);
  si.l1_size = fmt::load32(f + 8);
  uint16_t id_len = fmt::load16(f + 12);
  uint16_t name_len = fmt::load16(f + 14);
  si.date_sec = fmt::load32(f + 16);
  si.date_nsec = fmt::load32(f + 20);
  si.vm_clock_nsec = fmt::load64(f + 24);
  si.vm_state_size = fmt::load32(f + 32);
  uint32_t extra = fmt::load32(f + 36);
  const std::byte* v = f + fmt::kSnapshotEntryFixed;
  si.virtual_size = default_size;
  if (extra >= 8) si.vm_state_size = fmt::load64(v);
  if (extra >= 16) si.virtual_size = fmt::load64(v + 8);
  si.id.assign(reinterpret_cast<const char*>(v + extra), id_len);
  si.name.assign(reinterpret_cast<const char*>(v + extra + id_len), name_len);
  return si;
}


std::error_code Image::Impl::write_snapshot_table(
    std::vector<std::vector<std::byte>> entries) {
  uint64_t total = 0;
  for (auto& e : entries) total += fmt::round_up(e.size(), 8);
  if (total > fmt::kMaxSnapshotTableBytes)
    return std::make_error_code(std::errc::file_too_large);
  uint64_t off = 0;
  if (total) {
    std::vector<std::byte> buf(total);
    uint64_t p = 0;
    for (auto& e : entries) {
      std::copy(e.begin(), e.end(), buf.begin() + static_cast<ptrdiff_t>(p));
      p += fmt::round_up(e.size(), 8);
    }
    if (auto ec = alloc_clusters(fmt::div_round_up(total, cs), &off)) return ec;
    if (auto ec = file->pwrite(buf, off)) return ec;
  }
  // The new table and its refcounts are durable before the header names it.
  if (auto ec = write_refblocks()) return ec;
  if (auto ec = file->flush()) return ec;
  std::byte hdr[12];
  fmt::store32(hdr, static_cast<uint32_t>(entries.size()));
  fmt::store64(hdr + 4, off);
  if (auto ec = file->pwrite(hdr, fmt::kOffNbSnapshots)) return ec;
  if (auto ec = file->flush()) return ec;

  uint64_t old_off = snapshots_offset, old_bytes = snapshot_table_bytes;
  uint32_t old_nb = nb_snapshots;
  nb_snapshots = static_cast<uint32_t>(entries.size());
  snapshots_offset = off;
  snapshot_table_bytes = total;
  snap_raw = std::move(entries);
  snaps.clear();
  for (auto& e : snap_raw) snaps.push_back(decode_snapshot(e, h.virtual_size));
  rebuild_meta_ranges();
  if (old_nb && old_bytes) {
    for (uint64_t c = old_off >> cb; c <= (old_off + old_bytes - 1) >> cb; ++c)
      if (auto ec = free_cluster_now(c << cb)) return ec;
  }
  return {};
}

std::error_code Image::Impl::set_copied_flags(bool shared_tables_too) {
  for (uint64_t i = 0; i < l1.size(); ++i) {
    uint64_t off = l1[i] & fmt::kL1OffsetMask;
    if (!off) continue;
    uint64_t rc;
    if (auto ec = get_refcount(off >> cb, &rc)) return ec;
    uint64_t want = rc == 1 ? (off | fmt::kOflagCopied) : off;
    if (l1[i] != want) {
      l1[i] = want;
      l1_dirty = true;
    }
    // A shared table is not ours to change, except to mend flags left
    // stale by a failure: then the count of a table may be too high (its
    // snapshot half gone), and so a flag is set exactly where the cluster
    // it maps has a count of one, in whatever table (as QEMU's repair).
    if (rc != 1 && !shared_tables_too) continue;
    L2Table* t;
    if (auto ec = load_l2(i, &t)) return ec;
    if (!t) continue;
    for (uint64_t k = 0; k < l2_size; ++k) {
      uint64_t& e0 = t->words[k * words];
      if (e0 & fmt::kOflagCompressed) continue;
      uint64_t host = e0 & fmt::kL2OffsetMask;
      if (!host || external) continue;
      if (auto ec = get_refcount(host >> cb, &rc)) return ec;
      uint64_t ne = rc == 1 ? (e0 | fmt::kOflagCopied) : (e0 & ~fmt::kOflagCopied);
      if (ne != e0) {
        e0 = ne;
        t->dirty = true;
      }
    }
  }
  return {};
}

Status Image::Impl::create_snapshot_locked(const std::string& name) {
  if (external)
    return Status::NotSupported("internal snapshots with an external data file");
  if (h.refcount_bits < 2)
    return Status::NotSupported("refcount_bits=1 cannot count snapshots");
  if (nb_snapshots >= fmt::kMaxSnapshots)
    return Status::Invalid("too many snapshots");
  if (name.size() > 0xffff) return Status::Invalid("snapshot name too long");
  for (auto& s : snaps)
    if (s.name == name)
      return Status::Invalid("a snapshot named '" + name + "' already exists");
  if (auto ec = flush_locked(true)) return Status::IoError(ec, "flush");
  Status st = take_snapshot(name);
  if (!st.ok()) copied_flags_stale = true;
  return st;
}

std::error_code Image::Impl::refresh_copied_flags() {
  if (!copied_flags_stale) return {};
  if (auto ec = set_copied_flags(true)) return ec;
  copied_flags_stale = false;
  return {};
}

Status Image::Impl::take_snapshot(const std::string& name) {
  // Count everything the active L1 reaches once more; the active tables no
  // longer own their clusters alone.
  const uint64_t end = std::max(end_cluster, fmt::div_round_up(file->size(), cs));
  auto incr = [&](uint64_t cluster) -> std::error_code {
    if (cluster >= end)
      return mark_corrupt("cluster " + hex(cluster << cb) + " beyond end of file");
    uint64_t rc;
    if (auto ec = get_refcount(cluster, &rc)) return ec;
    return set_refcount(cluster, rc + 1);
  };
  for (uint64_t i = 0; i < l1.size(); ++i) {
    uint64_t off = l1[i] & fmt::kL1OffsetMask;
    if (!off) continue;
    L2Table* t;
    if (auto ec = load_l2(i, &t)) return Status::IoError(ec, "loading L2 table");
    if (auto ec = incr(off >> cb)) return Status::IoError(ec, "counting L2 table");
    for (uint64_t k = 0; k < l2_size; ++k) {
      uint64_t& e0 = t->words[k * words];
      if (e0 & fmt::kOflagCompressed) {
        uint64_t coff, clen;
        compressed_span(e0, &coff, &clen);
        for (uint64_t c = coff >> cb; c <= (coff + clen - 1) >> cb; ++c)
          if (auto ec = incr(c)) return Status::IoError(ec, "counting cluster");
        continue;
      }
      uint64_t host = e0 & fmt::kL2OffsetMask;
      if (host) {
        if (auto ec = incr(host >> cb)) return Status::IoError(ec, "counting cluster");
      }
      if (e0 & fmt::kOflagCopied) {
        e0 &= ~fmt::kOflagCopied;
        t->dirty = true;
      }
    }
    l1[i] = off;
    l1_dirty = true;
  }
  // The snapshot's copy of the L1 table.
  uint64_t l1_off = 0;
  if (!l1.empty()) {
    std::vector<std::byte> raw(l1.size() * 8);
    for (uint64_t i = 0; i < l1.size(); ++i) fmt::store64(&raw[i * 8], l1[i]);
    if (auto ec = alloc_clusters(fmt::div_round_up(raw.size(), cs), &l1_off))
      return Status::IoError(ec, "allocating snapshot L1 table");
    if (auto ec = file->pwrite(raw, l1_off))
      return Status::IoError(ec, "writing snapshot L1 table");
  }
  if (auto ec = flush_locked(true)) return Status::IoError(ec, "flush");

  // The entry: fixed part, 16 bytes of extra data, id, name.
  uint64_t next_id = 1;
  for (auto& s : snaps) {
    char* endp = nullptr;
    unsigned long long v = std::strtoull(s.id.c_str(), &endp, 10);
    if (!s.id.empty() && endp && *endp == 0 && v >= next_id) next_id = v + 1;
  }
  std::string id = std::to_string(next_id);
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  std::vector<std::byte> e(fmt::kSnapshotEntryFixed + 16 + id.size() + name.size());
  fmt::store64(&e[0], l1_off);
  fmt::store32(&e[8], static_cast<uint32_t>(l1.size()));
  fmt::store16(&e[12], static_cast<uint16_t>(id.size()));
  fmt::store16(&e[14], static_cast<uint16_t>(name.size()));
  fmt::store32(&e[16], static_cast<uint32_t>(ts.tv_sec));
  fmt::store32(&e[20], static_cast<uint32_t>(ts.tv_nsec));
  fmt::store64(&e[24], 0);
  fmt::store32(&e[32], 0);
  fmt::store32(&e[36], 16);
  fmt::store64(&e[40], 0);                // vm state size
  fmt::store64(&e[48], h.virtual_size);   // disk size
  std::copy(id.begin(), id.end(), reinterpret_cast<char*>(&e[56]));
  std::copy(name.begin(), name.end(), reinterpret_cast<char*>(&e[56 + id.size()]));
  auto entries = snap_raw;
  entries.push_back(std::move(e));
  if (auto ec = write_snapshot_table(std::move(entries)))
    return Status::IoError(ec, "writing snapshot table");
  if (auto ec = flush_locked(true)) return Status::IoError(ec, "flush");
  return Status::Ok();
}

Status Image::Impl::delete_snapshot_locked(const std::string& key) {
  size_t idx = snaps.size();
  for (size_t i = 0; i < snaps.size(); ++i)
    if (snaps[i].id == key) idx = i;
  if (idx == snaps.size())
    for (size_t i = 0; i < snaps.size(); ++i)
      if (snaps[i].name == key) idx = i;
  if (idx == snaps.size())
    return {std::make_error_code(std::errc::no_such_file_or_directory),
            "no snapshot '" + key + "'"};
  if (auto ec = flush_locked(true)) return Status::IoError(ec, "flush");
  Status st = drop_snapshot(idx);
  if (!st.ok()) copied_flags_stale = true;
  return st;
}

Status Image::Impl::drop_snapshot(size_t idx) {
  SnapshotInfo s = snaps[idx];
  // Read its L1 table before the entry disappears.
  std::vector<uint64_t> sl1(s.l1_size);
  if (s.l1_size) {
    std::vector<std::byte> raw(uint64_t(s.l1_size) * 8);
    if (auto ec = file->pread(raw, s.l1_table_offset))
      return Status::IoError(ec, "reading snapshot L1 table");
    for (uint64_t i = 0; i < s.l1_size; ++i) sl1[i] = fmt::load64(&raw[i * 8]);
  }
  auto entries = snap_raw;
  entries.erase(entries.begin() + static_cast<ptrdiff_t>(idx));
  if (auto ec = write_snapshot_table(std::move(entries)))
    return Status::IoError(ec, "writing snapshot table");

  // Now nothing names the snapshot: drop its references.
  std::vector<std::byte> raw(cs);
  const uint64_t fsize = file->size();
  for (uint64_t e : sl1) {
    uint64_t off = e & fmt::kL1OffsetMask;
    if (!off) continue;
    if (off % cs || off + cs > fsize) {
      (void)mark_corrupt("snapshot L2 table offset " + hex(off) + " invalid");
      return Status::Invalid("snapshot '" + s.name + "' has an invalid L2 table");
    }
    if (auto ec = file->pread(raw, off)) return Status::IoError(ec, "reading L2 table");
    for (uint64_t k = 0; k < l2_size; ++k) {
      uint64_t e0 = fmt::load64(&raw[k * words * 8]);
      if (e0 & fmt::kOflagCompressed) {
        uint64_t coff, clen;
        compressed_span(e0, &coff, &clen);
        for (uint64_t c = coff >> cb; c <= (coff + clen - 1) >> cb; ++c)
          if (auto ec = free_cluster_now(c << cb)) return Status::IoError(ec, "freeing");
        continue;
      }
      uint64_t host = e0 & fmt::kL2OffsetMask;
      if (host) {
        if (auto ec = free_cluster_now(host)) return Status::IoError(ec, "freeing");
      }
    }
    if (auto ec = free_cluster_now(off)) return Status::IoError(ec, "freeing");
  }
  for (uint64_t b = 0; b < uint64_t(s.l1_size) * 8; b += cs)
    if (auto ec = free_cluster_now(s.l1_table_offset + b))
      return Status::IoError(ec, "freeing");
  if (auto ec = set_copied_flags()) return Status::IoError(ec, "COPIED flags");
  if (auto ec = flush_locked(true)) return Status::IoError(ec, "flush");
  return Status::Ok();
}

Status Image::create_snapshot(const std::string& name, SnapshotInfo* created) {
  Impl& I = *impl_;
  if (I.is_view || I.ro)
    return {std::make_error_code(std::errc::operation_not_permitted),
            "image is read-only"};
  std::unique_lock<WriterPreferringMutex> lk;
  if (auto ec = I.lock_for_change(lk, 0, UINT64_MAX))
    return Status::IoError(ec, "snapshot");
  Status st = I.create_snapshot_locked(name);
  if (st.ok() && created) *created = I.snaps.back();
  return st;
}

Status Image::delete_snapshot(std::string_view id_or_name) {
  Impl& I = *impl_;
  if (I.is_view || I.ro)
    return {std::make_error_code(std::errc::operation_not_permitted),
            "image is read-only"};
  std::unique_lock<WriterPreferringMutex> lk;
  if (auto ec = I.lock_for_change(lk, 0, UINT64_MAX))
    return Status::IoError(ec, "snapshot");
  return I.delete_snapshot_locked(std::string(id_or_name));
}

}  // namespace layerd::qcow2
