// Persistent dirty bitmaps: what an Image does with the bitmaps extension.
//
// Open (load_bitmaps): the directory and every bitmap table are validated
// with QEMU's rules, and the bits of every consistent bitmap (not in use)
// are read into memory; an image QEMU would refuse is refused read-write.
// A read-write open then marks the enabled ones in use on disk
// (start_recording_bitmaps), rewriting the directory in place while the
// autoclear bit is off, as QEMU does: a crash in the middle leaves the bit
// off, so QEMU drops the bitmaps rather than read a torn directory.
//
// Writes set bits in memory only. close() (store_bitmaps) writes each
// recording bitmap to new clusters, then a new directory, syncs, switches
// the header's extension to the new directory with one 24-byte write, and
// only then frees the old directory, tables and data. A crash before the
// switch leaks the new clusters, after it the old ones: the dirty bit is
// set (begin_write) so the next read-write open repairs either, and check
// counts the clusters of whichever directory the header names.
#include <algorithm>
#include <bit>
#include <cstring>
#include <mutex>
#include <shared_mutex>

#include "qcow2/internal.h"

namespace layerd::qcow2 {

namespace {

uint64_t load_le64(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = v << 8 | static_cast<uint64_t>(p[i]);
  return v;
}

void store_le64(std::byte* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}

size_t entry_bytes(size_t name_len, uint32_t extra) {
  return fmt::round_up(fmt::kBitmapEntryFixed + extra + name_len, 8);
}

// Why QEMU would refuse `e` on a disk of `disk_size` bytes; empty if not.
std::string entry_problem(const BitmapDirEntry& e, uint64_t disk_size,
                          uint64_t cs) {
  if (e.table_size == 0 || e.table_offset == 0 || e.table_offset % cs)
    return "bitmap table (offset " + hex(e.table_offset) + ", " +
           std::to_string(e.table_size) + " entries) invalid";
  if (e.table_size > fmt::kMaxBitmapTableEntries ||
      uint64_t(e.table_size) * cs > fmt::kMaxBitmapDataBytes)
    return "bitmap table too large (" + std::to_string(e.table_size) +
           " entries)";
  if (e.granularity_bits < fmt::kMinBitmapGranularityBits ||
      e.granularity_bits > fmt::kMaxBitmapGranularityBits)
    return "granularity bits " + std::to_string(e.granularity_bits) +
           " out of range (9..31)";
  if (e.flags & ~fmt::kBitmapFlagsKnown)
    return "unknown flags " + hex(e.flags & ~fmt::kBitmapFlagsKnown);
  if (e.type != fmt::kBitmapTypeDirtyTracking)
    return "unknown type " + std::to_string(e.type);
  if (e.name.size() > fmt::kMaxBitmapNameLength) return "name too long";
  // An in-use bitmap may have any size (it may predate a resize).
  uint64_t need = bitmap_table_entries(disk_size, e.granularity_bits, cs);
  if (!(e.flags & fmt::kBitmapFlagInUse) && e.table_size != need)
    return "bitmap table has " + std::to_string(e.table_size) +
           " entries, the disk needs " + std::to_string(need);
  return {};
}

// Reads a table of `n` entries at `off` (already checked to lie in the file).
std::error_code read_bitmap_table(File& f, uint64_t off, uint32_t n,
                                  std::vector<uint64_t>* out) {
  std::vector<std::byte> raw(uint64_t(n) * 8);
  if (auto ec = f.pread(raw, off)) return ec;
  out->resize(n);
  for (uint32_t k = 0; k < n; ++k) (*out)[k] = fmt::load64(&raw[k * 8]);
  return {};
}

bool overlaps(const std::vector<std::pair<uint64_t, uint64_t>>& ranges,
              uint64_t off, uint64_t len) {
  for (auto& [b, e] : ranges)
    if (off < e && b < off + len) return true;
  return false;
}

}  // namespace

// --- The directory codec ---------------------------------------------------

uint64_t bitmap_table_entries(uint64_t disk_size, uint32_t granularity_bits,
                              uint64_t cluster_size) {
  uint64_t bits = fmt::div_round_up(disk_size, 1ull << granularity_bits);
  return fmt::div_round_up(fmt::div_round_up(bits, 8), cluster_size);
}

bool bitmap_table_entry_valid(uint64_t entry, uint64_t cluster_size) {
  if (entry & fmt::kBitmapTableReservedMask) return false;
  uint64_t off = entry & fmt::kBitmapTableOffsetMask;
  return off == 0 || (!(entry & fmt::kBitmapTableAllOnes) && off % cluster_size == 0);
}

Status decode_bitmap_directory(std::span<const std::byte> raw, uint32_t expected,
                               uint64_t disk_size, uint64_t cluster_size,
                               std::vector<BitmapDirEntry>* out) {
  out->clear();
  std::vector<BitmapDirEntry> entries;
  for (size_t pos = 0; pos < raw.size();) {
    if (raw.size() - pos < fmt::kBitmapEntryFixed)
      return Status::Invalid("bitmap directory broken: entry " +
                             std::to_string(entries.size()) + " truncated");
    if (entries.size() == expected)
      return Status::Invalid("bitmap directory holds more than the " +
                             std::to_string(expected) +
                             " bitmaps the header names");
    const std::byte* p = raw.data() + pos;
    BitmapDirEntry e;
    e.table_offset = fmt::load64(p);
    e.table_size = fmt::load32(p + 8);
    e.flags = fmt::load32(p + 12);
    e.type = static_cast<uint8_t>(p[16]);
    e.granularity_bits = static_cast<uint8_t>(p[17]);
    uint16_t name_len = fmt::load16(p + 18);
    uint32_t extra = fmt::load32(p + 20);
    if (entry_bytes(name_len, extra) > raw.size() - pos)
      return Status::Invalid("bitmap directory broken: entry " +
                             std::to_string(entries.size()) +
                             " runs past its end");
    e.name.assign(reinterpret_cast<const char*>(p + fmt::kBitmapEntryFixed + extra),
                  name_len);
    if (extra)
      return Status::Invalid("bitmap '" + e.name +
                             "' has extra data (not supported)");
    if (std::string why = entry_problem(e, disk_size, cluster_size); !why.empty())
      return Status::Invalid("bitmap '" + e.name + "': " + why);
    for (auto& other : entries)
      if (other.name == e.name)
        return Status::Invalid("two bitmaps named '" + e.name + "'");
    entries.push_back(std::move(e));
    pos += entry_bytes(name_len, 0);
  }
  if (entries.size() != expected)
    return Status::Invalid("bitmap directory holds " +
                           std::to_string(entries.size()) +
                           " bitmaps, the header names " +
                           std::to_string(expected));
  *out = std::move(entries);
  return Status::Ok();
}

std::vector<std::byte> encode_bitmap_directory(
    const std::vector<BitmapDirEntry>& entries) {
  size_t size = 0;
  for (auto& e : entries) size += entry_bytes(e.name.size(), 0);
  std::vector<std::byte> raw(size);
  size_t pos = 0;
  for (auto& e : entries) {
    std::byte* p = raw.data() + pos;
    fmt::store64(p, e.table_offset);
    fmt::store32(p + 8, e.table_size);
    fmt::store32(p + 12, e.flags);
    p[16] = static_cast<std::byte>(e.type);
    p[17] = static_cast<std::byte>(e.granularity_bits);
    fmt::store16(p + 18, static_cast<uint16_t>(e.name.size()));
    fmt::store32(p + 20, 0);
    std::memcpy(p + fmt::kBitmapEntryFixed, e.name.data(), e.name.size());
    pos += entry_bytes(e.name.size(), 0);
  }
  return raw;
}

// --- DirtyBitmap -------------------------------------------------------------

DirtyBitmap::DirtyBitmap(uint64_t disk_size, uint32_t granularity_bits)
    : disk_size_(disk_size),
      granularity_bits_(granularity_bits),
      bits_(fmt::div_round_up(disk_size, 1ull << granularity_bits)),
      words_(fmt::div_round_up(bits_, 64)),
      w_(std::make_unique<std::atomic<uint64_t>[]>(words_)) {}

void DirtyBitmap::mark(uint64_t offset, uint64_t length) {
  if (length == 0 || offset >= disk_size_) return;
  uint64_t first = offset >> granularity_bits_;
  uint64_t last = std::min(bits_ - 1, (offset + length - 1) >> granularity_bits_);
  for (uint64_t w = first / 64; w <= last / 64; ++w) {
    uint64_t lo = w == first / 64 ? first % 64 : 0;
    uint64_t hi = w == last / 64 ? last % 64 : 63;
    uint64_t mask = (~0ull >> (63 - hi)) & (~0ull << lo);
    // Rewrites of dirty ranges only read the word: no cache line bouncing.
    if ((w_[w].load(std::memory_order_relaxed) & mask) != mask)
      w_[w].fetch_or(mask, std::memory_order_relaxed);
  }
}

bool DirtyBitmap::test(uint64_t bit) const {
  return w_[bit / 64].load(std::memory_order_relaxed) >> (bit % 64) & 1;
}

void DirtyBitmap::dirty_run(uint64_t offset, uint64_t length, bool* dirty,
                            uint64_t* run_length) const {
  uint64_t end = std::min(disk_size_, offset + length);
  uint64_t bit = offset >> granularity_bits_;
  uint64_t last = (end - 1) >> granularity_bits_;
  const bool d = test(bit);
  // The first bit after `bit` that differs, or last + 1.
  uint64_t b = bit + 1;
  while (b <= last) {
    uint64_t w = w_[b / 64].load(std::memory_order_relaxed);
    uint64_t differs = (d ? ~w : w) & (~0ull << (b % 64));
    if (differs) {
      b = std::min<uint64_t>(last + 1, (b & ~63ull) + std::countr_zero(differs));
      break;
    }
    b = (b | 63) + 1;
  }
  b = std::min(b, last + 1);
  *dirty = d;
  *run_length = std::min(end, b << granularity_bits_) - offset;
}

void DirtyBitmap::load_chunk(uint64_t first_bit, std::span<const std::byte> data) {
  for (uint64_t k = 0; k < data.size() / 8; ++k) {
    uint64_t w = first_bit / 64 + k;
    if (w >= words_) break;
    uint64_t v = load_le64(&data[k * 8]);
    if (w == words_ - 1 && bits_ % 64) v &= ~0ull >> (64 - bits_ % 64);
    w_[w].store(v, std::memory_order_relaxed);
  }
}

void DirtyBitmap::fill_chunk(uint64_t first_bit, uint64_t nbits, bool value) {
  uint64_t end = std::min(bits_, first_bit + nbits);
  for (uint64_t w = first_bit / 64; w * 64 < end; ++w) {
    uint64_t v = value ? ~0ull : 0;
    if (end - w * 64 < 64) v &= ~0ull >> (64 - (end - w * 64));
    w_[w].store(v, std::memory_order_relaxed);
  }
}

DirtyBitmap::ChunkKind DirtyBitmap::save_chunk(uint64_t first_bit,
                                               std::span<std::byte> data) const {
  bool zeros = true, ones = true;
  for (uint64_t k = 0; k < data.size() / 8; ++k) {
    uint64_t w = first_bit / 64 + k;
    uint64_t v = w < words_ ? w_[w].load(std::memory_order_relaxed) : 0;
    store_le64(&data[k * 8], v);
    if (w >= words_) continue;
    uint64_t valid = bits_ - w * 64 >= 64 ? ~0ull : ~0ull >> (64 - (bits_ - w * 64));
    zeros &= (v & valid) == 0;
    ones &= (v & valid) == valid;
  }
  return zeros ? ChunkKind::Zeros : ones ? ChunkKind::Ones : ChunkKind::Mixed;
}

// --- Open --------------------------------------------------------------------

bool Image::Impl::bitmaps_vouched() const {
  return h.version >= 3 && has_bitmaps_ext &&
         (h.autoclear_features & fmt::kAutoclearBitmaps);
}

namespace {

// Whether the extension's own fields are what QEMU accepts.
Status extension_problem(const Image::Impl& I) {
  const uint64_t fsize = I.file->size();
  if (I.bitmaps_ext_length != fmt::kBitmapsExtLength || I.bitmaps_ext_reserved)
    return Status::Invalid("bitmaps extension malformed (length " +
                           std::to_string(I.bitmaps_ext_length) +
                           ", reserved field " + hex(I.bitmaps_ext_reserved) + ")");
  if (I.nb_bitmaps == 0 || I.nb_bitmaps > fmt::kMaxBitmaps)
    return Status::Invalid("bitmaps extension names " +
                           std::to_string(I.nb_bitmaps) + " bitmaps");
  const uint64_t off = I.bitmaps_dir_offset, size = I.bitmaps_dir_size;
  if (size == 0 || size > fmt::kMaxBitmapDirectoryBytes || off == 0 ||
      off % I.cs || off > fsize || fsize - off < size)
    return Status::Invalid("bitmap directory (offset " + hex(off) + ", " +
                           std::to_string(size) + " bytes) invalid");
  return Status::Ok();
}

// The clusters the bitmaps use: each must stay clear of the image's other
// metadata, and (checked once all are known) of each other.
class BitmapClusters {
 public:
  explicit BitmapClusters(const Image::Impl& I) : I_(I) {}
  Status claim(uint64_t off, uint64_t len, const std::string& what) {
    uint64_t end = off + fmt::round_up(len, I_.cs);
    if (overlaps(I_.meta_ranges, off, end - off))
      return Status::Invalid(what + " at " + hex(off) + " overlaps other metadata");
    used_.push_back({off, end});
    return Status::Ok();
  }
  Status disjoint() {
    std::sort(used_.begin(), used_.end());
    for (size_t i = 1; i < used_.size(); ++i)
      if (used_[i].first < used_[i - 1].second)
        return Status::Invalid("bitmap clusters at " + hex(used_[i].first) +
                               " used twice");
    return Status::Ok();
  }

