// RawLayer over real files: range checks, read-only refusal, zeroing and
// trimming that deallocate, block status of sparse files, and the O_DIRECT
// bounce path for unaligned requests.
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <vector>

#include <gtest/gtest.h>

#include "overlay/raw_layer.h"
#include "qcow2/file.h"

namespace layerd {
namespace {

class RawLayerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/var/tmp/layerd-raw-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/img";
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  void make_file(uint64_t size, bool sparse) {
    int fd = ::open(path_.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0644);
    ASSERT_GE(fd, 0);
    if (sparse) {
      ASSERT_EQ(::ftruncate(fd, static_cast<off_t>(size)), 0);
    } else {
      std::vector<char> pattern(size);
      for (size_t i = 0; i < size; ++i) pattern[i] = static_cast<char>(i * 7 + 1);
      ASSERT_EQ(::write(fd, pattern.data(), size), static_cast<ssize_t>(size));
    }
    ::close(fd);
  }

  std::shared_ptr<Layer> open(bool read_only, bool direct = false) {
    std::error_code ec;
    FileOptions fo;
    fo.mode = read_only ? OpenMode::ReadOnly : OpenMode::ReadWrite;
    fo.direct = direct;
    auto f = open_posix_file(path_, fo, ec);
    if (!f) return nullptr;
    return make_raw_layer(std::shared_ptr<File>(std::move(f)),
                          RawLayerOptions{.read_only = read_only,
                                          .direct_alignment = direct ? 4096u : 0u});
  }

