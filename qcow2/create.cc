// Image::create: lays out a fresh image. Cluster 0 holds the header, its
// extensions and the backing file name; then come the refcount table, the
// refcount blocks counting all of this metadata, and the L1 table.
// Preallocation=metadata then maps every guest cluster through the normal
// allocator.
#include <algorithm>
#include <cstring>

#include "qcow2/internal.h"

namespace layerd::qcow2 {

namespace {
bool pow2(uint64_t v) { return v && !(v & (v - 1)); }

void put_ext(std::vector<std::byte>& c, size_t& pos, uint32_t type,
             const void* data, size_t len) {
  fmt::store32(&c[pos], type);
  fmt::store32(&c[pos + 4], static_cast<uint32_t>(len));
  if (len) std::memcpy(&c[pos + 8], data, len);
  pos += 8 + fmt::round_up(len, 8);
}
}  // namespace

Status Image::create(File& f, const CreateOptions& o) {
  if (o.version != 2 && o.version != 3)
    return Status::Invalid("version must be 2 or 3");
  if (!pow2(o.cluster_size) || o.cluster_size < 512 || o.cluster_size > (2u << 20))
    return Status::Invalid("cluster size must be a power of two in 512..2M");
  if (!pow2(o.refcount_bits) || o.refcount_bits > 64)
    return Status::Invalid("refcount bits must be a power of two up to 64");
  if (o.version == 2 &&
      (o.refcount_bits != 16 || o.extended_l2 || o.lazy_refcounts ||
       o.compression_type || !o.data_file.empty()))
    return Status::Invalid("version 2 supports none of: refcount_bits other "
                           "than 16, extended L2, lazy refcounts, zstd, "
                           "external data files");
  if (o.extended_l2 && o.cluster_size < 16384)
    return Status::Invalid("extended L2 needs clusters of at least 16 KiB");
  if (o.compression_type > 1) return Status::Invalid("unknown compression type");
  if (o.backing_file.size() > fmt::kMaxBackingNameLength)
    return Status::Invalid("backing file name longer than 1023 bytes");
  if (o.data_file_raw && o.data_file.empty())
    return Status::Invalid("data_file_raw needs a data file");
  if (o.data_file_raw && !o.backing_file.empty())
    return Status::Invalid("a raw external data file cannot have a backing file");
  if (o.preallocation != Preallocation::Off && !o.backing_file.empty())
    return Status::Invalid("preallocation with a backing file is not supported");

  const uint64_t cs = o.cluster_size;
  uint32_t cb = 0;
  while ((1ull << cb) < cs) ++cb;
  uint32_t order = 0;
  while ((1u << order) < o.refcount_bits) ++order;
  const uint64_t l2_entries = cs / (o.extended_l2 ? 16 : 8);
  const uint64_t l1_size =
      fmt::div_round_up(fmt::div_round_up(o.size, cs), l2_entries);
  if (l1_size * 8 > fmt::kMaxL1Bytes)
    return Status::Invalid("image size too large for this cluster size");
  const uint64_t rb_entries = (cs * 8) >> order;
  const uint64_t L = fmt::div_round_up(l1_size * 8, cs);
  uint64_t R = 1, B = 1;
  for (int i = 0; i < 100; ++i) {
    uint64_t n = 1 + R + B + L;
    uint64_t nb = fmt::div_round_up(n, rb_entries);
    uint64_t nr = fmt::div_round_up(nb * 8, cs);
    if (nb == B && nr == R) break;
    B = std::max(B, nb);
    R = std::max(R, nr);
  }
  const uint64_t N = 1 + R + B + L;
  const uint64_t rt_off = cs, rb_off = (1 + R) * cs;
  const uint64_t l1_off = l1_size ? (1 + R + B) * cs : 0;

  // Header cluster.
  std::vector<std::byte> c(cs);
  fmt::store32(&c[fmt::kOffMagic], fmt::kMagic);
  fmt::store32(&c[fmt::kOffVersion], o.version);
  fmt::store32(&c[fmt::kOffClusterBits], cb);
  fmt::store64(&c[fmt::kOffSize], o.size);
  fmt::store32(&c[fmt::kOffL1Size], static_cast<uint32_t>(l1_size));
  fmt::store64(&c[fmt::kOffL1Offset], l1_off);
  fmt::store64(&c[fmt::kOffRefcountTableOffset], rt_off);
  fmt::store32(&c[fmt::kOffRefcountTableClusters], static_cast<uint32_t>(R));
  size_t pos = fmt::kV2HeaderLength;
  if (o.version == 3) {
    uint64_t incompat = 0, compat = 0, autoclear = 0;
    if (!o.data_file.empty()) incompat |= fmt::kIncompatDataFile;
    if (o.compression_type) incompat |= fmt::kIncompatCompression;
    if (o.extended_l2) incompat |= fmt::kIncompatExtendedL2;
    if (o.lazy_refcounts) compat |= fmt::kCompatLazyRefcounts;
    if (o.data_file_raw) autoclear |= fmt::kAutoclearDataFileRaw;
    fmt::store64(&c[fmt::kOffIncompatible], incompat);
    fmt::store64(&c[fmt::kOffCompatible], compat);
    fmt::store64(&c[fmt::kOffAutoclear], autoclear);
    fmt::store32(&c[fmt::kOffRefcountOrder], order);
    fmt::store32(&c[fmt::kOffHeaderLength], fmt::kV3HeaderLength);
    c[fmt::kOffCompressionType] = static_cast<std::byte>(o.compression_type);
    pos = fmt::kV3HeaderLength;
  }
  auto need = [](size_t len) { return 8 + fmt::round_up(len, 8); };
  size_t room = cs - o.backing_file.size() - 8 /* end marker */;
  if (!o.backing_format.empty()) {
    if (pos + need(o.backing_format.size()) > room)
      return Status::Invalid("header extensions do not fit in one cluster");
    put_ext(c, pos, fmt::kExtBackingFormat, o.backing_format.data(),
            o.backing_format.size());
  }
  if (!o.data_file.empty()) {
    if (pos + need(o.data_file.size()) > room)
      return Status::Invalid("header extensions do not fit in one cluster");
    put_ext(c, pos, fmt::kExtDataFile, o.data_file.data(), o.data_file.size());
  }
  if (o.version == 3) {
    static const struct { uint8_t type, bit; const char* name; } names[] = {
        {0, 0, "dirty bit"},           {0, 1, "corrupt bit"},
        {0, 2, "external data file"},  {0, 3, "compression type"},
        {0, 4, "extended L2 entries"}, {1, 0, "lazy refcounts"},
        {2, 0, "bitmaps"},             {2, 1, "raw external data"}};
    size_t len = sizeof names / sizeof names[0] * 48;
    if (pos + need(len) <= room) {
      std::vector<std::byte> t(len);
      for (size_t i = 0; i < sizeof names / sizeof names[0]; ++i) {
        t[i * 48] = std::byte{names[i].type};
        t[i * 48 + 1] = std::byte{names[i].bit};
        std::memcpy(&t[i * 48 + 2], names[i].name, std::strlen(names[i].name));
      }
      put_ext(c, pos, fmt::kExtFeatureTable, t.data(), t.size());
    }
  }
  pos += 8;  // end-of-extensions marker (zeros)
  if (!o.backing_file.empty()) {
    if (pos + o.backing_file.size() > cs)
      return Status::Invalid("backing file name does not fit in the header");
    std::memcpy(&c[pos], o.backing_file.data(), o.backing_file.size());
    fmt::store64(&c[fmt::kOffBackingOffset], pos);
    fmt::store32(&c[fmt::kOffBackingSize],
                 static_cast<uint32_t>(o.backing_file.size()));
  }

  // Refcount table and blocks.
  std::vector<std::byte> rt(R * cs);
  for (uint64_t i = 0; i < B; ++i) fmt::store64(&rt[i * 8], rb_off + i * cs);
  std::vector<std::byte> rbs(B * cs);
  for (uint64_t k = 0; k < N; ++k) {
    uint64_t bit = k << order;
    switch (order) {
      case 3: rbs[k] = std::byte{1}; break;
      case 4: fmt::store16(&rbs[k * 2], 1); break;
      case 5: fmt::store32(&rbs[k * 4], 1); break;
      case 6: fmt::store64(&rbs[k * 8], 1); break;
      default:
        rbs[bit >> 3] |= static_cast<std::byte>(1u << (bit & 7));
    }
  }
  if (auto ec = f.truncate(0)) return Status::IoError(ec, "truncate");
  if (auto ec = f.truncate(N * cs)) return Status::IoError(ec, "truncate");
  if (auto ec = f.pwrite(rt, rt_off)) return Status::IoError(ec, "write");
  if (auto ec = f.pwrite(rbs, rb_off)) return Status::IoError(ec, "write");
  // The L1 table is all zeros, but it must take its space now (not be a
  // hole): its first entry is written back when the disk may be full.
  if (l1_off) {
    if (auto ec = f.write_zeroes(l1_off, L * cs)) return Status::IoError(ec, "write");
  }
  if (auto ec = f.flush()) return Status::IoError(ec, "flush");
  if (auto ec = f.pwrite(c, 0)) return Status::IoError(ec, "write");
  if (auto ec = f.flush()) return Status::IoError(ec, "flush");

  if (o.preallocation == Preallocation::Metadata && o.size && o.data_file.empty()) {
    std::shared_ptr<File> alias(&f, [](File*) {});
    std::unique_ptr<Image> img;
    OpenOptions oo;
    if (Status st = open(alias, oo, &img); !st.ok()) return st;
    Impl& I = *img->impl_;
    std::unique_lock lk(I.mu);
    uint64_t clusters = fmt::div_round_up(o.size, cs);
    for (uint64_t gc = 0; gc < clusters; ++gc) {
      L2Table* t;
      if (auto ec = I.l2_for_write(gc >> I.l2_bits, &t))
        return Status::IoError(ec, "preallocating");
      uint64_t host;
      if (auto ec = I.alloc_clusters(1, &host))
        return Status::IoError(ec, "preallocating");
      if (auto ec = I.l2_for_write(gc >> I.l2_bits, &t))
        return Status::IoError(ec, "preallocating");
      uint64_t k = (gc & (I.l2_size - 1)) * I.words;
      t->words[k] = host | fmt::kOflagCopied;
      if (I.words == 2) t->words[k + 1] = 0xffffffffu;
      t->dirty = true;
    }
    if (auto ec = I.flush_locked(true)) return Status::IoError(ec, "flush");
    uint64_t end = I.end_cluster * cs;
    if (f.size() < end) {
      if (auto ec = f.truncate(end)) return Status::IoError(ec, "truncate");
    }
  }
  return Status::Ok();
}

}  // namespace layerd::qcow2
