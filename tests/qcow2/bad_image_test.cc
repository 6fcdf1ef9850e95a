// Hand-damaged images: each must give a clear error from open, or EIO from
// I/O with the image marked corrupt, and never crash, hang or allocate
// without bound (run under ASan/UBSan).
#include <gtest/gtest.h>

#include <zstd.h>

#include <chrono>
#include <cstring>

#include "test_util.h"

namespace layerd::qcow2::test {
namespace {

class BadImage : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = dir_ / "bad.qcow2";
    run("qemu-img create -q -f qcow2 '" + path_ + "' 8M");
    run("qemu-io -f qcow2 '" + path_ + "' -c 'write -P 1 0 256k' -c 'write -P 2 4M 64k'");
  }
  // Opens and expects an error whose message contains `what`.
  void expect_open_error(const std::string& what) {
    std::unique_ptr<Image> img;
    Status st = try_open(path_, false, &img);
    EXPECT_FALSE(st.ok());
    EXPECT_FALSE(img);
    EXPECT_NE(st.message().find(what), std::string::npos) << st.message();
  }
  uint64_t l1_offset() { return peek(path_, 40, 8); }
  uint64_t l2_offset() { return peek(path_, l1_offset(), 8) & 0x00fffffffffffe00ull; }
  TempDir dir_;
  std::string path_;
};

TEST_F(BadImage, BadMagic) { patch32(path_, 0, 0x12345678); expect_open_error("magic"); }
TEST_F(BadImage, BadVersion) { patch32(path_, 4, 4); expect_open_error("version 4"); }
TEST_F(BadImage, ClusterBitsTooSmall) { patch32(path_, 20, 8); expect_open_error("cluster_bits 8"); }
TEST_F(BadImage, ClusterBitsTooLarge) { patch32(path_, 20, 0xffffffff); expect_open_error("cluster_bits"); }
TEST_F(BadImage, HeaderLengthTooSmall) { patch32(path_, 100, 50); expect_open_error("header_length"); }
TEST_F(BadImage, HeaderLengthHuge) { patch32(path_, 100, 0x7ffffff8); expect_open_error("header_length"); }
TEST_F(BadImage, HeaderLengthUnaligned) { patch32(path_, 100, 105); expect_open_error("header_length"); }
TEST_F(BadImage, Encrypted) { patch32(path_, 32, 1); expect_open_error("encrypted"); }
TEST_F(BadImage, L1SizeHuge) { patch32(path_, 36, 0xffffffff); expect_open_error("L1 table too large"); }
TEST_F(BadImage, L1SizeTooSmall) { patch32(path_, 36, 0); expect_open_error("L1 table too small"); }
TEST_F(BadImage, L1OffsetMisaligned) { patch64(path_, 40, 0x30001); expect_open_error("not cluster aligned"); }
TEST_F(BadImage, L1OffsetBeyondEof) { patch64(path_, 40, 1ull << 50); expect_open_error("beyond end of file"); }
TEST_F(BadImage, L1OverlapsHeader) { patch64(path_, 40, 0); expect_open_error("overlaps"); }
TEST_F(BadImage, L1OverlapsRefcountTable) { patch64(path_, 40, peek(path_, 48, 8)); expect_open_error("overlaps"); }
TEST_F(BadImage, RefcountTableZero) { patch64(path_, 48, 0); expect_open_error("refcount table offset"); }
TEST_F(BadImage, RefcountTableBeyondEof) { patch64(path_, 48, 1ull << 45); expect_open_error("beyond end of file"); }
TEST_F(BadImage, RefcountTableHuge) { patch32(path_, 56, 0xffffffff); expect_open_error("refcount table size"); }
TEST_F(BadImage, RefcountOrderTooLarge) { patch32(path_, 96, 7); expect_open_error("refcount_order"); }
TEST_F(BadImage, VirtualSizeHuge) { patch64(path_, 24, 1ull << 63); expect_open_error("virtual size"); }
TEST_F(BadImage, TooManySnapshots) {
  patch32(path_, 60, 0x7fffffff);
  patch64(path_, 64, 0x10000);
  expect_open_error("too many snapshots");
}
TEST_F(BadImage, SnapshotTableBeyondEof) {
  patch32(path_, 60, 5);
  patch64(path_, 64, 1ull << 40);
  expect_open_error("snapshot table");
}
TEST_F(BadImage, SnapshotTableGarbage) {
  // Point the snapshot table at the data (0x01 bytes): extra data size is huge.
  patch32(path_, 60, 3);
  patch64(path_, 64, peek(path_, l2_offset(), 8) & 0x00fffffffffffe00ull);
  expect_open_error("snapshot");
}
TEST_F(BadImage, BackingNameTooLong) {
  patch64(path_, 8, 0x200);
  patch32(path_, 16, 5000);
  expect_open_error("backing file name");
}
TEST_F(BadImage, BackingNameOutsideFirstCluster) {
  patch64(path_, 8, 0x20000);
  patch32(path_, 16, 10);
  expect_open_error("backing file name");
}
TEST_F(BadImage, ExtensionLengthHuge) {
  // Replace the first extension (feature table) length.
  patch32(path_, 112 + 4, 0x7fffffff);
  expect_open_error("header extension");
}
TEST_F(BadImage, UnknownIncompatibleBitNamedFromTable) {
  // Rename the feature table's entry for bit 4 to bit 10, then set bit 10.
  uint64_t pos = 112 + 8;
  for (int i = 0; i < 10; ++i, pos += 48) {
    if (peek(path_, pos, 1) == 0 && peek(path_, pos + 1, 1) == 4) {
      patch(path_, pos + 1, {10});
      break;
    }
  }
  patch64(path_, 72, 1ull << 10);
  expect_open_error("extended L2 entries (bit 10)");
}
TEST_F(BadImage, UnknownIncompatibleBitWithoutName) {
  patch64(path_, 72, 1ull << 40);
  expect_open_error("bit 40");
}
TEST_F(BadImage, CompressionBitWithoutType) {
  patch64(path_, 72, 1ull << 3);
  expect_open_error("compression type");
}
TEST_F(BadImage, DataFileBitWithoutDataFile) {
  patch64(path_, 72, 1ull << 2);
  expect_open_error("external data file");
}
TEST_F(BadImage, TruncatedHeader) {
  std::filesystem::resize_file(path_, 50);
  expect_open_error("too small");
}
TEST_F(BadImage, EmptyFile) {
  std::filesystem::resize_file(path_, 0);
  expect_open_error("too small");
}

