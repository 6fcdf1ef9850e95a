// libFuzzer target: a qcow2 image made of the input bytes, opened and used
// the way an export uses it.
//
// The input is the image file. It is opened twice: read-only through a file
// that aborts on any write (a read-only Image must never write), and
// read-write on an in-memory copy that refuses to grow past kMaxFileBytes
// (a small disk: the engine must handle EFBIG, not the harness). Each Image
// is walked with block_status and read where the walk leads, its snapshots
// listed and opened and read, and checked; the writable one also takes
// writes, zero writes, discards and a snapshot, is repaired and closed.
// Work is bounded by the number of extents and bytes visited, never by the
// virtual size the header claims. A successful write must read back.
// External data files are empty in-memory files; what lies below reads as a
// fixed pattern, so "ask below" paths show up in what is read.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "qcow2/file.h"
#include "qcow2/image.h"

namespace layerd::qcow2 {
namespace {

void require(bool ok) {
  if (!ok) std::abort();
}

// The memory file's vector may double its capacity past this: 16 MiB stays
// under scripts/fuzz's 32 MiB allocation limit.
constexpr uint64_t kMaxFileBytes = 8ull << 20;
constexpr int kMaxExtents = 128;
constexpr uint64_t kMaxReadBytes = 64 * 1024;
constexpr size_t kMaxSnapshots = 4;
constexpr std::byte kBelowPattern{0xab};

// A BelowReader for every call (a callable object, as BelowReader takes).
const auto read_below = [](uint64_t, std::span<std::byte> buf) {
  std::fill(buf.begin(), buf.end(), kBelowPattern);
  return std::error_code();
};

// Forwards to a memory file; writes beyond kMaxFileBytes fail with EFBIG.
// With `read_only`, any attempt to write aborts.
class BoundedFile final : public File {
 public:
  BoundedFile(std::shared_ptr<File> inner, bool read_only)
      : inner_(std::move(inner)), read_only_(read_only) {}

  std::error_code pread(std::span<std::byte> buf, uint64_t offset) override {
    return inner_->pread(buf, offset);
  }
  std::error_code pread_nowait(std::span<std::byte> buf,
                               uint64_t offset) override {
    return inner_->pread_nowait(buf, offset);
  }
  std::error_code pwrite(std::span<const std::byte> data,
                         uint64_t offset) override {
    if (auto ec = may_grow_to(offset, data.size())) return ec;
    return inner_->pwrite(data, offset);
  }
  std::error_code flush() override { return inner_->flush(); }
  std::error_code truncate(uint64_t size) override {
    if (auto ec = may_grow_to(size, 0)) return ec;
    return inner_->truncate(size);
  }
  std::error_code punch_hole(uint64_t offset, uint64_t length) override {
    require(!read_only_);
    return inner_->punch_hole(offset, std::min(length, kMaxFileBytes));
  }
  std::error_code write_zeroes(uint64_t offset, uint64_t length) override {
    if (auto ec = may_grow_to(offset, length)) return ec;
    return inner_->write_zeroes(offset, length);
  }
  uint64_t size() const override { return inner_->size(); }
  uint64_t extent_at(uint64_t offset, uint64_t length,
                     bool* is_data) const override {
    return inner_->extent_at(offset, length, is_data);
  }
  bool writable() const override { return !read_only_; }

 private:
  std::error_code may_grow_to(uint64_t offset, uint64_t length) const {
    require(!read_only_);
    if (offset > kMaxFileBytes || length > kMaxFileBytes - offset)
      return std::make_error_code(std::errc::file_too_large);
    return {};
  }

