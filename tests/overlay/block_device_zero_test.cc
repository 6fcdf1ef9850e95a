// Zeroing a raw block device with --discard=unmap: a device's BLKDISCARD
// may leave the old data in place (many SSDs and thin volumes do), so a
// WRITE_ZEROES that may trim must still read back as zeros, and a TRIM
// still discards. Runs on a loop device (needs root and /dev/loop-control;
// skipped with a message otherwise) whose discard is made to keep data by
// the ioctl hook below.
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "overlay/raw_layer.h"
#include "qcow2/file.h"

// Test hook: BLKDISCARD succeeds and changes nothing (a device that
// keeps discarded data), and is counted. Defined in the test binary, it
// takes the place of libc's ioctl for the statically linked layers.
static std::atomic<int> g_discards{0};
extern "C" int ioctl(int fd, unsigned long request, ...) {
  va_list ap;
  va_start(ap, request);
  void* arg = va_arg(ap, void*);
  va_end(ap);
  if (request == BLKDISCARD) {
    ++g_discards;
    return 0;
  }
  return static_cast<int>(::syscall(SYS_ioctl, fd, request, arg));
}

namespace layerd {
namespace {

constexpr uint64_t kSize = 8 << 20;

std::string shell(const std::string& cmd) {
  std::string out;
  if (FILE* p = ::popen(cmd.c_str(), "r")) {
    char buf[256];
    while (std::fgets(buf, sizeof buf, p)) out += buf;
    ::pclose(p);
  }
  while (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

class LoopDevice : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0 || ::access("/dev/loop-control", F_OK) != 0)
      GTEST_SKIP() << "needs root and loop devices (losetup)";
    char tmpl[] = "/var/tmp/layerd-loop-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    backing_ = dir_ + "/dev.img";
    shell("truncate -s " + std::to_string(kSize) + " '" + backing_ + "'");
    device_ = shell("losetup -f --show '" + backing_ + "' 2>/dev/null");
    if (device_.rfind("/dev/loop", 0) != 0)
      GTEST_SKIP() << "losetup could not attach a loop device here";
    FileOptions fo;
    fo.mode = OpenMode::ReadWrite;
    std::error_code ec;
    file_ = std::shared_ptr<File>(open_posix_file(device_, fo, ec));
    ASSERT_FALSE(ec) << device_ << ": " << ec.message();
    layer_ = make_raw_layer(file_, RawLayerOptions{.size = file_->size()});
    std::vector<std::byte> data(kSize, std::byte{0xab});
    ASSERT_FALSE(file_->pwrite(data, 0));
    ASSERT_FALSE(file_->flush());
  }
  void TearDown() override {
    layer_.reset();
    file_.reset();
    if (!device_.empty()) shell("losetup -d '" + device_ + "'");
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }
  std::vector<std::byte> read(uint64_t offset, uint64_t length) {
    std::vector<std::byte> buf(length);
    EXPECT_FALSE(file_->pread(buf, offset));
    return buf;
  }

  std::string dir_, backing_, device_;
  std::shared_ptr<File> file_;
  std::shared_ptr<Layer> layer_;
};

TEST_F(LoopDevice, WriteZeroesThatMayTrimReadsAsZeros) {
  ASSERT_FALSE(layer_->write_zeroes(1 << 20, 2 << 20, ZeroFlags{.may_trim = true}));
  const std::vector<std::byte> zeros(2 << 20);
  EXPECT_TRUE(read(1 << 20, 2 << 20) == zeros) << "old data after WRITE_ZEROES";
  EXPECT_EQ(read(0, 1 << 20), std::vector<std::byte>(1 << 20, std::byte{0xab}));
  EXPECT_EQ(read(3 << 20, 1 << 20), std::vector<std::byte>(1 << 20, std::byte{0xab}));
}

TEST_F(LoopDevice, WriteZeroesWithoutTrimReadsAsZeros) {
  ASSERT_FALSE(layer_->write_zeroes(4096, 65536, ZeroFlags{}));
  EXPECT_TRUE(read(4096, 65536) == std::vector<std::byte>(65536));
}

TEST_F(LoopDevice, TrimStillDiscards) {
  const int before = g_discards;
  ASSERT_FALSE(layer_->trim(0, 1 << 20, false));
  EXPECT_EQ(g_discards, before + 1);
}

}  // namespace
}  // namespace layerd
