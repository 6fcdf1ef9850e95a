// Image::grow: a larger virtual disk (qemu-img resize semantics, growing
// only), with a larger L1 table when needed; QEMU reads the result.
#include "tests/qcow2/faulty_file.h"
#include "test_util.h"

#include <fstream>

namespace layerd::qcow2::test {
namespace {

std::string q(const std::string& s) { return "'" + s + "'"; }

// Runs `grow` on a copy of `pristine` whose n-th pwrite from then on is a
// crash (nothing written after it), for n = 0, 1, ... until a run
// completes; after each, reopens the copy (which repairs a dirty image),
// hands it to `expect` with whether the run completed, and checks that it
// is clean.
template <class Grow, class Expect>
void kill_at_every_write(const std::vector<std::byte>& pristine, Grow grow, Expect expect,
                         int max_writes) {
  for (int n = 0;; ++n) {
    auto copy = std::shared_ptr<File>(make_memory_file());
    ASSERT_FALSE(copy->pwrite(pristine, 0));
    auto faulty = std::make_shared<FaultyFile>(copy);
    bool done;
    {
      std::unique_ptr<Image> img;
      ASSERT_TRUE(Image::open(faulty, {}, &img).ok());
      faulty->fail_pwrite_after(n, true);
      done = grow(*img);
    }
    std::unique_ptr<Image> img;
    Status st = Image::open(copy, {}, &img);  // repairs a dirty image
    ASSERT_TRUE(st.ok()) << n << ": " << st.message();
    ASSERT_NO_FATAL_FAILURE(expect(*img, done)) << "after a kill at write " << n;
    CheckReport rep;
    ASSERT_TRUE(img->check(Repair::None, &rep).ok());
    EXPECT_TRUE(rep.clean()) << n << ": " << (rep.messages.empty() ? "" : rep.messages[0]);
    if (done) break;
    ASSERT_LT(n, max_writes);
  }
}

class Grow : public ::testing::Test {
 protected:
  TempDir dir_;
  std::string img_ = dir_ / "img.qcow2";
};

TEST_F(Grow, WithinTheL1TableOnlyTheSizeChanges) {
  run("qemu-img create -q -f qcow2 " + q(img_) + " 1M");
  run("qemu-io -c 'write -P 1 0 1M' " + q(img_));
  uint64_t l1 = peek(img_, 40, 8);
  {
    auto img = open_image(img_, true);
    Status st = img->grow(100 << 20);
    ASSERT_TRUE(st.ok()) << st.message();
    EXPECT_EQ(img->size(), 100u << 20);
    EXPECT_EQ(img->info().virtual_size, 100u << 20);
    std::vector<std::byte> w(4096, std::byte{2});
    ASSERT_FALSE(img->write((100 << 20) - 4096, w, zero_below()));
  }
  EXPECT_EQ(peek(img_, 40, 8), l1);
  std::string out = run("qemu-img info --output=json " + q(img_));
  EXPECT_NE(out.find("\"virtual-size\": 104857600"), std::string::npos) << out;
  qemu_check_clean(img_);
  run("qemu-io -c 'read -P 1 0 1M' -c 'read -P 0 1M 103804928' "
      "-c 'read -P 2 104853504 4096' " + q(img_));
}

TEST_F(Grow, ALargerL1TableIsWrittenAndTheOldOneFreed) {
  // 512-byte clusters: each L2 table maps 32 KiB, the L1 of 1 MiB is 256
  // bytes; growing to 64 MiB needs 2048 entries (16 KiB of L1).
  run("qemu-img create -q -f qcow2 -o cluster_size=512 " + q(img_) + " 1M");
  run("qemu-io -c 'write -P 1 0 1M' " + q(img_));
  uint64_t l1 = peek(img_, 40, 8);
  {
    auto img = open_image(img_, true);
    Status st = img->grow(64 << 20);
    ASSERT_TRUE(st.ok()) << st.message();
    EXPECT_EQ(img->info().l1_size, 2048u);
    EXPECT_NE(img->info().l1_table_offset, l1);
    std::vector<std::byte> w(65536, std::byte{3});
    ASSERT_FALSE(img->write((64 << 20) - 65536, w, zero_below()));
    ASSERT_FALSE(img->write(0, std::span(w.data(), 512), zero_below()));
    CheckReport rep;
    ASSERT_TRUE(img->check(Repair::None, &rep).ok());
    EXPECT_TRUE(rep.clean()) << (rep.messages.empty() ? "" : rep.messages[0]);
  }
  EXPECT_EQ(peek(img_, 36, 4), 2048u);
  qemu_check_clean(img_);
  std::string out = run("qemu-img info --output=json " + q(img_));
  EXPECT_NE(out.find("\"virtual-size\": 67108864"), std::string::npos) << out;
  run("qemu-io -c 'read -P 3 0 512' -c 'read -P 1 512 1048064' -c 'read -P 0 1M 62M' "
      "-c 'read -P 3 67043328 65536' " + q(img_));
  // QEMU can go on from there.
  run("qemu-io -c 'write -P 4 40M 1M' " + q(img_));
  qemu_check_clean(img_);
}

TEST_F(Grow, TheNewAreaReadsFromBelow) {
  std::string base = dir_ / "base.qcow2";
  run("qemu-img create -q -f qcow2 " + q(base) + " 8M");
  run("qemu-io -c 'write -P 5 0 8M' " + q(base));
  run("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 " + q(img_) + " 4M");
  {
    auto img = open_image(img_, true);
    ASSERT_TRUE(img->grow(8 << 20).ok());
    MapExtent e;
    ASSERT_FALSE(img->block_status(4 << 20, 4 << 20, &e));
    EXPECT_EQ(e.kind, ExtentKind::Unallocated);
  }
  // As documented: unallocated, so the longer backing file shows through
  // (the caller zeroes it where QEMU would).
  run("qemu-io -c 'read -P 5 4M 4M' " + q(img_));
  qemu_check_clean(img_);
}

TEST_F(Grow, RefusesShrinkingSnapshotsAndReadOnlyImages) {
  run("qemu-img create -q -f qcow2 " + q(img_) + " 4M");
  {
    auto img = open_image(img_, true);
    EXPECT_EQ(img->grow(1 << 20).code(), std::errc::invalid_argument);
    EXPECT_TRUE(img->grow(4 << 20).ok());  // the same size: nothing to do
    EXPECT_EQ(img->size(), 4u << 20);
  }
  {
    auto img = open_image(img_, false);
    EXPECT_EQ(img->grow(8 << 20).code(), std::errc::invalid_argument);
  }
  run("qemu-img snapshot -c s " + q(img_));
  {
    auto img = open_image(img_, true);
    Status st = img->grow(8 << 20);
    EXPECT_EQ(st.code(), std::errc::invalid_argument);
    EXPECT_NE(st.message().find("snapshots"), std::string::npos);
    EXPECT_EQ(img->size(), 4u << 20);
  }
  std::string out = run("qemu-img info --output=json " + q(img_));
  EXPECT_NE(out.find("\"virtual-size\": 4194304"), std::string::npos) << out;
}

// A crash at any write of a growth that moves the L1 table leaves the old
// disk or the grown one, both readable, and nothing worse than leaks.
TEST(GrowCrash, AKillAtAnyWriteLeavesOldOrGrown) {
  CreateOptions co;
  co.size = 1 << 20;
  co.cluster_size = 512;
  auto mem = std::shared_ptr<File>(make_memory_file());
  ASSERT_TRUE(Image::create(*mem, co).ok());
  std::vector<std::byte> data(1 << 20);
  for (size_t i = 0; i < data.size(); ++i) data[i] = std::byte(i * 13 / 512);
  {
    std::unique_ptr<Image> img;
    ASSERT_TRUE(Image::open(mem, {}, &img).ok());
    ASSERT_FALSE(img->write(0, data, zero_below()));
    ASSERT_FALSE(img->close());
  }
  std::vector<std::byte> pristine(mem->size());
  ASSERT_FALSE(mem->pread(pristine, 0));
  kill_at_every_write(
      pristine, [](Image& img) { return img.grow(16 << 20).ok(); },
      [&](Image& img, bool done) {
        EXPECT_TRUE(img.size() == (1u << 20) || img.size() == (16u << 20));
        if (done) {
          EXPECT_EQ(img.size(), 16u << 20);
        }
        std::vector<std::byte> got(1 << 20);
        ASSERT_FALSE(img.read(0, got, zero_below()));
        EXPECT_EQ(got, data);
      },
      100);
}

// --- grow_reading_zeros ----------------------------------------------------

// What a longer backing file reads: never zero, so zeros in the gained
// area can only come from the image itself.
std::byte backing_byte(uint64_t offset) { return std::byte(0x80 | (offset / 512 % 127)); }
BelowReader pattern_below() {
  return [](uint64_t offset, std::span<std::byte> buf) {
    for (size_t i = 0; i < buf.size(); ++i) buf[i] = backing_byte(offset + i);
    return std::error_code{};
  };
}

// An image of `old_size` bytes, of `cluster_size` clusters, whose first
// half is its own data (0x5a) and whose second half reads from below.
struct ZeroGrowCase {
  uint64_t old_size;
  uint32_t cluster_size;
  bool extended_l2;
};

class GrowReadingZeros : public ::testing::TestWithParam<ZeroGrowCase> {
 protected:
  static constexpr uint64_t kNewSize = 8 << 20;
  std::shared_ptr<File> make_image() {
    const ZeroGrowCase& c = GetParam();
    CreateOptions co;
    co.size = c.old_size;
    co.cluster_size = c.cluster_size;
    co.extended_l2 = c.extended_l2;
    auto mem = std::shared_ptr<File>(make_memory_file());
    EXPECT_TRUE(Image::create(*mem, co).ok());
    std::unique_ptr<Image> img;
    EXPECT_TRUE(Image::open(mem, {}, &img).ok());
    std::vector<std::byte> own(c.old_size / 2, std::byte{0x5a});
    EXPECT_FALSE(img->write(0, own, pattern_below()));
    EXPECT_FALSE(img->close());
    return mem;
  }
  // What the image reads through the pattern below: its data, the
  // backing file up to the old end, zeros after it.
  void expect_content(Image& img, uint64_t size) {
    const uint64_t old = GetParam().old_size;
    ASSERT_EQ(img.size(), size);
    std::vector<std::byte> got(size);
    ASSERT_FALSE(img.read(0, got, pattern_below()));
    for (uint64_t i = 0; i < size; ++i) {
      const std::byte want = i < old / 2 ? std::byte{0x5a} : i < old ? backing_byte(i) : std::byte{0};
      ASSERT_EQ(got[i], want) << "at byte " << i << " of " << size << " (old size " << old << ")";
    }
  }
};

TEST_P(GrowReadingZeros, TheGainedAreaReadsZerosNotTheLongerBackingFile) {
  auto mem = make_image();
  {
    std::unique_ptr<Image> img;
    ASSERT_TRUE(Image::open(mem, {}, &img).ok());
    Status st = img->grow_reading_zeros(kNewSize, pattern_below());
    ASSERT_TRUE(st.ok()) << st.message();
    expect_content(*img, kNewSize);
    // Writes go on anywhere on the grown disk.
    std::vector<std::byte> w(4096, std::byte{7});
    ASSERT_FALSE(img->write(kNewSize - 4096, w, pattern_below()));
    ASSERT_FALSE(img->write(GetParam().old_size - 100, std::span(w.data(), 200), pattern_below()));
    CheckReport rep;
    ASSERT_TRUE(img->check(Repair::None, &rep).ok());
    EXPECT_TRUE(rep.clean()) << (rep.messages.empty() ? "" : rep.messages[0]);
    ASSERT_FALSE(img->close());
  }
  // QEMU, over a longer backing file, sees the same zeros.
  TempDir dir;
  const std::string back = dir / "back.raw", img = dir / "img.qcow2";
  {
    std::vector<std::byte> b(kNewSize);
    ASSERT_FALSE(pattern_below()(0, b));
    std::ofstream(back, std::ios::binary).write(reinterpret_cast<const char*>(b.data()),
                                                static_cast<std::streamsize>(b.size()));
    std::vector<std::byte> raw(mem->size());
    ASSERT_FALSE(mem->pread(raw, 0));
    std::ofstream(img, std::ios::binary).write(reinterpret_cast<const char*>(raw.data()),
                                               static_cast<std::streamsize>(raw.size()));
  }
  run("qemu-img rebase -u -F raw -b back.raw " + q(img));
  qemu_check_clean(img);
  const uint64_t old = GetParam().old_size;
  run("qemu-io -c 'read -P 0 " + std::to_string(old + 200) + " " +
      std::to_string(kNewSize - 4096 - old - 200) + "' -c 'read -P 7 " +
      std::to_string(kNewSize - 4096) + " 4096' " + q(img));
}

// A kill at any write leaves the old disk or the grown one, and the grown
// one never shows the backing file past the old end.
TEST_P(GrowReadingZeros, AKillAtAnyWriteLeavesTheOldDiskOrTheGrownOneWithZeros) {
  auto mem = make_image();
  std::vector<std::byte> pristine(mem->size());
  ASSERT_FALSE(mem->pread(pristine, 0));
  kill_at_every_write(
      pristine, [](Image& img) { return img.grow_reading_zeros(kNewSize, pattern_below()).ok(); },
      [&](Image& img, bool done) {
        const uint64_t size = img.size();
        ASSERT_TRUE(size == GetParam().old_size || size == kNewSize) << size;
        if (done) {
          EXPECT_EQ(size, kNewSize);
        }
        expect_content(img, size);
      },
      2000);
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, GrowReadingZeros,
    ::testing::Values(ZeroGrowCase{1 << 20, 65536, false},          // within one L2 table
                      ZeroGrowCase{(1 << 20) + 1536, 4096, false},  // ends inside a cluster
                      ZeroGrowCase{96 << 10, 512, false},           // the L1 table grows
                      ZeroGrowCase{(1 << 20) + 2560, 65536, true}), // inside a subcluster
    [](const auto& param_info) {
      return "Size" + std::to_string(param_info.param.old_size) + "Cluster" +
             std::to_string(param_info.param.cluster_size) + (param_info.param.extended_l2 ? "Extended" : "");
    });

TEST(GrowReadingZerosRefusal, AVersion2ImageHasNoZeroClusters) {
  CreateOptions co;
  co.size = 1 << 20;
  co.version = 2;
  auto mem = std::shared_ptr<File>(make_memory_file());
  ASSERT_TRUE(Image::create(*mem, co).ok());
  std::unique_ptr<Image> img;
  ASSERT_TRUE(Image::open(mem, {}, &img).ok());
  Status st = img->grow_reading_zeros(2 << 20, pattern_below());
  EXPECT_EQ(st.code(), std::errc::not_supported);
  EXPECT_NE(st.message().find("compat=v3"), std::string::npos) << st.message();
  EXPECT_EQ(img->size(), 1u << 20);
}

// A disk shrunk by qemu-img resize --shrink keeps its last cluster, data
// past the new end included; growing again must show zeros there (the
// chain above read zeros past the end), whichever way it grows.
class GrowTail : public ::testing::TestWithParam<bool> {};

TEST_P(GrowTail, BytesAShrunkDiskLeftInItsLastClusterReadAsZerosAfterGrowing) {
  const bool reading_zeros = GetParam();
  CreateOptions co;
  co.size = (1 << 20) + 4096;
  co.cluster_size = 4096;
  auto mem = std::shared_ptr<File>(make_memory_file());
  ASSERT_TRUE(Image::create(*mem, co).ok());
  {
    std::unique_ptr<Image> img;
    ASSERT_TRUE(Image::open(mem, {}, &img).ok());
    std::vector<std::byte> last(4096, std::byte{0xab});
    ASSERT_FALSE(img->write(1 << 20, last, zero_below()));
    ASSERT_FALSE(img->close());
  }
  const uint64_t shrunk = (1 << 20) + 1536;
  std::byte size_field[8];
  for (int i = 0; i < 8; ++i) size_field[i] = std::byte(shrunk >> (56 - 8 * i));
  ASSERT_FALSE(mem->pwrite(size_field, 24));
  std::unique_ptr<Image> img;
  ASSERT_TRUE(Image::open(mem, {}, &img).ok());
  Status st = reading_zeros ? img->grow_reading_zeros(2 << 20, pattern_below())
                            : img->grow(2 << 20);
  ASSERT_TRUE(st.ok()) << st.message();
  std::vector<std::byte> got(4096);
  ASSERT_FALSE(img->read(1 << 20, got, pattern_below()));
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_EQ(got[i], i < 1536 ? std::byte{0xab} : std::byte{0}) << "at byte " << i;
  CheckReport rep;
  ASSERT_TRUE(img->check(Repair::None, &rep).ok());
  EXPECT_TRUE(rep.clean());
}

INSTANTIATE_TEST_SUITE_P(Ways, GrowTail, ::testing::Bool(), [](const auto& param_info) {
  return param_info.param ? std::string("ReadingZeros") : std::string("Plain");
});

TEST(GrowReadingZerosRefusal, ARefusedGrowthRewritesNothing) {
  CreateOptions co;
  co.size = (1 << 20) + 1536;
  co.cluster_size = 4096;
  auto mem = std::shared_ptr<File>(make_memory_file());
  ASSERT_TRUE(Image::create(*mem, co).ok());
  std::unique_ptr<Image> img;
  ASSERT_TRUE(Image::open(mem, {}, &img).ok());
  ASSERT_TRUE(img->create_snapshot("s").ok());
  ASSERT_FALSE(img->flush());
  const uint64_t file_size = mem->size();
  Status st = img->grow_reading_zeros(2 << 20, pattern_below());
  EXPECT_EQ(st.code(), std::errc::invalid_argument);
  MapExtent e;
  ASSERT_FALSE(img->block_status(1 << 20, 1536, &e));
  EXPECT_EQ(e.kind, ExtentKind::Unallocated);  // the last cluster was not rewritten
  EXPECT_EQ(mem->size(), file_size);
}

}  // namespace
}  // namespace layerd::qcow2::test