// A 2 MiB header cluster holds up to 262,000 (empty) header extensions; the
// duplicate check used to compare each with all before it (minutes).
TEST(BadHeader, HeaderClusterFullOfExtensionsOpensQuickly) {
  TempDir d;
  std::string path = d / "ext.qcow2";
  run("qemu-img create -q -f qcow2 -o cluster_size=2M '" + path + "' 8M");
  const uint64_t header_length = peek(path, 100, 4);
  std::vector<uint8_t> area((2u << 20) - header_length);
  for (size_t pos = 0, i = 0; pos + 8 <= area.size(); pos += 8, ++i) {
    const std::vector<uint8_t> type = be(0x10000000 + i, 4);  // unknown, len 0
    std::copy(type.begin(), type.end(), area.begin() + ptrdiff_t(pos));
  }
  patch(path, header_length, area);
  const auto start = std::chrono::steady_clock::now();
  auto img = open_image(path, false);
  EXPECT_TRUE(img);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

// 1300 snapshots, each an L1 table of 4096 entries (the same table) that
// all point at one L2 table, in 104 KiB: check walked that L2 table 5.3
// million times (minutes). It now walks each distinct table once.
TEST(BadSnapshots, SnapshotsSharingOneL2TableAreCheckedQuickly) {
  constexpr uint64_t cs = 512, snapshots = 1300, snapshot_l1_entries = 4096;
  constexpr uint64_t l1 = 3 * cs, l2 = 4 * cs, data = 5 * cs, snapshot_l1 = 8 * cs,
                     table = 80 * cs;
  std::vector<std::byte> image(table + snapshots * 48 + cs);
  auto put = [&](uint64_t off, uint64_t v, int n) {
    for (int i = 0; i < n; ++i) image[off + i] = std::byte(v >> (8 * (n - 1 - i)));
  };
  put(0, 0x514649fb, 4);  // "QFI\xfb"
  put(4, 3, 4);
  put(20, 9, 4);          // 512-byte clusters
  put(24, 65536, 8);      // virtual size
  put(36, 2, 4);          // L1 entries
  put(40, l1, 8);
  put(48, cs, 8);         // refcount table: one cluster at cluster 1
  put(56, 1, 4);
  put(60, snapshots, 4);
  put(64, table, 8);
  put(96, 4, 4);          // 16-bit refcounts
  put(100, 104, 4);       // header length
  put(cs, 2 * cs, 8);     // refcount block at cluster 2
  for (uint64_t c = 0; c < image.size() / cs; ++c) put(2 * cs + 2 * c, 1, 2);
  put(l1, l2 | (1ull << 63), 8);
  for (uint64_t k = 0; k < 64; ++k) put(l2 + 8 * k, data | (1ull << 63), 8);
  for (uint64_t i = 0; i < snapshot_l1_entries; ++i) put(snapshot_l1 + 8 * i, l2, 8);
  for (uint64_t s = 0, pos = table; s < snapshots; ++s, pos += 48) {
    put(pos, snapshot_l1, 8);
    put(pos + 8, snapshot_l1_entries, 4);
    put(pos + 12, 4, 2);  // id "%04u"
    const std::string id = std::to_string(1000 + s);
    std::memcpy(&image[pos + 40], id.data(), 4);
  }
  auto file = std::shared_ptr<File>(make_memory_file());
  ASSERT_FALSE(file->pwrite(image, 0));
  std::unique_ptr<Image> img;
  OpenOptions o;
  o.read_only = true;
  ASSERT_TRUE(Image::open(file, o, &img).ok());
  ASSERT_EQ(img->snapshots().size(), snapshots);
  const auto start = std::chrono::steady_clock::now();
  CheckReport report;
  ASSERT_TRUE(img->check(Repair::None, &report).ok());
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  // References still count one by one: the shared clusters' refcounts of 1
  // are far too low.
  EXPECT_GT(report.corruptions, 0u);
}

// --- Corruption found during I/O -----------------------------------------

TEST_F(BadImage, L2BeyondEofFailsReadAndMarksCorrupt) {
  patch64(path_, l1_offset(), (1ull << 40) | (1ull << 63));
  {
    auto img = open_image(path_, true);
    ASSERT_TRUE(img);
    std::vector<std::byte> buf(4096);
    EXPECT_EQ(img->read(0, buf, zero_below()), std::make_error_code(std::errc::io_error));
    EXPECT_TRUE(img->corrupt());
    // Writes now fail, even elsewhere.
    EXPECT_EQ(img->write(4 << 20, buf, zero_below()), std::make_error_code(std::errc::io_error));
  }
  EXPECT_NE(peek(path_, 72, 8) & 2, 0u) << "corrupt bit written";
  std::string info = run("qemu-img info '" + path_ + "'");
  EXPECT_NE(info.find("corrupt: true"), std::string::npos) << info;
  // Reopening a corrupt image: read-only, writes EIO.
  auto img = open_image(path_, true);
  ASSERT_TRUE(img);
  EXPECT_TRUE(img->read_only());
  std::vector<std::byte> buf(512);
  EXPECT_EQ(img->write(4 << 20, buf, zero_below()), std::make_error_code(std::errc::io_error));
}

TEST_F(BadImage, MisalignedL2EntryFailsWithEio) {
  uint64_t l2 = l2_offset();
  patch64(path_, l2 + 8, (peek(path_, l2 + 8, 8) + 4096) | (1ull << 63));
  auto img = open_image(path_, false);
  std::vector<std::byte> buf(4096);
  EXPECT_FALSE(img->read(0, buf, zero_below()));  // cluster 0 is fine
  EXPECT_EQ(img->read(65536, buf, zero_below()), std::make_error_code(std::errc::io_error));
  MapExtent m;
  EXPECT_EQ(img->block_status(65536, 4096, &m), std::make_error_code(std::errc::io_error));
}

TEST_F(BadImage, GarbageCompressedClusterFailsWithEio) {
  uint64_t l2 = l2_offset();
  // A compressed descriptor pointing at the L1 table (not deflate data).
  patch64(path_, l2, (1ull << 62) | l1_offset());
  auto img = open_image(path_, false);
  std::vector<std::byte> buf(4096);
  EXPECT_EQ(img->read(0, buf, zero_below()), std::make_error_code(std::errc::io_error));
}

// A zstd frame may ask for a window of up to 128 MiB (the library's default
// limit), which the decoder would allocate for every read of the cluster.
// A cluster never needs a window larger than itself: such a frame is corrupt.
TEST(BadCompressedImage, ZstdWindowLargerThanTheClusterIsCorrupt) {
  TempDir d;
  std::string raw = d / "src.raw", path = d / "c.qcow2";
  run("qemu-img create -q -f raw '" + raw + "' 1M");
  run("qemu-io -f raw '" + raw + "' -c 'write -P 0x5a 0 64k'");
  run("qemu-img convert -c -O qcow2 -o compression_type=zstd '" + raw + "' '" + path + "'");
  // Recompress cluster 0 with a 128 MiB window and no content size, append
  // the frame to the file and point the L2 entry at it.
  std::vector<std::byte> data(65536, std::byte{0x5a}), frame(ZSTD_compressBound(65536));
  ZSTD_CCtx* cctx = ZSTD_createCCtx();
  ZSTD_CCtx_setParameter(cctx, ZSTD_c_windowLog, 27);
  ZSTD_CCtx_setParameter(cctx, ZSTD_c_contentSizeFlag, 0);
  ZSTD_inBuffer in{data.data(), data.size(), 0};
  ZSTD_outBuffer out{frame.data(), frame.size(), 0};
  ASSERT_FALSE(ZSTD_isError(ZSTD_compressStream2(cctx, &out, &in, ZSTD_e_continue)));
  ASSERT_EQ(ZSTD_compressStream2(cctx, &out, &in, ZSTD_e_end), 0u);
  ZSTD_freeCCtx(cctx);
  ASSERT_LE(out.pos, 512u);
  const uint64_t frame_at = std::filesystem::file_size(path);
  std::vector<uint8_t> frame_bytes(512, 0);
  std::memcpy(frame_bytes.data(), frame.data(), out.pos);
  patch(path, frame_at, frame_bytes);
  const uint64_t l2 = peek(path, peek(path, 40, 8), 8) & 0x00fffffffffffe00ull;
  ASSERT_NE(peek(path, l2, 8) & (1ull << 62), 0u) << "cluster 0 not compressed";
  patch64(path, l2, (1ull << 62) | frame_at);  // one sector at frame_at

  auto img = open_image(path, false);
  ASSERT_TRUE(img);
  std::vector<std::byte> buf(4096);
  EXPECT_EQ(img->read(0, buf, zero_below()), std::make_error_code(std::errc::io_error));
  EXPECT_TRUE(img->corrupt());
}

TEST_F(BadImage, RefcountBlockBeyondEofFailsAllocation) {
  uint64_t rt = peek(path_, 48, 8);
  patch64(path_, rt, 1ull << 44);
  auto img = open_image(path_, true);
  ASSERT_TRUE(img);
  std::vector<std::byte> buf(4096, std::byte{5});
  EXPECT_FALSE(img->write(0, buf, zero_below()));  // in place: no allocation
  EXPECT_EQ(img->write(6 << 20, buf, zero_below()), std::make_error_code(std::errc::io_error));
  EXPECT_TRUE(img->corrupt());
}

TEST_F(BadImage, L2PointingAtHeaderIsCorrupt) {
  patch64(path_, l1_offset(), 1ull << 63);  // offset 0 with COPIED: unallocated
  patch64(path_, l1_offset(), 512 | (1ull << 63));
  auto img = open_image(path_, false);
  std::vector<std::byte> buf(512);
  EXPECT_EQ(img->read(0, buf, zero_below()), std::make_error_code(std::errc::io_error));
}

TEST_F(BadImage, DataClusterOnTopOfL1IsNeverWritten) {
  uint64_t l2 = l2_offset();
  patch64(path_, l2 + 8, l1_offset() | (1ull << 63));  // guest 64k -> L1 table
  auto l1_before = peek(path_, l1_offset(), 8);
  {
    auto img = open_image(path_, true);
    std::vector<std::byte> buf(4096, std::byte{0xee});
    EXPECT_EQ(img->write(65536, buf, zero_below()), std::make_error_code(std::errc::io_error));
    EXPECT_TRUE(img->corrupt());
    EXPECT_NE(img->corrupt_reason().find("metadata"), std::string::npos) << img->corrupt_reason();
  }
  EXPECT_EQ(peek(path_, l1_offset(), 8), l1_before);
}

// Random byte flips in the metadata: whatever happens, no crash and no hang.
TEST(BadImageFuzz, RandomMetadataDamage) {
  TempDir d;
  std::string src = d / "src.qcow2";
  run("qemu-img create -q -f qcow2 -o cluster_size=4k '" + src + "' 4M");
  run("qemu-io -f qcow2 '" + src + "' -c 'write -P 1 0 256k' -c 'write -c -P 2 1M 64k'"
      " -c 'write -z 2M 64k'");
  run("qemu-img snapshot -c s '" + src + "'");
  run("qemu-io -f qcow2 '" + src + "' -c 'write -P 3 0 8k'");
  auto pristine = slurp(src);
  std::mt19937_64 rng(getenv("QCOW2_FUZZ_SEED") ? atoi(getenv("QCOW2_FUZZ_SEED")) : 1234);
  int opened = 0;
  const int iters = getenv("QCOW2_FUZZ_ITERS") ? atoi(getenv("QCOW2_FUZZ_ITERS")) : 200;
  for (int iter = 0; iter < iters; ++iter) {
    auto mem = std::shared_ptr<File>(make_memory_file());
    ASSERT_FALSE(mem->pwrite(pristine, 0));
    int flips = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < flips; ++k) {
      // Bias toward the header and the first metadata clusters.
      uint64_t r = rng() % 3;
      uint64_t limit = r == 0 ? 512
                       : r == 1 ? std::min<uint64_t>(pristine.size(), 12 * 4096)
                                : pristine.size();
      uint64_t off = rng() % limit;
      std::byte b{static_cast<uint8_t>(rng())};
      ASSERT_FALSE(mem->pwrite(std::span(&b, 1), off));
    }
    std::unique_ptr<Image> img;
    OpenOptions o;
    if (!Image::open(mem, o, &img).ok()) continue;
    ++opened;
    std::vector<std::byte> buf(64 * 1024);
    for (uint64_t off = 0; off + buf.size() <= img->size(); off += buf.size())
      (void)img->read(off, buf, zero_below());
    MapExtent m;
    for (uint64_t off = 0; off < img->size(); off += m.length ? m.length : 4096)
      if (img->block_status(off, img->size() - off, &m)) break;
    std::memset(buf.data(), 7, buf.size());
    (void)img->write(12345, std::span(buf.data(), 10000), zero_below());
    (void)img->write_zeroes(3 << 20, 100000, true, zero_below());
    (void)img->discard(0, 1 << 20, DiscardMode::Unallocate, zero_below());
    (void)img->flush();
    for (auto& s : img->snapshots()) {
      std::unique_ptr<Image> v;
      if (img->open_snapshot(s.id, &v).ok() && v->size() <= (64 << 20))
        for (uint64_t off = 0; off + buf.size() <= v->size(); off += buf.size())
          (void)v->read(off, buf, zero_below());
    }
    if (iter % 4 == 0) {
      (void)img->create_snapshot("fuzz");
      (void)img->delete_snapshot("1");
    }
    CheckReport rep;
    (void)img->check(Repair::All, &rep);
  }
  EXPECT_GT(opened, 10);
}

}  // namespace
}  // namespace layerd::qcow2::test
