// Bulk transfers past the page cache (BulkIoScope): inside a scope,
// aligned transfers of a posix File leave no pages in the cache and stay
// coherent with what the cache holds; everything else (unaligned
// transfers, file systems without O_DIRECT, reads past the end, a reopen
// in between) works as outside a scope. Page-cache residency is read with
// mincore(2) on a mapping of the file.
#include <fcntl.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <atomic>
#include <thread>

#include "test_util.h"

namespace layerd::qcow2::test {
namespace {

constexpr size_t kMiB = 1 << 20;
constexpr long kPage = 4096;

std::byte pattern(uint64_t off, int seed) {
  return static_cast<std::byte>((off * 13 + off / 4093 + static_cast<uint64_t>(seed)) & 0xff);
}

void fill(std::span<std::byte> buf, uint64_t offset, int seed) {
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = pattern(offset + i, seed);
}

// The first offset in `buf` that does not hold `seed`'s pattern, or -1.
long mismatch(std::span<const std::byte> buf, uint64_t offset, int seed) {
  for (size_t i = 0; i < buf.size(); ++i)
    if (buf[i] != pattern(offset + i, seed)) return static_cast<long>(i);
  return -1;
}

// How many of the pages of [offset, offset + length) of the file are in
// the page cache.
size_t resident_pages(const std::string& path, uint64_t offset, uint64_t length) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  EXPECT_GE(fd, 0) << path;
  void* map = ::mmap(nullptr, length, PROT_READ, MAP_SHARED, fd, static_cast<off_t>(offset));
  ::close(fd);
  EXPECT_NE(map, MAP_FAILED);
  if (map == MAP_FAILED) return 0;
  std::vector<unsigned char> vec((length + kPage - 1) / kPage);
  EXPECT_EQ(::mincore(map, length, vec.data()), 0);
  ::munmap(map, length);
  size_t n = 0;
  for (unsigned char v : vec) n += v & 1;
  return n;
}

// Writes back and drops the file's cached pages.
void drop_cache(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  ::fdatasync(fd);
  ASSERT_EQ(::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
  ::close(fd);
}

std::shared_ptr<File> open_file_created(const std::string& path) {
  std::error_code ec;
  auto f = open_posix_file(path, FileOptions{.mode = OpenMode::ReadWrite, .create = true}, ec);
  EXPECT_TRUE(f) << path << ": " << ec.message();
  return std::shared_ptr<File>(std::move(f));
}

// O_DIRECT that bypasses the cache: tmpfs (Linux 6.6) accepts the flag and
// keeps every page in memory all the same.
bool has_direct_io(const std::string& dir) {
  struct statfs fs {};
  if (::statfs(dir.c_str(), &fs) != 0 || fs.f_type == TMPFS_MAGIC) return false;
  const std::string probe = dir + "/direct-probe";
  int fd = ::open(probe.c_str(), O_RDWR | O_CREAT | O_DIRECT | O_CLOEXEC, 0600);
  if (fd >= 0) ::close(fd);
  ::unlink(probe.c_str());
  return fd >= 0;
}

class DirectIo : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!has_direct_io(dir_.path())) GTEST_SKIP() << dir_.path() << " has no O_DIRECT";
  }
  TempDir dir_;
};

TEST_F(DirectIo, AlignedWritesInAScopeLeaveNoPagesInTheCache) {
  const std::string path = dir_ / "f.raw";
  auto f = open_file_created(path);
  DirectIoBuffer buf(kMiB);
  fill(buf, 0, 1);
  {
    BulkIoScope scope;
    ASSERT_FALSE(f->pwrite(buf, 0));
  }
  fill(buf, kMiB, 1);
  ASSERT_FALSE(f->pwrite(buf, kMiB));  // outside a scope: through the cache
  EXPECT_EQ(resident_pages(path, 0, kMiB), 0u);
  EXPECT_EQ(resident_pages(path, kMiB, kMiB), kMiB / kPage);
  EXPECT_EQ(f->size(), 2 * kMiB);
  std::vector<std::byte> back = slurp(path);
  EXPECT_EQ(mismatch(back, 0, 1), -1);
}

