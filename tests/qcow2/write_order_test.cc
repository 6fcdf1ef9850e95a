// The order in which metadata and data reach the disk, and I/O loops that
// must end: an L2 table evicted from the cache of an image with an external
// data file is written only after the data it maps is durable, and a
// pwrite(2) that writes nothing is an error rather than a retry forever.
#include <gtest/gtest.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <set>
#include <thread>

#include "test_util.h"

// Test hook: while set, pwrite(2) returns 0 (writes nothing, no error), as
// some FUSE and network filesystems can. The definition in the test binary
// takes the place of libc's for the statically linked engine.
static std::atomic<bool> g_pwrite_returns_zero{false};
extern "C" ssize_t pwrite(int fd, const void* buf, size_t count, off_t offset) {
  if (g_pwrite_returns_zero.load() && count > 0) return 0;
  return ::syscall(SYS_pwrite64, fd, buf, count, offset);
}

namespace layerd::qcow2::test {
namespace {

// Records, for the image file, every pwrite made while the data file holds
// writes that were not flushed yet. Writes of zeros are left out: a new L2
// table is written as zeros when allocated (to take its space), before
// anything points at it, which is harmless; a table that maps data is
// never all zeros.
struct Order {
  bool data_unflushed = false;
  std::set<uint64_t> image_writes_before_data_flush;
};

class DataFileSpy final : public File {
 public:
  DataFileSpy(std::shared_ptr<File> inner, Order* order, bool is_data)
      : inner_(std::move(inner)), order_(order), is_data_(is_data) {}
  std::error_code pread(std::span<std::byte> b, uint64_t o) override {
    return inner_->pread(b, o);
  }
  std::error_code pwrite(std::span<const std::byte> d, uint64_t o) override {
    if (is_data_) order_->data_unflushed = true;
    else if (order_->data_unflushed &&
             std::any_of(d.begin(), d.end(), [](std::byte b) { return b != std::byte{0}; }))
      order_->image_writes_before_data_flush.insert(o);
    return inner_->pwrite(d, o);
  }
  std::error_code flush() override {
    if (is_data_) order_->data_unflushed = false;
    return inner_->flush();
  }
  std::error_code truncate(uint64_t s) override { return inner_->truncate(s); }
  std::error_code punch_hole(uint64_t o, uint64_t l) override {
    if (is_data_) order_->data_unflushed = true;
    return inner_->punch_hole(o, l);
  }
  std::error_code write_zeroes(uint64_t o, uint64_t l) override {
    if (is_data_) order_->data_unflushed = true;
    return inner_->write_zeroes(o, l);
  }
  uint64_t size() const override { return inner_->size(); }
  uint64_t extent_at(uint64_t o, uint64_t l, bool* d) const override {
    return inner_->extent_at(o, l, d);
  }
  bool writable() const override { return inner_->writable(); }
  std::error_code lock(const LockSet& w, LockConflict* c) override {
    return inner_->lock(w, c);
  }
  std::error_code reopen(OpenMode m) override { return inner_->reopen(m); }

 private:
  std::shared_ptr<File> inner_;
  Order* order_;
  bool is_data_;
};

// The host offsets of the image's L2 tables, from its L1 table on disk.
std::set<uint64_t> l2_offsets(const std::string& img) {
  auto f = open_file(img, false);
  std::byte h[48];
  EXPECT_FALSE(f->pread(h, 0));
  auto be32 = [&](int at) {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v = v << 8 | uint32_t(h[at + i]);
    return v;
  };
  const uint32_t l1_size = be32(36);
  const uint64_t l1_offset = uint64_t(be32(40)) << 32 | be32(44);
  std::vector<std::byte> l1(l1_size * 8ull);
  EXPECT_FALSE(f->pread(l1, l1_offset));
  std::set<uint64_t> out;
  for (uint32_t i = 0; i < l1_size; ++i) {
    uint64_t e = 0;
    for (int k = 0; k < 8; ++k) e = e << 8 | uint64_t(l1[i * 8 + k]);
    if (uint64_t off = e & 0x00fffffffffffe00ull) out.insert(off);
  }
  return out;
}

TEST(ExternalDataFileOrder, EvictedL2TableWaitsForItsData) {
  TempDir d;
  std::string img = d / "x.qcow2", data = d / "x.raw";
  // 4 KiB clusters: one L2 table maps 2 MiB, so writes 2 MiB apart need a
  // table each and a cache of 4 tables evicts dirty ones.
  run("qemu-img create -q -f qcow2 -o cluster_size=4096,data_file='" + data +
      "' '" + img + "' 64M");
  Order order;
  OpenOptions o;
  o.data_file = std::make_shared<DataFileSpy>(open_file(data, true), &order, true);
  o.l2_cache_bytes = 4 * 4096;
  std::unique_ptr<Image> image;
  auto file = std::make_shared<DataFileSpy>(open_file(img, true), &order, false);
  ASSERT_TRUE(Image::open(file, o, &image).ok());
  std::vector<std::byte> buf(4096, std::byte{0x5a});
  for (uint64_t i = 0; i < 24; ++i)
    ASSERT_FALSE(image->write(i * (2 << 20), buf, zero_below()));
  ASSERT_FALSE(image->flush());
  image.reset();

  const std::set<uint64_t> tables = l2_offsets(img);
  ASSERT_EQ(tables.size(), 24u);
  for (uint64_t off : order.image_writes_before_data_flush)
    EXPECT_EQ(tables.count(off), 0u)
        << "L2 table at " << off << " was written before the data it maps was flushed";
  run("qemu-img check -q '" + img + "'");
}

TEST(PosixFileWrite, NoProgressIsAnErrorNotALoop) {
  TempDir d;
  run("truncate -s 0 '" + d / "f" + "'");
  auto f = open_file(d / "f", true);
  std::atomic<bool> done{false};
  std::error_code ec;
  std::vector<std::byte> buf(4096, std::byte{1});
  g_pwrite_returns_zero = true;
  std::thread t([&] {
    ec = f->pwrite(buf, 0);
    done = true;
  });
  for (int i = 0; i < 200 && !done; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  g_pwrite_returns_zero = false;  // lets a looping pwrite finish
  t.join();
  ASSERT_TRUE(done);
  EXPECT_EQ(ec, std::errc::no_space_on_device);
}

}  // namespace
}  // namespace layerd::qcow2::test