 private:
  const Image::Impl& I_;
  std::vector<std::pair<uint64_t, uint64_t>> used_;
};

// Reads and validates the table of `b` (a consistent bitmap) and loads its
// bits.
Status load_bits(Image::Impl& I, Image::Impl::Bitmap& b, BitmapClusters& clusters) {
  const uint64_t fsize = I.file->size(), cs = I.cs;
  const std::string what = "bitmap '" + b.entry.name + "'";
  uint64_t tbytes = uint64_t(b.entry.table_size) * 8;
  if (b.entry.table_offset > fsize || fsize - b.entry.table_offset < tbytes)
    return Status::Invalid(what + ": table beyond end of file");
  if (Status st = clusters.claim(b.entry.table_offset, tbytes, what + " table");
      !st.ok())
    return st;
  if (auto ec = read_bitmap_table(*I.file, b.entry.table_offset,
                                  b.entry.table_size, &b.table))
    return Status::IoError(ec, "reading the table of " + what);
  b.bits = std::make_unique<DirtyBitmap>(I.h.virtual_size, b.entry.granularity_bits);
  const uint64_t bits_per_cluster = cs * 8;
  std::vector<std::byte> chunk(cs);
  for (uint64_t k = 0; k < b.table.size(); ++k) {
    uint64_t t = b.table[k];
    uint64_t off = t & fmt::kBitmapTableOffsetMask;
    if (!bitmap_table_entry_valid(t, cs))
      return Status::Invalid(what + ": table entry " + std::to_string(k) + " (" +
                             hex(t) + ") invalid");
    if (!off) {
      if (t & fmt::kBitmapTableAllOnes)
        b.bits->fill_chunk(k * bits_per_cluster, bits_per_cluster, true);
      continue;
    }
    if (off > fsize || fsize - off < cs)
      return Status::Invalid(what + ": data cluster " + hex(off) +
                             " beyond end of file");
    if (Status st = clusters.claim(off, cs, what + " data"); !st.ok()) return st;
    if (auto ec = I.file->pread(chunk, off))
      return Status::IoError(ec, "reading the data of " + what);
    b.bits->load_chunk(k * bits_per_cluster, chunk);
  }
  return Status::Ok();
}

}  // namespace

Status Image::Impl::load_bitmaps() {
  if (!bitmaps_vouched()) return Status::Ok();
  if (Status st = extension_problem(*this); !st.ok()) return st;
  BitmapClusters clusters(*this);
  if (Status st = clusters.claim(bitmaps_dir_offset, bitmaps_dir_size,
                                 "bitmap directory");
      !st.ok())
    return st;
  std::vector<std::byte> raw(bitmaps_dir_size);
  if (auto ec = file->pread(raw, bitmaps_dir_offset))
    return Status::IoError(ec, "reading the bitmap directory");
  std::vector<BitmapDirEntry> entries;
  if (Status st = decode_bitmap_directory(raw, nb_bitmaps, h.virtual_size, cs,
                                          &entries);
      !st.ok())
    return st;
  std::vector<Bitmap> loaded(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    loaded[i].entry = std::move(entries[i]);
    // In use: a writer was killed while it recorded; QEMU does not read it.
    if (loaded[i].entry.flags & fmt::kBitmapFlagInUse) continue;
    if (Status st = load_bits(*this, loaded[i], clusters); !st.ok()) return st;
  }
  if (Status st = clusters.disjoint(); !st.ok()) return st;
  bitmaps = std::move(loaded);
  bitmaps_valid = true;
  rebuild_meta_ranges();
  return Status::Ok();
}

namespace {

// Rewrites the directory where it is (same size: only flags changed) with
// the autoclear bit off meanwhile, so that a torn directory is never vouched
// for.
std::error_code rewrite_directory_in_place(Image::Impl& I) {
  std::vector<BitmapDirEntry> entries;
  for (auto& b : I.bitmaps) entries.push_back(b.entry);
  std::vector<std::byte> raw = encode_bitmap_directory(entries);
  if (raw.size() != I.bitmaps_dir_size) return eio();
  const uint64_t vouching = I.h.autoclear_features;
  std::lock_guard lk(I.hdr_mu);
  if (auto ec = I.write_header_u64(fmt::kOffAutoclear,
                                   vouching & ~fmt::kAutoclearBitmaps))
    return ec;
  if (auto ec = I.file->flush()) return ec;
  if (auto ec = I.file->pwrite(raw, I.bitmaps_dir_offset)) return ec;
  if (auto ec = I.file->flush()) return ec;
  if (auto ec = I.write_header_u64(fmt::kOffAutoclear, vouching)) return ec;
  return I.file->flush();
}

}  // namespace

std::error_code Image::Impl::start_recording_bitmaps() {
  std::vector<Bitmap*> starting;
  for (Bitmap& b : bitmaps)
    if (b.bits && !b.recording && (b.entry.flags & fmt::kBitmapFlagAuto))
      starting.push_back(&b);
  if (starting.empty()) return {};
  // Dirty first: a kill while the autoclear bit is off leaves the bitmap
  // clusters as leaks, which the next read-write open then repairs.
  if (auto ec = mark_dirty()) return ec;
  for (Bitmap* b : starting) b->entry.flags |= fmt::kBitmapFlagInUse;
  if (auto ec = rewrite_directory_in_place(*this)) {
    for (Bitmap* b : starting) b->entry.flags &= ~fmt::kBitmapFlagInUse;
    return ec;
  }
  for (Bitmap* b : starting) {
    b->recording = true;
    recording.push_back(b->bits.get());
  }
  return {};
}

// --- Close -------------------------------------------------------------------

namespace {

// Writes the bits of `bits` to new clusters and returns its table: 0 for
// a cluster's worth of clear bits, 1 for set ones, else a data cluster.
std::error_code write_bitmap_data(Image::Impl& I, const DirtyBitmap& bits,
                                  uint64_t entries, std::vector<uint64_t>* table) {
  table->assign(entries, 0);
  std::vector<std::byte> chunk(I.cs);
  for (uint64_t k = 0; k < entries; ++k) {
    switch (bits.save_chunk(k * I.cs * 8, chunk)) {
      case DirtyBitmap::ChunkKind::Zeros:
        break;
      case DirtyBitmap::ChunkKind::Ones:
        (*table)[k] = fmt::kBitmapTableAllOnes;
        break;
      case DirtyBitmap::ChunkKind::Mixed: {
        uint64_t host;
        if (auto ec = I.alloc_clusters(1, &host)) return ec;
        if (auto ec = I.file->pwrite(chunk, host)) return ec;
        (*table)[k] = host;
        break;
      }
    }
  }
  return {};
}

std::error_code write_bitmap_table(Image::Impl& I, const std::vector<uint64_t>& table,
                                   uint64_t* offset) {
  std::vector<std::byte> raw(fmt::round_up(table.size() * 8, I.cs));
  for (size_t k = 0; k < table.size(); ++k) fmt::store64(&raw[k * 8], table[k]);
  if (auto ec = I.alloc_clusters(raw.size() / I.cs, offset)) return ec;
  return I.file->pwrite(raw, *offset);
}

// The clusters a bitmap's table and data occupy.
void add_bitmap_clusters(const Image::Impl::Bitmap& b, uint64_t cs,
                         std::vector<uint64_t>* out) {
  uint64_t tbytes = uint64_t(b.entry.table_size) * 8;
  for (uint64_t off = 0; off < tbytes; off += cs)
    out->push_back(b.entry.table_offset + off);
  for (uint64_t t : b.table)
    if (t & fmt::kBitmapTableOffsetMask) out->push_back(t & fmt::kBitmapTableOffsetMask);
}

}  // namespace

std::error_code Image::Impl::store_bitmaps() {
  if (recording.empty()) return {};
  // New clusters are counted from here on: a crash must find the image dirty.
  if (auto ec = begin_write()) return ec;
  std::vector<uint64_t> unused;  // what the old directory held, freed last
  for (Bitmap& b : bitmaps) {
    if (!b.recording) continue;
    std::vector<uint64_t> table;
    if (auto ec = write_bitmap_data(*this, *b.bits, b.entry.table_size, &table))
      return ec;
    uint64_t table_offset;
    if (auto ec = write_bitmap_table(*this, table, &table_offset)) return ec;
    add_bitmap_clusters(b, cs, &unused);
    b.entry.table_offset = table_offset;
    b.entry.flags &= ~fmt::kBitmapFlagInUse;
    b.table = std::move(table);
  }
  std::vector<BitmapDirEntry> entries;
  for (auto& b : bitmaps) entries.push_back(b.entry);
  std::vector<std::byte> dir = encode_bitmap_directory(entries);
  uint64_t dir_offset;
  if (auto ec = alloc_clusters(fmt::div_round_up(dir.size(), cs), &dir_offset))
    return ec;
  if (auto ec = file->pwrite(dir, dir_offset)) return ec;
  // Everything the new directory reaches is written and counted: make it
  // durable, then point the header at it.
  if (auto ec = write_back(true)) return ec;
  std::byte ext[fmt::kBitmapsExtLength] = {};
  fmt::store32(ext, nb_bitmaps);
  fmt::store64(ext + 8, dir.size());
  fmt::store64(ext + 16, dir_offset);
  if (auto ec = file->pwrite(ext, bitmaps_ext_offset)) return ec;
  if (auto ec = file->flush()) return ec;
  for (uint64_t off = 0; off < bitmaps_dir_size; off += cs)
    unused.push_back(bitmaps_dir_offset + off);
  bitmaps_dir_offset = dir_offset;
  bitmaps_dir_size = dir.size();
  recording.clear();
  for (auto& b : bitmaps) b.recording = false;
  rebuild_meta_ranges();
  for (uint64_t host : unused)
    if (auto ec = free_cluster_now(host)) return ec;
  return {};
}

// --- Check -------------------------------------------------------------------

void Image::Impl::count_bitmap_clusters(
    const std::function<void(uint64_t, uint64_t, const char*)>& ref,
    const std::function<void(std::string)>& corruption,
    const std::function<void()>& read_error) {
  if (!bitmaps_vouched() || bitmaps_dir_size == 0) return;
  const uint64_t fsize = file->size();
  if (bitmaps_dir_offset % cs || bitmaps_dir_size > fmt::kMaxBitmapDirectoryBytes ||
      bitmaps_dir_offset > fsize || fsize - bitmaps_dir_offset < bitmaps_dir_size) {
    corruption("ERROR bitmap directory offset " + hex(bitmaps_dir_offset) +
               " invalid");
    return;
  }
  ref(bitmaps_dir_offset, bitmaps_dir_size, "bitmap directory");
  std::vector<std::byte> dir(bitmaps_dir_size);
  if (file->pread(dir, bitmaps_dir_offset)) {
    read_error();
    return;
  }
  // Leniently: every entry that can be read counts, whatever QEMU would
  // think of its flags, so that a repair never frees what it may use.
  for (size_t pos = 0; pos < dir.size();) {
    const std::byte* p = dir.data() + pos;
    uint64_t size = dir.size() - pos < fmt::kBitmapEntryFixed
                        ? ~0ull
                        : entry_bytes(fmt::load16(p + 18), fmt::load32(p + 20));
    if (size > dir.size() - pos) {
      corruption("ERROR bitmap directory broken at entry offset " +
                 std::to_string(pos));
      return;
    }
    pos += size;
    uint64_t toff = fmt::load64(p);
    uint32_t tsize = fmt::load32(p + 8);
    if (toff % cs || tsize > fmt::kMaxBitmapTableEntries || toff > fsize ||
        fsize - toff < uint64_t(tsize) * 8) {
      corruption("ERROR bitmap table offset " + hex(toff) + " invalid");
      continue;
    }
    ref(toff, uint64_t(tsize) * 8, "bitmap table");
    std::vector<uint64_t> table;
    if (tsize && read_bitmap_table(*file, toff, tsize, &table)) {
      read_error();
      continue;
    }
    for (uint64_t t : table) {
      uint64_t off = t & fmt::kBitmapTableOffsetMask;
      if (!bitmap_table_entry_valid(t, cs))
        corruption("ERROR bitmap table entry " + hex(t) + " invalid");
      if (off && off % cs == 0) ref(off, cs, "bitmap data");
    }
  }
}

// --- The public calls --------------------------------------------------------

std::vector<BitmapInfo> Image::bitmaps() const {
  std::shared_lock lk(impl_->mu);
  std::vector<BitmapInfo> out;
  for (auto& b : impl_->bitmaps) {
    BitmapInfo info;
    info.name = b.entry.name;
    info.granularity = 1u << b.entry.granularity_bits;
    info.enabled = b.entry.flags & fmt::kBitmapFlagAuto;
    info.inconsistent = !b.bits;
    info.recording = b.recording;
    out.push_back(std::move(info));
  }
  return out;
}

Status Image::bitmaps_status() const { return impl_->bitmaps_status; }

std::error_code Image::dirty_status(std::string_view name, uint64_t offset,
                                    uint64_t length, DirtyExtent* out) const {
  const Impl& I = *impl_;
  if (length == 0 || offset >= I.h.virtual_size ||
      length > I.h.virtual_size - offset)
    return einval();
  for (auto& b : I.bitmaps) {
    if (b.entry.name != name) continue;
    if (!b.bits) return std::make_error_code(std::errc::state_not_recoverable);
    b.bits->dirty_run(offset, length, &out->dirty, &out->length);
    return {};
  }
  return std::make_error_code(std::errc::no_such_file_or_directory);
}

}  // namespace layerd::qcow2
