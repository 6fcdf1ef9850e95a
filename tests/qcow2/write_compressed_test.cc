// Image::write_compressed against qemu: what it writes reads back the same
// in qemu-img (compare with a raw copy of the data), `qemu-img check` is
// clean and counts the clusters as compressed, and the image stays
// consistent when compressed clusters are overwritten, by compressed and
// ordinary writes, concurrently.
#include <thread>

#include "tests/qcow2/test_util.h"

namespace layerd::qcow2::test {
namespace {

// Data that compresses: runs of one byte value, changing every 4 KiB.
std::vector<std::byte> compressible(size_t n, uint8_t seed) {
  std::vector<std::byte> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = std::byte(uint8_t(seed + i / 4096));
  return v;
}

std::vector<std::byte> random_bytes(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<std::byte> v(n);
  for (auto& b : v) b = std::byte(uint8_t(rng()));
  return v;
}

void write_raw(const std::string& path, uint64_t off, const std::vector<std::byte>& d) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(static_cast<std::streamoff>(off));
  f.write(reinterpret_cast<const char*>(d.data()), static_cast<std::streamsize>(d.size()));
}

// qemu-img check's "N/M = X% allocated, Y% fragmented, Z% compressed".
double compressed_percent(const std::string& img) {
  std::string out = run("LC_ALL=C qemu-img check '" + img + "'");
  size_t p = out.find("% compressed clusters");
  if (p == std::string::npos) return -1;
  size_t s = out.rfind(' ', p);
  return std::stod(out.substr(s + 1, p - s - 1));
}

class WriteCompressed : public testing::TestWithParam<std::string> {
 protected:
  void make(uint64_t size) {
    run("qemu-img create -q -f qcow2 " + GetParam() + " '" + img_ + "' " +
        std::to_string(size));
    run("truncate -s " + std::to_string(size) + " '" + raw_ + "'");
  }
  void write_both(Image& image, uint64_t off, const std::vector<std::byte>& d) {
    ASSERT_FALSE(image.write_compressed(off, d)) << off;
    write_raw(raw_, off, d);
  }
  void expect_as_raw() {
    run("qemu-img compare -q -f qcow2 -F raw '" + img_ + "' '" + raw_ + "'");
    qemu_check_clean(img_);
  }
  TempDir dir_;
  std::string img_ = dir_ / "c.qcow2", raw_ = dir_ / "c.raw";
};

TEST_P(WriteCompressed, ReadsBackInQemuAndCountsAsCompressed) {
  make(4 << 20);
  {
    auto image = open_image(img_, true);
    const uint64_t cs = image->cluster_size();
    write_both(*image, 0, compressible(8 * cs, 1));
    write_both(*image, 20 * cs, compressible(cs, 7));
    EXPECT_EQ(read_all(*image), slurp(raw_));
    ASSERT_FALSE(image->close());
  }
  expect_as_raw();
  EXPECT_DOUBLE_EQ(compressed_percent(img_), 100.0);
}

TEST_P(WriteCompressed, PacksClustersIntoSharedHostClusters) {
  make(16 << 20);
  const uint64_t empty = std::filesystem::file_size(img_);
  uint64_t cs;
  {
    auto image = open_image(img_, true);
    cs = image->cluster_size();
    for (uint64_t c = 0; c < 64; ++c)
      write_both(*image, c * cs, compressible(cs, uint8_t(c)));
    ASSERT_FALSE(image->close());
  }
  expect_as_raw();
  // 64 clusters that compress to a few hundred bytes each fit in a few
  // host clusters, beside an L2 table and a refcount block or two.
  EXPECT_LT(std::filesystem::file_size(img_), empty + 12 * cs);
}

TEST_P(WriteCompressed, IncompressibleClustersAreWrittenAsOrdinaryOnes) {
  make(2 << 20);
  {
    auto image = open_image(img_, true);
    const uint64_t cs = image->cluster_size();
    write_both(*image, 0, random_bytes(cs, 1));
    write_both(*image, cs, compressible(cs, 3));
    ASSERT_FALSE(image->close());
  }
  expect_as_raw();
  EXPECT_DOUBLE_EQ(compressed_percent(img_), 50.0);
}

TEST_P(WriteCompressed, OverwritesAreCleanWhateverWasThere) {
  make(4 << 20);
  {
    auto image = open_image(img_, true);
    const uint64_t cs = image->cluster_size();
    write_both(*image, 0, compressible(4 * cs, 1));
    // A compressed cluster over a compressed one, over an ordinary one,
    // over a zero cluster.
    write_both(*image, cs, compressible(cs, 9));
    std::vector<std::byte> plain = random_bytes(2 * cs, 4);
    ASSERT_FALSE(image->write(4 * cs, plain, zero_below()));
    write_raw(raw_, 4 * cs, plain);
    write_both(*image, 5 * cs, compressible(cs, 11));
    ASSERT_FALSE(image->write_zeroes(6 * cs, cs, true, zero_below()));
    write_both(*image, 6 * cs, compressible(cs, 13));
    // An ordinary write into part of a compressed cluster.
    std::vector<std::byte> part = random_bytes(100, 5);
    ASSERT_FALSE(image->write(2 * cs + 7, part, zero_below()));
    write_raw(raw_, 2 * cs + 7, part);
    EXPECT_EQ(read_all(*image), slurp(raw_));
    ASSERT_FALSE(image->close());
  }
  expect_as_raw();
}

// The host cluster the next compressed cluster would be packed into is
// freed (its only compressed cluster overwritten) and reused for data.
TEST_P(WriteCompressed, FreedHostClusterIsNotPackedInto) {
  make(4 << 20);
  {
    auto image = open_image(img_, true);
    const uint64_t cs = image->cluster_size();
    write_both(*image, 0, compressible(cs, 1));
    std::vector<std::byte> plain = random_bytes(cs, 2);
    ASSERT_FALSE(image->write(0, plain, zero_below()));
    write_raw(raw_, 0, plain);
    ASSERT_FALSE(image->flush());  // the old host cluster is free now
    std::vector<std::byte> more = random_bytes(3 * cs, 3);
    ASSERT_FALSE(image->write(cs, more, zero_below()));
    write_raw(raw_, cs, more);
    write_both(*image, 4 * cs, compressible(cs, 5));
    EXPECT_EQ(read_all(*image), slurp(raw_));
    ASSERT_FALSE(image->close());
  }
  expect_as_raw();
}

TEST_P(WriteCompressed, LastClusterMayEndAtTheEndOfTheDisk) {
  const uint64_t size = (1 << 20) + 1536;
  make(size);
  {
    auto image = open_image(img_, true);
    const uint64_t cs = image->cluster_size();
    const uint64_t last = size / cs * cs;
    write_both(*image, last, compressible(size - last, 2));
    ASSERT_FALSE(image->close());
  }
  expect_as_raw();
}

TEST_P(WriteCompressed, RefusesWhatIsNotWholeClusters) {
  make(1 << 20);
  auto image = open_image(img_, true);
  const uint64_t cs = image->cluster_size();
  const auto einval = std::make_error_code(std::errc::invalid_argument);
  EXPECT_EQ(image->write_compressed(cs / 2, compressible(cs, 1)), einval);
  EXPECT_EQ(image->write_compressed(0, compressible(cs + cs / 2, 1)), einval);
  EXPECT_EQ(image->write_compressed(0, compressible(cs / 2, 1)), einval);
  EXPECT_EQ(image->write_compressed((1 << 20) - cs, compressible(2 * cs, 1)), einval);
  ASSERT_FALSE(image->close());
  qemu_check_clean(img_);
}

TEST_P(WriteCompressed, ConcurrentWritersKeepRefcountsExact) {
  make(8 << 20);
  {
    auto image = open_image(img_, true);
    const uint64_t cs = image->cluster_size();
    const uint64_t clusters = 24;
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t)
      threads.emplace_back([&, t] {
        for (int round = 0; round < 6; ++round)
          for (uint64_t c = t; c < clusters; c += 4) {
            auto d = compressible(cs, uint8_t(c + round));
            EXPECT_FALSE(round % 3 == 2 ? image->write(c * cs, d, zero_below())
                                        : image->write_compressed(c * cs, d));
          }
      });
    for (auto& th : threads) th.join();
    // The final round (5) was compressed everywhere.
    for (uint64_t c = 0; c < clusters; ++c) write_raw(raw_, c * cs, compressible(cs, uint8_t(c + 5)));
    ASSERT_FALSE(image->close());
  }
  expect_as_raw();
}

INSTANTIATE_TEST_SUITE_P(Formats, WriteCompressed,
                         testing::Values("-o cluster_size=65536",
                                         "-o cluster_size=4096",
                                         "-o compression_type=zstd",
                                         "-o cluster_size=65536,extended_l2=on",
                                         "-o compat=0.10,cluster_size=512"));

}  // namespace
}  // namespace layerd::qcow2::test