TEST_F(DirectIo, AlignedReadsInAScopeBypassTheCacheAndSeeUnsyncedWrites) {
  const std::string path = dir_ / "f.raw";
  auto f = open_file_created(path);
  DirectIoBuffer buf(kMiB);
  fill(buf, 0, 2);
  ASSERT_FALSE(f->pwrite(buf, 0));  // dirty in the cache, not on disk yet
  DirectIoBuffer in(kMiB);
  {
    BulkIoScope scope;
    ASSERT_FALSE(f->pread(in, 0));
  }
  EXPECT_EQ(mismatch(in, 0, 2), -1);

  drop_cache(path);
  ASSERT_EQ(resident_pages(path, 0, kMiB), 0u);
  std::fill(in.begin(), in.end(), std::byte{0});
  {
    BulkIoScope scope;
    ASSERT_FALSE(f->pread(in, 0));
  }
  EXPECT_EQ(mismatch(in, 0, 2), -1);
  EXPECT_EQ(resident_pages(path, 0, kMiB), 0u);
  ASSERT_FALSE(f->pread(in, 0));  // outside a scope: through the cache
  EXPECT_EQ(resident_pages(path, 0, kMiB), kMiB / kPage);
}

TEST_F(DirectIo, AWriteInAScopeReplacesWhatTheCacheHeld) {
  const std::string path = dir_ / "f.raw";
  auto f = open_file_created(path);
  DirectIoBuffer buf(kMiB);
  fill(buf, 0, 3);
  ASSERT_FALSE(f->pwrite(buf, 0));
  ASSERT_FALSE(f->pread(buf, 0));  // cached, and dirty
  fill(buf, 0, 4);
  {
    BulkIoScope scope;
    ASSERT_FALSE(f->pwrite(buf, 0));
  }
  std::vector<std::byte> back(kMiB);
  ASSERT_FALSE(f->pread(back, 0));
  EXPECT_EQ(mismatch(back, 0, 4), -1);
  drop_cache(path);
  EXPECT_EQ(mismatch(slurp(path), 0, 4), -1);
}

TEST_F(DirectIo, UnalignedTransfersInAScopeUseTheCache) {
  const std::string path = dir_ / "f.raw";
  auto f = open_file_created(path);
  DirectIoBuffer buf(kMiB + kPage);
  std::span<std::byte> odd_memory(buf.data() + 1, 64 << 10);
  std::span<std::byte> odd_length(buf.data(), 5000);
  BulkIoScope scope;
  fill(odd_memory, 0, 5);
  ASSERT_FALSE(f->pwrite(odd_memory, 0));
  fill(odd_length, 128 << 10, 5);
  ASSERT_FALSE(f->pwrite(odd_length, 128 << 10));
  std::span<std::byte> aligned(buf.data(), 8192);
  fill(aligned, 200000, 5);
  ASSERT_FALSE(f->pwrite(aligned, 200000));  // offset not aligned
  // Aligned for the device (512) but not to a page: a page written through
  // the cache could share it.
  std::span<std::byte> sub_page(buf.data(), 4096);
  fill(sub_page, 512 << 10 | 512, 5);
  ASSERT_FALSE(f->pwrite(sub_page, 512 << 10 | 512));
  EXPECT_EQ(resident_pages(path, 512 << 10, 8192), 2u);
  EXPECT_EQ(resident_pages(path, 0, 64 << 10), (64u << 10) / kPage);
  EXPECT_GT(resident_pages(path, 128 << 10, 5000), 0u);
  EXPECT_GT(resident_pages(path, 196608, 16384), 0u);
  std::vector<std::byte> back(64 << 10);
  ASSERT_FALSE(f->pread(back, 0));
  EXPECT_EQ(mismatch(back, 0, 5), -1);
  back.resize(5000);
  ASSERT_FALSE(f->pread(back, 128 << 10));
  EXPECT_EQ(mismatch(back, 128 << 10, 5), -1);
  back.resize(8192);
  ASSERT_FALSE(f->pread(std::span<std::byte>(back.data(), 8192), 200000));
  EXPECT_EQ(mismatch(back, 200000, 5), -1);
}

