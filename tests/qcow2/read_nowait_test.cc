// Image::read_nowait: the same bytes as read() when everything is in
// memory, and "would block" (never a wrong answer) when it is not.
#include <gtest/gtest.h>

#include "test_util.h"

namespace layerd::qcow2::test {
namespace {

const auto kWouldBlock = std::make_error_code(std::errc::resource_unavailable_try_again);

TEST(ReadNowait, CachedDataZerosAndBackingReadLikeRead) {
  TempDir d;
  std::string img = d / "a.qcow2";
  run("qemu-img create -q -f qcow2 '" + img + "' 4M");
  run("qemu-io -f qcow2 '" + img + "' -c 'write -P 0x3c 0 1M' -c 'write -z 1M 64k'");
  auto image = open_image(img, false);
  ASSERT_TRUE(image);
  std::vector<std::byte> want(2 << 20), got(2 << 20);
  int below_calls = 0;
  auto below = [&](uint64_t, std::span<std::byte> b) {
    ++below_calls;
    std::fill(b.begin(), b.end(), std::byte{0x77});
    return std::error_code{};
  };
  ASSERT_FALSE(image->read(0, want, below));  // loads the L2 table
  // The file was just read, so its pages are cached.
  ASSERT_FALSE(image->read_nowait(0, got, below));
  EXPECT_EQ(got, want);
  EXPECT_EQ(got[0], std::byte{0x3c});
  EXPECT_EQ(got[(1 << 20) + 5], std::byte{0});      // zero cluster
  EXPECT_EQ(got[(1 << 20) + 65536], std::byte{0x77});  // from below
  EXPECT_GT(below_calls, 1);
}

TEST(ReadNowait, UncachedMappingWouldBlockInsteadOfLoading) {
  TempDir d;
  std::string img = d / "a.qcow2";
  run("qemu-img create -q -f qcow2 '" + img + "' 4M");
  run("qemu-io -f qcow2 '" + img + "' -c 'write -P 0x3c 0 64k'");
  auto image = open_image(img, false);
  ASSERT_TRUE(image);
  std::vector<std::byte> buf(4096);
  EXPECT_EQ(image->read_nowait(0, buf, zero_below()), kWouldBlock);
  ASSERT_FALSE(image->read(0, buf, zero_below()));
  EXPECT_FALSE(image->read_nowait(0, buf, zero_below()));
  EXPECT_EQ(buf[0], std::byte{0x3c});
}

TEST(ReadNowait, CompressedClustersWouldBlock) {
  TempDir d;
  std::string raw = d / "a.raw", img = d / "c.qcow2";
  run("qemu-img create -q -f raw '" + raw + "' 1M");
  run("qemu-io -f raw '" + raw + "' -c 'write -P 0x5a 0 1M'");
  run("qemu-img convert -c -O qcow2 '" + raw + "' '" + img + "'");
  auto image = open_image(img, false);
  ASSERT_TRUE(image);
  std::vector<std::byte> buf(4096);
  ASSERT_FALSE(image->read(0, buf, zero_below()));
  EXPECT_EQ(image->read_nowait(0, buf, zero_below()), kWouldBlock);
}

TEST(ReadNowait, OutOfRangeIsInvalid) {
  TempDir d;
  std::string img = d / "a.qcow2";
  run("qemu-img create -q -f qcow2 '" + img + "' 1M");
  auto image = open_image(img, false);
  std::vector<std::byte> buf(16);
  EXPECT_EQ(image->read_nowait((1 << 20) - 8, buf, zero_below()),
            std::errc::invalid_argument);
}

}  // namespace
}  // namespace layerd::qcow2::test
