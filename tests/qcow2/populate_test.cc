// Image::populate, the write of copy-on-read and streaming: it fills only
// clusters that are wholly unallocated, turns zero data into zero clusters,
// and never overwrites what a client wrote, whichever comes first.
#include <atomic>
#include <thread>

#include "tests/qcow2/test_util.h"

namespace layerd::qcow2::test {
namespace {

constexpr uint64_t kCluster = 65536;

std::vector<std::byte> filled(size_t n, uint8_t v) {
  return std::vector<std::byte>(n, std::byte{v});
}

std::string qemu_map(const std::string& img) {
  return run("qemu-img map --output=json -U '" + img + "'");
}

TEST(Populate, FillsOnlyWhollyUnallocatedClusters) {
  TempDir d;
  const std::string img = d / "top.qcow2";
  run("qemu-img create -q -f qcow2 '" + img + "' 1M");
  run("qemu-io -c 'write -P 0x11 64k 4k' -c 'write -z 128k 64k' '" + img + "'");
  {
    auto image = open_image(img, true);
    auto data = filled(4 * kCluster, 0xaa);
    ASSERT_FALSE(image->populate(0, data));
    ASSERT_FALSE(image->close());
  }
  qemu_check_clean(img);
  // Cluster 0 and 3 take the new data; 1 keeps its data (and its
  // copy-on-write zeros), 2 stays a zero cluster.
  run("qemu-io -c 'read -P 0xaa 0 64k' -c 'read -P 0x11 64k 4k' "
      "-c 'read -P 0 68k 60k' -c 'read -P 0 128k 64k' -c 'read -P 0xaa 192k 64k' "
      "-c 'read -P 0 256k 768k' '" + img + "'");
}

TEST(Populate, ZeroDataBecomesZeroClustersWithoutSpace) {
  TempDir d;
  const std::string img = d / "top.qcow2";
  run("qemu-img create -q -f qcow2 '" + img + "' 4M");
  const auto before = std::filesystem::file_size(img);
  {
    auto image = open_image(img, true);
    ASSERT_FALSE(image->populate(0, filled(16 * kCluster, 0)));
    ASSERT_FALSE(image->close());
  }
  qemu_check_clean(img);
  // Only an L2 table was added (at the next cluster boundary), no data.
  EXPECT_LE(std::filesystem::file_size(img), before + 2 * kCluster);
  std::string map = qemu_map(img);
  EXPECT_NE(map.find("\"length\": 1048576, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false"),
            std::string::npos) << map;
}

TEST(Populate, AcceptsTheLastClusterPastTheEnd) {
  TempDir d;
  const std::string img = d / "odd.qcow2";
  run("qemu-img create -q -f qcow2 '" + img + "' 100000");
  {
    auto image = open_image(img, true);
    ASSERT_FALSE(image->populate(0, filled(2 * kCluster, 0x5c)));
    EXPECT_TRUE(image->populate(2 * kCluster, filled(kCluster, 1)));  // beyond
    EXPECT_TRUE(image->populate(100, filled(kCluster, 1)));           // unaligned
    ASSERT_FALSE(image->close());
  }
  qemu_check_clean(img);
  run("qemu-io -c 'read -P 0x5c 0 100000' '" + img + "'");
}

TEST(Populate, ReadOnlyImageRefuses) {
  TempDir d;
  const std::string img = d / "ro.qcow2";
  run("qemu-img create -q -f qcow2 '" + img + "' 1M");
  auto image = open_image(img, false);
  EXPECT_EQ(image->populate(0, filled(kCluster, 1)),
            std::make_error_code(std::errc::operation_not_permitted));
}

// A client write racing with populate on the same cluster always wins:
// populate never maps its (older) data over a cluster a write has mapped,
// and a write after populate overwrites populate's data in place.
TEST(Populate, RacingWritesAlwaysWin) {
  TempDir d;
  const std::string img = d / "race.qcow2";
  constexpr uint64_t kClusters = 256;
  run("qemu-img create -q -f qcow2 '" + img + "' " + std::to_string(kClusters * kCluster));
  auto image = open_image(img, true);
  std::atomic<uint64_t> next{0};
  std::thread populator([&] {
    auto old = filled(kCluster, 0x01);
    for (int round = 0; round < 3; ++round)
      for (uint64_t c = 0; c < kClusters; ++c)
        (void)image->populate(c * kCluster, old);
  });
  std::thread writer([&] {
    for (uint64_t c; (c = next.fetch_add(1)) < kClusters;) {
      auto data = filled(4096, static_cast<uint8_t>(0x80 | (c & 0x7f)));
      ASSERT_FALSE(image->write(c * kCluster + 4096, data, zero_below()));
    }
  });
  writer.join();
  populator.join();
  for (uint64_t c = 0; c < kClusters; ++c) {
    std::vector<std::byte> got(4096);
    ASSERT_FALSE(image->read(c * kCluster + 4096, got, zero_below()));
    ASSERT_EQ(got, filled(4096, static_cast<uint8_t>(0x80 | (c & 0x7f))))
        << "cluster " << c;
  }
  ASSERT_FALSE(image->close());
  qemu_check_clean(img);
}

}  // namespace
}  // namespace layerd::qcow2::test
