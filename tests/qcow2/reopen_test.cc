// Reopening in place, for live jobs: File::reopen switches a File between
// read-only and read-write while other threads read through it and keeps
// its image locks; Image::reopen_read_write / reopen_read_only turn an open
// Image writable and back without closing it (caches, bitmaps, dirty bit).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <set>
#include <thread>

#include "test_util.h"

namespace layerd::qcow2::test {
namespace {

const auto kConflict = std::make_error_code(std::errc::resource_unavailable_try_again);
const LockSet kReader{perm::kConsistentRead, perm::kConsistentRead | perm::kWriteUnchanged};
const LockSet kWriter{perm::kConsistentRead | perm::kWrite | perm::kResize,
                      perm::kConsistentRead | perm::kWriteUnchanged};

std::string q(const std::string& s) { return "'" + s + "'"; }

std::shared_ptr<File> open_mode(const std::string& path, OpenMode mode) {
  std::error_code ec;
  auto f = open_posix_file(path, FileOptions{.mode = mode}, ec);
  EXPECT_TRUE(f) << path << ": " << ec.message();
  return std::shared_ptr<File>(std::move(f));
}

// The lock bytes (100-103, 200-203) that some other open holds.
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

std::byte pattern(uint64_t off) { return static_cast<std::byte>((off * 7 + off / 4099) & 0xff); }

class Reopen : public ::testing::Test {
 protected:
  TempDir dir_;
};

TEST_F(Reopen, FileSwitchesModeInPlace) {
  std::string path = dir_ / "f.raw";
  run("truncate -s 1M " + q(path));
  auto f = open_mode(path, OpenMode::ReadOnly);
  std::byte b[4] = {std::byte{1}, std::byte{2}, std::byte{3}, std::byte{4}};
  EXPECT_FALSE(f->writable());
  EXPECT_TRUE(f->pwrite(b, 0));  // EBADF
  ASSERT_FALSE(f->reopen(OpenMode::ReadWrite));
  EXPECT_TRUE(f->writable());
  ASSERT_FALSE(f->pwrite(b, 4096));
  ASSERT_FALSE(f->flush());
  ASSERT_FALSE(f->reopen(OpenMode::ReadOnly));
  EXPECT_FALSE(f->writable());
  EXPECT_EQ(f->pwrite(b, 0), std::make_error_code(std::errc::bad_file_descriptor));
  std::byte r[4];
  ASSERT_FALSE(f->pread(r, 4096));
  EXPECT_EQ(std::memcmp(r, b, 4), 0);
  // Reopening to the mode it has is fine too.
  EXPECT_FALSE(f->reopen(OpenMode::ReadOnly));
}

TEST_F(Reopen, FileThatCannotBeWrittenStaysAsItWas) {
  std::string path = dir_ / "ro.raw";
  run("truncate -s 64K " + q(path));
  ::chmod(path.c_str(), 0444);
  if (::geteuid() == 0 && sh("chattr +i " + q(path) + " 2>&1").find_first_not_of(" \n") != std::string::npos)
    GTEST_SKIP() << "running as root and chattr +i is unavailable";
  auto f = open_mode(path, OpenMode::ReadOnly);
  ASSERT_FALSE(f->lock(kReader, nullptr));
  std::error_code ec = f->reopen(OpenMode::ReadWrite);
  (void)sh("chattr -i " + q(path));
  EXPECT_TRUE(ec == std::errc::permission_denied || ec == std::errc::operation_not_permitted ||
              ec == std::errc::read_only_file_system)
      << ec.message();
  EXPECT_FALSE(f->writable());
  std::byte r[16];
  EXPECT_FALSE(f->pread(r, 0));
  EXPECT_EQ(locked_bytes(path), (std::set<int>{100, 201, 203}));
}

TEST_F(Reopen, LocksStayHeldAcrossReopen) {
  std::string path = dir_ / "a.qcow2";
  run("qemu-img create -q -f qcow2 " + q(path) + " 1M");
  auto f = open_mode(path, OpenMode::ReadOnly);
  ASSERT_FALSE(f->lock(kReader, nullptr));
  ASSERT_FALSE(f->reopen(OpenMode::ReadWrite));
  // The reader's bytes survived the switch of descriptions...
  EXPECT_EQ(locked_bytes(path), (std::set<int>{100, 201, 203}));
  // ...and lock() still works on them: take the writer's locks.
  ASSERT_FALSE(f->lock(kWriter, nullptr));
  EXPECT_EQ(locked_bytes(path), (std::set<int>{100, 101, 103, 201, 203}));
  int status = 0;
  std::string out = sh("qemu-io -c 'write 0 4k' " + q(path), &status);
  EXPECT_NE(status, 0);
  EXPECT_NE(out.find("lock"), std::string::npos) << out;
  // Another open in this process conflicts as well.
  auto other = open_mode(path, OpenMode::ReadOnly);
  EXPECT_EQ(other->lock(kReader, nullptr), kConflict);
  // Back to read-only with the writer's locks still held: still refused.
  ASSERT_FALSE(f->reopen(OpenMode::ReadOnly));
  EXPECT_EQ(locked_bytes(path), (std::set<int>{100, 101, 103, 201, 203}));
  out = sh("qemu-io -c 'write 0 4k' " + q(path), &status);
  EXPECT_NE(status, 0) << out;
  ASSERT_FALSE(f->lock(kReader, nullptr));
  EXPECT_FALSE(other->lock(kReader, nullptr));
  run("qemu-img info " + q(path));
  // Reopen again after a lock change: the locks stay on the first open.
  ASSERT_FALSE(f->reopen(OpenMode::ReadWrite));
  EXPECT_EQ(f->lock(kWriter, nullptr), kConflict);  // `other` shares no write
  other.reset();
  ASSERT_FALSE(f->lock(kWriter, nullptr));
  f.reset();  // closing the File releases everything
  EXPECT_TRUE(locked_bytes(path).empty());
}

TEST_F(Reopen, MemoryFileRefusesWritesWhileReadOnly) {
  auto f = make_memory_file(4096);
  std::byte b[4] = {};
  ASSERT_FALSE(f->reopen(OpenMode::ReadOnly));
  EXPECT_FALSE(f->writable());
  EXPECT_TRUE(f->pwrite(b, 0));
  EXPECT_TRUE(f->truncate(0));
  ASSERT_FALSE(f->reopen(OpenMode::ReadWrite));
  EXPECT_FALSE(f->pwrite(b, 0));
}

// A reader thread verifies every byte it reads while the main thread turns
// the image writable, writes (elsewhere), and turns it back, many times.
TEST_F(Reopen, ReadsNeverFailWhileTheImageIsReopened) {
  std::string path = dir_ / "img.qcow2";
  run("qemu-img create -q -f qcow2 " + q(path) + " 8M");
  constexpr uint64_t kVerified = 4 << 20;  // [0, 4M) holds the pattern
  {
    auto img = open_image(path, true);
    std::vector<std::byte> buf(kVerified);
    for (uint64_t i = 0; i < buf.size(); ++i) buf[i] = pattern(i);
    ASSERT_FALSE(img->write(0, buf, zero_below()));
    ASSERT_FALSE(img->close());
  }
  auto file = open_mode(path, OpenMode::ReadOnly);
  ASSERT_FALSE(file->lock(kReader, nullptr));
  std::unique_ptr<Image> img;
  OpenOptions o;
  o.read_only = true;
  o.l2_cache_bytes = 64 << 10;  // small: tables are loaded again and again
  ASSERT_TRUE(Image::open(file, o, &img).ok());
  ASSERT_TRUE(img->read_only());

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> reads{0}, failures{0};
  std::thread reader([&] {
    std::mt19937_64 rng(7);
    std::vector<std::byte> buf(70000);
    while (!stop || reads < 200) {
      uint64_t len = 1 + rng() % buf.size();
      uint64_t off = rng() % (kVerified - len);
      if (img->read(off, std::span(buf.data(), len), zero_below())) {
        ++failures;
      } else {
        for (uint64_t i = 0; i < len; ++i)
          if (buf[i] != pattern(off + i)) {
            ++failures;
            break;
          }
      }
      ++reads;
    }
  });
  std::vector<std::byte> w(100000);
  for (int round = 0; round < 40; ++round) {
    ASSERT_FALSE(file->reopen(OpenMode::ReadWrite));
    ASSERT_FALSE(file->lock(kWriter, nullptr));
    Status st = img->reopen_read_write();
    ASSERT_TRUE(st.ok()) << st.message();
    ASSERT_FALSE(img->read_only());
    std::memset(w.data(), round + 1, w.size());
    ASSERT_FALSE(img->write(kVerified + (round % 30) * w.size(), w, zero_below()));
    st = img->reopen_read_only();
    ASSERT_TRUE(st.ok()) << st.message();
    ASSERT_TRUE(img->read_only());
    EXPECT_FALSE(img->dirty());
    EXPECT_EQ(img->write(kVerified, w, zero_below()),
              std::make_error_code(std::errc::operation_not_permitted));
    ASSERT_FALSE(file->lock(kReader, nullptr));
    ASSERT_FALSE(file->reopen(OpenMode::ReadOnly));
  }
  stop = true;
  reader.join();
  EXPECT_EQ(failures, 0u) << "of " << reads << " reads";
  img.reset();
  file.reset();
  qemu_check_clean(path);
  auto raw = qemu_raw(path, dir_.path());
  for (uint64_t i = 0; i < kVerified; ++i)
    ASSERT_EQ(raw[i], pattern(i)) << i;
  for (int slot = 0; slot < 30; ++slot) {
    int last = slot + 30 < 40 ? slot + 31 : slot + 1;  // the last round writing it
    EXPECT_EQ(raw[kVerified + slot * w.size()], std::byte(last)) << slot;
  }
}

TEST_F(Reopen, ReadWriteNeedsAWritableFile) {
  std::string path = dir_ / "img.qcow2";
  run("qemu-img create -q -f qcow2 " + q(path) + " 1M");
  auto img = open_image(path, false);
  Status st = img->reopen_read_write();
  EXPECT_EQ(st.code(), std::errc::invalid_argument);
  EXPECT_TRUE(img->read_only());
  // Reopening an already read-only image read-only changes nothing.
  EXPECT_TRUE(img->reopen_read_only().ok());
}

TEST_F(Reopen, ReadWriteRepairsADirtyImage) {
  std::string path = dir_ / "img.qcow2";
  run("qemu-img create -q -f qcow2 " + q(path) + " 1M");
  run("qemu-io -c 'write -P 3 0 64k' " + q(path));
  patch64(path, 72, peek(path, 72, 8) | 1);  // dirty
  auto file = open_mode(path, OpenMode::ReadOnly);
  std::unique_ptr<Image> img;
  OpenOptions o;
  o.read_only = true;
  ASSERT_TRUE(Image::open(file, o, &img).ok());
  EXPECT_TRUE(img->dirty());
  ASSERT_FALSE(file->reopen(OpenMode::ReadWrite));
  Status st = img->reopen_read_write();
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_FALSE(img->dirty());
  EXPECT_EQ(peek(path, 72, 8) & 1, 0u);
  ASSERT_FALSE(img->close());
  qemu_check_clean(path);
}

TEST_F(Reopen, ACorruptImageStaysReadOnly) {
  std::string path = dir_ / "img.qcow2";
  run("qemu-img create -q -f qcow2 " + q(path) + " 1M");
  patch64(path, 72, peek(path, 72, 8) | 2);  // corrupt
  auto file = open_mode(path, OpenMode::ReadOnly);
  std::unique_ptr<Image> img;
  OpenOptions o;
  o.read_only = true;
  ASSERT_TRUE(Image::open(file, o, &img).ok());
  ASSERT_FALSE(file->reopen(OpenMode::ReadWrite));
  EXPECT_EQ(img->reopen_read_write().code(), std::errc::invalid_argument);
  EXPECT_TRUE(img->read_only());
}

TEST_F(Reopen, BitmapsRecordAgainAfterEveryReopen) {
  std::string path = dir_ / "img.qcow2";
  run("qemu-img create -q -f qcow2 " + q(path) + " 4M");
  run("qemu-img bitmap --add " + q(path) + " b0");
  auto file = open_mode(path, OpenMode::ReadOnly);
  std::unique_ptr<Image> img;
  OpenOptions o;
  o.read_only = true;
  ASSERT_TRUE(Image::open(file, o, &img).ok());
  ASSERT_EQ(img->bitmaps().size(), 1u);
  EXPECT_FALSE(img->bitmaps()[0].recording);
  std::vector<std::byte> w(65536, std::byte{9});
  for (int round = 0; round < 3; ++round) {
    ASSERT_FALSE(file->reopen(OpenMode::ReadWrite));
    ASSERT_TRUE(img->reopen_read_write().ok());
    ASSERT_EQ(img->bitmaps().size(), 1u);
    EXPECT_TRUE(img->bitmaps()[0].recording);
    EXPECT_NE(sh("qemu-img info -U " + q(path)).find("in-use"), std::string::npos);
    ASSERT_FALSE(img->write(uint64_t(round) << 20, w, zero_below()));
    ASSERT_TRUE(img->reopen_read_only().ok());
    EXPECT_FALSE(img->bitmaps()[0].recording);
    ASSERT_FALSE(file->reopen(OpenMode::ReadOnly));
    std::string info = sh("qemu-img info -U " + q(path));
    EXPECT_EQ(info.find("in-use"), std::string::npos) << info;
    EXPECT_FALSE(img->dirty());
  }
  img.reset();
  file.reset();
  qemu_check_clean(path);
  // Every round's write is in the bitmap on disk, nothing else.
  auto ro = open_image(path, false);
  for (int round = 0; round < 4; ++round) {
    DirtyExtent e;
    ASSERT_FALSE(ro->dirty_status("b0", uint64_t(round) << 20, 65536, &e));
    EXPECT_EQ(e.dirty, round < 3) << round;
  }
}

}  // namespace
}  // namespace layerd::qcow2::test
