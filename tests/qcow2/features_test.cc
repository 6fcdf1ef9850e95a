// Discard and zero semantics over a backing file, external data files,
// header rewrites that keep unknown extensions, autoclear bits.
#include <gtest/gtest.h>

#include <cstring>

#include "test_util.h"

namespace layerd::qcow2::test {
namespace {

class OverBacking : public ::testing::Test {
 protected:
  void SetUp() override {
    base_ = dir_ / "base.qcow2";
    top_ = dir_ / "top.qcow2";
    run("qemu-img create -q -f qcow2 '" + base_ + "' 4M");
    run("qemu-io -f qcow2 '" + base_ + "' -c 'write -P 0xaa 0 4M'");
    run("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 '" + top_ + "' 4M");
    run("qemu-io -f qcow2 '" + top_ + "' -c 'write -P 0xbb 0 1M'");
    b_ = open_image(base_, false);
    t_ = open_image(top_, true);
  }
  std::error_code below(uint64_t off, std::span<std::byte> buf) {
    return b_->read(off, buf, zero_below());
  }
  std::byte at(uint64_t off) {
    std::byte x[1];
    auto rd = [this](uint64_t o, std::span<std::byte> b) { return below(o, b); };
    EXPECT_FALSE(t_->read(off, x, rd));
    return x[0];
  }
  TempDir dir_;
  std::string base_, top_;
  std::unique_ptr<Image> b_, t_;
};

TEST_F(OverBacking, DiscardUnallocateExposesBacking) {
  auto rd = [this](uint64_t o, std::span<std::byte> b) { return below(o, b); };
  ASSERT_FALSE(t_->discard(0, 256 * 1024, DiscardMode::Unallocate, rd));
  EXPECT_EQ(at(100), std::byte{0xaa});
  EXPECT_EQ(at(300 * 1024), std::byte{0xbb});
  MapExtent m;
  ASSERT_FALSE(t_->block_status(0, 1 << 20, &m));
  EXPECT_EQ(m.kind, ExtentKind::Unallocated);
  EXPECT_EQ(m.length, 256u * 1024);
  // Partial clusters are left alone.
  ASSERT_FALSE(t_->discard(300 * 1024, 1000, DiscardMode::Unallocate, rd));
  EXPECT_EQ(at(300 * 1024), std::byte{0xbb});
  t_.reset();
  qemu_check_clean(top_);
}

TEST_F(OverBacking, DiscardZeroHidesBacking) {
  auto rd = [this](uint64_t o, std::span<std::byte> b) { return below(o, b); };
  ASSERT_FALSE(t_->discard(0, 256 * 1024 + 1000, DiscardMode::Zero, rd));
  EXPECT_EQ(at(100), std::byte{0});
  EXPECT_EQ(at(256 * 1024 + 999), std::byte{0});
  EXPECT_EQ(at(256 * 1024 + 1000), std::byte{0xbb});
  MapExtent m;
  ASSERT_FALSE(t_->block_status(0, 1 << 20, &m));
  EXPECT_EQ(m.kind, ExtentKind::Zero);
  EXPECT_FALSE(m.has_host_offset);  // freed
  // Zeroing an unallocated range hides the backing too.
  ASSERT_FALSE(t_->write_zeroes(2 << 20, 128 * 1024, true, rd));
  EXPECT_EQ(at(2 << 20), std::byte{0});
  EXPECT_EQ(at((2 << 20) + 128 * 1024), std::byte{0xaa});
  t_.reset();
  qemu_check_clean(top_);
  auto v = qemu_raw(top_, dir_.path());
  EXPECT_EQ(v[100], std::byte{0});
  EXPECT_EQ(v[(2 << 20) + 5], std::byte{0});
  EXPECT_EQ(v[3 << 20], std::byte{0xaa});
}

TEST_F(OverBacking, ZeroWithoutUnmapKeepsAllocation) {
  auto rd = [this](uint64_t o, std::span<std::byte> b) { return below(o, b); };
  MapExtent before;
  ASSERT_FALSE(t_->block_status(0, 65536, &before));
  ASSERT_EQ(before.kind, ExtentKind::Data);
  ASSERT_FALSE(t_->write_zeroes(0, 65536, false, rd));
  MapExtent m;
  ASSERT_FALSE(t_->block_status(0, 65536, &m));
  EXPECT_EQ(m.kind, ExtentKind::Zero);
  EXPECT_TRUE(m.has_host_offset);
  EXPECT_EQ(m.host_offset, before.host_offset);
  EXPECT_EQ(at(5), std::byte{0});
  // Writing into the preallocated zero cluster reuses it and zero-fills.
  std::vector<std::byte> buf(100, std::byte{0xcc});
  ASSERT_FALSE(t_->write(1000, buf, rd));
  ASSERT_FALSE(t_->block_status(0, 65536, &m));
  EXPECT_EQ(m.kind, ExtentKind::Data);
  EXPECT_EQ(m.host_offset, before.host_offset);
  EXPECT_EQ(at(5), std::byte{0});
  EXPECT_EQ(at(1000), std::byte{0xcc});
  t_.reset();
  qemu_check_clean(top_);
}

TEST_F(OverBacking, FuaWriteIsDurable) {
  auto rd = [this](uint64_t o, std::span<std::byte> b) { return below(o, b); };
  std::vector<std::byte> buf(3000, std::byte{0x12});
  ASSERT_FALSE(t_->write(2 << 20, buf, rd, /*fua=*/true));
  // Without closing, the file on disk already maps the data.
  auto v = qemu_raw(top_, dir_.path());
  EXPECT_EQ(v[(2 << 20) + 2999], std::byte{0x12});
  EXPECT_EQ(v[(2 << 20) + 3000], std::byte{0xaa});  // copied from below
}

TEST(ExternalDataFile, ReadWriteMatchesQemu) {
  TempDir d;
  std::string img = d / "x.qcow2", data = d / "x.raw";
  run("qemu-img create -q -f qcow2 -o data_file='" + data + "' '" + img + "' 8M");
  run("qemu-io -f qcow2 '" + img + "' -c 'write -P 0x11 0 100k' -c 'write -z 1M 64k'");
  OpenOptions o;
  o.data_file = open_file(data, true);
  auto image = open_image(img, true, o);
  ASSERT_TRUE(image);
  EXPECT_TRUE(image->info().has_data_file);
  EXPECT_EQ(image->data_file_name(), data);
  std::vector<std::byte> buf(70000, std::byte{0x22});
  ASSERT_FALSE(image->write(3 << 20, buf, zero_below()));
  ASSERT_FALSE(image->write(50000, buf, zero_below()));
  ASSERT_FALSE(image->write_zeroes(4 << 20, 1 << 20, true, zero_below()));
  MapExtent m;
  ASSERT_FALSE(image->block_status(3 << 20, 4096, &m));
  EXPECT_EQ(m.kind, ExtentKind::Data);
  EXPECT_TRUE(m.in_data_file);
  EXPECT_EQ(m.host_offset, 3u << 20);
  auto ours = read_all(*image);
  image.reset();
  qemu_check_clean(img);
  expect_same(ours, qemu_raw(img, d.path()));
  HeaderInfo hi;
  ASSERT_TRUE(Image::probe(open_file(img, false), &hi).ok());
  EXPECT_TRUE(hi.has_data_file);
  EXPECT_EQ(hi.data_file, data);
  // Without the data file, open refuses with the name.
  std::unique_ptr<Image> none;
  Status st = try_open(img, false, &none);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("x.raw"), std::string::npos);
}

TEST(Header, UnknownExtensionsSurviveRewrites) {
  TempDir d;
  std::string img = d / "u.qcow2";
  run("qemu-img create -q -f qcow2 -o lazy_refcounts=on '" + img + "' 4M");
  // Insert an unknown extension where the end marker was: find it first.
  uint64_t pos = 112;
  while (peek(img, pos, 4) != 0) pos += 8 + ((peek(img, pos + 4, 4) + 7) & ~7ull);
  patch32(img, pos, 0x12345678);
  patch32(img, pos + 4, 5);
  patch(img, pos + 8, {'h', 'e', 'l', 'l', 'o', 0, 0, 0});
  patch64(img, pos + 16, 0);
  patch64(img, 88, 1ull << 0 | 1ull << 5);  // bitmaps + unknown autoclear bit
  auto before = slurp(img);
  {
    auto image = open_image(img, true);
    ASSERT_TRUE(image);
    EXPECT_EQ(image->info().autoclear_features, 0u);  // cleared on open
    std::vector<std::byte> buf(4096, std::byte{1});
    ASSERT_FALSE(image->write(0, buf, zero_below()));  // sets/clears dirty
  }
  auto after = slurp(img);
  EXPECT_EQ(peek(img, pos, 4), 0x12345678u);
  EXPECT_EQ(0, std::memcmp(before.data() + pos, after.data() + pos, 24));
  EXPECT_EQ(peek(img, 88, 8), 0u);
  EXPECT_EQ(peek(img, 72, 8), 0u);  // dirty bit cleared at close
  std::string out = run("qemu-img check '" + img + "'");
  EXPECT_NE(out.find("No errors"), std::string::npos) << out;
}

TEST(Header, ReadOnlyOpenWritesNothing) {
  TempDir d;
  std::string img = d / "r.qcow2";
  run("qemu-img create -q -f qcow2 '" + img + "' 4M");
  patch64(img, 88, 1ull << 7);
  auto before = slurp(img);
  {
    auto image = open_image(img, false);
    std::vector<std::byte> buf(4096);
    EXPECT_EQ(image->write(0, buf, zero_below()),
              std::make_error_code(std::errc::operation_not_permitted));
    EXPECT_FALSE(image->read(0, buf, zero_below()));
    EXPECT_EQ(image->read(4 << 20, std::span(buf.data(), 1), zero_below()),
              std::make_error_code(std::errc::invalid_argument));
  }
  auto after = slurp(img);
  EXPECT_TRUE(before == after);
}

}  // namespace
}  // namespace layerd::qcow2::test
