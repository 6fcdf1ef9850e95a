// Persistent dirty bitmaps of a qcow2 image (the "bitmaps" extension of
// QEMU's docs/interop/qcow2.txt): the bitmap directory codec and the
// in-memory bitmap. What an Image does with them at open, on writes, at
// close and in check is in bitmaps.cc.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "qcow2/image.h"

namespace layerd::qcow2 {

// One bitmap directory entry, decoded. Entries with extra data are refused
// (as QEMU refuses them), so encoding an entry gives back its bytes.
struct BitmapDirEntry {
  uint64_t table_offset = 0;
  uint32_t table_size = 0;  // 64-bit entries
  uint32_t flags = 0;
  uint8_t type = 0;
  uint8_t granularity_bits = 0;
  std::string name;
};

// Decodes a whole bitmap directory of `expected` entries and checks every
// constraint QEMU checks on an image of `disk_size` bytes and clusters of
// `cluster_size` bytes (flags, type, granularity, table size and placement,
// names at most 1023 bytes and distinct). On failure nothing is
// kept and the message names the bitmap when it can.
Status decode_bitmap_directory(std::span<const std::byte> raw, uint32_t expected,
                               uint64_t disk_size, uint64_t cluster_size,
                               std::vector<BitmapDirEntry>* out);
std::vector<std::byte> encode_bitmap_directory(
    const std::vector<BitmapDirEntry>& entries);

// Bitmap table entries (after decoding) that the spec allows: 0 (all zeros),
// 1 (all ones), or a cluster-aligned offset without flags.
bool bitmap_table_entry_valid(uint64_t entry, uint64_t cluster_size);
// Entries a bitmap of `disk_size` bytes at `granularity_bits` needs with
// clusters of `cluster_size` bytes.
uint64_t bitmap_table_entries(uint64_t disk_size, uint32_t granularity_bits,
                              uint64_t cluster_size);

// The bits of one bitmap: bit i covers guest bytes [i << granularity_bits,
// (i + 1) << granularity_bits). Stored as on disk: 64-bit words, least
// significant bit first, so a cluster of bitmap data is a run of whole words.
//
// Thread safety: mark() and dirty_run() may run concurrently with each other
// from any thread; mark() sets bits with atomic ORs, allocates nothing and
// takes no lock. load_chunk() and fill_chunk() are for a bitmap no other
// thread uses yet (open); save_chunk() may run concurrently with mark() but
// then sees some of its bits or not.
class DirtyBitmap {
 public:
  DirtyBitmap(uint64_t disk_size, uint32_t granularity_bits);
  uint32_t granularity_bits() const { return granularity_bits_; }
  uint64_t bit_count() const { return bits_; }

  // Sets the bits of every granule that [offset, offset + length) touches.
  void mark(uint64_t offset, uint64_t length);
  // From guest `offset` (< disk size): whether it is dirty, and how many
  // bytes from there (at most `length`, at least 1) share that state.
  void dirty_run(uint64_t offset, uint64_t length, bool* dirty,
                 uint64_t* run_length) const;

  // Bitmap data clusters: `first_bit` is a multiple of 64; `data` covers
  // the bits from there (bits past bit_count() are read as 0 and written as
  // 0).
  void load_chunk(uint64_t first_bit, std::span<const std::byte> data);
  void fill_chunk(uint64_t first_bit, uint64_t nbits, bool value);
  // Writes the bits from `first_bit` into `data`; tells whether they are all
  // clear or all set (counting only bits below bit_count()).
  enum class ChunkKind { Zeros, Ones, Mixed };
  ChunkKind save_chunk(uint64_t first_bit, std::span<std::byte> data) const;

 private:
  bool test(uint64_t bit) const;
  uint64_t disk_size_;
  uint32_t granularity_bits_;
  uint64_t bits_;
  uint64_t words_;
  std::unique_ptr<std::atomic<uint64_t>[]> w_;
};

}  // namespace layerd::qcow2
