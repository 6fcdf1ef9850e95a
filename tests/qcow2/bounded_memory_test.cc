// Hostile sizes in small images: the engine must not allocate by what the
// metadata claims. Every operator new of this test binary records its size,
// and each test checks the largest single allocation made by one call.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <functional>
#include <new>

#include "test_util.h"

namespace {
std::atomic<size_t> largest_allocation{0};
}  // namespace

void* operator new(size_t n) {
  size_t seen = largest_allocation.load(std::memory_order_relaxed);
  while (n > seen && !largest_allocation.compare_exchange_weak(seen, n)) {
  }
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }

namespace layerd::qcow2::test {
namespace {

size_t largest_allocation_during(const std::function<void()>& f) {
  largest_allocation = 0;
  f();
  return largest_allocation;
}

// The bitmap directory's (offset, entry) of the image's bitmaps extension.
uint64_t bitmap_directory(const std::string& path) {
  for (uint64_t pos = peek(path, 100, 4); pos < 4096;) {
    uint32_t type = uint32_t(peek(path, pos, 4));
    uint32_t len = uint32_t(peek(path, pos + 4, 4));
    if (type == 0x23852875) return peek(path, pos + 8 + 16, 8);
    if (type == 0) break;
    pos += 8 + (len + 7) / 8 * 8;
  }
  ADD_FAILURE() << "no bitmaps extension";
  return 0;
}

TEST(BoundedMemory, CheckReadsNoBitmapTableLargerThanTheFile) {
  TempDir d;
  std::string path = d / "b.qcow2";
  run("qemu-img create -q -f qcow2 '" + path + "' 8M");
  run("qemu-img bitmap --add '" + path + "' b0");
  run("qemu-io -f qcow2 '" + path + "' -c 'write -P 1 0 64k'");
  // The first directory entry claims a table of 8 Mi entries (64 MiB).
  patch32(path, bitmap_directory(path) + 8, 8u << 20);
  auto img = open_image(path, false);
  ASSERT_TRUE(img);
  CheckReport report;
  size_t largest = largest_allocation_during([&] {
    ASSERT_TRUE(img->check(Repair::None, &report).ok());
  });
  EXPECT_LT(largest, 1u << 20);
  EXPECT_GT(report.corruptions, 0u);  // the table lies beyond the file
}

}  // namespace
}  // namespace layerd::qcow2::test