TEST_F(DirectIo, AReadPastTheEndInAScopeReadsZeros) {
  const std::string path = dir_ / "f.raw";
  auto f = open_file_created(path);
  std::vector<std::byte> head(6000);
  fill(head, 0, 6);
  ASSERT_FALSE(f->pwrite(head, 0));
  drop_cache(path);
  DirectIoBuffer in(3 * kPage, std::byte{0xee});
  {
    BulkIoScope scope;
    ASSERT_FALSE(f->pread(in, 0));
  }
  EXPECT_EQ(mismatch(std::span<const std::byte>(in).first(6000), 0, 6), -1);
  for (size_t i = 6000; i < in.size(); ++i) ASSERT_EQ(in[i], std::byte{0}) << i;
}

TEST_F(DirectIo, BulkTransfersFollowTheFileThroughReopens) {
  const std::string path = dir_ / "f.raw";
  {
    auto f = open_file_created(path);
    DirectIoBuffer buf(kMiB);
    fill(buf, 0, 7);
    ASSERT_FALSE(f->pwrite(buf, 0));
  }
  drop_cache(path);
  auto f = open_file(path, false);
  BulkIoScope scope;
  DirectIoBuffer buf(kMiB);
  ASSERT_FALSE(f->pread(buf, 0));  // opens the direct descriptor, read-only
  EXPECT_EQ(mismatch(buf, 0, 7), -1);
  ASSERT_FALSE(f->reopen(OpenMode::ReadWrite));
  fill(buf, 0, 8);
  ASSERT_FALSE(f->pwrite(buf, 0));
  EXPECT_EQ(resident_pages(path, 0, kMiB), 0u);  // it went direct
  ASSERT_FALSE(f->reopen(OpenMode::ReadOnly));
  EXPECT_EQ(f->pwrite(buf, 0), std::make_error_code(std::errc::bad_file_descriptor));
  std::fill(buf.begin(), buf.end(), std::byte{0});
  ASSERT_FALSE(f->pread(buf, 0));
  EXPECT_EQ(mismatch(buf, 0, 8), -1);
  EXPECT_EQ(resident_pages(path, 0, kMiB), 0u);
}

TEST_F(DirectIo, BulkReadsNeverFailWhileTheFileIsReopened) {
  const std::string path = dir_ / "f.raw";
  constexpr size_t kSize = 4 * kMiB, kPiece = 64 << 10;
  {
    auto f = open_file_created(path);
    DirectIoBuffer buf(kSize);
    fill(buf, 0, 9);
    ASSERT_FALSE(f->pwrite(buf, 0));
  }
  auto f = open_file(path, false);
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0}, reads{0};
  std::thread reader([&] {
    BulkIoScope scope;
    DirectIoBuffer buf(kPiece);
    for (uint64_t off = 0; !stop.load(); off = (off + kPiece) % kSize) {
      if (f->pread(buf, off) || mismatch(buf, off, 9) != -1) failures.fetch_add(1);
      reads.fetch_add(1);
    }
  });
  for (int i = 0; i < 200; ++i) {
    ASSERT_FALSE(f->reopen(i % 2 == 0 ? OpenMode::ReadWrite : OpenMode::ReadOnly));
    while (reads.load() < i) std::this_thread::yield();
  }
  stop.store(true);
  reader.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_GE(reads.load(), 200);
}

// tmpfs refuses O_DIRECT before Linux 6.6 and ignores it since: either
// way a scope changes nothing there.
TEST(DirectIoFallback, FilesOnTmpfsWorkInAScope) {
  if (!std::filesystem::is_directory("/dev/shm")) GTEST_SKIP() << "no /dev/shm";
  const std::string path = "/dev/shm/layerd-direct-io-test-" + std::to_string(::getpid());
  {
    auto f = open_file_created(path);
    BulkIoScope scope;
    DirectIoBuffer buf(kMiB);
    fill(buf, 0, 10);
    ASSERT_FALSE(f->pwrite(buf, 0));
    std::fill(buf.begin(), buf.end(), std::byte{0});
    ASSERT_FALSE(f->pread(buf, 0));
    EXPECT_EQ(mismatch(buf, 0, 10), -1);
  }
  EXPECT_EQ(mismatch(slurp(path), 0, 10), -1);
  ::unlink(path.c_str());
}

}  // namespace
}  // namespace layerd::qcow2::test
