// Metadata ordering: stop the file at every write of a workload (as if the
// machine crashed with writes reaching the disk in order) and require that
// what is on disk has no refcount or mapping errors; leaks are allowed.
#include <gtest/gtest.h>

#include <cstring>
#include <functional>

#include "tests/qcow2/faulty_file.h"
#include "test_util.h"

namespace layerd::qcow2::test {
namespace {

std::vector<std::byte> snapshot_of(File& f) {
  std::vector<std::byte> v(f.size());
  EXPECT_FALSE(f.pread(v, 0));
  return v;
}

void workload(Image& img) {
  std::vector<std::byte> buf(200000);
  for (int i = 0; i < 12; ++i) {
    std::memset(buf.data(), i + 1, buf.size());
    uint64_t off = (uint64_t(i) * 1234567) % (img.size() - buf.size());
    if (img.write(off, std::span(buf.data(), 5000 + i * 9000), zero_below())) return;
    if (i % 4 == 3 && img.flush()) return;
    if (i == 6 && img.discard(0, 1 << 20, DiscardMode::Unallocate, zero_below())) return;
    if (i == 8 && img.write_zeroes(2 << 20, 300000, true, zero_below())) return;
    if (i == 4 && !img.create_snapshot("s").ok()) return;
    if (i == 10 && !img.delete_snapshot("s").ok()) return;
  }
  (void)img.flush();
}

class Crash : public ::testing::TestWithParam<CreateOptions> {};

TEST_P(Crash, EveryPrefixOfWritesIsConsistent) {
  // A base image with some data (and a snapshot in the file made by qemu).
  auto base = std::shared_ptr<File>(make_memory_file());
  ASSERT_TRUE(Image::create(*base, GetParam()).ok());
  {
    std::unique_ptr<Image> img;
    ASSERT_TRUE(Image::open(base, {}, &img).ok());
    std::vector<std::byte> buf(1 << 20, std::byte{0x5a});
    ASSERT_FALSE(img->write(0, buf, zero_below()));
  }
  auto pristine = snapshot_of(*base);
  // Count the writes of a full run.
  int total;
  {
    auto mem = std::shared_ptr<File>(make_memory_file());
    ASSERT_FALSE(mem->pwrite(pristine, 0));
    auto faulty = std::make_shared<FaultyFile>(mem);
    std::unique_ptr<Image> img;
    ASSERT_TRUE(Image::open(faulty, {}, &img).ok());
    workload(*img);
    img.reset();
    total = faulty->pwrites();
  }
  ASSERT_GT(total, 10);
  const int step = std::max(1, total / 50);
  for (int n = 0; n <= total; n += step) {
    auto mem = std::shared_ptr<File>(make_memory_file());
    ASSERT_FALSE(mem->pwrite(pristine, 0));
    auto faulty = std::make_shared<FaultyFile>(mem);
    {
      std::unique_ptr<Image> img;
      ASSERT_TRUE(Image::open(faulty, {}, &img).ok());
      faulty->fail_pwrite_after(n, /*sticky=*/true);
      workload(*img);
    }
    std::unique_ptr<Image> img;
    OpenOptions o;
    o.read_only = true;
    Status st = Image::open(mem, o, &img);
    ASSERT_TRUE(st.ok()) << "after " << n << " writes: " << st.message();
    CheckReport rep;
    ASSERT_TRUE(img->check(Repair::None, &rep).ok());
    // A COPIED flag that disagrees with the refcount is reported like QEMU
    // does, but is harmless while a snapshot is being taken or deleted
    // (the extra count is not yet, or no longer, a real reference); any
    // other error is real damage.
    std::vector<std::string> real;
    for (auto& m : rep.messages)
      if (m.rfind("ERROR", 0) == 0 && m.find("OFLAG_COPIED") == std::string::npos)
        real.push_back(m);
    ASSERT_TRUE(real.empty()) << "after " << n << " writes: "
                              << ::testing::PrintToString(real);
    // Whatever is mapped must be readable.
    (void)read_all(*img);
  }
}

CreateOptions co(uint32_t cs, bool ext = false, uint32_t rb = 16) {
  CreateOptions o;
  o.size = 8 << 20;
  o.cluster_size = cs;
  o.extended_l2 = ext;
  o.refcount_bits = rb;
  return o;
}

INSTANTIATE_TEST_SUITE_P(All, Crash,
                         ::testing::Values(co(65536), co(4096), co(512, false, 64),
                                           co(32768, true)),
                         [](const auto& pinfo) {
                           return "c" + std::to_string(pinfo.param.cluster_size) +
                                  (pinfo.param.extended_l2 ? "_extl2" : "") + "_rc" +
                                  std::to_string(pinfo.param.refcount_bits);
                         });

// A File that models a disk cache: writes since the last flush may reach
// the disk in any subset. At the crash, the disk is what was flushed plus a
// random subset of the later writes.
class CacheModelFile : public File {
 public:
  explicit CacheModelFile(const std::vector<std::byte>& initial)
      : live_(make_memory_file()), disk_(make_memory_file()) {
    (void)live_->pwrite(initial, 0);
    (void)disk_->pwrite(initial, 0);
  }
  void crash_after(int n) { left_ = n; }
  int writes() const { return writes_; }
  std::vector<std::byte> disk_after_crash(std::mt19937_64& rng) {
    for (auto& op : pending_)
      if (rng() % 2) op(*disk_);
    std::vector<std::byte> v(disk_->size());
    (void)disk_->pread(v, 0);
    return v;
  }

