// The cluster map: L2 table loading and caching, entry classification, the
// read path and block status.
#include <algorithm>
#include <cstring>

#include "qcow2/internal.h"

namespace layerd::qcow2 {

std::error_code Image::Impl::validate_l2_offset(uint64_t l1e, uint64_t i) {
  uint64_t off = l1e & fmt::kL1OffsetMask;
  if (l1e & fmt::kL1ReservedMask)
    return mark_corrupt("L1 entry " + std::to_string(i) + " (" + hex(l1e) +
                        ") has reserved bits set");
  if (off % cs)
    return mark_corrupt("L2 table offset " + hex(off) + " not cluster aligned");
  if (off < cs)
    return mark_corrupt("L2 table offset " + hex(off) + " overlaps the header");
  if (off + cs > file->size())
    return mark_corrupt("L2 table offset " + hex(off) + " beyond end of file");
  return {};
}

void Image::Impl::evict_l2_if_needed() {
  while (l2_resident.size() >= l2_max_tables) {
    size_t victim = 0;
    uint64_t best = ~0ull;
    for (size_t k = 0; k < l2_resident.size(); ++k) {
      uint64_t u = l2[l2_resident[k]]->last_use.load(std::memory_order_relaxed);
      if (u < best) best = u, victim = k;
    }
    uint64_t idx = l2_resident[victim];
    L2Table* t = l2[idx].get();
    if (t->dirty) {
      // The table may point at clusters whose refcounts are still only in
      // the cache, and (with an external data file) at data not yet on
      // disk: those go first, as in write_back().
      if (external && data_file->flush()) return;  // keep it; retry later
      if (persist_refcounts() || file->flush()) return;
      std::vector<std::byte> raw(cs);
      for (uint64_t k = 0; k < t->words.size(); ++k)
        fmt::store64(&raw[k * 8], t->words[k]);
      if (file->pwrite(raw, t->offset)) return;
      t->dirty = false;
    }
    l2[idx].reset();
    l2_resident[victim] = l2_resident.back();
    l2_resident.pop_back();
  }
}

std::error_code Image::Impl::load_l2(uint64_t i, L2Table** out) {
  *out = nullptr;
  if (i >= l1.size()) return mark_corrupt("L1 index out of range");
  if (l2[i]) {
    *out = l2[i].get();
    return {};
  }
  uint64_t l1e = l1[i];
  uint64_t off = l1e & fmt::kL1OffsetMask;
  if (!off) return {};
  if (auto ec = validate_l2_offset(l1e, i)) return ec;
  evict_l2_if_needed();
  auto t = std::make_unique<L2Table>();
  t->offset = off;
  t->words.resize(cs / 8);
  std::vector<std::byte> raw(cs);
  if (auto ec = file->pread(raw, off)) return ec;
  for (uint64_t k = 0; k < t->words.size(); ++k)
    t->words[k] = fmt::load64(&raw[k * 8]);
  t->last_use = clock.fetch_add(1, std::memory_order_relaxed);
  *out = t.get();
  l2[i] = std::move(t);
  l2_resident.push_back(i);
  return {};
}

CType Image::Impl::classify(uint64_t e0, uint64_t bitmap, uint32_t unit,
                            uint64_t* host) const {
  *host = e0 & fmt::kL2OffsetMask;
  if (e0 & fmt::kOflagCompressed) return CType::Compressed;
  if (words == 2) {
    if (bitmap >> unit & 1) return CType::Data;
    if (bitmap >> (32 + unit) & 1) return CType::Zero;
    return CType::Unalloc;
  }
  if (e0 & fmt::kOflagZero) return CType::Zero;
  if (*host == 0 && !(external && (e0 & fmt::kOflagCopied)))
    return CType::Unalloc;
  return CType::Data;
}

std::error_code Image::Impl::check_entry(uint64_t e0, uint64_t bitmap,
                                         uint64_t guest) {
  if (e0 & fmt::kOflagCompressed) {
    if (external)
      return mark_corrupt("compressed cluster at guest offset " + hex(guest) +
                          " with an external data file");
    if (words == 2 && bitmap)
      return mark_corrupt("compressed cluster at guest offset " + hex(guest) +
                          " has a subcluster bitmap");
    return {};
  }
  uint64_t host = e0 & fmt::kL2OffsetMask;
  if (e0 & 0x3f00000000000000ull)
    return mark_corrupt("L2 entry for guest offset " + hex(guest) +
                        " has reserved bits set");
  if (host % cs)
    return mark_corrupt("cluster offset " + hex(host) + " for guest offset " +
                        hex(guest) + " not cluster aligned");
  if (words == 2) {
    if (e0 & fmt::kOflagZero)
      return mark_corrupt("zero flag in an extended L2 entry at guest offset " +
                          hex(guest));
    uint32_t alloc = static_cast<uint32_t>(bitmap);
    uint32_t zero = static_cast<uint32_t>(bitmap >> 32);
    if (alloc & zero)
      return mark_corrupt("subcluster both allocated and zero at guest offset " +
                          hex(guest));
    if (alloc && host == 0 && !external)
      return mark_corrupt("allocated subclusters without a host cluster at "
                          "guest offset " + hex(guest));
  }
  if (host && host < cs && !external)
    return mark_corrupt("data cluster at guest offset " + hex(guest) +
                        " overlaps the header");
  return {};
}

std::error_code Image::Impl::lookup(uint64_t pos, CType* type, uint64_t* host,
                                    uint64_t* e0out, uint64_t* avail,
                                    bool* need_load) {
  uint64_t cluster = pos >> cb;
  uint64_t i = cluster >> l2_bits;
  if (i >= l1.size())
    return mark_corrupt("guest offset " + hex(pos) + " beyond the L1 table");
  uint64_t l2off = l1[i] & fmt::kL1OffsetMask;
  if (!l2off) {
    *type = CType::Unalloc;
    *e0out = 0;
    *host = 0;
    *avail = ((i + 1) << (l2_bits + cb)) - pos;
    return {};
  }
  L2Table* t = l2[i].get();
  if (!t) {
    *need_load = true;
    return {};
  }
  t->last_use.store(clock.fetch_add(1, std::memory_order_relaxed),
                    std::memory_order_relaxed);
  uint64_t k = (cluster & (l2_size - 1)) * words;
  uint64_t e0 = t->words[k];
  uint64_t bitmap = words == 2 ? t->words[k + 1] : 0;
  if (e0 | bitmap) {
    if (auto ec = check_entry(e0, bitmap, pos)) return ec;
  }
  uint64_t in_cluster = pos & (cs - 1);
  *e0out = e0;
  if (e0 & fmt::kOflagCompressed) {
    *type = CType::Compressed;
    *host = 0;
    *avail = cs - in_cluster;
    return {};
  }
  uint32_t unit = static_cast<uint32_t>(in_cluster / sc_size);
  uint64_t h0;
  *type = classify(e0, bitmap, unit, &h0);
  *host = h0 + in_cluster;
  *avail = (uint64_t(unit) + 1) * sc_size - in_cluster;
  return {};
}

void Image::Impl::compressed_span(uint64_t e0, uint64_t* off,
                                  uint64_t* len) const {
  uint32_t x = 62 - (cb - 8);
  *off = e0 & ((1ull << x) - 1);
  uint64_t nsec = ((e0 >> x) & ((1ull << (cb - 8)) - 1)) + 1;
  *len = nsec * 512 - (*off & 511);
}

std::error_code Image::Impl::read_compressed(uint64_t e0,
                                             std::span<std::byte> out) {
  uint64_t off, len;
  compressed_span(e0, &off, &len);
  thread_local std::vector<std::byte> in;
  if (in.size() < len) in.resize(len);
  if (auto ec = file->pread(std::span(in.data(), len), off)) return ec;
  if (!decompress_cluster(h.compression_type, std::span(in.data(), len), out))
    return mark_corrupt("compressed cluster at " + hex(off) +
                        " does not decompress");
  return {};
}

std::error_code Image::Impl::fill_below(uint64_t guest, std::span<std::byte> buf,
                                        BelowReader& below) {
  if (buf.empty()) return {};
  uint64_t vs = h.virtual_size;
  uint64_t n = guest >= vs ? 0 : std::min<uint64_t>(buf.size(), vs - guest);
  if (n < buf.size()) std::memset(buf.data() + n, 0, buf.size() - n);
  if (n) return below(guest, buf.first(n));
  return {};
}

std::error_code Image::Impl::read_locked(uint64_t& offset,
                                         std::span<std::byte>& buf,
                                         BelowReader& below, bool* need_load,
                                         uint64_t* load_index, bool nowait) {
  const auto would_block = std::make_error_code(std::errc::resource_unavailable_try_again);
  while (!buf.empty()) {
    CType type;
    uint64_t host, e0, avail;
    bool nl = false;
    if (auto ec = lookup(offset, &type, &host, &e0, &avail, &nl)) return ec;
    if (nl && nowait) return would_block;
    if (nl) {
      *need_load = true;
      *load_index = (offset >> cb) >> l2_bits;
      return {};
    }
    uint64_t run = std::min<uint64_t>(avail, buf.size());
    if (type == CType::Compressed) {
      if (nowait) return would_block;
      thread_local std::vector<std::byte> cbuf;
      if (cbuf.size() < cs) cbuf.resize(cs);
      if (auto ec = read_compressed(e0, std::span(cbuf.data(), cs))) return ec;
      std::memcpy(buf.data(), cbuf.data() + (offset & (cs - 1)), run);
    } else {
      // Extend the run over following units of the same kind (contiguous
      // host offsets for data).
      while (run < buf.size()) {
        CType t2;
        uint64_t h2, e2, a2;
        bool nl2 = false;
        if (auto ec = lookup(offset + run, &t2, &h2, &e2, &a2, &nl2)) return ec;
        if (nl2 || t2 != type || t2 == CType::Compressed) break;
        if (type == CType::Data && h2 != host + run) break;
        run += std::min<uint64_t>(a2, buf.size() - run);
      }
      auto part = buf.first(run);
      std::error_code ec;
      switch (type) {
        case CType::Data:
          ec = nowait ? data_file->pread_nowait(part, host)
                      : data_file->pread(part, host);
          break;
        case CType::Zero:
          std::memset(part.data(), 0, part.size());
          break;
        case CType::Unalloc:
          ec = fill_below(offset, part, below);
          break;
        case CType::Compressed:
          break;
      }
      if (ec) return ec;
    }
    offset += run;
    buf = buf.subspan(run);
  }
  return {};
}

std::error_code Image::Impl::status_locked(uint64_t offset, uint64_t length,
                                           MapExtent* out, bool* need_load,
                                           uint64_t* load_index) {
  CType type;
  uint64_t host, e0, avail;
  bool nl = false;
  if (auto ec = lookup(offset, &type, &host, &e0, &avail, &nl)) return ec;
  if (nl) {
    *need_load = true;
    *load_index = (offset >> cb) >> l2_bits;
    return {};
  }
  // Zero and unallocated units inside a cluster that has a host cluster
  // (preallocated zeros; subclusters of an allocated cluster) keep their
  // host offset, as QEMU reports them (ZERO_ALLOC, UNALLOCATED_ALLOC).
  auto has_offset = [&](CType t, uint64_t entry) {
    return t == CType::Data || ((entry & fmt::kL2OffsetMask) != 0 &&
                                (t == CType::Zero || (t == CType::Unalloc && words == 2)));
  };
  MapExtent m;
  m.length = std::min(avail, length);
  m.has_host_offset = has_offset(type, e0);
  m.host_offset = m.has_host_offset ? host : 0;
  m.in_data_file = external && m.has_host_offset;
  switch (type) {
    case CType::Data:
      m.kind = ExtentKind::Data;
      break;
    case CType::Compressed:
      m.kind = ExtentKind::Data;
      m.compressed = true;
      {
        uint64_t off, len;
        compressed_span(e0, &off, &len);
        m.has_host_offset = true;
        m.host_offset = off;
      }
      break;
    case CType::Zero:
      m.kind = ExtentKind::Zero;
      break;
    case CType::Unalloc:
      m.kind = ExtentKind::Unallocated;
      break;
  }
  if (type != CType::Compressed) {
    while (m.length < length) {
      CType t2;
      uint64_t h2, e2, a2;
      bool nl2 = false;
      if (auto ec = lookup(offset + m.length, &t2, &h2, &e2, &a2, &nl2))
        return ec;
      if (nl2 || t2 != type || has_offset(t2, e2) != m.has_host_offset) break;
      if (m.has_host_offset && h2 != host + m.length) break;
      m.length += std::min(a2, length - m.length);
    }
  }
  *out = m;
  return {};
}

}  // namespace layerd::qcow2
