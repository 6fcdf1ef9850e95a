// File::start_writeback and Image::start_writeback: what a long copy has
// written starts for the disk at once, without a flush, so that a job's
// final flush has little left. Observed with cachestat(2), which counts a
// file's dirty pages; the kernel's own write-back would not start them
// for dirty_expire_centisecs (30 s by default), far beyond the wait here.
// write_back_in_steps: the same, waited for, a step at a time; its errors
// fail what it is part of (close, reopen_read_only).
#include <fcntl.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <thread>

#include "forwarding_file.h"
#include "qcow2/rwlock.h"
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

// A new empty file at `path`, open read-write.
std::shared_ptr<File> empty_file(const std::string& path) {
  std::ofstream(path).close();
  return open_file(path, true);
}

TEST(StartWriteback, PosixFileSendsItsDirtyPagesToTheDiskWithoutAFlush) {
  TempDir d;
  std::string why;
  if (!can_watch_writeback(d.path(), &why)) GTEST_SKIP() << why;
  std::string path = d / "f.raw";
  auto file = empty_file(path);
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

// A new 64 MiB qcow2 image at `img`, open read-write, whose first `bytes`
// were written with `fill` and are still dirty in the page cache; nullptr
// (with a failure) otherwise.
std::unique_ptr<Image> image_with_dirty_data(const std::string& img, size_t bytes, std::byte fill) {
  run("qemu-img create -q -f qcow2 '" + img + "' 64M");
  auto image = open_image(img, true);
  if (!image) return nullptr;
  std::vector<std::byte> data(bytes, fill);
  EXPECT_FALSE(image->write(0, data, zero_below()));
  EXPECT_GT(unwritten_pages(img), 0);
  if (::testing::Test::HasFailure()) return nullptr;
  return image;
}

TEST(StartWriteback, ImageStartsTheWriteBackOfItsData) {
  TempDir d;
  std::string why;
  if (!can_watch_writeback(d.path(), &why)) GTEST_SKIP() << why;
  std::string img = d / "a.qcow2";
  auto image = image_with_dirty_data(img, 16 << 20, std::byte{0x3c});
  ASSERT_TRUE(image);
  image->start_writeback();
  EXPECT_TRUE(written_back_within(img, kWaitSeconds))
      << unwritten_pages(img) << " pages still dirty";
  ASSERT_FALSE(image->flush());
  image.reset();
  run("qemu-img check -q '" + img + "'");
}

TEST(WriteBackInSteps, PosixFileHasNoDirtyPageLeftWhenItReturns) {
  TempDir d;
  std::string why;
  if (!can_watch_writeback(d.path(), &why)) GTEST_SKIP() << why;
  std::string path = d / "f.raw";
  auto file = empty_file(path);
  ASSERT_TRUE(file);
  // Two and a half steps, and a page in each of them.
  const uint64_t size = File::kWriteBackStep * 5 / 2;
  std::vector<std::byte> data(size, std::byte{0x6e});
  ASSERT_FALSE(file->pwrite(data, 0));
  std::vector<std::byte> page(4096, std::byte{0x6f});
  for (uint64_t at = 0; at < size; at += File::kWriteBackStep)
    ASSERT_FALSE(file->pwrite(page, at + File::kWriteBackStep / 2));
  ASSERT_GT(unwritten_pages(path), 0) << "the pages should still be dirty";
  ASSERT_FALSE(file->write_back_in_steps());
  EXPECT_EQ(unwritten_pages(path), 0);
  ASSERT_FALSE(file->flush());
}

// A job's thread may run in the background CPU class; the lock a client's
// flush may wait for is held in the normal one (qcow2/rwlock.h's hook),
// by a flush and by each step of a write-back.
struct CountingHook final : ExclusiveHoldHook {
  int before = 0, after = 0;
  void before_exclusive() override { ++before; }
  void after_exclusive() override { ++after; }
};

TEST(WriteBackInSteps, ItAndFlushHoldTheirSyncLockInTheNormalCpuClass) {
  TempDir d;
  std::string path = d / "f.raw";
  auto file = empty_file(path);
  ASSERT_TRUE(file);
  std::vector<std::byte> page(4096, std::byte{0x71});
  ASSERT_FALSE(file->pwrite(page, 0));
  ASSERT_FALSE(file->pwrite(page, File::kWriteBackStep + 4096));
  CountingHook hook;
  exclusive_hold_hook = &hook;
  const std::error_code written_back = file->write_back_in_steps();
  const int steps_held = hook.before;
  const std::error_code flushed = file->flush();
  exclusive_hold_hook = nullptr;
  EXPECT_FALSE(written_back);
  EXPECT_FALSE(flushed);
  EXPECT_GE(steps_held, 3) << "the take and two steps";
  EXPECT_EQ(hook.before, steps_held + 1) << "and the flush";
  EXPECT_EQ(hook.after, hook.before);
}

// What is written after a write-back is the next one's to write back.
TEST(WriteBackInSteps, WritesAfterAWriteBackAreWrittenBackByTheNext) {
  TempDir d;
  std::string why;
  if (!can_watch_writeback(d.path(), &why)) GTEST_SKIP() << why;
  std::string path = d / "f.raw";
  auto file = empty_file(path);
  ASSERT_TRUE(file);
  std::vector<std::byte> page(4096, std::byte{0x70});
  ASSERT_FALSE(file->pwrite(page, File::kWriteBackStep * 3));
  ASSERT_FALSE(file->write_back_in_steps());
  ASSERT_EQ(unwritten_pages(path), 0);
  // Below, then above what the first write-back covered.
  ASSERT_FALSE(file->pwrite(page, 4096));
  ASSERT_FALSE(file->pwrite(page, File::kWriteBackStep * 5 + 4096));
  ASSERT_GT(unwritten_pages(path), 0);
  ASSERT_FALSE(file->write_back_in_steps());
  EXPECT_EQ(unwritten_pages(path), 0);
}

TEST(WriteBackInSteps, ImageWritesBackItsDataAndStaysValid) {
  TempDir d;
  std::string why;
  if (!can_watch_writeback(d.path(), &why)) GTEST_SKIP() << why;
  std::string img = d / "a.qcow2";
  auto image = image_with_dirty_data(img, 20 << 20, std::byte{0x3d});
  ASSERT_TRUE(image);
  ASSERT_FALSE(image->write_back_in_steps());
  EXPECT_EQ(unwritten_pages(img), 0);
  ASSERT_FALSE(image->flush());
  image.reset();
  run("qemu-img check -q '" + img + "'");
  run("qemu-io -f qcow2 -c 'read -q -P 0x3d 0 20M' '" + img + "'");
}

// A file whose write-back fails (as sync_file_range reports an I/O error
// that the next fdatasync of the descriptor may no longer see) while its
// flush succeeds.
class WriteBackFails final : public ForwardingFile {
 public:
  using ForwardingFile::ForwardingFile;
  std::error_code write_back_in_steps() override { return std::make_error_code(std::errc::io_error); }
};

TEST(WriteBackInSteps, ItsErrorFailsTheReopenReadOnlyAndTheClose) {
  TempDir d;
  for (bool reopen : {true, false}) {
    std::string img = d / (reopen ? "r.qcow2" : "c.qcow2");
    run("qemu-img create -q -f qcow2 '" + img + "' 8M");
    std::unique_ptr<Image> image;
    ASSERT_TRUE(Image::open(std::make_shared<WriteBackFails>(open_file(img, true)), OpenOptions{}, &image).ok());
    std::vector<std::byte> data(1 << 20, std::byte{0x11});
    ASSERT_FALSE(image->write(0, data, zero_below()));
    EXPECT_EQ(image->write_back_in_steps(), std::errc::io_error);
    if (reopen)
      EXPECT_FALSE(image->reopen_read_only().ok());
    else
      EXPECT_EQ(image->close(), std::errc::io_error);
  }
}

// The image stays read-only after the failed reopen and its flushes say
// what was lost, also after a second reopen that finds nothing to do.
TEST(WriteBackInSteps, AFailedReopenReadOnlyIsReportedByEveryFlushAfterIt) {
  TempDir d;
  std::string img = d / "a.qcow2";
  run("qemu-img create -q -f qcow2 '" + img + "' 8M");
  std::unique_ptr<Image> image;
  ASSERT_TRUE(Image::open(std::make_shared<WriteBackFails>(open_file(img, true)), OpenOptions{}, &image).ok());
  std::vector<std::byte> data(1 << 20, std::byte{0x12});
  ASSERT_FALSE(image->write(0, data, zero_below()));
  EXPECT_FALSE(image->reopen_read_only().ok());
  EXPECT_TRUE(image->read_only());
  EXPECT_EQ(image->flush(), std::errc::io_error);
  EXPECT_TRUE(image->reopen_read_only().ok()) << "read-only already: nothing to do";
  EXPECT_EQ(image->flush(), std::errc::io_error) << "the lost write-back must stay reported";
}

}  // namespace
}  // namespace layerd::qcow2::test