  std::error_code pread(std::span<std::byte> b, uint64_t o) override { return live_->pread(b, o); }
  std::error_code pwrite(std::span<const std::byte> d, uint64_t o) override {
    if (left_ == 0) return std::make_error_code(std::errc::io_error);
    if (left_ > 0) --left_;
    ++writes_;
    std::vector<std::byte> copy(d.begin(), d.end());
    pending_.push_back([copy, o](File& f) { (void)f.pwrite(copy, o); });
    return live_->pwrite(d, o);
  }
  std::error_code flush() override {
    if (left_ == 0) return std::make_error_code(std::errc::io_error);
    for (auto& op : pending_) op(*disk_);
    pending_.clear();
    return {};
  }
  std::error_code truncate(uint64_t size) override {
    if (left_ == 0) return std::make_error_code(std::errc::io_error);
    pending_.push_back([size](File& f) { (void)f.truncate(size); });
    return live_->truncate(size);
  }
  std::error_code punch_hole(uint64_t o, uint64_t l) override {
    if (left_ == 0) return std::make_error_code(std::errc::io_error);
    pending_.push_back([o, l](File& f) { (void)f.punch_hole(o, l); });
    return live_->punch_hole(o, l);
  }
  std::error_code write_zeroes(uint64_t o, uint64_t l) override {
    if (left_ == 0) return std::make_error_code(std::errc::io_error);
    pending_.push_back([o, l](File& f) { (void)f.write_zeroes(o, l); });
    return live_->write_zeroes(o, l);
  }
  uint64_t size() const override { return live_->size(); }
  uint64_t extent_at(uint64_t o, uint64_t l, bool* d) const override { return live_->extent_at(o, l, d); }
  bool writable() const override { return true; }

 private:
  std::shared_ptr<File> live_, disk_;
  std::vector<std::function<void(File&)>> pending_;
  int left_ = -1;
  int writes_ = 0;
};

void check_reordered_crashes(const CreateOptions& o, int trials) {
  auto base = std::shared_ptr<File>(make_memory_file());
  ASSERT_TRUE(Image::create(*base, o).ok());
  {
    std::unique_ptr<Image> img;
    ASSERT_TRUE(Image::open(base, {}, &img).ok());
    std::vector<std::byte> buf(1 << 20, std::byte{0x5a});
    ASSERT_FALSE(img->write(0, buf, zero_below()));
  }
  auto pristine = snapshot_of(*base);
  // Crash points are spread over all the writes of a full run.
  int total = 0;
  {
    auto f = std::make_shared<CacheModelFile>(pristine);
    std::unique_ptr<Image> img;
    ASSERT_TRUE(Image::open(f, {}, &img).ok());
    workload(*img);
    img.reset();
    total = f->writes();
  }
  ASSERT_GT(total, 10);
  std::mt19937_64 rng(99);
  for (int trial = 0; trial < trials; ++trial) {
    auto f = std::make_shared<CacheModelFile>(pristine);
    {
      std::unique_ptr<Image> img;
      ASSERT_TRUE(Image::open(f, {}, &img).ok());
      f->crash_after(static_cast<int>(rng() % total));
      workload(*img);
    }
    auto disk = std::shared_ptr<File>(make_memory_file());
    ASSERT_FALSE(disk->pwrite(f->disk_after_crash(rng), 0));
    std::unique_ptr<Image> img;
    OpenOptions ro;
    ro.read_only = true;
    Status st = Image::open(disk, ro, &img);
    ASSERT_TRUE(st.ok()) << "trial " << trial << ": " << st.message();
    CheckReport rep;
    ASSERT_TRUE(img->check(Repair::None, &rep).ok());
    std::vector<std::string> real;
    for (auto& m : rep.messages)
      if (m.rfind("ERROR", 0) == 0 && m.find("OFLAG_COPIED") == std::string::npos)
        real.push_back(m);
    ASSERT_TRUE(real.empty()) << "trial " << trial << ": " << ::testing::PrintToString(real);
  }
}

TEST(CrashReordered, UnflushedWritesLandInAnyOrder) {
  check_reordered_crashes(co(4096), 60);
}

// 512-byte clusters with 64-bit refcounts: a refcount block covers only
// 32 KiB, so the workload creates many, and their reftable entries must
// not reach the disk before the blocks, nor L2 entries before either.
TEST(CrashReordered, NewRefcountBlocksAreDurableBeforeTheirUsers) {
  check_reordered_crashes(co(512, false, 64), 300);
}

}  // namespace
}  // namespace layerd::qcow2::test