  std::shared_ptr<File> inner_;
  bool read_only_;
};

std::shared_ptr<File> file_from(std::span<const std::byte> bytes, bool read_only) {
  std::shared_ptr<File> mem = make_memory_file();
  require(!mem->pwrite(bytes, 0));
  return std::make_shared<BoundedFile>(std::move(mem), read_only);
}

// Walks the image from offset 0 with block_status and reads the start of
// every extent (and the last bytes of the disk), plain and nowait.
void walk_and_read(Image& img) {
  std::vector<std::byte> buf(kMaxReadBytes);
  uint64_t offset = 0;
  for (int i = 0; i < kMaxExtents && offset < img.size(); ++i) {
    MapExtent e;
    if (img.block_status(offset, img.size() - offset, &e)) break;
    require(e.length > 0 && e.length <= img.size() - offset);
    const uint64_t n = std::min(e.length, kMaxReadBytes);
    if (!img.read(offset, std::span(buf.data(), n), read_below) &&
        e.kind == ExtentKind::Zero)
      require(std::all_of(buf.begin(), buf.begin() + n,
                          [](std::byte b) { return b == std::byte{0}; }));
    (void)img.read_nowait(offset, std::span(buf.data(), n), read_below);
    offset += e.length;
  }
  const uint64_t tail = std::min(img.size(), kMaxReadBytes);
  (void)img.read(img.size() - tail, std::span(buf.data(), tail), read_below);
}

void visit_snapshots(const Image& img) {
  const std::vector<SnapshotInfo> snaps = img.snapshots();
  for (size_t i = 0; i < std::min(snaps.size(), kMaxSnapshots); ++i) {
    std::unique_ptr<Image> view;
    if (!img.open_snapshot(snaps[i].id, &view).ok()) continue;
    require(view->read_only());
    walk_and_read(*view);
  }
  if (!snaps.empty()) {
    std::unique_ptr<Image> view;
    (void)img.open_snapshot(snaps.back().name, &view);
  }
}

// Writes `data` at `offset` (clamped to the disk) and reads it back.
void write_and_verify(Image& img, uint64_t offset, size_t length, std::byte fill) {
  if (offset >= img.size()) return;
  length = size_t(std::min<uint64_t>(length, img.size() - offset));
  std::vector<std::byte> data(length, fill);
  if (img.write(offset, data, read_below)) return;
  std::vector<std::byte> back(length);
  if (img.read(offset, back, read_below)) return;
  require(std::memcmp(back.data(), data.data(), length) == 0);
}

void modify(Image& img) {
  const uint64_t cs = img.cluster_size();
  write_and_verify(img, 0, 4096, std::byte{1});
  write_and_verify(img, img.size() / 2 + 1000, 3000, std::byte{2});
  write_and_verify(img, cs, size_t(std::min<uint64_t>(2 * cs, kMaxReadBytes)),
                   std::byte{3});
  (void)img.write_zeroes(0, std::min(img.size(), 2 * cs), true, read_below);
  (void)img.write_zeroes(cs / 2, std::min(img.size() - std::min(img.size(), cs / 2), cs),
                         false, read_below, true);
  (void)img.discard(0, std::min(img.size(), 4 * cs), DiscardMode::Unallocate,
                    read_below);
  (void)img.discard(img.size() / 2, std::min(img.size() - img.size() / 2, 3 * cs),
                    DiscardMode::Zero, read_below);
  SnapshotInfo taken;
  if (img.create_snapshot("fuzz", &taken).ok()) {
    write_and_verify(img, 0, 512, std::byte{4});
    visit_snapshots(img);
    (void)img.delete_snapshot(taken.id);
  }
  (void)img.flush();
  walk_and_read(img);
}

void exercise(std::span<const std::byte> bytes, bool read_only) {
  std::shared_ptr<File> file = file_from(bytes, read_only);
  HeaderInfo info;
  if (!Image::probe(file, &info).ok()) return;
  OpenOptions options;
  options.read_only = read_only;
  // The smallest caches (four tables each), so that eviction, write-back
  // and reloading are exercised too.
  options.l2_cache_bytes = 0;
  options.refcount_cache_bytes = 0;
  if (info.has_data_file) options.data_file = file_from({}, read_only);
  std::unique_ptr<Image> img;
  if (!Image::open(file, options, &img).ok()) return;
  require(img->read_only() || !read_only);
  walk_and_read(*img);
  visit_snapshots(*img);
  if (!read_only) modify(*img);
  CheckReport report;
  (void)img->check(read_only ? Repair::None : Repair::All, &report);
  (void)img->close();
}

}  // namespace
}  // namespace layerd::qcow2

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  layerd::qcow2::exercise(bytes, true);
  layerd::qcow2::exercise(bytes, false);
  return 0;
}
