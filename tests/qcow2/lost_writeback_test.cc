// A write-back the kernel failed fails every later flush of the file: the
// kernel reports such an error once per descriptor and marks the pages
// clean, so without memory of it the next fdatasync would succeed over
// data that never reached the disk. The storage here is a loop device
// whose backing file lives on a full tmpfs: its write-back fails with an
// I/O error (as a dying disk's would). Needs root, loop devices and mount;
// skips otherwise.
#include <sys/mount.h>

#include <cstring>

#include "tests/qcow2/test_util.h"

namespace layerd::qcow2::test {
namespace {

class LostWriteBack : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::mount("none", dir_.path().c_str(), "tmpfs", 0, "size=2M") != 0)
      GTEST_SKIP() << "cannot mount a tmpfs: " << std::strerror(errno);
    mounted_ = true;
    const std::string backing = dir_ / "backing";
    int st = 0;
    std::string out = sh("truncate -s 64M '" + backing + "' && losetup -f --show '" + backing + "'", &st);
    if (st != 0) GTEST_SKIP() << "no loop device: " << out;
    device_ = out.substr(0, out.find('\n'));
  }
  void TearDown() override {
    file_.reset();
    if (!device_.empty()) sh("losetup -d '" + device_ + "'");
    if (mounted_) ::umount2(dir_.path().c_str(), MNT_DETACH);
  }
  // Opens the device and writes 8 MiB through the page cache: more than
  // the tmpfs under it can hold.
  File& written_file() {
    file_ = open_file(device_, true);
    std::vector<std::byte> data(8 << 20, std::byte{0x5c});
    EXPECT_FALSE(file_->pwrite(data, 0));
    return *file_;
  }

  TempDir dir_;
  bool mounted_ = false;
  std::string device_;
  std::shared_ptr<File> file_;
};

TEST_F(LostWriteBack, AFailedFlushFailsEveryLaterFlush) {
  File& f = written_file();
  EXPECT_TRUE(f.flush()) << "the write-back of 8 MiB into 2 MiB should fail";
  EXPECT_TRUE(f.flush()) << "a second flush must not succeed over lost writes";
  std::vector<std::byte> page(4096, std::byte{1});
  ASSERT_FALSE(f.pwrite(page, 0));
  EXPECT_TRUE(f.flush());
}

TEST_F(LostWriteBack, AFailedWriteBackInStepsFailsTheFlushAfterIt) {
  File& f = written_file();
  EXPECT_TRUE(f.write_back_in_steps());
  EXPECT_TRUE(f.flush()) << "the flush after a failed write-back must fail";
}

}  // namespace
}  // namespace layerd::qcow2::test