  std::string dir_;
  std::string path_;
};

TEST_F(RawLayerTest, ReadsWhatTheFileHolds) {
  make_file(1 << 16, false);
  auto layer = open(true);
  ASSERT_TRUE(layer);
  EXPECT_EQ(layer->size(), 1u << 16);
  std::vector<std::byte> buf(100);
  ASSERT_FALSE(layer->read(1000, buf));
  for (size_t i = 0; i < buf.size(); ++i)
    EXPECT_EQ(buf[i], static_cast<std::byte>((1000 + i) * 7 + 1));
}

TEST_F(RawLayerTest, RangesPastTheEndAreInvalid) {
  make_file(4096, false);
  auto layer = open(false);
  std::vector<std::byte> buf(16);
  EXPECT_EQ(layer->read(4090, buf), std::errc::invalid_argument);
  EXPECT_EQ(layer->write(4090, buf, false), std::errc::invalid_argument);
  EXPECT_EQ(layer->write_zeroes(UINT64_MAX - 1, 16, {}), std::errc::invalid_argument);
  EXPECT_EQ(layer->trim(4096, 1, false), std::errc::invalid_argument);
  EXPECT_FALSE(layer->read(4080, buf));  // exactly up to the end is fine
}

TEST_F(RawLayerTest, ReadOnlyLayerRefusesEveryWriteWithEperm) {
  make_file(4096, false);
  auto layer = open(true);
  std::vector<std::byte> buf(16);
  EXPECT_FALSE(layer->capabilities().writable);
  EXPECT_EQ(layer->write(0, buf, false), std::errc::operation_not_permitted);
  EXPECT_EQ(layer->write_zeroes(0, 16, {}), std::errc::operation_not_permitted);
  EXPECT_EQ(layer->trim(0, 16, false), std::errc::operation_not_permitted);
}

TEST_F(RawLayerTest, WriteThenReadBackWithFua) {
  make_file(1 << 16, false);
  auto layer = open(false);
  std::vector<std::byte> data(5000, std::byte{0xab});
  ASSERT_FALSE(layer->write(777, data, true));
  std::vector<std::byte> back(5000);
  ASSERT_FALSE(layer->read(777, back));
  EXPECT_EQ(back, data);
}

TEST_F(RawLayerTest, WriteZeroesWithTrimDeallocatesAndReadsZero) {
  make_file(1 << 20, false);
  auto layer = open(false);
  ASSERT_FALSE(layer->write_zeroes(0, 1 << 19, ZeroFlags{.may_trim = true}));
  std::vector<std::byte> back(1 << 19);
  ASSERT_FALSE(layer->read(0, back));
  EXPECT_EQ(std::count(back.begin(), back.end(), std::byte{0}), 1 << 19);
  Extent ex[4];
  size_t n = 0;
  ASSERT_FALSE(layer->block_status(0, 1 << 20, ex, &n));
  ASSERT_GE(n, 1u);
  EXPECT_TRUE(ex[0].hole);
  EXPECT_TRUE(ex[0].zero);
  EXPECT_EQ(ex[0].length, 1u << 19);
}

TEST_F(RawLayerTest, BlockStatusReportsHolesAndDataOfSparseFile) {
  make_file(1 << 20, true);
  {
    auto layer = open(false);
    std::vector<std::byte> data(65536, std::byte{1});
    ASSERT_FALSE(layer->write(262144, data, true));
  }
  auto layer = open(true);
  Extent ex[8];
  size_t n = 0;
  ASSERT_FALSE(layer->block_status(0, 1 << 20, ex, &n));
  ASSERT_EQ(n, 3u);
  EXPECT_TRUE(ex[0].hole);
  EXPECT_EQ(ex[0].length, 262144u);
  EXPECT_FALSE(ex[1].hole);
  EXPECT_FALSE(ex[1].zero);
  EXPECT_EQ(ex[1].length, 65536u);
  EXPECT_TRUE(ex[2].hole);
  EXPECT_EQ(ex[2].length, (1u << 20) - 262144 - 65536);
}

TEST_F(RawLayerTest, BlockStatusStopsWhenTheOutputIsFull) {
  make_file(1 << 20, true);
  {
    auto layer = open(false);
    std::vector<std::byte> data(4096, std::byte{1});
    for (uint64_t off = 0; off < (1 << 20); off += 65536)
      ASSERT_FALSE(layer->write(off, data, false));
  }
  auto layer = open(true);
  Extent ex[3];
  size_t n = 0;
  ASSERT_FALSE(layer->block_status(0, 1 << 20, ex, &n));
  EXPECT_EQ(n, 3u);
  EXPECT_EQ(ex[0].length + ex[1].length + ex[2].length, 65536u + 4096u);
}

TEST_F(RawLayerTest, TrimPunchesAHole) {
  make_file(1 << 20, false);
  auto layer = open(false);
  ASSERT_FALSE(layer->trim(0, 1 << 20, false));
  struct stat st {};
  ASSERT_EQ(::stat(path_.c_str(), &st), 0);
  EXPECT_EQ(st.st_blocks, 0);
  EXPECT_EQ(st.st_size, 1 << 20);
}

TEST_F(RawLayerTest, DirectIoServesUnalignedRequestsThroughABounceBuffer) {
  make_file(1 << 16, false);
  auto layer = open(false, /*direct=*/true);
  if (!layer) GTEST_SKIP() << "O_DIRECT not supported on /var/tmp";
  std::vector<std::byte> data(1000, std::byte{0x5c});
  ASSERT_FALSE(layer->write(4000, data, false));  // crosses a 4K boundary
  std::vector<std::byte> back(1100);
  ASSERT_FALSE(layer->read(3950, back));
  for (size_t i = 0; i < back.size(); ++i) {
    uint64_t off = 3950 + i;
    std::byte want = (off >= 4000 && off < 5000)
                         ? std::byte{0x5c}
                         : static_cast<std::byte>(off * 7 + 1);
    ASSERT_EQ(back[i], want) << "offset " << off;
  }
  ASSERT_FALSE(layer->write_zeroes(100, 50, {}));
  std::vector<std::byte> z(50);
  ASSERT_FALSE(layer->read(100, z));
  EXPECT_EQ(std::count(z.begin(), z.end(), std::byte{0}), 50);
}

std::vector<std::byte> head_of(std::string_view text, size_t at = 0) {
  std::vector<std::byte> b(kProbeBytes);
  std::memcpy(b.data() + at, text.data(), text.size());
  return b;
}

TEST(ImageHeader, RecognizesWhatQemuProbes) {
  EXPECT_FALSE(looks_like_image_header(head_of("")));
  EXPECT_FALSE(looks_like_image_header(head_of("just some data\n")));
  EXPECT_TRUE(looks_like_image_header(head_of("QFI\xfb")));
  EXPECT_TRUE(looks_like_image_header(head_of(std::string_view("QED\0", 4))));
  EXPECT_TRUE(looks_like_image_header(head_of("KDMV")));
  EXPECT_TRUE(looks_like_image_header(head_of("conectix")));
  EXPECT_TRUE(looks_like_image_header(head_of("vhdxfile")));
  EXPECT_TRUE(looks_like_image_header(head_of("LUKS\xba\xbe")));
  EXPECT_TRUE(looks_like_image_header(head_of("\x7f\x10\xda\xbe", 64)));  // VDI
  EXPECT_FALSE(looks_like_image_header(head_of("\x7f\x10\xda\xbe", 60)));
  // VMDK text descriptors: comments and blank lines, then version=N.
  EXPECT_TRUE(looks_like_image_header(head_of("# Disk DescriptorFile\nversion=1\n")));
  EXPECT_TRUE(looks_like_image_header(head_of("#c\n   \r\nversion=3\r\n")));
  EXPECT_FALSE(looks_like_image_header(head_of("# Disk DescriptorFile\nCID=1\nversion=1\n")));
  EXPECT_FALSE(looks_like_image_header(head_of("version=4\n")));
  // Only whole magics count.
  EXPECT_FALSE(looks_like_image_header(head_of("QFI")));
}

TEST_F(RawLayerTest, RefusingFormatHeadersChecksWritesIntoBlockZero) {
  make_file(1 << 16, false);
  std::error_code ec;
  auto f = open_posix_file(path_, FileOptions{.mode = OpenMode::ReadWrite}, ec);
  ASSERT_TRUE(f) << ec.message();
  auto layer = make_raw_layer(std::shared_ptr<File>(std::move(f)),
                              RawLayerOptions{.refuse_format_headers = true});
  auto qf = head_of("QF");
  auto ib = head_of("I\xfb");
  ASSERT_FALSE(layer->write(0, std::span(qf).first(2), false));
  EXPECT_EQ(layer->write(2, std::span(ib).first(2), false),
            std::errc::operation_not_permitted);
  EXPECT_FALSE(layer->write(512, head_of("QFI\xfb"), false)) << "block 1 is free";
  std::vector<std::byte> back(4);
  ASSERT_FALSE(layer->read(0, back));
  EXPECT_EQ(back[2], static_cast<std::byte>(2 * 7 + 1)) << "the refused write left no trace";
}

TEST_F(RawLayerTest, SizeMayExceedTheFileAndTheTailReadsAsAHoleOfZeros) {
  make_file(1000, false);
  std::error_code ec;
  auto f = open_posix_file(path_, FileOptions{.mode = OpenMode::ReadOnly}, ec);
  ASSERT_TRUE(f) << ec.message();
  auto layer = make_raw_layer(std::shared_ptr<File>(std::move(f)),
                              RawLayerOptions{.read_only = true, .size = 1024});
  EXPECT_EQ(layer->size(), 1024u);
  std::vector<std::byte> tail(24, std::byte{0xee});
  ASSERT_FALSE(layer->read(1000, tail));
  for (std::byte b : tail) EXPECT_EQ(b, std::byte{0});
}

TEST_F(RawLayerTest, MissingFileFailsWithEnoent) {
  std::error_code ec;
  auto f = open_posix_file(dir_ + "/nope", FileOptions{}, ec);
  EXPECT_FALSE(f);
  EXPECT_EQ(ec, std::errc::no_such_file_or_directory);
}

TEST_F(RawLayerTest, DirectoryIsRefused) {
  std::error_code ec;
  auto f = open_posix_file(dir_, FileOptions{}, ec);
  EXPECT_FALSE(f);
  EXPECT_EQ(ec, std::errc::is_a_directory);
}

}  // namespace
}  // namespace layerd
