// Parsing and validating the header, its extensions, the snapshot table and
// the table placements; small in-place header rewrites.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <unordered_set>

#include "qcow2/internal.h"

namespace layerd::qcow2 {

std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

namespace {

struct Range {
  uint64_t off, len;
  const char* what;
};

bool overlaps(const Range& a, const Range& b) {
  return a.len && b.len && a.off < b.off + b.len && b.off < a.off + a.len;
}

}  // namespace

Status Image::Impl::parse_header() {
  const uint64_t fsize = file->size();
  std::byte hdr[fmt::kV3HeaderLength + 8] = {};
  if (fsize < fmt::kV2HeaderLength)
    return Status::Invalid("file too small for a qcow2 header (" +
                           std::to_string(fsize) + " bytes)");
  if (auto ec = file->pread(std::span(hdr, sizeof hdr), 0))
    return Status::IoError(ec, "reading qcow2 header");
  if (fmt::load32(hdr) != fmt::kMagic)
    return Status::Invalid("not a qcow2 image (bad magic)");
  h.version = fmt::load32(hdr + fmt::kOffVersion);
  if (h.version != 2 && h.version != 3)
    return Status::NotSupported("unsupported qcow2 version " +
                                std::to_string(h.version));
  h.cluster_bits = fmt::load32(hdr + fmt::kOffClusterBits);
  if (h.cluster_bits < fmt::kMinClusterBits ||
      h.cluster_bits > fmt::kMaxClusterBits)
    return Status::Invalid("cluster_bits " + std::to_string(h.cluster_bits) +
                           " out of range (9..21)");
  cb = h.cluster_bits;
  cs = 1ull << cb;
  h.cluster_size = static_cast<uint32_t>(cs);
  set_size(fmt::load64(hdr + fmt::kOffSize));
  uint32_t crypt = fmt::load32(hdr + fmt::kOffCryptMethod);
  if (crypt != 0)
    return Status::NotSupported("encrypted qcow2 images are not supported");
  h.l1_size = fmt::load32(hdr + fmt::kOffL1Size);
  h.l1_table_offset = fmt::load64(hdr + fmt::kOffL1Offset);
  h.refcount_table_offset = fmt::load64(hdr + fmt::kOffRefcountTableOffset);
  h.refcount_table_clusters = fmt::load32(hdr + fmt::kOffRefcountTableClusters);
  nb_snapshots = fmt::load32(hdr + fmt::kOffNbSnapshots);
  snapshots_offset = fmt::load64(hdr + fmt::kOffSnapshotsOffset);
  uint64_t backing_off = fmt::load64(hdr + fmt::kOffBackingOffset);
  uint32_t backing_len = fmt::load32(hdr + fmt::kOffBackingSize);

  if (h.version == 2) {
    h.header_length = fmt::kV2HeaderLength;
    rb_order = 4;
  } else {
    h.incompatible_features = fmt::load64(hdr + fmt::kOffIncompatible);
    h.compatible_features = fmt::load64(hdr + fmt::kOffCompatible);
    h.autoclear_features = fmt::load64(hdr + fmt::kOffAutoclear);
    rb_order = fmt::load32(hdr + fmt::kOffRefcountOrder);
    h.header_length = fmt::load32(hdr + fmt::kOffHeaderLength);
    if (h.header_length < fmt::kV3MinHeaderLength || h.header_length % 8 ||
        h.header_length > cs)
      return Status::Invalid("invalid header_length " +
                             std::to_string(h.header_length));
    if (rb_order > 6)
      return Status::Invalid("refcount_order " + std::to_string(rb_order) +
                             " out of range (0..6)");
    if (h.header_length > fmt::kOffCompressionType)
      h.compression_type = static_cast<uint8_t>(hdr[fmt::kOffCompressionType]);
  }
  if (fsize < h.header_length)
    return Status::Invalid("file too small for header_length " +
                           std::to_string(h.header_length));
  h.refcount_bits = 1u << rb_order;
  rb_entries = (cs * 8) >> rb_order;
  refcount_max = rb_order == 6 ? ~0ull : (1ull << h.refcount_bits) - 1;

  // Header extensions: between the header and the backing file name (or the
  // end of the first cluster).
  uint64_t ext_end = cs;
  if (backing_off) {
    if (backing_off >= cs || backing_len > fmt::kMaxBackingNameLength ||
        backing_off + backing_len > cs)
      return Status::Invalid("backing file name (offset " + hex(backing_off) +
                             ", length " + std::to_string(backing_len) +
                             ") must lie in the first cluster and be at most "
                             "1023 bytes");
    if (backing_off < h.header_length)
      return Status::Invalid("backing file name overlaps the header");
    ext_end = backing_off;
  }
  {  // v2 images may carry extensions too
    std::vector<std::byte> area(ext_end > h.header_length
                                    ? ext_end - h.header_length
                                    : 0);
    if (!area.empty()) {
      if (auto ec = file->pread(area, h.header_length))
        return Status::IoError(ec, "reading header extensions");
    }
    size_t pos = 0;
    bool seen_end = false;
    std::unordered_set<uint32_t> seen;  // a cluster holds 2^18 extensions
    while (pos + 8 <= area.size()) {
      uint32_t type = fmt::load32(&area[pos]);
      uint32_t len = fmt::load32(&area[pos + 4]);
      pos += 8;
      if (type == fmt::kExtEnd) {
        seen_end = true;
        break;
      }
      if (len > area.size() - pos)
        return Status::Invalid("header extension " + hex(type) + " length " +
                               std::to_string(len) +
                               " exceeds the header area");
      const std::byte* d = &area[pos];
      if (!seen.insert(type).second && type != fmt::kExtFeatureTable)
        return Status::Invalid("duplicate header extension " + hex(type));
      switch (type) {
        case fmt::kExtBackingFormat:
          h.backing_format.assign(reinterpret_cast<const char*>(d), len);
          break;
        case fmt::kExtDataFile:
          h.data_file.assign(reinterpret_cast<const char*>(d), len);
          break;
        case fmt::kExtFeatureTable:
          for (size_t i = 0; i + 48 <= len; i += 48) {
            FeatureName f;
            f.type = static_cast<uint8_t>(d[i]);
            f.bit = static_cast<uint8_t>(d[i + 1]);
            const char* n = reinterpret_cast<const char*>(d + i + 2);
            f.name.assign(n, strnlen(n, 46));
            features.push_back(std::move(f));
          }
          break;
        case fmt::kExtBitmaps:
          if (len < 24) return Status::Invalid("bitmaps extension too short");
          has_bitmaps_ext = true;
          bitmaps_ext_length = len;
          bitmaps_ext_offset = h.header_length + pos;
          nb_bitmaps = fmt::load32(d);
          bitmaps_ext_reserved = fmt::load32(d + 4);
          bitmaps_dir_size = fmt::load64(d + 8);
          bitmaps_dir_offset = fmt::load64(d + 16);
          break;
        case fmt::kExtCrypto:
          return Status::NotSupported("encrypted qcow2 images are not supported");
        default:
          break;  // unknown: ignored, kept intact on disk
      }
      pos += fmt::round_up(len, 8);
    }
    (void)seen_end;
  }
  if (backing_off && backing_len) {
    h.backing_file.resize(backing_len);
    if (auto ec = file->pread(
            std::as_writable_bytes(std::span(h.backing_file)), backing_off))
      return Status::IoError(ec, "reading backing file name");
  }

  // Incompatible features.
  uint64_t unknown = h.incompatible_features & ~fmt::kIncompatKnown;
  if (unknown) {
    std::string names;
    for (int bit = 0; bit < 64; ++bit) {
      if (!(unknown >> bit & 1)) continue;
      if (!names.empty()) names += ", ";
      std::string n;
      for (auto& f : features)
        if (f.type == 0 && f.bit == bit) n = f.name;
      names += n.empty() ? "bit " + std::to_string(bit) : n + " (bit " + std::to_string(bit) + ")";
    }
    return Status::NotSupported("unsupported incompatible qcow2 features: " +
                                names);
  }
  h.extended_l2 = h.incompatible_features & fmt::kIncompatExtendedL2;
  h.has_data_file = h.incompatible_features & fmt::kIncompatDataFile;
  h.data_file_raw = h.autoclear_features & fmt::kAutoclearDataFileRaw;
  if (h.incompatible_features & fmt::kIncompatCompression) {
    if (h.header_length <= fmt::kOffCompressionType || h.compression_type == 0)
      return Status::Invalid("compression type bit set but compression_type is "
                             "absent or zlib");
  } else if (h.compression_type != 0) {
    return Status::Invalid("compression_type " +
                           std::to_string(h.compression_type) +
                           " set without the compression type bit");
  }
  if (h.compression_type > 1)
    return Status::NotSupported("unknown compression type " +
                                std::to_string(h.compression_type));
  if (h.extended_l2 && cb < 14)
    return Status::Invalid("extended L2 entries need clusters of at least 16 KiB");
  lazy = h.compatible_features & fmt::kCompatLazyRefcounts;
  dirty_bit = h.incompatible_features & fmt::kIncompatDirty;
  corrupt = h.incompatible_features & fmt::kIncompatCorrupt;
  if (!h.has_data_file && !h.data_file.empty())
    h.data_file.clear();  // stale name without the bit: ignored like QEMU
  if (h.data_file_raw && !h.has_data_file)
    return Status::Invalid("raw external data bit set without a data file");

  words = h.extended_l2 ? 2 : 1;
  l2_bits = cb - 3 - (h.extended_l2 ? 1 : 0);
  l2_size = 1ull << l2_bits;
  units = h.extended_l2 ? fmt::kSubclusters : 1;
  sc_size = cs / units;

  // Virtual size and L1.
  uint64_t guest_clusters = fmt::div_round_up(h.virtual_size, cs);
  uint64_t l1_needed = fmt::div_round_up(guest_clusters, l2_size);
  if (h.virtual_size > (1ull << 62) || l1_needed > fmt::kMaxL1Bytes / 8)
    return Status::Invalid("virtual size " + std::to_string(h.virtual_size) +
                           " too large for the L1 table limit");
  if (h.l1_size < l1_needed)
    return Status::Invalid("L1 table too small: " + std::to_string(h.l1_size) +
                           " entries for virtual size " +
                           std::to_string(h.virtual_size));
  if (uint64_t(h.l1_size) > fmt::kMaxL1Bytes / 8)
    return Status::Invalid("L1 table too large: " + std::to_string(h.l1_size) +
                           " entries");
  if (h.l1_size && h.l1_table_offset % cs)
    return Status::Invalid("L1 table offset " + hex(h.l1_table_offset) +
                           " not cluster aligned");
  if (h.l1_size && (h.l1_table_offset > fsize ||
                    fsize - h.l1_table_offset < uint64_t(h.l1_size) * 8))
    return Status::Invalid("L1 table offset " + hex(h.l1_table_offset) +
                           " beyond end of file");

  // Refcount table.
  if (h.refcount_table_offset % cs || h.refcount_table_offset == 0)
    return Status::Invalid("refcount table offset " +
                           hex(h.refcount_table_offset) +
                           " invalid (zero or not cluster aligned)");
  if (h.refcount_table_clusters == 0 ||
      uint64_t(h.refcount_table_clusters) * cs > fmt::kMaxRefcountTableBytes * 4)
    return Status::Invalid("refcount table size " +
                           std::to_string(h.refcount_table_clusters) +
                           " clusters invalid");
  uint64_t rt_bytes = uint64_t(h.refcount_table_clusters) * cs;
  if (h.refcount_table_offset > fsize ||
      fsize - h.refcount_table_offset < rt_bytes)
    return Status::Invalid("refcount table offset " +
                           hex(h.refcount_table_offset) + " beyond end of file");

  // Snapshot table placement (the entries are parsed in load_tables).
  if (nb_snapshots > fmt::kMaxSnapshots)
    return Status::Invalid("too many snapshots: " + std::to_string(nb_snapshots));
  if (nb_snapshots && (snapshots_offset % cs || snapshots_offset == 0 ||
                       snapshots_offset >= fsize))
    return Status::Invalid("snapshot table offset " + hex(snapshots_offset) +
                           " invalid");
  if (h.has_data_file && nb_snapshots)
    return Status::Invalid("internal snapshots with an external data file");

  // Overlapping metadata.
  Range rs[] = {{0, cs, "header"},
                {h.l1_table_offset, uint64_t(h.l1_size) * 8, "L1 table"},
                {h.refcount_table_offset, rt_bytes, "refcount table"}};
  for (size_t i = 0; i < 3; ++i)
    for (size_t j = i + 1; j < 3; ++j)
      if (overlaps(rs[i], rs[j]))
        return Status::Invalid(std::string(rs[i].what) + " overlaps " +
                               rs[j].what);
  return Status::Ok();
}

Status Image::Impl::load_tables() {
  const uint64_t fsize = file->size();
  // L1.
  l1.assign(h.l1_size, 0);
  if (h.l1_size) {
    std::vector<std::byte> raw(uint64_t(h.l1_size) * 8);
    if (auto ec = file->pread(raw, h.l1_table_offset))
      return Status::IoError(ec, "reading L1 table");
    for (uint64_t i = 0; i < h.l1_size; ++i) l1[i] = fmt::load64(&raw[i * 8]);
  }
  l2.clear();
  l2.resize(h.l1_size);
  l2_max_tables = std::max<uint64_t>(4, opts.l2_cache_bytes / (cs + 64));

  // Refcount table (not needed by snapshot views).
  if (!is_view) {
    uint64_t rt_bytes = uint64_t(h.refcount_table_clusters) * cs;
    std::vector<std::byte> raw(rt_bytes);
    if (auto ec = file->pread(raw, h.refcount_table_offset))
      return Status::IoError(ec, "reading refcount table");
    reftable.resize(rt_bytes / 8);
    for (uint64_t i = 0; i < reftable.size(); ++i)
      reftable[i] = fmt::load64(&raw[i * 8]);
    refblocks.clear();
    refblocks.resize(reftable.size());
    rb_max_blocks = std::max<uint64_t>(4, opts.refcount_cache_bytes / (cs + 64));
    end_cluster = fmt::div_round_up(fsize, cs);
    free_hint = 0;
  }

  // Snapshot table.
  snaps.clear();
  snap_raw.clear();
  uint64_t pos = snapshots_offset;
  for (uint32_t s = 0; s < nb_snapshots; ++s) {
    std::byte fixed[fmt::kSnapshotEntryFixed];
    if (pos - snapshots_offset + sizeof fixed > fmt::kMaxSnapshotTableBytes ||
        pos + sizeof fixed > fsize)
      return Status::Invalid("snapshot table extends beyond end of file");
    if (auto ec = file->pread(fixed, pos))
      return Status::IoError(ec, "reading snapshot table");
    uint16_t id_len = fmt::load16(fixed + 12);
    uint16_t name_len = fmt::load16(fixed + 14);
    uint32_t extra = fmt::load32(fixed + 36);
    if (extra > fmt::kMaxSnapshotExtraData)
      return Status::Invalid("snapshot " + std::to_string(s) +
                             " extra data too large (" + std::to_string(extra) +
                             " bytes)");
    uint64_t var = uint64_t(extra) + id_len + name_len;
    pos += sizeof fixed;
    if (pos + var > fsize ||
        pos + var - snapshots_offset > fmt::kMaxSnapshotTableBytes)
      return Status::Invalid("snapshot table extends beyond end of file");
    std::vector<std::byte> raw(fixed, fixed + sizeof fixed);
    raw.resize(sizeof fixed + var);
    if (var) {
      if (auto ec = file->pread(std::span(raw).subspan(sizeof fixed), pos))
        return Status::IoError(ec, "reading snapshot table");
    }
    SnapshotInfo si = decode_snapshot(raw, h.virtual_size);
    pos = fmt::round_up(pos + var, 8);
    if (si.l1_size > fmt::kMaxL1Bytes / 8)
      return Status::Invalid("snapshot '" + si.name + "' L1 table too large");
    if (si.l1_size && (si.l1_table_offset % cs || si.l1_table_offset == 0 ||
                       si.l1_table_offset > fsize ||
                       fsize - si.l1_table_offset < uint64_t(si.l1_size) * 8))
      return Status::Invalid("snapshot '" + si.name + "' L1 table offset " +
                             hex(si.l1_table_offset) + " invalid");
    snaps.push_back(std::move(si));
    snap_raw.push_back(std::move(raw));
  }
  snapshot_table_bytes = pos - snapshots_offset;
  rebuild_meta_ranges();
  if (nb_snapshots) {
    Range a{snapshots_offset, snapshot_table_bytes, "snapshot table"};
    Range others[] = {{0, cs, "header"},
                      {h.l1_table_offset, uint64_t(h.l1_size) * 8, "L1 table"},
                      {h.refcount_table_offset,
                       uint64_t(h.refcount_table_clusters) * cs,
                       "refcount table"}};
    for (auto& o : others)
      if (overlaps(a, o))
        return Status::Invalid(std::string("snapshot table overlaps ") + o.what);
  }
  return Status::Ok();
}

void Image::Impl::rebuild_meta_ranges() {
  meta_ranges.clear();
  auto add = [&](uint64_t off, uint64_t len) {
    if (len) meta_ranges.push_back({off, off + fmt::round_up(len, cs)});
  };
  add(0, cs);
  add(h.l1_table_offset, uint64_t(h.l1_size) * 8);
  add(h.refcount_table_offset, uint64_t(h.refcount_table_clusters) * cs);
  if (nb_snapshots) add(snapshots_offset, snapshot_table_bytes);
  for (auto& s : snaps) add(s.l1_table_offset, uint64_t(s.l1_size) * 8);
  if (bitmaps_valid) {
    add(bitmaps_dir_offset, bitmaps_dir_size);
    for (auto& b : bitmaps)
      add(b.entry.table_offset, uint64_t(b.entry.table_size) * 8);
  }
  std::sort(meta_ranges.begin(), meta_ranges.end());
}

std::error_code Image::Impl::check_data_write(uint64_t off, uint64_t len) {
  if (external || !len) return {};
  // A mapping far past the end of the file would grow it without bound.
  if (off + len > std::max(end_cluster << cb, fmt::round_up(file->size(), cs)))
    return mark_corrupt("data cluster " + hex(off) + " beyond end of file");
  // The first range starting at or after `off + len` and everything after
  // it cannot overlap; check the ranges before it.
  auto it = std::lower_bound(meta_ranges.begin(), meta_ranges.end(),
                             std::make_pair(off + len, uint64_t{0}));
  while (it != meta_ranges.begin()) {
    --it;
    if (it->second > off)
      return mark_corrupt("data write at " + hex(off) +
                          " would overwrite metadata at " + hex(it->first));
    if (it->first + (128ull << 20) < off) break;  // ranges are < 128 MiB
  }
  return {};
}

// One crash-safe step, as QEMU's qcow2_update_header: the whole first
// cluster is built in memory from what is on disk (the header fields as
// they are, every extension but the backing format kept byte for byte,
// unknown ones included, in their order), with the new backing format
// extension first and the new name after the end marker, and written with
// one pwrite. A torn write could only mix old and new bytes of the first
// cluster's sectors; the fields that decide what is read (name offset and
// length at bytes 8-20) share the first sector with the rest of the header.
Status Image::Impl::rewrite_backing(const std::string& name,
                                    const std::string& format) {
  std::lock_guard lk(hdr_mu);
  std::vector<std::byte> old(cs), out(cs);
  if (auto ec = file->pread(old, 0))
    return Status::IoError(ec, "reading the header");
  const uint64_t hl = h.header_length;
  const uint64_t old_backing = fmt::load64(&old[fmt::kOffBackingOffset]);
  const uint64_t ext_end = old_backing ? old_backing : cs;
  std::copy(old.begin(), old.begin() + static_cast<ptrdiff_t>(hl), out.begin());
  uint64_t pos = hl;
  const auto too_long = [] { return Status::Invalid("backing file name too long"); };
  auto put = [&](uint32_t type, const std::byte* data, uint32_t len) {
    uint64_t padded = fmt::round_up(len, 8);
    if (pos + 8 + padded > cs) return false;
    fmt::store32(&out[pos], type);
    fmt::store32(&out[pos + 4], len);
    if (len) std::memcpy(&out[pos + 8], data, len);
    pos += 8 + padded;
    return true;
  };
  if (!format.empty() &&
      !put(fmt::kExtBackingFormat, reinterpret_cast<const std::byte*>(format.data()),
           static_cast<uint32_t>(format.size())))
    return too_long();
  uint64_t new_bitmaps_ext = bitmaps_ext_offset;
  for (uint64_t p = hl; p + 8 <= ext_end;) {
    uint32_t type = fmt::load32(&old[p]);
    uint32_t len = fmt::load32(&old[p + 4]);
    if (type == fmt::kExtEnd) break;
    if (len > ext_end - p - 8) return Status::Invalid("header extension too long");
    if (type != fmt::kExtBackingFormat) {
      if (type == fmt::kExtBitmaps) new_bitmaps_ext = pos + 8;
      if (!put(type, &old[p + 8], len)) return too_long();
    }
    p += 8 + fmt::round_up(len, 8);
  }
  if (!put(fmt::kExtEnd, nullptr, 0)) return too_long();
  if (!name.empty()) {
    if (name.size() > fmt::kMaxBackingNameLength || pos + name.size() > cs)
      return too_long();
    std::memcpy(&out[pos], name.data(), name.size());
    fmt::store64(&out[fmt::kOffBackingOffset], pos);
    fmt::store32(&out[fmt::kOffBackingSize], static_cast<uint32_t>(name.size()));
  } else {
    fmt::store64(&out[fmt::kOffBackingOffset], 0);
    fmt::store32(&out[fmt::kOffBackingSize], 0);
  }
  if (auto ec = file->pwrite(out, 0))
    return Status::IoError(ec, "writing the header");
  if (auto ec = file->flush()) return Status::IoError(ec, "flush");
  h.backing_file = name;
  h.backing_format = format;
  bitmaps_ext_offset = new_bitmaps_ext;
  return Status::Ok();
}

std::error_code Image::Impl::write_header_u64(size_t off, uint64_t v) {
  std::byte b[8];
  fmt::store64(b, v);
  return file->pwrite(b, off);
}

std::error_code Image::Impl::set_incompat_bit(uint64_t bit, bool on) {
  if (h.version < 3) return {};
  std::lock_guard lk(hdr_mu);
  uint64_t v = on ? (h.incompatible_features | bit)
                  : (h.incompatible_features & ~bit);
  if (v == h.incompatible_features) return {};
  if (auto ec = write_header_u64(fmt::kOffIncompatible, v)) return ec;
  if (auto ec = file->flush()) return ec;
  h.incompatible_features = v;
  return {};
}

std::error_code Image::Impl::mark_dirty() {
  if (h.version < 3 || dirty_bit) return {};
  if (auto ec = set_incompat_bit(fmt::kIncompatDirty, true)) return ec;
  dirty_bit = true;
  dirty_set_by_us = true;
  return {};
}

Status Image::change_backing_file(const std::string& name,
                                  const std::string& format) {
  Impl& I = *impl_;
  if (I.is_view || I.ro)
    return Status::Invalid("changing the backing file needs a writable image");
  if (name.empty() && !format.empty())
    return Status::Invalid("a backing format needs a backing file name");
  if (name.size() > fmt::kMaxBackingNameLength)
    return Status::Invalid("backing file name too long");
  std::unique_lock lk(I.mu);
  if (I.corrupt) return Status::IoError(eio(), "image is corrupt");
  return I.rewrite_backing(name, format);
}

std::error_code Image::Impl::mark_corrupt(const std::string& why) {
  bool was = corrupt.exchange(true);
  if (!was) {
    {
      std::lock_guard lk(reason_mu);
      corrupt_reason = why;
    }
    if (!ro && !is_view) (void)set_incompat_bit(fmt::kIncompatCorrupt, true);
  }
  return eio();
}

}  // namespace layerd::qcow2
