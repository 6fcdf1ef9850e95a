// Image::change_backing_file: a new backing file name and format in one
// header write that QEMU reads back, every other extension kept.
#include "test_util.h"

namespace layerd::qcow2::test {
namespace {

std::string q(const std::string& s) { return "'" + s + "'"; }

struct Ext {
  uint32_t type, len;
  uint64_t data;  // file offset of the data
};

// The header extensions of `path` (up to the end marker).
std::vector<Ext> extensions(const std::string& path) {
  uint64_t cs = 1ull << peek(path, 20, 4);
  uint64_t version = peek(path, 4, 4);
  uint64_t pos = version == 2 ? 72 : peek(path, 100, 4);
  uint64_t end = peek(path, 8, 8) ? peek(path, 8, 8) : cs;
  std::vector<Ext> out;
  while (pos + 8 <= end) {
    uint32_t type = static_cast<uint32_t>(peek(path, pos, 4));
    uint32_t len = static_cast<uint32_t>(peek(path, pos + 4, 4));
    if (type == 0) break;
    out.push_back({type, len, pos + 8});
    pos += 8 + (len + 7) / 8 * 8;
  }
  return out;
}

class ChangeBacking : public ::testing::Test {
 protected:
  void SetUp() override {
    run("qemu-img create -q -f qcow2 " + q(dir_ / "base.qcow2") + " 4M");
    run("qemu-io -c 'write -P 1 0 4M' " + q(dir_ / "base.qcow2"));
    run("qemu-img create -q -f raw " + q(dir_ / "other.raw") + " 4M");
    run("qemu-io -f raw -c 'write -P 2 0 4M' " + q(dir_ / "other.raw"));
    run("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 " + q(top_) + " 4M");
    run("qemu-io -c 'write -P 3 1M 64k' " + q(top_));
  }
  std::string info() { return run("qemu-img info -U --output=json " + q(top_)); }
  TempDir dir_;
  std::string top_ = dir_ / "top.qcow2";
};

TEST_F(ChangeBacking, QemuSeesTheNewNameAndFormat) {
  run("qemu-img bitmap --add " + q(top_) + " b0");
  {
    auto img = open_image(top_, true);
    Status st = img->change_backing_file("other.raw", "raw");
    ASSERT_TRUE(st.ok()) << st.message();
    EXPECT_EQ(img->backing_file(), "other.raw");
    EXPECT_EQ(img->backing_format(), "raw");
    EXPECT_EQ(img->info().backing_file, "other.raw");
    EXPECT_EQ(img->info().backing_format, "raw");
    // Still usable: writes and the bitmaps written back at close (their
    // extension moved within the header).
    std::vector<std::byte> w(4096, std::byte{4});
    ASSERT_FALSE(img->write(2 << 20, w, zero_below()));
    ASSERT_FALSE(img->close());
  }
  std::string out = info();
  EXPECT_NE(out.find("\"backing-filename\": \"other.raw\""), std::string::npos) << out;
  EXPECT_NE(out.find("\"backing-filename-format\": \"raw\""), std::string::npos) << out;
  EXPECT_NE(out.find("\"name\": \"b0\""), std::string::npos) << out;
  EXPECT_EQ(out.find("in-use"), std::string::npos) << out;
  qemu_check_clean(top_);
  // The guest sees the new backing file where the top has nothing.
  auto raw = qemu_raw(top_, dir_.path());
  EXPECT_EQ(raw[0], std::byte{2});
  EXPECT_EQ(raw[1 << 20], std::byte{3});
  EXPECT_EQ(raw[2 << 20], std::byte{4});
  // Our own open agrees.
  auto img = open_image(top_, false);
  EXPECT_EQ(img->backing_file(), "other.raw");
  EXPECT_EQ(img->backing_format(), "raw");
  EXPECT_EQ(img->bitmaps().size(), 1u);
}

TEST_F(ChangeBacking, AnEmptyFormatDropsTheExtension) {
  {
    auto img = open_image(top_, true);
    ASSERT_TRUE(img->change_backing_file("base.qcow2", "").ok());
  }
  for (const Ext& e : extensions(top_)) EXPECT_NE(e.type, 0xe2792acau);
  std::string out = info();
  EXPECT_NE(out.find("\"backing-filename\": \"base.qcow2\""), std::string::npos) << out;
  EXPECT_EQ(out.find("backing-filename-format"), std::string::npos) << out;
  qemu_check_clean(top_);
  auto img = open_image(top_, false);
  EXPECT_EQ(img->backing_format(), "");
}

TEST_F(ChangeBacking, AnEmptyNameRemovesTheBacking) {
  {
    auto img = open_image(top_, true);
    EXPECT_EQ(img->change_backing_file("", "qcow2").code(), std::errc::invalid_argument);
    ASSERT_TRUE(img->change_backing_file("", "").ok());
    EXPECT_EQ(img->backing_file(), "");
  }
  EXPECT_EQ(peek(top_, 8, 8), 0u);
  std::string out = info();
  EXPECT_EQ(out.find("backing-filename"), std::string::npos) << out;
  qemu_check_clean(top_);
  auto raw = qemu_raw(top_, dir_.path());
  EXPECT_EQ(raw[0], std::byte{0});
  EXPECT_EQ(raw[1 << 20], std::byte{3});
}

TEST_F(ChangeBacking, UnknownExtensionsAreKept) {
  // Put an unknown extension where the end marker was.
  auto before = extensions(top_);
  ASSERT_FALSE(before.empty());
  uint64_t end = before.back().data + (before.back().len + 7) / 8 * 8;
  // The name after it must move: rewrite it behind the new extension.
  uint32_t name_len = static_cast<uint32_t>(peek(top_, 16, 4));
  patch32(top_, end, 0x12345678);
  patch32(top_, end + 4, 11);
  patch(top_, end + 8, {'u', 'n', 'k', 'n', 'o', 'w', 'n', ' ', 'e', 'x', 't', 0, 0, 0, 0, 0});
  patch64(top_, end + 24, 0);  // end marker
  patch(top_, end + 32, std::vector<uint8_t>{'b', 'a', 's', 'e', '.', 'q', 'c', 'o', 'w', '2'});
  patch64(top_, 8, end + 32);
  ASSERT_EQ(name_len, 10u);
  run("qemu-img info " + q(top_));
  {
    auto img = open_image(top_, true);
    ASSERT_TRUE(img->change_backing_file("other.raw", "raw").ok());
  }
  auto after = extensions(top_);
  bool found = false;
  for (const Ext& e : after) {
    if (e.type != 0x12345678) continue;
    found = true;
    EXPECT_EQ(e.len, 11u);
    EXPECT_EQ(peek(top_, e.data, 8), 0x756e6b6e6f776e20ull);  // "unknown "
  }
  EXPECT_TRUE(found);
  EXPECT_EQ(after.size(), before.size() + 1);
  std::string out = info();
  EXPECT_NE(out.find("\"backing-filename\": \"other.raw\""), std::string::npos) << out;
  qemu_check_clean(top_);
}

TEST_F(ChangeBacking, ANameThatDoesNotFitIsRefusedAndNothingChanges) {
  std::string small = dir_ / "small.qcow2";
  run("qemu-img create -q -f qcow2 -o cluster_size=512 -b base.qcow2 -F qcow2 " +
      q(small) + " 4M");
  auto header = slurp(small);
  header.resize(512);
  {
    auto img = open_image(small, true);
    Status st = img->change_backing_file(std::string(400, 'x'), "qcow2");
    EXPECT_EQ(st.code(), std::errc::invalid_argument);
    EXPECT_NE(st.message().find("backing file name too long"), std::string::npos);
    EXPECT_EQ(img->backing_file(), "base.qcow2");
    EXPECT_EQ(img->change_backing_file(std::string(1024, 'y'), "").code(),
              std::errc::invalid_argument);
  }
  auto now = slurp(small);
  now.resize(512);
  // Only the dirty bit may have come and gone: the header is as it was.
  EXPECT_EQ(now, header);
  std::string out = run("qemu-img info --output=json " + q(small));
  EXPECT_NE(out.find("\"backing-filename\": \"base.qcow2\""), std::string::npos) << out;
}

TEST_F(ChangeBacking, NeedsAWritableImage) {
  auto img = open_image(top_, false);
  EXPECT_EQ(img->change_backing_file("other.raw", "raw").code(),
            std::errc::invalid_argument);
  EXPECT_EQ(img->backing_file(), "base.qcow2");
}

TEST_F(ChangeBacking, WorksOnVersion2) {
  std::string v2 = dir_ / "v2.qcow2";
  run("qemu-img create -q -f qcow2 -o compat=0.10 -b base.qcow2 -F qcow2 " + q(v2) + " 4M");
  {
    auto img = open_image(v2, true);
    ASSERT_TRUE(img->change_backing_file("other.raw", "raw").ok());
  }
  std::string out = run("qemu-img info --output=json " + q(v2));
  EXPECT_NE(out.find("\"backing-filename\": \"other.raw\""), std::string::npos) << out;
  EXPECT_NE(out.find("\"backing-filename-format\": \"raw\""), std::string::npos) << out;
  qemu_check_clean(v2);
}

}  // namespace
}  // namespace layerd::qcow2::test
