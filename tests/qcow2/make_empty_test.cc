// Image::make_empty ("commit and empty"): every offset reads from below
// afterwards, the file gives its space back, QEMU checks it clean, the image
// stays usable, and a crash at any write leaves old or empty, never a mix.
#include <sys/stat.h>

#include <chrono>
#include <cstring>

#include "tests/qcow2/faulty_file.h"
#include "test_util.h"

namespace layerd::qcow2::test {
namespace {

std::string q(const std::string& s) { return "'" + s + "'"; }

uint64_t blocks_of(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(::stat(path.c_str(), &st), 0);
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

class MakeEmpty : public ::testing::Test {
 protected:
  TempDir dir_;
  std::string base_ = dir_ / "base.qcow2";
  std::string top_ = dir_ / "top.qcow2";
  void make(const std::string& size, const std::string& opts = "") {
    run("qemu-img create -q -f qcow2 " + q(base_) + " " + size);
    run("qemu-io -c 'write -P 1 0 1M' " + q(base_));
    // (QEMU allows preallocation with a backing file only with extended L2.)
    run("qemu-img create -q -f qcow2 " + opts + " " + q(top_) + " " + size);
    run("qemu-img rebase -u -b base.qcow2 -F qcow2 " + q(top_));
  }
};

TEST_F(MakeEmpty, EverythingReadsFromBelowAndTheFileShrinks) {
  make("32M");
  run("qemu-io -c 'write -c -P 9 8M 64k' -c 'write -P 7 0 8M' -c 'write -P 7 9M 23M' -c 'write -z 4M 1M' " +
      q(top_));
  const uint64_t before = blocks_of(top_);
  ASSERT_GT(before, 30u << 20);
  {
    auto img = open_image(top_, true);
    Status st = img->make_empty();
    ASSERT_TRUE(st.ok()) << st.message();
    for (uint64_t off = 0; off < img->size();) {
      MapExtent e;
      ASSERT_FALSE(img->block_status(off, img->size() - off, &e));
      EXPECT_EQ(e.kind, ExtentKind::Unallocated) << off;
      off += e.length;
    }
    CheckReport rep;
    ASSERT_TRUE(img->check(Repair::None, &rep).ok());
    EXPECT_TRUE(rep.clean());
    // Still writable, through the new tables.
    std::vector<std::byte> w(100000, std::byte{5});
    ASSERT_FALSE(img->write(20 << 20, w, zero_below()));
    ASSERT_FALSE(img->close());
  }
  qemu_check_clean(top_);
  EXPECT_LT(std::filesystem::file_size(top_), 1u << 20);
  EXPECT_LT(blocks_of(top_), 1u << 20);
  run("qemu-io -c 'read -P 1 0 1M' -c 'read -P 0 1M 19M' -c 'read -P 5 20M 100000' "
      "-c 'read -P 0 21M 11M' " + q(top_));
  std::string map = run("qemu-img map --output=json " + q(top_));
  // Only the new write is allocated in the top (depth 0).
  EXPECT_EQ(map.find("\"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, "
                     "\"compressed\": false, \"offset\""),
            map.rfind("\"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, "
                      "\"compressed\": false, \"offset\""))
      << map;
}

TEST_F(MakeEmpty, IsFastOnAFullyAllocatedGigabyte) {
  make("1G", "-o preallocation=falloc");
  {
    auto img = open_image(top_, true);
    MapExtent e;
    ASSERT_FALSE(img->block_status(512 << 20, 1 << 20, &e));
    ASSERT_EQ(e.kind, ExtentKind::Data);
    auto t0 = std::chrono::steady_clock::now();
    Status st = img->make_empty();
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                  std::chrono::steady_clock::now() - t0)
                  .count();
    ASSERT_TRUE(st.ok()) << st.message();
    EXPECT_LT(ms, 1000);
    ASSERT_FALSE(img->block_status(512 << 20, 1 << 20, &e));
    EXPECT_EQ(e.kind, ExtentKind::Unallocated);
  }
  qemu_check_clean(top_);
  EXPECT_LT(blocks_of(top_), 1u << 20);
  run("qemu-io -c 'read -P 1 0 1M' -c 'read -P 0 1M 1023M' " + q(top_));
}

TEST_F(MakeEmpty, RefusesImagesWithSnapshotsOrBitmaps) {
  make("4M");
  run("qemu-io -c 'write -P 7 0 1M' " + q(top_));
  run("qemu-img snapshot -c s1 " + q(top_));
  {
    auto img = open_image(top_, true);
    Status st = img->make_empty();
    EXPECT_EQ(st.code(), std::errc::invalid_argument);
    EXPECT_NE(st.message().find("has internal snapshots"), std::string::npos) << st.message();
  }
  run("qemu-img snapshot -d s1 " + q(top_));
  run("qemu-img bitmap --add " + q(top_) + " b0");
  {
    auto img = open_image(top_, true);
    Status st = img->make_empty();
    EXPECT_EQ(st.code(), std::errc::invalid_argument);
    EXPECT_NE(st.message().find("bitmaps"), std::string::npos) << st.message();
  }
  run("qemu-io -c 'read -P 7 0 1M' " + q(top_));
  qemu_check_clean(top_);
  auto ro = open_image(top_, false);
  EXPECT_EQ(ro->make_empty().code(), std::errc::invalid_argument);
}

// --- Crash safety --------------------------------------------------------

std::vector<std::byte> contents(File& f) {
  std::vector<std::byte> v(f.size());
  EXPECT_FALSE(f.pread(v, 0));
  return v;
}

// What lies below in the crash test: a pattern no write of the top uses.
std::error_code below_pattern(uint64_t off, std::span<std::byte> buf) {
  for (size_t i = 0; i < buf.size(); ++i)
    buf[i] = static_cast<std::byte>(0x80 | ((off + i) / 512 % 97));
  return {};
}

std::vector<std::byte> guest(Image& img) {
  std::vector<std::byte> out(img.size());
  auto below = &below_pattern;
  EXPECT_FALSE(img.read(0, out, below));
  return out;
}

class MakeEmptyCrash : public ::testing::TestWithParam<CreateOptions> {};

TEST_P(MakeEmptyCrash, AKillAtAnyWriteLeavesOldOrEmpty) {
  auto mem = std::shared_ptr<File>(make_memory_file());
  ASSERT_TRUE(Image::create(*mem, GetParam()).ok());
  std::vector<std::byte> old_guest, empty_guest;
  {
    std::unique_ptr<Image> img;
    ASSERT_TRUE(Image::open(mem, {}, &img).ok());
    auto below = &below_pattern;
    std::vector<std::byte> buf(300000);
    for (int i = 0; i < 8; ++i) {
      std::memset(buf.data(), i + 1, buf.size());
      ASSERT_FALSE(img->write((uint64_t(i) * 2654435761u) % (img->size() - buf.size()),
                              buf, below));
    }
    ASSERT_FALSE(img->write_zeroes(1 << 20, 200000, true, below));
    old_guest = guest(*img);
    ASSERT_FALSE(img->close());
    empty_guest.resize(old_guest.size());
    ASSERT_FALSE(below_pattern(0, empty_guest));
  }
  const auto pristine = contents(*mem);
  int total;
  {
    auto copy = std::shared_ptr<File>(make_memory_file());
    ASSERT_FALSE(copy->pwrite(pristine, 0));
    auto faulty = std::make_shared<FaultyFile>(copy);
    std::unique_ptr<Image> img;
    ASSERT_TRUE(Image::open(faulty, {}, &img).ok());
    int at_start = faulty->pwrites();
    ASSERT_TRUE(img->make_empty().ok());
    total = faulty->pwrites() - at_start;
  }
  ASSERT_GE(total, 4);  // v2 has no dirty bit to set
  int saw_old = 0, saw_empty = 0;
  for (int n = 0; n <= total; ++n) {
    auto copy = std::shared_ptr<File>(make_memory_file());
    ASSERT_FALSE(copy->pwrite(pristine, 0));
    auto faulty = std::make_shared<FaultyFile>(copy);
    {
      std::unique_ptr<Image> img;
      ASSERT_TRUE(Image::open(faulty, {}, &img).ok());
      faulty->fail_pwrite_after(n, /*sticky=*/true);
      Status st = img->make_empty();
      EXPECT_EQ(st.ok(), n == total) << n << ": " << st.message();
    }
    // A read-only open reads it as it is...
    {
      std::unique_ptr<Image> img;
      OpenOptions o;
      o.read_only = true;
      Status st = Image::open(copy, o, &img);
      ASSERT_TRUE(st.ok()) << "after " << n << " writes: " << st.message();
      auto g = guest(*img);
      bool is_old = g == old_guest, is_empty = g == empty_guest;
      EXPECT_TRUE(is_old || is_empty) << "after " << n << " writes: a mix";
      saw_old += is_old;
      saw_empty += is_empty;
      CheckReport rep;
      ASSERT_TRUE(img->check(Repair::None, &rep).ok());
      EXPECT_EQ(rep.corruptions, 0u) << "after " << n << " writes";
    }
    // ...and a read-write open repairs what a crash leaves (leaks at most).
    std::unique_ptr<Image> img;
    Status st = Image::open(copy, {}, &img);
    ASSERT_TRUE(st.ok()) << "after " << n << " writes: " << st.message();
    CheckReport rep;
    ASSERT_TRUE(img->check(Repair::None, &rep).ok());
    EXPECT_TRUE(rep.clean()) << "after " << n << " writes";
    auto g = guest(*img);
    EXPECT_TRUE(g == old_guest || g == empty_guest) << "after " << n << " writes";
    std::vector<std::byte> w(70000, std::byte{0x33});
    auto below = &below_pattern;
    EXPECT_FALSE(img->write(12345, w, below));
    EXPECT_FALSE(img->close());
  }
  EXPECT_GT(saw_old, 0);
  EXPECT_GT(saw_empty, 0);
}

CreateOptions opts(uint32_t version, uint32_t cluster, uint32_t refbits, bool ext) {
  CreateOptions o;
  o.size = 6 << 20;
  o.version = version;
  o.cluster_size = cluster;
  o.refcount_bits = refbits;
  o.extended_l2 = ext;
  o.backing_file = "below";
  return o;
}

INSTANTIATE_TEST_SUITE_P(Layouts, MakeEmptyCrash,
                         ::testing::Values(opts(3, 65536, 16, false),
                                           opts(2, 65536, 16, false),
                                           opts(3, 512, 1, false),
                                           opts(3, 4096, 64, false),
                                           opts(3, 65536, 16, true)));

}  // namespace
}  // namespace layerd::qcow2::test
