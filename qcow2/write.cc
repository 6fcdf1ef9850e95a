// The write path: in-place overwrites, cluster allocation with copy-on-write
// of the parts a request does not cover, zero clusters and discard.
//
// An allocating write runs in three steps: plan every cluster (allocate the
// host clusters, counted in the refcount cache), write all the data, and
// only then point the L2 entries at the new clusters and queue the old ones
// for release. A failed data write therefore never maps a half-written
// cluster; its fresh clusters are given back (abort_plans). A new L2 table
// is zeroed (write_zeroes) when it is allocated, so that a full disk fails the
// write that needs it rather than a later flush.
#include <algorithm>
#include <cstring>

#include "qcow2/internal.h"

namespace layerd::qcow2 {

namespace {

// Merges pwrites that continue each other in both the host file and the
// caller's buffer into one.
class Coalescer {
 public:
  explicit Coalescer(File& f) : f_(f) {}
  std::error_code add(uint64_t host, const std::byte* src, uint64_t len) {
    if (len_ && host == host_ + len_ && src == src_ + len_) {
      len_ += len;
      return {};
    }
    if (auto ec = drain()) return ec;
    host_ = host, src_ = src, len_ = len;
    return {};
  }
  std::error_code drain() {
    if (!len_) return {};
    auto ec = f_.pwrite(std::span(src_, len_), host_);
    len_ = 0;
    return ec;
  }

