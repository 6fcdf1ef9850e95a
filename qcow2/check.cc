// Consistency check and repair, like `qemu-img check`: rebuild the expected
// refcount of every host cluster by walking all metadata (header, L1 and L2
// tables of the active image and of every snapshot, refcount structures,
// the snapshot table, bitmaps), compare with the stored refcounts and check
// the COPIED flags of the active tables.
//
// A check is a scan (scan_metadata: reads the file and the in-memory
// tables that only writes change, touches no cache, so it may run beside
// reads, without mu, while nothing can change the metadata: see
// Image::reopen_read_write) and the repair it planned (apply_repair, under
// mu held exclusively).
#include <algorithm>
#include <map>

#include "qcow2/internal.h"

namespace layerd::qcow2 {

namespace {

// The refcounts the file stores, read block by block from the file, not
// through the refcount cache, so that a scan under a shared lock leaves
// the caches alone. The caller sees to it that the cache holds nothing
// newer (it flushed, or the image is read-only).
class StoredRefcounts {
 public:
  explicit StoredRefcounts(const Image::Impl& I) : I_(I) { block_.raw.resize(I.cs); }
  // EIO for a table entry that load_refblock would refuse (the check
  // counts it as a check error; nothing is marked).
  std::error_code get(uint64_t cluster, uint64_t* rc) {
    const uint64_t idx = cluster / I_.rb_entries;
    const uint64_t e = idx < I_.reftable.size() ? I_.reftable[idx] : 0;
    const uint64_t off = e & fmt::kRefTableOffsetMask;
    if (!off) return (*rc = 0), std::error_code{};
    if (e & fmt::kRefTableReservedMask || off % I_.cs || off + I_.cs > I_.file->size())
      return eio();
    if (idx != loaded_) {
      loaded_ = UINT64_MAX;
      if (auto ec = I_.file->pread(block_.raw, off)) return ec;
      loaded_ = idx;
    }
    *rc = I_.rb_get(block_, cluster % I_.rb_entries);
    return {};
  }

