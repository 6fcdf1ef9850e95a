// Image::create against qemu-img (info, check, qemu-io on the result) and
// Image::check/repair against `qemu-img check` on hand-damaged images.
#include <gtest/gtest.h>

#include <cstring>

#include "test_util.h"

namespace layerd::qcow2::test {
namespace {

struct CreateCase {
  const char* name;
  CreateOptions o;
};

CreateOptions opts(uint64_t size, uint32_t version, uint32_t cs, uint32_t rb,
                   bool ext = false, uint32_t ct = 0,
                   Preallocation p = Preallocation::Off, bool lazy = false) {
  CreateOptions o;
  o.size = size;
  o.version = version;
  o.cluster_size = cs;
  o.refcount_bits = rb;
  o.extended_l2 = ext;
  o.compression_type = ct;
  o.preallocation = p;
  o.lazy_refcounts = lazy;
  return o;
}

class Create : public ::testing::TestWithParam<CreateCase> {};

TEST_P(Create, QemuAcceptsAndAgrees) {
  TempDir d;
  std::string path = d / "new.qcow2";
  const CreateOptions& o = GetParam().o;
  {
    std::error_code ec;
    FileOptions fo;
    fo.mode = OpenMode::ReadWrite;
    fo.create = true;
    auto f = open_posix_file(path, fo, ec);
    ASSERT_TRUE(f) << ec.message();
    Status st = Image::create(*f, o);
    ASSERT_TRUE(st.ok()) << st.message();
  }
  qemu_check_clean(path);
  std::string info = run("qemu-img info '" + path + "'");
  EXPECT_NE(info.find("virtual size: "), std::string::npos);
  EXPECT_NE(info.find("(" + std::to_string(o.size) + " bytes)"), std::string::npos) << info;
  EXPECT_NE(info.find("cluster_size: " + std::to_string(o.cluster_size)), std::string::npos) << info;
  if (o.version == 2) {
    EXPECT_NE(info.find("compat: 0.10"), std::string::npos) << info;
  }
  if (o.extended_l2) {
    EXPECT_NE(info.find("extended l2: true"), std::string::npos) << info;
  }
  if (o.compression_type == 1) {
    EXPECT_NE(info.find("compression type: zstd"), std::string::npos) << info;
  }
  if (o.lazy_refcounts) {
    EXPECT_NE(info.find("lazy refcounts: true"), std::string::npos) << info;
  }
  // qemu writes to it, we read it back; we write, qemu reads it back.
  if (o.size == 0) {
    auto img = open_image(path, true);
    ASSERT_TRUE(img);
    EXPECT_EQ(img->size(), 0u);
    std::byte x[1];
    EXPECT_TRUE(img->read(0, x, zero_below()));
    return;
  }
  run("qemu-io -f qcow2 '" + path + "' -c 'write -P 0x42 4096 100k'");
  {
    auto img = open_image(path, true);
    ASSERT_TRUE(img);
    std::vector<std::byte> buf(70000, std::byte{0x43});
    ASSERT_FALSE(img->write(o.size - buf.size(), buf, zero_below()));
    ASSERT_FALSE(img->flush());
    expect_same(read_all(*img), qemu_raw(path, d.path()));
  }
  qemu_check_clean(path);
  if (o.preallocation == Preallocation::Metadata) {
    std::string map = run("qemu-img map --output=json '" + path + "'");
    EXPECT_EQ(map.find("\"present\": false"), std::string::npos) << map;
  }
}

INSTANTIATE_TEST_SUITE_P(
    All, Create,
    ::testing::Values(
        CreateCase{"v3_64k", opts(64 << 20, 3, 65536, 16)},
        CreateCase{"v3_empty", opts(0, 3, 65536, 16)},
        CreateCase{"v2_64k", opts(64 << 20, 2, 65536, 16)},
        CreateCase{"v3_512_rc64_big", opts(32 << 20, 3, 512, 64)},
        CreateCase{"v3_4k_rc1", opts(10 << 20, 3, 4096, 1)},
        CreateCase{"v3_2M", opts(64 << 20, 3, 2 << 20, 16)},
        CreateCase{"v3_extl2_zstd", opts(32 << 20, 3, 65536, 16, true, 1)},
        CreateCase{"v3_prealloc", opts(16 << 20, 3, 65536, 16, false, 0, Preallocation::Metadata)},
        CreateCase{"v3_prealloc_extl2", opts(8 << 20, 3, 32768, 16, true, 0, Preallocation::Metadata)},
        CreateCase{"v3_lazy_odd", opts((5 << 20) + 512, 3, 65536, 16, false, 0, Preallocation::Off, true)}),
    [](const auto& pinfo) { return std::string(pinfo.param.name); });

TEST(CreateOpts, BackingAndRejections) {
  TempDir d;
  std::string path = d / "top.qcow2";
  auto mem = make_memory_file();
  CreateOptions o;
  o.size = 1 << 20;
  o.cluster_size = 1000;
  EXPECT_FALSE(Image::create(*mem, o).ok());
  o.cluster_size = 4096;
  o.extended_l2 = true;
  EXPECT_FALSE(Image::create(*mem, o).ok());
  o.extended_l2 = false;
  o.version = 2;
  o.refcount_bits = 8;
  EXPECT_FALSE(Image::create(*mem, o).ok());
  o.version = 3;
  o.refcount_bits = 3;
  EXPECT_FALSE(Image::create(*mem, o).ok());

  run("qemu-img create -q -f qcow2 '" + (d / "base.qcow2") + "' 1M");
  {
    std::error_code ec;
    FileOptions fo;
    fo.mode = OpenMode::ReadWrite;
    fo.create = true;
    auto f = open_posix_file(path, fo, ec);
    CreateOptions c;
    c.size = 2 << 20;
    c.backing_file = "base.qcow2";
    c.backing_format = "qcow2";
    ASSERT_TRUE(Image::create(*f, c).ok());
  }
  std::string info = run("qemu-img info '" + path + "'");
  EXPECT_NE(info.find("backing file: base.qcow2"), std::string::npos) << info;
  EXPECT_NE(info.find("backing file format: qcow2"), std::string::npos) << info;
  auto img = open_image(path, false);
  EXPECT_EQ(img->backing_file(), "base.qcow2");
  EXPECT_EQ(img->backing_format(), "qcow2");
  qemu_check_clean(path);
}

// --- check ------------------------------------------------------------------

struct QemuCheck {
  uint64_t leaks = 0, errors = 0;
};

QemuCheck qemu_check(const std::string& path) {
  QemuCheck q;
  std::string out = sh("qemu-img check '" + path + "'");
  auto num_before = [&](const std::string& what) -> uint64_t {
    size_t k = out.find(what);
    if (k == std::string::npos) return 0;
    size_t s = out.rfind('\n', k);
    s = s == std::string::npos ? 0 : s + 1;
    return std::stoull(out.substr(s, k - s));
  };
  q.leaks = num_before(" leaked clusters were found");
  q.errors = num_before(" errors were found");
  return q;
}

// Offset of the refcount entry (16-bit) of `cluster`.
uint64_t refcount_entry(const std::string& path, uint64_t cluster) {
  uint64_t rt = peek(path, 48, 8);
  uint64_t cs = 1ull << peek(path, 20, 4);
  uint64_t per_block = cs / 2;
  uint64_t block = peek(path, rt + (cluster / per_block) * 8, 8);
  return block + (cluster % per_block) * 2;
}

TEST(Check, FindsAndRepairsLeaksLikeQemu) {
  TempDir d;
  std::string path = d / "c.qcow2";
  run("qemu-img create -q -f qcow2 '" + path + "' 8M");
  run("qemu-io -f qcow2 '" + path + "' -c 'write -P 1 0 1M'");
  // A refcount for a cluster nobody uses (past the end of the data).
  uint64_t fsize = std::filesystem::file_size(path);
  std::filesystem::resize_file(path, fsize + 4 * 65536);
  uint64_t leaked = fsize / 65536 + 2;
  patch(path, refcount_entry(path, leaked), be(1, 2));
  // One data cluster counted twice.
  {
    auto img = open_image(path, false);
    MapExtent m;
    ASSERT_FALSE(img->block_status(0, 65536, &m));
    patch(path, refcount_entry(path, m.host_offset / 65536), be(2, 2));
  }
  QemuCheck q = qemu_check(path);
  EXPECT_EQ(q.leaks, 2u);
  auto img = open_image(path, true);
  CheckReport rep;
  ASSERT_TRUE(img->check(Repair::None, &rep).ok());
  EXPECT_EQ(rep.leaks, q.leaks);
  EXPECT_EQ(rep.corruptions, q.errors) << (rep.messages.empty() ? "" : rep.messages[0]);
  ASSERT_TRUE(img->check(Repair::Leaks, &rep).ok());
  EXPECT_EQ(rep.leaks_fixed, 2u);
  img.reset();
  qemu_check_clean(path);
}

TEST(Check, RepairsTooLowRefcounts) {
  TempDir d;
  std::string path = d / "c.qcow2";
  run("qemu-img create -q -f qcow2 '" + path + "' 8M");
  run("qemu-io -f qcow2 '" + path + "' -c 'write -P 1 0 1M'");
  uint64_t host;
  {
    auto img = open_image(path, false);
    MapExtent m;
    ASSERT_FALSE(img->block_status(65536, 65536, &m));
    host = m.host_offset;
  }
  patch(path, refcount_entry(path, host / 65536), be(0, 2));
  QemuCheck q = qemu_check(path);
  EXPECT_GT(q.errors, 0u);
  auto img = open_image(path, true);
  CheckReport rep;
  ASSERT_TRUE(img->check(Repair::None, &rep).ok());
  EXPECT_EQ(rep.corruptions, q.errors) << ::testing::PrintToString(rep.messages);
  ASSERT_TRUE(img->check(Repair::All, &rep).ok());
  EXPECT_EQ(rep.corruptions_fixed, rep.corruptions);
  // Writing after the repair must not reuse the cluster.
  std::vector<std::byte> buf(65536 * 4, std::byte{9});
  ASSERT_FALSE(img->write(4 << 20, buf, zero_below()));
  img.reset();
  qemu_check_clean(path);
  auto v = qemu_raw(path, d.path());
  EXPECT_EQ(v[65536 + 5], std::byte{1});
}

TEST(Check, DirtyImageIsRepairedOnOpen) {
  TempDir d;
  std::string path = d / "dirty.qcow2";
  run("qemu-img create -q -f qcow2 -o lazy_refcounts=on '" + path + "' 8M");
  // qemu-io aborts with the dirty bit set and refcounts not written.
  sh("qemu-io -f qcow2 '" + path + "' -c 'write -P 3 0 2M' -c 'write -P 4 3M 64k' -c abort");
  ASSERT_EQ(peek(path, 72, 8) & 1, 1u) << "expected the dirty bit";
  {
    auto img = open_image(path, true);
    ASSERT_TRUE(img);
    EXPECT_FALSE(img->dirty());
  }
  EXPECT_EQ(peek(path, 72, 8) & 1, 0u);
  qemu_check_clean(path);
  auto v = qemu_raw(path, d.path());
  EXPECT_EQ(v[100], std::byte{3});
  EXPECT_EQ(v[(3 << 20) + 5], std::byte{4});
}

TEST(Check, CleanImagesReportClean) {
  TempDir d;
  std::string path = d / "c.qcow2";
  run("qemu-img create -q -f qcow2 -o cluster_size=4k '" + path + "' 8M");
  run("qemu-io -f qcow2 '" + path + "' -c 'write -P 1 0 1M' -c 'write -c -P 2 2M 4k'");
  run("qemu-img snapshot -c s1 '" + path + "'");
  run("qemu-io -f qcow2 '" + path + "' -c 'write -P 5 512k 1M'");
  run("qemu-img bitmap --add '" + path + "' b0");
  auto img = open_image(path, false);
  CheckReport rep;
  ASSERT_TRUE(img->check(Repair::None, &rep).ok());
  EXPECT_TRUE(rep.clean()) << ::testing::PrintToString(rep.messages);
  EXPECT_EQ(rep.total_clusters, 2048u);
  EXPECT_GT(rep.allocated_clusters, 256u);
}

}  // namespace
}  // namespace layerd::qcow2::test