 private:
  File& f_;
  uint64_t host_ = 0;
  const std::byte* src_ = nullptr;
  uint64_t len_ = 0;
};

uint32_t unit_mask(uint32_t u0, uint32_t u1) {  // units [u0, u1)
  uint64_t m = ((1ull << (u1 - u0)) - 1) << u0;
  return static_cast<uint32_t>(m);
}

}  // namespace

std::error_code Image::Impl::begin_write() {
  if (corrupt) return eio();
  if (ro || is_view) return std::make_error_code(std::errc::operation_not_permitted);
  if (!write_started) {
    // Every metadata change goes through here first (see mark_dirty).
    if (auto ec = mark_dirty()) return ec;
    write_started = true;
  }
  return {};
}

std::error_code Image::Impl::l2_for_write(uint64_t i, L2Table** out) {
  if (i >= l1.size()) return mark_corrupt("write beyond the L1 table");
  uint64_t l1e = l1[i];
  uint64_t off = l1e & fmt::kL1OffsetMask;
  if (!off) {
    uint64_t host;
    if (auto ec = alloc_clusters(1, &host)) return ec;
    if (auto ec = reserve_cluster(host)) return ec;
    evict_l2_if_needed();
    auto t = std::make_unique<L2Table>();
    t->offset = host;
    t->words.assign(cs / 8, 0);
    t->dirty = true;
    t->last_use = clock.fetch_add(1, std::memory_order_relaxed);
    *out = t.get();
    l2[i] = std::move(t);
    l2_resident.push_back(i);
    l1[i] = host | fmt::kOflagCopied;
    l1_dirty = true;
    return {};
  }
  L2Table* t;
  if (auto ec = load_l2(i, &t)) return ec;
  if (!(l1e & fmt::kOflagCopied)) {
    uint64_t rc;
    if (auto ec = get_refcount(off >> cb, &rc)) return ec;
    if (rc == 0)
      return mark_corrupt("L2 table at " + hex(off) + " has refcount 0");
    if (rc == 1) {
      l1[i] = off | fmt::kOflagCopied;
      l1_dirty = true;
    } else {
      // Shared with a snapshot: copy the table.
      uint64_t host;
      if (auto ec = alloc_clusters(1, &host)) return ec;
      if (auto ec = reserve_cluster(host)) return ec;
      if (!l2[i]) {  // evicted by the allocation
        if (auto ec = load_l2(i, &t)) return ec;
      }
      auto n = std::make_unique<L2Table>();
      n->offset = host;
      n->words = l2[i]->words;
      n->dirty = true;
      n->last_use = clock.fetch_add(1, std::memory_order_relaxed);
      t = n.get();
      l2[i] = std::move(n);
      l1[i] = host | fmt::kOflagCopied;
      l1_dirty = true;
      pending_free.push_back(off);
    }
  }
  *out = t;
  return {};
}

std::error_code Image::Impl::reserve_cluster(uint64_t host) {
  if (auto ec = file->write_zeroes(host, cs)) {
    (void)free_cluster_now(host);
    return ec;
  }
  return {};
}

void Image::Impl::abort_plans(const std::vector<ClusterPlan>& plans) {
  // An error here leaves the cluster counted: a leak, as before.
  for (const ClusterPlan& p : plans)
    if (p.fresh) (void)free_cluster_now(p.host);
}

std::error_code Image::Impl::release_entry(uint64_t e0, uint64_t /*bitmap*/) {
  if (external) return {};
  if (e0 & fmt::kOflagCompressed) {
    uint64_t off, len;
    compressed_span(e0, &off, &len);
    for (uint64_t c = off >> cb; c <= (off + len - 1) >> cb; ++c)
      pending_free.push_back(c << cb);
    return {};
  }
  uint64_t host = e0 & fmt::kL2OffsetMask;
  if (host) pending_free.push_back(host);
  return {};
}

bool Image::Impl::try_write_in_place(uint64_t offset,
                                     std::span<const std::byte> data,
                                     std::error_code* ec, bool* need_load,
                                     uint64_t* load_index) {
  // Pass 1: every unit must be data owned by this image.
  for (uint64_t pos = offset, end = offset + data.size(); pos < end;) {
    CType type;
    uint64_t host, e0, avail;
    bool nl = false;
    if ((*ec = lookup(pos, &type, &host, &e0, &avail, &nl))) return true;
    if (nl) {
      *need_load = true;
      *load_index = (pos >> cb) >> l2_bits;
      return false;
    }
    if (type != CType::Data) return false;
    if (!external && !(e0 & fmt::kOflagCopied)) return false;
    if ((*ec = check_data_write(host, std::min(avail, end - pos)))) return true;
    pos += avail;
  }
  // Pass 2: write, one pwrite per contiguous host run.
  Coalescer co(*data_file);
  for (uint64_t pos = offset, end = offset + data.size(); pos < end;) {
    CType type;
    uint64_t host, e0, avail;
    bool nl = false;
    if ((*ec = lookup(pos, &type, &host, &e0, &avail, &nl))) return true;
    uint64_t n = std::min(avail, end - pos);
    if ((*ec = co.add(host, data.data() + (pos - offset), n))) return true;
    pos += n;
  }
  *ec = co.drain();
  return true;
}

// Step 1, under the exclusive lock: make the L2 tables writable, decide for
// every cluster whether it is written in place or copied to a new cluster,
// and allocate the new clusters.
std::error_code Image::Impl::plan_write(uint64_t offset,
                                        std::span<const std::byte> data,
                                        std::vector<ClusterPlan>* plans) {
  plans->clear();
  uint64_t end = offset + data.size();
  for (uint64_t pos = offset; pos < end;) {
    ClusterPlan p;
    p.gc = pos >> cb;
    uint64_t guest0 = p.gc << cb;
    p.a = pos - guest0;
    p.b = std::min<uint64_t>(cs, end - guest0);
    p.src = data.data() + (pos - offset);  // at guest0 + a

    L2Table* t;
    if (auto ec = l2_for_write(p.gc >> l2_bits, &t)) return ec;
    uint64_t k = (p.gc & (l2_size - 1)) * words;
    p.e0 = t->words[k];
    p.bm = words == 2 ? t->words[k + 1] : 0;
    if (p.e0 | p.bm) {
      if (auto ec = check_entry(p.e0, p.bm, guest0)) return ec;
    }
    p.compressed = p.e0 & fmt::kOflagCompressed;
    p.host_old = p.compressed ? 0 : (p.e0 & fmt::kL2OffsetMask);
    p.has_host = !p.compressed && (p.host_old || external);
    bool owned = false;
    if (external) {
      owned = true;
      p.host_old = guest0;
    } else if (p.has_host) {
      if (p.e0 & fmt::kOflagCopied) {
        owned = true;
      } else {
        uint64_t rc;
        if (auto ec = get_refcount(p.host_old >> cb, &rc)) return ec;
        if (rc == 0)
          return mark_corrupt("data cluster " + hex(p.host_old) +
                              " has refcount 0");
        owned = rc == 1;
      }
    }
    p.host = p.host_old;
    if (!owned) {
      if (auto ec = alloc_clusters(1, &p.host)) return ec;
    }
    if (auto ec = check_data_write(p.host, cs)) return ec;
    p.fresh = !owned;
    if (!external) note_end(p.host + cs);
    plans->push_back(p);
    pos = guest0 + p.b;
  }
  return {};
}

// Step 2, with or without the lock: write the data, filling the parts of
// (sub)clusters the request does not cover from the old contents.
std::error_code Image::Impl::execute_write(std::vector<ClusterPlan>& plans,
                                           BelowReader& below) {
  Coalescer co(*data_file);
  std::vector<std::byte> cbuf, region;
  for (ClusterPlan& p : plans) {
    const uint64_t guest0 = p.gc << cb, a = p.a, b = p.b, host = p.host;
    const std::byte* src = p.src;
    auto old_state = [&](uint32_t u) {
      if (p.compressed) return CType::Compressed;
      uint64_t dummy;
      CType ty = classify(p.e0, p.bm, u, &dummy);
      if (external && words == 1 && ty == CType::Unalloc &&
          (p.e0 & fmt::kOflagCopied))
        ty = CType::Data;
      return ty;
    };
    bool have_cbuf = false;
    uint32_t written = 0;
    for (uint32_t u = 0; u < units;) {
      uint64_t u_lo = u * sc_size, u_hi = u_lo + sc_size;
      bool touched = u_lo < b && a < u_hi;
      CType st = old_state(u);
      bool need = touched || (p.fresh && (st == CType::Data || st == CType::Compressed));
      if (!need) {
        ++u;
        continue;
      }
      if (!p.fresh && st == CType::Data) {
        // Owned data: write just the caller's bytes.
        uint64_t lo = std::max(a, u_lo), hi = std::min(b, u_hi);
        if (auto ec = co.add(host + lo, src + (lo - a), hi - lo)) return ec;
        written |= 1u << u;
        ++u;
        continue;
      }
      // A run of units that need filling: [u, u2).
      uint32_t u2 = u + 1;
      while (u2 < units) {
        CType s2 = old_state(u2);
        uint64_t l2lo = u2 * sc_size, l2hi = l2lo + sc_size;
        bool t2 = l2lo < b && a < l2hi;
        bool n2 = t2 || (p.fresh && (s2 == CType::Data || s2 == CType::Compressed));
        if (!n2 || (!p.fresh && s2 == CType::Data)) break;
        ++u2;
      }
      uint64_t r0 = u * sc_size, r1 = u2 * sc_size;
      written |= unit_mask(u, u2);
      if (a <= r0 && r1 <= b) {
        if (auto ec = co.add(host + r0, src + (r0 - a), r1 - r0)) return ec;
        u = u2;
        continue;
      }
      region.resize(r1 - r0);
      for (uint32_t v = u; v < u2; ++v) {
        uint64_t v0 = v * sc_size;
        std::span<std::byte> dst(region.data() + (v0 - r0), sc_size);
        // Only the bytes outside [a, b) need the old contents.
        uint64_t lo = std::max(a, v0), hi = std::min(b, v0 + sc_size);
        bool covered = lo <= v0 && hi >= v0 + sc_size;
        if (covered) continue;
        switch (old_state(v)) {
          case CType::Data:
            if (auto ec = data_file->pread(dst, p.host_old + v0)) return ec;
            break;
          case CType::Compressed:
            if (!have_cbuf) {
              cbuf.resize(cs);
              if (auto ec = read_compressed(p.e0, cbuf)) return ec;
              have_cbuf = true;
            }
            std::memcpy(dst.data(), cbuf.data() + v0, sc_size);
            break;
          case CType::Zero:
            std::memset(dst.data(), 0, dst.size());
            break;
          case CType::Unalloc:
            if (auto ec = fill_below(guest0 + v0, dst, below)) return ec;
            break;
        }
      }
      uint64_t lo = std::max(a, r0), hi = std::min(b, r1);
      if (lo < hi) std::memcpy(region.data() + (lo - r0), src + (lo - a), hi - lo);
      if (auto ec = co.drain()) return ec;
      if (auto ec = data_file->pwrite(region, host + r0)) return ec;
      u = u2;
    }
    p.written = written;
  }
  return co.drain();
}

// Step 3, under the exclusive lock: point the L2 entries at the written
// clusters and queue the replaced ones for release.
std::error_code Image::Impl::apply_write(const std::vector<ClusterPlan>& plans) {
  for (const ClusterPlan& p : plans) {
    uint64_t guest0 = p.gc << cb;
    uint64_t ne0 = (external ? guest0 : p.host) | fmt::kOflagCopied, nbm = 0;
    if (words == 2) {
      uint32_t alloc = static_cast<uint32_t>(p.bm), zero = static_cast<uint32_t>(p.bm >> 32);
      if (p.compressed) alloc = 0, zero = 0;
      alloc |= p.written;
      zero &= ~p.written;
      nbm = (uint64_t(zero) << 32) | alloc;
    }
    L2Table* t;
    if (auto ec = l2_for_write(p.gc >> l2_bits, &t)) return ec;
    uint64_t k = (p.gc & (l2_size - 1)) * words;
    if (t->words[k] != ne0 || (words == 2 && t->words[k + 1] != nbm)) {
      t->words[k] = ne0;
      if (words == 2) t->words[k + 1] = nbm;
      t->dirty = true;
    }
    if (p.fresh && (p.compressed || p.has_host)) {
      if (auto ec = release_entry(p.e0, p.bm)) return ec;
    }
  }
  return {};
}

std::error_code Image::Impl::plan_populate(uint64_t offset,
                                           std::span<const std::byte> data,
                                           std::vector<ClusterPlan>* plans) {
  plans->clear();
  for (uint64_t done = 0; done < data.size(); done += cs) {
    const std::byte* src = data.data() + done;
    const bool zeros = all_zero(std::span(src, cs));
    if (zeros && h.version < 3) continue;  // reads as zeros from below too
    ClusterPlan p;
    p.gc = (offset + done) >> cb;
    L2Table* t;
    if (auto ec = l2_for_write(p.gc >> l2_bits, &t)) return ec;
    uint64_t k = (p.gc & (l2_size - 1)) * words;
    if (t->words[k] != 0 || (words == 2 && t->words[k + 1] != 0)) continue;
    if (zeros) {
      if (words == 2)
        t->words[k + 1] = uint64_t{0xffffffff} << 32;  // every unit zero
      else
        t->words[k] = fmt::kOflagZero;
      t->dirty = true;
      continue;
    }
    p.a = 0;
    p.b = cs;
    p.src = src;
    if (auto ec = alloc_clusters(1, &p.host)) return ec;
    if (auto ec = check_data_write(p.host, cs)) return ec;
    p.fresh = true;
    note_end(p.host + cs);
    plans->push_back(p);
  }
  return {};
}

std::error_code Image::Impl::execute_and_apply(
    std::unique_lock<WriterPreferringMutex>& lk, uint64_t first, uint64_t last,
    std::vector<ClusterPlan>& plans, BelowReader& below) {
  inflight.push_back({first, last});
  lk.unlock();
  std::error_code ec = execute_write(plans, below);
  lk.lock();
  inflight.erase(std::find(inflight.begin(), inflight.end(),
                           std::make_pair(first, last)));
  if (!ec) ec = apply_write(plans);
  else abort_plans(plans);
  lk.unlock();
  inflight_cv.notify_all();
  return ec;
}

std::error_code Image::Impl::write_locked(uint64_t offset,
                                          std::span<const std::byte> data,
                                          BelowReader& below) {
  if (data.empty()) return {};
  std::vector<ClusterPlan> plans;
  std::error_code ec = plan_write(offset, data, &plans);
  if (!ec) ec = execute_write(plans, below);
  if (ec) {
    abort_plans(plans);
    return ec;
  }
  return apply_write(plans);
}

bool Image::Impl::inflight_overlaps(uint64_t first, uint64_t last) const {
  for (auto& r : inflight)
    if (r.first <= last && first <= r.second) return true;
  return false;
}

std::error_code Image::Impl::lock_for_change(
    std::unique_lock<WriterPreferringMutex>& lk, uint64_t first, uint64_t last) {
  lk = std::unique_lock(mu);
  if (auto ec = begin_write()) return ec;
  inflight_cv.wait(lk, [&] { return !inflight_overlaps(first, last); });
  return {};
}

Image::Impl::ClusterSpan Image::Impl::covered_span(uint64_t pos,
                                                   uint64_t end) const {
  ClusterSpan s;
  s.gc = pos >> cb;
  s.guest0 = s.gc << cb;
  s.a = pos - s.guest0;
  s.b = std::min<uint64_t>(cs, end - s.guest0);
  if (end >= h.virtual_size && s.guest0 + cs == fmt::round_up(h.virtual_size, cs))
    s.b = cs;
  return s;
}

std::error_code Image::Impl::zero_locked(uint64_t offset, uint64_t length,
                                         bool may_unmap, BelowReader& below) {
  static const std::vector<std::byte> zeros(2u << 20);
  uint64_t end = offset + length;
  auto write_zero_bytes = [&](uint64_t from, uint64_t to) -> std::error_code {
    while (from < to) {
      uint64_t n = std::min<uint64_t>(to - from, zeros.size());
      if (auto ec = write_locked(from, std::span(zeros.data(), n), below))
        return ec;
      from += n;
    }
    return {};
  };
  if (h.version < 3) return write_zero_bytes(offset, end);
  for (uint64_t pos = offset; pos < end;) {
    const auto [gc, guest0, a, b] = covered_span(pos, end);
    uint32_t u0 = static_cast<uint32_t>(fmt::div_round_up(a, sc_size));
    uint32_t u1 = static_cast<uint32_t>(b / sc_size);
    if (u0 >= u1) {  // no whole unit covered
      if (auto ec = write_zero_bytes(pos, std::min(end, guest0 + cs))) return ec;
      pos = std::min(end, guest0 + cs);
      continue;
    }
    // Partial units at the edges get written zeros.
    if (a < u0 * sc_size) {
      if (auto ec = write_zero_bytes(pos, guest0 + u0 * sc_size)) return ec;
    }
    if (u1 * sc_size < b) {
      if (auto ec = write_zero_bytes(guest0 + u1 * sc_size,
                                     std::min(end, guest0 + b)))
        return ec;
    }
    L2Table* t;
    if (auto ec = l2_for_write(gc >> l2_bits, &t)) return ec;
    uint64_t k = (gc & (l2_size - 1)) * words;
    uint64_t e0 = t->words[k];
    uint64_t bm = words == 2 ? t->words[k + 1] : 0;
    if (e0 | bm) {
      if (auto ec = check_entry(e0, bm, guest0)) return ec;
    }
    bool compressed = e0 & fmt::kOflagCompressed;
    uint64_t host = compressed ? 0 : (e0 & fmt::kL2OffsetMask);
    bool has_host = !compressed && (host || (external && (e0 & fmt::kOflagCopied)));
    bool owned = external || (has_host && (e0 & fmt::kOflagCopied));
    uint64_t ne0 = e0, nbm = bm;
    bool release = false;
    if (words == 2) {
      uint32_t m = unit_mask(u0, u1);
      bool all = m == 0xffffffffu;
      if (compressed) {
        ne0 = 0, nbm = 0xffffffff00000000ull, release = true;
        if (!all) {  // cannot happen: compressed covers whole clusters only
          if (auto ec = write_zero_bytes(guest0 + u0 * sc_size, guest0 + u1 * sc_size))
            return ec;
          pos = guest0 + b;
          continue;
        }
      } else if (all && has_host && !external && (may_unmap || !owned)) {
        ne0 = 0, nbm = 0xffffffff00000000ull, release = true;
      } else {
        uint32_t alloc = static_cast<uint32_t>(bm) & ~m;
        uint32_t zero = static_cast<uint32_t>(bm >> 32) | m;
        nbm = (uint64_t(zero) << 32) | alloc;
      }
    } else {
      if (compressed) {
        ne0 = fmt::kOflagZero, release = true;
      } else if (has_host && (external || (owned && !may_unmap))) {
        ne0 = host | fmt::kOflagCopied | fmt::kOflagZero;
        if (external) ne0 = (e0 & fmt::kL2OffsetMask) | fmt::kOflagCopied | fmt::kOflagZero;
      } else {
        ne0 = fmt::kOflagZero;
        release = has_host;
      }
    }
    if (external && h.data_file_raw) {
      if (auto ec = data_file->write_zeroes(guest0 + u0 * sc_size,
                                            (u1 - u0) * sc_size))
        return ec;
    }
    if (ne0 != e0 || nbm != bm) {
      t->words[k] = ne0;
      if (words == 2) t->words[k + 1] = nbm;
      t->dirty = true;
    }
    if (release) {
      if (auto ec = release_entry(e0, bm)) return ec;
    }
    pos = std::min(end, guest0 + cs);
  }
  return reclaim_if_many();
}

std::error_code Image::Impl::reclaim_if_many() {
  // Freed clusters are only reclaimed after the L2 tables that dropped them
  // are on disk; do that now and then rather than waiting for a flush.
  if (pending_free.size() < 4096) return {};
  return flush_locked(true);
}

std::error_code Image::Impl::discard_locked(uint64_t offset, uint64_t length,
                                            BelowReader& /*below*/) {
  uint64_t end = offset + length;
  for (uint64_t pos = offset; pos < end;) {
    const auto [gc, guest0, a, b] = covered_span(pos, end);
    pos = std::min(end, guest0 + cs);
    uint64_t i = gc >> l2_bits;
    if (i >= l1.size()) return mark_corrupt("discard beyond the L1 table");
    if (!(l1[i] & fmt::kL1OffsetMask)) {  // nothing mapped in this L2 range
      pos = std::max(pos, std::min(end, (i + 1) << (l2_bits + cb)));
      continue;
    }
    uint32_t u0 = static_cast<uint32_t>(fmt::div_round_up(a, sc_size));
    uint32_t u1 = static_cast<uint32_t>(b / sc_size);
    if (u0 >= u1) continue;
    L2Table* t;
    if (auto ec = l2_for_write(i, &t)) return ec;
    uint64_t k = (gc & (l2_size - 1)) * words;
    uint64_t e0 = t->words[k];
    uint64_t bm = words == 2 ? t->words[k + 1] : 0;
    if (!(e0 | bm)) continue;
    if (auto ec = check_entry(e0, bm, guest0)) return ec;
    uint32_t m = unit_mask(u0, u1);
    uint32_t full = words == 2 ? 0xffffffffu : 1u;
    if ((e0 & fmt::kOflagCompressed) && m != full) continue;
    if (words == 2 && m != full) {
      uint64_t nbm = bm & ~((uint64_t(m) << 32) | m);
      if (nbm != bm) {
        t->words[k + 1] = nbm;
        t->dirty = true;
      }
      continue;
    }
    if (external && h.data_file_raw) continue;
    t->words[k] = 0;
    if (words == 2) t->words[k + 1] = 0;
    t->dirty = true;
    if (external) {
      (void)data_file->punch_hole(guest0, cs);
    } else if (auto ec = release_entry(e0, bm)) {
      return ec;
    }
  }
  return reclaim_if_many();
}

}  // namespace layerd::qcow2