 private:
  const Image::Impl& I_;
  RefBlock block_;
  uint64_t loaded_ = UINT64_MAX;
};

}  // namespace

// The walk: the expected refcount of every host cluster from all metadata,
// compared with the stored ones; then the COPIED flags of the active
// tables against the refcounts as they will be after the repair.
Status Image::Impl::scan_metadata(Repair repair, RepairPlan* plan) {
  CheckReport* rep = &plan->report;
  plan->repair = repair;
  const uint64_t fsize = file->size();
  uint64_t nclusters = std::max(fmt::div_round_up(fsize, cs), end_cluster);
  if (nclusters > (1ull << 31))
    return Status::NotSupported("image too large to check");
  std::vector<uint32_t>& expected = plan->expected;
  expected.assign(nclusters, 0);
  // `times`: how many references one walk stands for (a snapshot L2 table
  // shared by many L1 entries is walked once); counts stay per reference.
  auto problem = [&](uint64_t* counter, std::string msg, uint64_t times = 1) {
    *counter += times;
    if (rep->messages.size() < 1000) rep->messages.push_back(std::move(msg));
  };
  auto ref = [&](uint64_t off, uint64_t len, const char* what,
                 uint64_t times = 1) {
    if (!len) return;
    for (uint64_t c = off >> cb; c <= (off + len - 1) >> cb; ++c) {
      if (c >= nclusters) {
        problem(&rep->corruptions, std::string("ERROR ") + what + " at " +
                                       hex(off) + " beyond end of file", times);
        return;
      }
      expected[c] = uint32_t(std::min<uint64_t>(UINT32_MAX, expected[c] + times));
    }
  };
  ref(0, cs, "header");
  ref(h.l1_table_offset, uint64_t(h.l1_size) * 8, "L1 table");
  ref(h.refcount_table_offset, uint64_t(h.refcount_table_clusters) * cs,
      "refcount table");
  for (uint64_t i = 0; i < reftable.size(); ++i) {
    uint64_t off = reftable[i] & fmt::kRefTableOffsetMask;
    if (!off) continue;
    if (off % cs) {
      problem(&rep->corruptions, "ERROR refcount block " + std::to_string(i) +
                                     " not cluster aligned");
      continue;
    }
    ref(off, cs, "refcount block");
  }
  if (nb_snapshots) ref(snapshots_offset, snapshot_table_bytes, "snapshot table");

  // Bitmaps: directory, bitmap tables, bitmap data clusters, while the
  // autoclear bit vouches for them (as QEMU: once a program without bitmap
  // support cleared it, they are dropped and their clusters are leaks).
  count_bitmap_clusters(
      ref, [&](std::string msg) { problem(&rep->corruptions, std::move(msg)); },
      [&] { ++rep->check_errors; });

  // L1/L2 walk.
  std::vector<std::byte> raw(cs);
  std::vector<std::pair<uint64_t, uint64_t>> active_l2;  // (l1 index, offset)
  // One L1 entry (index i of the active table, or a snapshot's), standing
  // for `times` references to its L2 table.
  auto walk_l2 = [&](uint64_t i, uint64_t off, bool active, uint64_t times) {
    if (off % cs || off + cs > fsize) {
      problem(&rep->corruptions, "ERROR L2 table offset " + hex(off) +
                                     " invalid (misaligned or beyond end "
                                     "of file)", times);
      return;
    }
    ref(off, cs, "L2 table", times);
    if (active) active_l2.push_back({i, off});
    if (auto ec = file->pread(raw, off)) {
      rep->check_errors += times;
      return;
    }
    for (uint64_t k = 0; k < l2_size; ++k) {
      uint64_t e0 = fmt::load64(&raw[k * words * 8]);
      uint64_t guest = ((i << l2_bits) + k) << cb;
      if (e0 & fmt::kOflagCompressed) {
        uint64_t coff, clen;
        compressed_span(e0, &coff, &clen);
        if (external) {
          problem(&rep->corruptions, "ERROR compressed cluster with an "
                                     "external data file", times);
          continue;
        }
        ref(coff, clen, "compressed cluster", times);
        if (active && guest < h.virtual_size) ++rep->allocated_clusters;
        continue;
      }
      uint64_t host = e0 & fmt::kL2OffsetMask;
      // As classify() reads it: in an external data file, offset 0 with
      // the COPIED flag is the data file's first cluster.
      const bool mapped = host || (external && (e0 & fmt::kOflagCopied));
      if (active && guest < h.virtual_size &&
          (mapped || (words == 2 && (fmt::load64(&raw[k * 16 + 8]) & 0xffffffffu))))
        ++rep->allocated_clusters;
      if (!host || external) continue;
      if (host % cs) {
        problem(&rep->corruptions,
                "ERROR cluster " + hex(host) + " not cluster aligned", times);
        continue;
      }
      ref(host, cs, "data cluster", times);
    }
  };
  for (uint64_t i = 0; i < l1.size(); ++i)
    if (uint64_t off = l1[i] & fmt::kL1OffsetMask) walk_l2(i, off, true, 1);
  // Snapshots: every distinct L2 table once, however many L1 entries of
  // however many snapshots share it (a 100 KiB image can hold a thousand
  // snapshots of one 4096-entry L1 table: walked per reference, that took
  // minutes).
  std::map<uint64_t, uint64_t> snapshot_l2;  // L2 offset -> references
  for (const SnapshotInfo& s : snaps) {
    ref(s.l1_table_offset, uint64_t(s.l1_size) * 8, "snapshot L1 table");
    std::vector<std::byte> r(uint64_t(s.l1_size) * 8);
    if (!r.empty() && file->pread(r, s.l1_table_offset)) {
      ++rep->check_errors;
      continue;
    }
    for (uint64_t i = 0; i < s.l1_size; ++i)
      if (uint64_t off = fmt::load64(&r[i * 8]) & fmt::kL1OffsetMask)
        ++snapshot_l2[off];
  }
  for (auto [off, times] : snapshot_l2) walk_l2(0, off, false, times);

  // Compare. A table that could not be read (check_errors) counted none
  // of the clusters it maps: their refcounts then look too high, and
  // "repairing" those leaks would free clusters in use. Only a complete
  // walk repairs leaks (raising a refcount that is too low is safe either
  // way), as QEMU's check, which stops at the first such error.
  const bool walk_complete = rep->check_errors == 0;
  const bool fix_leaks = repair != Repair::None && walk_complete;
  StoredRefcounts stored(*this);
  // The refcount of every cluster as it will be after the repair (capped:
  // the COPIED flags only ask whether it is one), kUnknown where it could
  // not be read.
  constexpr uint32_t kUnknown = UINT32_MAX;
  std::vector<uint32_t> after(nclusters, kUnknown);
  uint64_t last_used = 0;
  for (uint64_t c = 0; c < nclusters; ++c) {
    uint64_t actual;
    if (stored.get(c, &actual)) {
      ++rep->check_errors;
      continue;
    }
    uint64_t want = expected[c];
    after[c] = uint32_t(std::min<uint64_t>(kUnknown - 1, actual));
    if (want) last_used = c + 1;
    if (actual == want) continue;
    if (actual < want) {
      problem(&rep->corruptions, "ERROR cluster " + std::to_string(c) +
                                     " refcount=" + std::to_string(actual) +
                                     " reference=" + std::to_string(want));
      if (repair == Repair::All) {
        plan->refcounts.push_back({c, want, false});
        after[c] = uint32_t(std::min<uint64_t>(kUnknown - 1, want));
        ++rep->corruptions_fixed;
      }
    } else {
      problem(&rep->leaks, "Leaked cluster " + std::to_string(c) +
                               " refcount=" + std::to_string(actual) +
                               " reference=" + std::to_string(want));
      if (fix_leaks) {
        plan->refcounts.push_back({c, want, true});
        after[c] = uint32_t(want);
        ++rep->leaks_fixed;
      }
    }
  }
  // Refcounts counted beyond the end of the file are leaks too.
  for (uint64_t idx = nclusters / rb_entries; idx < reftable.size(); ++idx) {
    if (!(reftable[idx] & fmt::kRefTableOffsetMask)) continue;
    for (uint64_t k = 0; k < rb_entries; ++k) {
      uint64_t c = idx * rb_entries + k, v;
      if (c < nclusters) continue;
      if (stored.get(c, &v)) break;  // an unusable block: nothing to count
      if (!v) continue;
      problem(&rep->leaks, "Leaked cluster " + std::to_string(c) + " refcount=" +
                               std::to_string(v) + " reference=0");
      if (fix_leaks) {
        plan->refcounts.push_back({c, 0, true});
        ++rep->leaks_fixed;
      }
    }
  }
  // Past the file (a corruption the walk reported) or unreadable: unknown,
  // and its flags are left alone.
  auto refcount_after = [&](uint64_t host, uint64_t* rc) {
    const uint64_t c = host >> cb;
    if (c >= nclusters || after[c] == kUnknown) return false;
    *rc = after[c];
    return true;
  };

  // COPIED flags of the active tables.
  for (auto [i, off] : active_l2) {
    uint64_t rc;
    if (!refcount_after(off, &rc)) continue;
    bool want = rc == 1, have = l1[i] & fmt::kOflagCopied;
    if (want != have) {
      problem(&rep->corruptions, "ERROR OFLAG_COPIED L2 cluster: l1_index=" +
                                     std::to_string(i) + " refcount=" +
                                     std::to_string(rc));
      if (repair == Repair::All) {
        plan->l1_entries.push_back(
            {i, want ? (l1[i] | fmt::kOflagCopied) : (l1[i] & ~fmt::kOflagCopied)});
        ++rep->corruptions_fixed;
      }
    }
    if (file->pread(raw, off)) continue;  // counted by the walk
    for (uint64_t k = 0; k < l2_size; ++k) {
      uint64_t e0 = fmt::load64(&raw[k * words * 8]);
      if (e0 & fmt::kOflagCompressed) continue;
      uint64_t host = e0 & fmt::kL2OffsetMask;
      if (!host || external || host % cs) continue;
      if (!refcount_after(host, &rc)) continue;
      bool w = rc == 1, hv = e0 & fmt::kOflagCopied;
      if (w == hv) continue;
      problem(&rep->corruptions, "ERROR OFLAG_COPIED data cluster: l2_entry=" +
                                     hex(e0) + " refcount=" + std::to_string(rc));
      if (repair == Repair::All) {
        plan->l2_entries.push_back(
            {i, k, w ? (e0 | fmt::kOflagCopied) : (e0 & ~fmt::kOflagCopied)});
        ++rep->corruptions_fixed;
      }
    }
  }
  rep->total_clusters = fmt::div_round_up(h.virtual_size, cs);
  rep->image_end_offset = last_used * cs;
  return Status::Ok();
}

// The repair the scan planned, under mu held exclusively, on metadata that
// has not changed since the scan. A fix that fails (a refcount wider than
// the image's refcount width, an unreadable table) is skipped and not
// counted as fixed, as before the check was split.
Status Image::Impl::apply_repair(RepairPlan& plan) {
  CheckReport& rep = plan.report;
  if (plan.repair == Repair::None) return Status::Ok();
  if (!ro) {
    // A repair changes refcounts and flags: dirty first, like any write.
    if (auto ec = mark_dirty()) return Status::IoError(ec, "setting the dirty bit");
  }
  // A refcount block created on the way goes on a cluster nothing uses.
  reserved = &plan.expected;
  for (const RepairPlan::Refcount& f : plan.refcounts) {
    if (!set_refcount(f.cluster, f.refcount)) continue;
    --(f.leak ? rep.leaks_fixed : rep.corruptions_fixed);
  }
  for (auto [i, entry] : plan.l1_entries) {
    l1[i] = entry;
    l1_dirty = true;
  }
  for (const RepairPlan::L2Entry& e : plan.l2_entries) {
    L2Table* t;
    if (load_l2(e.table, &t) || !t) {
      --rep.corruptions_fixed;
      continue;
    }
    t->words[e.index * words] = e.entry;
    t->dirty = true;
  }
  reserved = nullptr;
  if (auto ec = flush_locked(true)) return Status::IoError(ec, "flush");
  if (corrupt && rep.corruptions == rep.corruptions_fixed && rep.check_errors == 0) {
    // Writable from now on: the bitmaps must see the writes. (Before the
    // flag goes: Image::write reads `recording` once it sees it clear.)
    if (auto ec = start_recording_bitmaps())
      return Status::IoError(ec, "marking the dirty bitmaps in use");
    corrupt = false;
    (void)set_incompat_bit(fmt::kIncompatCorrupt, false);
  }
  // Refcounts are consistent now (leaks do not matter): a dirty bit set
  // by someone else may be cleared at close(), as `qemu-img check -r`
  // clears it. Not before: writes may follow while the image is open.
  if (dirty_bit && rep.corruptions == rep.corruptions_fixed && rep.check_errors == 0)
    dirty_set_by_us = true;
  return Status::Ok();
}

Status Image::Impl::check_locked(Repair repair, CheckReport* rep) {
  if (!ro) {
    if (auto ec = flush_locked(true)) return Status::IoError(ec, "flush");
  }
  RepairPlan plan;
  Status st = scan_metadata(repair, &plan);
  if (st.ok()) st = apply_repair(plan);
  *rep = std::move(plan.report);
  return st;
}

}  // namespace layerd::qcow2
