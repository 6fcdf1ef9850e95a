// File::start_writeback and Image::start_writeback: what a long copy has
// written starts for the disk at once, without a flush, so that a job's
// final flush has little left. Observed with cachestat(2), which counts a
// file's dirty pages; the kernel's own write-back would not start them
// for dirty_expire_centisecs (30 s by default), far beyond the wait here.
#include <fcntl.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <thread>

#include "test_util.h"

namespace layerd::qcow2::test {
namespace {

#ifndef __NR_cachestat
#define __NR_cachestat 451
#endif

struct CachestatRange {
  uint64_t off, len;
};
struct Cachestat {
  uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
};

// Dirty or under write-back pages of the file at `path`; -1 if the kernel
// cannot tell.
int64_t unwritten_pages(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  CachestatRange range{0, 0};
  Cachestat cs{};
  long r = ::syscall(__NR_cachestat, fd, &range, &cs, 0);
  ::close(fd);
  if (r != 0) return -1;
  return static_cast<int64_t>(cs.nr_dirty + cs.nr_writeback);
}

// Seconds the kernel lets a page stay dirty before writing it back itself.
double dirty_expire_seconds() {
  std::ifstream in("/proc/sys/vm/dirty_expire_centisecs");
  double centisecs = 0;
  in >> centisecs;
  return centisecs / 100;
}

// Skips unless dirty pages of files in `dir` can be watched: cachestat
// exists, the file system writes back (not tmpfs) and the kernel's own
// write-back comes later than the test waits.
constexpr double kWaitSeconds = 10;
bool can_watch_writeback(const std::string& dir, std::string* why) {
  struct statfs st {};
  if (::statfs(dir.c_str(), &st) != 0 || st.f_type == 0x01021994 /* tmpfs */) {
    *why = dir + " is on tmpfs (no write-back)";
    return false;
  }
  if (dirty_expire_seconds() <= kWaitSeconds) {
    *why = "vm.dirty_expire_centisecs is too short to tell our write-back from the kernel's";
    return false;
  }
  std::string probe = dir + "/probe";
  std::ofstream(probe) << "x";
  if (unwritten_pages(probe) < 0) {
    *why = "no cachestat(2) in this kernel";
    return false;
  }
  return true;
}

bool written_back_within(const std::string& path, double seconds) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (std::chrono::steady_clock::now() < deadline) {
    if (unwritten_pages(path) == 0) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

TEST(StartWriteback, PosixFileSendsItsDirtyPagesToTheDiskWithoutAFlush) {
  TempDir d;
  std::string why;
  if (!can_watch_writeback(d.path(), &why)) GTEST_SKIP() << why;
  std::string path = d / "f.raw";
  std::ofstream(path).close();
  auto file = open_file(path, true);
  ASSERT_TRUE(file);
  std::vector<std::byte> data(16 << 20, std::byte{0x5a});
  ASSERT_FALSE(file->pwrite(data, 0));
  ASSERT_GT(unwritten_pages(path), 0) << "the pages should still be dirty";
  file->start_writeback();
  EXPECT_TRUE(written_back_within(path, kWaitSeconds))
      << unwritten_pages(path) << " pages still dirty";
}

TEST(StartWriteback, ReadOnlyFileIsLeftAlone) {
  TempDir d;
  std::string path = d / "f.raw";
  std::ofstream(path) << "data";
  auto file = open_file(path, false);
  ASSERT_TRUE(file);
  file->start_writeback();  // nothing to write, nothing fails
  std::vector<std::byte> buf(4);
  ASSERT_FALSE(file->pread(buf, 0));
  EXPECT_EQ(buf[0], std::byte{'d'});
}

TEST(StartWriteback, ImageStartsTheWriteBackOfItsData) {
  TempDir d;
  std::string why;
  if (!can_watch_writeback(d.path(), &why)) GTEST_SKIP() << why;
  std::string img = d / "a.qcow2";
  run("qemu-img create -q -f qcow2 '" + img + "' 64M");
  auto image = open_image(img, true);
  ASSERT_TRUE(image);
  std::vector<std::byte> data(16 << 20, std::byte{0x3c});
  ASSERT_FALSE(image->write(0, data, zero_below()));
  ASSERT_GT(unwritten_pages(img), 0);
  image->start_writeback();
  EXPECT_TRUE(written_back_within(img, kWaitSeconds))
      << unwritten_pages(img) << " pages still dirty";
  ASSERT_FALSE(image->flush());
  image.reset();
  run("qemu-img check -q '" + img + "'");
}

}  // namespace
}  // namespace layerd::qcow2::test
