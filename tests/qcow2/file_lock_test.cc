// File::lock: QEMU's byte-range lock protocol on open-file-description
// locks. Two Files in one process must refuse each other what two
// processes would, changes happen in place without a gap, and qemu-img
// reads the same bytes (it is the oracle for the byte layout).
#include <fcntl.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <set>

#include "test_util.h"

namespace layerd::qcow2::test {
namespace {

const auto kConflict = std::make_error_code(std::errc::resource_unavailable_try_again);

// What QEMU's qcow2 users lock: a writer takes write and resize, and no
// user lets others write or resize the file under its metadata.
const LockSet kReader{perm::kConsistentRead, perm::kConsistentRead | perm::kWriteUnchanged};
const LockSet kWriter{perm::kConsistentRead | perm::kWrite | perm::kResize,
                      perm::kConsistentRead | perm::kWriteUnchanged};
const LockSet kForceShared{perm::kConsistentRead, perm::kAll};

std::unique_ptr<File> open_file(const std::string& path, OpenMode mode) {
  std::error_code ec;
  auto f = open_posix_file(path, FileOptions{.mode = mode}, ec);
  EXPECT_TRUE(f) << path << ": " << ec.message();
  return f;
}

// The lock bytes (100-103, 200-203) some open other than a fresh one holds.
std::set<int> locked_bytes(const std::string& path) {
  std::set<int> out;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  EXPECT_GE(fd, 0);
  for (int base : {100, 200}) {
    for (int i = 0; i < 4; ++i) {
      struct flock fl {};
      fl.l_type = F_WRLCK;
      fl.l_whence = SEEK_SET;
      fl.l_start = base + i;
      fl.l_len = 1;
      EXPECT_EQ(::fcntl(fd, F_OFD_GETLK, &fl), 0);
      if (fl.l_type != F_UNLCK) out.insert(base + i);
    }
  }
  ::close(fd);
  return out;
}

class FileLock : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = dir_ / "a.qcow2";
    run("qemu-img create -q -f qcow2 '" + path_ + "' 1M");
  }
  TempDir dir_;
  std::string path_;
};

TEST_F(FileLock, TakesQemusBytes) {
  auto f = open_file(path_, OpenMode::ReadWrite);
  ASSERT_FALSE(f->lock(kWriter, nullptr));
  EXPECT_EQ(locked_bytes(path_), (std::set<int>{100, 101, 103, 201, 203}));
  ASSERT_FALSE(f->lock(kReader, nullptr));
  EXPECT_EQ(locked_bytes(path_), (std::set<int>{100, 201, 203}));
  ASSERT_FALSE(f->lock(LockSet{}, nullptr));
  EXPECT_EQ(locked_bytes(path_), std::set<int>{});
}

TEST_F(FileLock, TwoOpensInOneProcessConflictLikeTwoProcesses) {
  auto writer = open_file(path_, OpenMode::ReadWrite);
  auto reader = open_file(path_, OpenMode::ReadOnly);
  ASSERT_FALSE(writer->lock(kWriter, nullptr));

  LockConflict c;
  EXPECT_EQ(reader->lock(kReader, &c), kConflict);
  EXPECT_EQ(c.permission, perm::kWrite);
  EXPECT_TRUE(c.taken_by_other);
  EXPECT_EQ(c.describe(), "another process holds the \"write\" lock");
  EXPECT_EQ(c.qemu_message(), "Failed to get shared \"write\" lock");
  // The failed attempt left nothing behind.
  EXPECT_EQ(locked_bytes(path_), (std::set<int>{100, 101, 103, 201, 203}));

  // Force-share asks only for what it takes.
  EXPECT_FALSE(reader->lock(kForceShared, nullptr));
}

TEST_F(FileLock, AWriterIsRefusedWhereAReaderSharesNoWrite) {
  auto reader = open_file(path_, OpenMode::ReadOnly);
  auto writer = open_file(path_, OpenMode::ReadWrite);
  ASSERT_FALSE(reader->lock(kReader, nullptr));
  LockConflict c;
  EXPECT_EQ(writer->lock(kWriter, &c), kConflict);
  EXPECT_EQ(c.permission, perm::kWrite);
  EXPECT_FALSE(c.taken_by_other);
  EXPECT_EQ(c.describe(),
            "another process has it open and does not share the \"write\" lock");
  EXPECT_EQ(c.qemu_message(), "Failed to get \"write\" lock");
  // Two readers get along.
  auto second_reader = open_file(path_, OpenMode::ReadOnly);
  EXPECT_FALSE(second_reader->lock(kReader, nullptr));
}

TEST_F(FileLock, UpgradeAndDowngradeInPlace) {
  auto a = open_file(path_, OpenMode::ReadWrite);
  auto b = open_file(path_, OpenMode::ReadOnly);
  ASSERT_FALSE(a->lock(kReader, nullptr));
  ASSERT_FALSE(a->lock(kWriter, nullptr));  // alone: the upgrade works
  EXPECT_EQ(b->lock(kReader, nullptr), kConflict);
  ASSERT_FALSE(a->lock(kReader, nullptr));  // back down: readers fit again
  ASSERT_FALSE(b->lock(kReader, nullptr));

  // Now the upgrade is refused, and `a` keeps its reader's locks.
  LockConflict c;
  EXPECT_EQ(a->lock(kWriter, &c), kConflict);
  EXPECT_EQ(c.permission, perm::kWrite);
  b.reset();  // closing `b` releases its locks
  EXPECT_EQ(locked_bytes(path_), (std::set<int>{100, 201, 203}));
  EXPECT_FALSE(a->lock(kWriter, nullptr));
}

TEST_F(FileLock, ClosingAnotherDescriptorReleasesNothing) {
  auto writer = open_file(path_, OpenMode::ReadWrite);
  ASSERT_FALSE(writer->lock(kWriter, nullptr));
  // With POSIX record locks this close would drop the writer's locks.
  int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  ::close(fd);
  auto reader = open_file(path_, OpenMode::ReadOnly);
  EXPECT_EQ(reader->lock(kReader, nullptr), kConflict);
  writer.reset();
  EXPECT_FALSE(reader->lock(kReader, nullptr));
}

TEST_F(FileLock, QemuImgSeesTheLocks) {
  auto f = open_file(path_, OpenMode::ReadWrite);
  ASSERT_FALSE(f->lock(kWriter, nullptr));
  int status = 0;
  std::string out = sh("qemu-img info '" + path_ + "'", &status);
  EXPECT_NE(status, 0);
  EXPECT_NE(out.find("Failed to get shared \"write\" lock"), std::string::npos) << out;
  run("qemu-img info -U '" + path_ + "'");

  ASSERT_FALSE(f->lock(kReader, nullptr));
  run("qemu-img info '" + path_ + "'");
  out = sh("qemu-io -c 'write 0 4k' '" + path_ + "'", &status);
  EXPECT_NE(status, 0);
  EXPECT_NE(out.find("Failed to get \"write\" lock"), std::string::npos) << out;
}

TEST(FileLockMemory, AcceptsEverything) {
  auto a = make_memory_file(4096);
  EXPECT_FALSE(a->lock(kWriter, nullptr));
  EXPECT_FALSE(a->lock(kReader, nullptr));
}

}  // namespace
}  // namespace layerd::qcow2::test