namespace layerd::qcow2::test {
namespace {

TEST(CreateOpts, HugeImageCreates) {
  TempDir d;
  std::string path = d / "huge.qcow2";
  {
    std::error_code ec;
    FileOptions fo;
    fo.mode = OpenMode::ReadWrite;
    fo.create = true;
    auto f = open_posix_file(path, fo, ec);
    CreateOptions o;
    o.size = 8ull << 40;
    ASSERT_TRUE(Image::create(*f, o).ok());
  }
  qemu_check_clean(path);
  run("qemu-io -f qcow2 '" + path + "' -c 'write -P 9 " + std::to_string(7ull << 40) + " 64k'");
  auto img = open_image(path, true);
  std::vector<std::byte> buf(65536);
  ASSERT_FALSE(img->read(7ull << 40, buf, zero_below()));
  EXPECT_EQ(buf[100], std::byte{9});
  ASSERT_FALSE(img->write((7ull << 40) + (1ull << 30), buf, zero_below()));
  img.reset();
  qemu_check_clean(path);
}

}  // namespace
}  // namespace layerd::qcow2::test

namespace layerd::qcow2::test {
namespace {

TEST(Check, CopiedFlagsLikeQemu) {
  TempDir d;
  std::string path = d / "f.qcow2";
  run("qemu-img create -q -f qcow2 '" + path + "' 8M");
  run("qemu-io -f qcow2 '" + path + "' -c 'write -P 1 0 256k'");
  uint64_t l1 = peek(path, 40, 8);
  uint64_t l2 = peek(path, l1, 8) & 0x00fffffffffffe00ull;
  patch64(path, l2 + 16, peek(path, l2 + 16, 8) & ~(1ull << 63));  // clear COPIED
  QemuCheck q = qemu_check(path);
  EXPECT_EQ(q.errors, 1u);
  {
    auto img = open_image(path, true);
    CheckReport rep;
    ASSERT_TRUE(img->check(Repair::None, &rep).ok());
    EXPECT_EQ(rep.corruptions, q.errors) << ::testing::PrintToString(rep.messages);
    // Writing there still works (refcount is 1: written in place).
    std::vector<std::byte> buf(4096, std::byte{2});
    ASSERT_FALSE(img->write(2 * 65536, buf, zero_below()));
    ASSERT_TRUE(img->check(Repair::All, &rep).ok());
  }
  qemu_check_clean(path);
  auto v = qemu_raw(path, d.path());
  EXPECT_EQ(v[2 * 65536], std::byte{2});
  EXPECT_EQ(v[2 * 65536 + 4096], std::byte{1});
}

TEST(Check, ExtendedL2SubclusterStatus) {
  TempDir d;
  std::string path = d / "e.qcow2";
  run("qemu-img create -q -f qcow2 -o extended_l2=on '" + path + "' 8M");
  auto img = open_image(path, true);
  std::vector<std::byte> buf(2048, std::byte{7});  // subcluster = 2 KiB
  ASSERT_FALSE(img->write(4096, buf, zero_below()));
  MapExtent m;
  ASSERT_FALSE(img->block_status(0, 65536, &m));
  EXPECT_EQ(m.kind, ExtentKind::Unallocated);
  EXPECT_EQ(m.length, 4096u);
  ASSERT_FALSE(img->block_status(4096, 65536 - 4096, &m));
  EXPECT_EQ(m.kind, ExtentKind::Data);
  EXPECT_EQ(m.length, 2048u);
  ASSERT_FALSE(img->write_zeroes(8192, 4096, true, zero_below()));
  ASSERT_FALSE(img->block_status(8192, 65536 - 8192, &m));
  EXPECT_EQ(m.kind, ExtentKind::Zero);
  EXPECT_EQ(m.length, 4096u);
  ASSERT_FALSE(img->flush());
  std::string map = run("qemu-img map -U --output=json '" + path + "'");
  EXPECT_NE(map.find("\"start\": 4096, \"length\": 2048, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"),
            std::string::npos) << map;
  img.reset();
  qemu_check_clean(path);
}

}  // namespace
}  // namespace layerd::qcow2::test
