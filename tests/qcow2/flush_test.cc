// Image::flush syncs data without the metadata lock: while its fdatasync
// waits for the disk, reads (and in-place writes) of the image go on.
#include <condition_variable>
#include <future>
#include <mutex>
#include <thread>

#include "tests/qcow2/forwarding_file.h"
#include "tests/qcow2/test_util.h"

namespace layerd::qcow2::test {
namespace {

// Forwards to a file; while held, flush() blocks until release(), from the
// `skip`-th call on (0: the first).
class HeldFlushFile final : public ForwardingFile {
 public:
  using ForwardingFile::ForwardingFile;
  void hold(int skip = 0) {
    std::lock_guard l(m_);
    held_ = true;
    skip_ = skip;
  }
  void release() { std::lock_guard l(m_); held_ = false; cv_.notify_all(); }
  // Waits until a flush is blocked in this file.
  bool wait_blocked() {
    std::unique_lock l(m_);
    return cv_.wait_for(l, std::chrono::seconds(10), [&] { return blocked_ > 0; });
  }

  std::error_code flush() override {
    std::unique_lock l(m_);
    if (skip_ > 0) {
      --skip_;
      l.unlock();
      return ForwardingFile::flush();
    }
    ++blocked_;
    cv_.notify_all();
    cv_.wait(l, [&] { return !held_; });
    --blocked_;
    l.unlock();
    return ForwardingFile::flush();
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  bool held_ = false;
  int skip_ = 0;
  int blocked_ = 0;
};

// Each sync of a flush (the data's; the refcount blocks' before the L2
// tables go out; the last) may be the one the disk is slow on.
class Flush : public ::testing::TestWithParam<int> {};

TEST_P(Flush, ReadsAndOverwritesGoOnWhileASyncWaits) {
  TempDir d;
  const std::string img = d / "img.qcow2";
  run("qemu-img create -q -f qcow2 '" + img + "' 4M");
  run("qemu-io -c 'write -P 0x5a 0 1M' '" + img + "'");
  auto file = std::make_shared<HeldFlushFile>(open_file(img, true));
  std::unique_ptr<Image> image;
  ASSERT_TRUE(Image::open(file, OpenOptions{}, &image).ok());
  // New metadata to write back, so that the flush has real work.
  std::vector<std::byte> data(65536, std::byte{0x77});
  ASSERT_FALSE(image->write(2 << 20, data, zero_below()));

  file->hold(GetParam());
  auto flushed = std::async(std::launch::async, [&] { return image->flush(); });
  ASSERT_TRUE(file->wait_blocked());
  // The flush waits for the disk: the image still answers.
  auto reader = std::async(std::launch::async, [&] {
    std::vector<std::byte> buf(65536);
    std::error_code ec = image->read(0, buf, zero_below());
    if (!ec) ec = image->write(0, data, zero_below());  // in place: no allocation
    return ec;
  });
  ASSERT_EQ(reader.wait_for(std::chrono::seconds(10)), std::future_status::ready)
      << "a read waited for the flush's sync";
  EXPECT_FALSE(reader.get());
  file->release();
  EXPECT_FALSE(flushed.get());
  ASSERT_FALSE(image->close());
  qemu_check_clean(img);
  run("qemu-io -c 'read -P 0x77 0 64k' -c 'read -P 0x5a 64k 960k' -c 'read -P 0x77 2M 64k' '" +
      img + "'");
}

INSTANTIATE_TEST_SUITE_P(EverySync, Flush, ::testing::Values(0, 1, 2));

}  // namespace
}  // namespace layerd::qcow2::test
