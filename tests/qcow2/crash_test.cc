// Metadata ordering: stop the file at every write of a workload (as if the
// machine crashed with writes reaching the disk in order) and require that
// what is on disk has no refcount or mapping errors; leaks are allowed.
#include <gtest/gtest.h>

#include <cstring>

#include "qcow2/faulty_file.h"
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
  const int step = std::max(1, total / 80);
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
    ASSERT_EQ(rep.corruptions, 0u) << "after " << n << " writes: "
                                   << ::testing::PrintToString(rep.messages);
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

}  // namespace
}  // namespace layerd::qcow2::test
