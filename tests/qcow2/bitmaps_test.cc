// Persistent dirty bitmaps: images get their bitmaps from `qemu-img bitmap`
// and qemu-io, are written through Image, and qemu (qemu-img check/info,
// qemu-nbd -B with nbdinfo --map) is the oracle for what is on disk.
#include <gtest/gtest.h>

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <sstream>
#include <thread>

#include "qcow2/bitmaps.h"
#include "tests/qcow2/faulty_file.h"
#include "test_util.h"

namespace layerd::qcow2::test {
namespace {

std::string q(const std::string& s) { return "'" + s + "'"; }

// The dirty granules of `bitmap` according to qemu-nbd -B and nbdinfo.
// Extents are byte ranges [offset, offset + length).
struct Extent {
  uint64_t offset, length;
  bool operator==(const Extent&) const = default;
};
std::ostream& operator<<(std::ostream& o, const Extent& e) {
  return o << "[" << e.offset << ", +" << e.length << ")";
}

std::vector<Extent> qemu_dirty(const std::string& img, const std::string& bitmap) {
  static int n = 0;
  std::string sock = img + "." + std::to_string(++n) + ".sock";
  std::string pid_file = sock + ".pid";
  run("qemu-nbd --fork -r -f qcow2 -B " + bitmap + " -k " + q(sock) +
      " --pid-file=" + q(pid_file) + " " + q(img));
  pid_t pid = static_cast<pid_t>(std::stol(run("cat " + q(pid_file))));
  std::string out = run("nbdinfo --map=qemu:dirty-bitmap:" + bitmap +
                        " 'nbd+unix:///?socket=" + sock + "'");
  // qemu-nbd leaves with its last client; wait, so that it has removed its
  // socket before the test directory goes.
  while (kill(pid, 0) == 0) usleep(1000);
  std::vector<Extent> dirty;
  std::istringstream in(out);
  uint64_t off, len, type;
  std::string desc;
  while (in >> off >> len >> type && std::getline(in, desc)) {
    if (!(type & 1)) continue;
    if (!dirty.empty() && dirty.back().offset + dirty.back().length == off)
      dirty.back().length += len;
    else
      dirty.push_back({off, len});
  }
  return dirty;
}

// The same, from Image::dirty_status.
std::vector<Extent> our_dirty(const Image& img, const std::string& bitmap) {
  std::vector<Extent> dirty;
  for (uint64_t off = 0; off < img.size();) {
    DirtyExtent e;
    EXPECT_FALSE(img.dirty_status(bitmap, off, img.size() - off, &e));
    if (e.length == 0) break;
    if (e.dirty) {
      if (!dirty.empty() && dirty.back().offset + dirty.back().length == off)
        dirty.back().length += e.length;
      else
        dirty.push_back({off, e.length});
    }
    off += e.length;
  }
  return dirty;
}

// The granule-aligned ranges that writes to `ranges` dirty, merged.
std::vector<Extent> expected_dirty(std::vector<Extent> ranges, uint64_t gran,
                                   uint64_t disk) {
  std::vector<Extent> out;
  std::sort(ranges.begin(), ranges.end(),
            [](auto& a, auto& b) { return a.offset < b.offset; });
  for (auto& r : ranges) {
    uint64_t b = r.offset / gran * gran;
    uint64_t e = std::min(disk, (r.offset + r.length + gran - 1) / gran * gran);
    if (!out.empty() && out.back().offset + out.back().length >= b) {
      uint64_t end = std::max(out.back().offset + out.back().length, e);
      out.back().length = end - out.back().offset;
    } else {
      out.push_back({b, e - b});
    }
  }
  return out;
}

std::string qemu_info(const std::string& img) {
  return run("qemu-img info -U --output=json " + q(img));
}

// Where the bitmap directory entries of an image are (parsed by hand, so
// the tests can damage them).
struct DirEntryAt {
  uint64_t at;  // file offset of the entry
  uint64_t table_offset;
  uint32_t table_size, flags;
  std::string name;
};
uint64_t bitmaps_ext_at(const std::string& img) {
  uint64_t pos = peek(img, 100, 4);  // header_length
  for (;;) {
    uint64_t type = peek(img, pos, 4), len = peek(img, pos + 4, 4);
    if (type == 0) return 0;
    if (type == 0x23852875) return pos + 8;
    pos += 8 + ((len + 7) & ~7ull);
  }
}
std::vector<DirEntryAt> directory(const std::string& img) {
  uint64_t ext = bitmaps_ext_at(img);
  uint64_t n = peek(img, ext, 4), off = peek(img, ext + 16, 8);
  std::vector<DirEntryAt> out;
  for (uint64_t i = 0, p = off; i < n; ++i) {
    DirEntryAt e;
    e.at = p;
    e.table_offset = peek(img, p, 8);
    e.table_size = static_cast<uint32_t>(peek(img, p + 8, 4));
    e.flags = static_cast<uint32_t>(peek(img, p + 12, 4));
    uint64_t name_len = peek(img, p + 18, 2);
    for (uint64_t k = 0; k < name_len; ++k)
      e.name += static_cast<char>(peek(img, p + 24 + k, 1));
    out.push_back(e);
    p += (24 + name_len + 7) & ~7ull;
  }
  return out;
}

std::vector<std::byte> pattern(size_t n, int seed) {
  std::vector<std::byte> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<std::byte>(seed + i * 7);
  return v;
}

// A 64 MiB image with enabled bitmaps b0 (64 KiB) and b1 (128 KiB), and d0
// (512 KiB), disabled after qemu-io dirtied it; qemu-io also dirtied b0/b1.
void make_three_bitmaps(const std::string& img) {
  run("qemu-img create -q -f qcow2 " + q(img) + " 64M");
  run("qemu-img bitmap --add " + q(img) + " b0");
  run("qemu-img bitmap --add -g 128K " + q(img) + " b1");
  run("qemu-img bitmap --add -g 512K " + q(img) + " d0");
  run("qemu-io -f qcow2 -c 'write -P 3 20M 4k' " + q(img));
  run("qemu-img bitmap --disable " + q(img) + " d0");
}

TEST(DirtyBitmap, RunsStopAtStateChangesAndAtTheAskedLength) {
  // 1000 granules of 512 bytes, the last one short (disk ends at 511,900).
  const uint64_t disk = 999 * 512 + 412;
  DirtyBitmap b(disk, 9);
  EXPECT_EQ(b.bit_count(), 1000u);
  b.mark(60 * 512 + 1, 512);        // granules 60 and 61
  b.mark(64 * 512, 200 * 512);      // 64..263: crosses words
  b.mark(disk - 1, 1);              // the short last granule
  using Run = std::pair<bool, uint64_t>;  // dirty, bytes
  auto run = [&](uint64_t off, uint64_t len) {
    bool dirty;
    uint64_t n;
    b.dirty_run(off, len, &dirty, &n);
    return Run(dirty, n);
  };
  EXPECT_EQ(run(0, disk), Run(false, 60 * 512));
  EXPECT_EQ(run(60 * 512 + 7, disk), Run(true, 2 * 512 - 7));
  EXPECT_EQ(run(62 * 512, disk), Run(false, 2 * 512));
  EXPECT_EQ(run(64 * 512, disk), Run(true, 200 * 512));
  EXPECT_EQ(run(64 * 512, 1000), Run(true, 1000));
  EXPECT_EQ(run(264 * 512, disk), Run(false, (999 - 264) * 512));
  EXPECT_EQ(run(999 * 512, 412), Run(true, 412));
}

TEST(DirtyBitmap, ChunksRoundTripAndKnowAllZerosAndAllOnes) {
  DirtyBitmap b(100 * 4096, 12);  // 100 bits: one chunk of 512 bytes
  std::vector<std::byte> chunk(512);
  EXPECT_EQ(b.save_chunk(0, chunk), DirtyBitmap::ChunkKind::Zeros);
  b.fill_chunk(0, 4096, true);
  EXPECT_EQ(b.save_chunk(0, chunk), DirtyBitmap::ChunkKind::Ones);
  EXPECT_EQ(chunk[12], std::byte{0x0f});  // bits 96..99, nothing past the end
  EXPECT_EQ(chunk[13], std::byte{0});
  DirtyBitmap c(100 * 4096, 12);
  chunk.assign(512, std::byte{0});
  chunk[1] = std::byte{0x81};  // bits 8 and 15
  chunk[40] = std::byte{0xff};  // past the end: ignored
  c.load_chunk(0, chunk);
  bool dirty;
  uint64_t n;
  c.dirty_run(8 * 4096, 100 * 4096 - 8 * 4096, &dirty, &n);
  EXPECT_TRUE(dirty);
  EXPECT_EQ(n, 4096u);
  c.dirty_run(16 * 4096, 84 * 4096, &dirty, &n);
  EXPECT_FALSE(dirty);
  EXPECT_EQ(n, 84u * 4096);
  EXPECT_EQ(c.save_chunk(0, chunk), DirtyBitmap::ChunkKind::Mixed);
}

TEST(BitmapDirectory, DecodesWhatQemuWroteAndEncodesItBackByteForByte) {
  TempDir d;
  std::string img = d / "a.qcow2";
  run("qemu-img create -q -f qcow2 " + q(img) + " 64M");
  run("qemu-img bitmap --add " + q(img) + " first");
  run("qemu-img bitmap --add -g 1M --disable " + q(img) + " a-longer-name-than-8");
  uint64_t ext = bitmaps_ext_at(img);
  auto file = slurp(img);
  uint64_t off = peek(img, ext + 16, 8), size = peek(img, ext + 8, 8);
  std::span<const std::byte> raw(file.data() + off, size);
  std::vector<BitmapDirEntry> entries;
  ASSERT_TRUE(decode_bitmap_directory(raw, 2, 64 << 20, 65536, &entries).ok());
  ASSERT_EQ(entries.size(), 2u);
  EXPECT_EQ(entries[1].name, "a-longer-name-than-8");
  EXPECT_EQ(entries[1].granularity_bits, 20);
  EXPECT_EQ(entries[0].flags, 2u);
  auto back = encode_bitmap_directory(entries);
  EXPECT_TRUE(std::equal(back.begin(), back.end(), raw.begin(), raw.end()));
  // The header's count must match; the disk must fit the table.
  EXPECT_FALSE(decode_bitmap_directory(raw, 3, 64 << 20, 65536, &entries).ok());
  EXPECT_FALSE(decode_bitmap_directory(raw, 2, 1ull << 50, 65536, &entries).ok());
  EXPECT_FALSE(decode_bitmap_directory(raw.first(raw.size() - 8), 2, 64 << 20, 65536,
                                       &entries).ok());
}

TEST(Bitmaps, WritesZeroesAndDiscardsAreRecordedAndQemuReadsThem) {
  TempDir d;
  std::string img = d / "a.qcow2";
  make_three_bitmaps(img);
  const uint64_t disk = 64 << 20;
  // What qemu-io wrote before us, then what we write.
  std::vector<Extent> ours = {{(1 << 20) + 512, 4096},
                              {(3 << 20) - 10000, 200000},
                              {5 << 20, 128 << 10},
                              {7 << 20, 64 << 10},
                              {disk - 4096, 4096}};
  {
    auto image = open_image(img, true);
    ASSERT_TRUE(image);
    auto list = image->bitmaps();
    ASSERT_EQ(list.size(), 3u);
    EXPECT_EQ(list[0].name, "b0");
    EXPECT_EQ(list[1].granularity, 128u << 10);
    EXPECT_TRUE(list[0].recording && list[1].recording);
    EXPECT_FALSE(list[2].enabled || list[2].recording || list[2].inconsistent);
    // In use on disk while we record, as QEMU marks them.
    auto dir = directory(img);
    EXPECT_EQ(dir[0].flags, 3u);
    EXPECT_EQ(dir[1].flags, 3u);
    EXPECT_EQ(dir[2].flags, 0u);
    EXPECT_NE(qemu_info(img).find("in-use"), std::string::npos);

    auto data = pattern(200000, 1);
    ASSERT_FALSE(image->write(ours[0].offset, std::span(data.data(), 4096), zero_below()));
    ASSERT_FALSE(image->write(ours[1].offset, data, zero_below()));
    ASSERT_FALSE(image->write_zeroes(ours[2].offset, ours[2].length, true, zero_below()));
    ASSERT_FALSE(image->discard(ours[3].offset, ours[3].length,
                                DiscardMode::Unallocate, zero_below()));
    ASSERT_FALSE(image->write(ours[4].offset, std::span(data.data(), 4096), zero_below()));
    ASSERT_FALSE(image->close());
  }
  qemu_check_clean(img);
  std::string info = qemu_info(img);
  EXPECT_EQ(info.find("in-use"), std::string::npos) << info;
  EXPECT_NE(info.find("\"b1\""), std::string::npos) << info;
  EXPECT_NE(info.find("\"d0\""), std::string::npos) << info;
  EXPECT_NE(peek(img, 88, 8) & 1, 0u);  // the autoclear bit vouches for them
  auto dir = directory(img);
  EXPECT_EQ(dir[0].flags, 2u);
  EXPECT_EQ(dir[2].flags, 0u);

  std::vector<Extent> all = ours;
  all.push_back({20 << 20, 4096});
  EXPECT_EQ(qemu_dirty(img, "b0"), expected_dirty(all, 64 << 10, disk));
  EXPECT_EQ(qemu_dirty(img, "b1"), expected_dirty(all, 128 << 10, disk));
  EXPECT_EQ(qemu_dirty(img, "d0"), expected_dirty({{20 << 20, 4096}}, 512 << 10, disk));

  // And we read back what we wrote, read-only, without changing a byte.
  auto before = slurp(img);
  {
    auto image = open_image(img, false);
    EXPECT_EQ(our_dirty(*image, "b0"), expected_dirty(all, 64 << 10, disk));
    EXPECT_EQ(our_dirty(*image, "d0"), expected_dirty({{20 << 20, 4096}}, 512 << 10, disk));
    EXPECT_FALSE(image->bitmaps()[0].recording);
  }
  EXPECT_EQ(before, slurp(img));
}

TEST(Bitmaps, ClosingWithoutWritesKeepsTheBitsAndClearsInUse) {
  TempDir d;
  std::string img = d / "a.qcow2";
  make_three_bitmaps(img);
  { auto image = open_image(img, true); }
  qemu_check_clean(img);
  EXPECT_EQ(qemu_info(img).find("in-use"), std::string::npos);
  EXPECT_EQ(qemu_dirty(img, "b0"), (std::vector<Extent>{{20 << 20, 64 << 10}}));
}

// 9 GiB at 4 KiB clusters and 512-byte granules: one data cluster covers
// 16 MiB, the table (577 entries) spans two clusters.
TEST(Bitmaps, LargeDiskSmallGranulesAndAllOnesChunks) {
  TempDir d;
  std::string img = d / "big.qcow2";
  const uint64_t disk = 9ull << 30;
  run("qemu-img create -q -f qcow2 -o cluster_size=4k " + q(img) + " 9G");
  run("qemu-img bitmap --add -g 512 " + q(img) + " fine");
  run("qemu-img bitmap --add -g 64K " + q(img) + " coarse");
  run("qemu-io -f qcow2 -c 'write 100M 1k' " + q(img));
  std::vector<Extent> writes = {{0, 1},
                                {(16 << 20) - 100, 200},
                                {(8ull << 30) + (1 << 29) + 333, 70000},
                                {disk - 512, 512}};
  const Extent whole_chunk = {32 << 20, 16 << 20};  // table entry 2: all ones
  {
    auto image = open_image(img, true);
    ASSERT_TRUE(image);
    auto data = pattern(70000, 9);
    for (auto& w : writes)
      ASSERT_FALSE(image->write(w.offset, std::span(data.data(), w.length), zero_below()));
    ASSERT_FALSE(image->write_zeroes(whole_chunk.offset, whole_chunk.length, false,
                                     zero_below()));
  }
  qemu_check_clean(img);
  EXPECT_EQ(qemu_info(img).find("in-use"), std::string::npos);
  std::vector<Extent> all = writes;
  all.push_back({100 << 20, 1024});
  all.push_back(whole_chunk);
  EXPECT_EQ(qemu_dirty(img, "fine"), expected_dirty(all, 512, disk));
  EXPECT_EQ(qemu_dirty(img, "coarse"), expected_dirty(all, 64 << 10, disk));
  auto dir = directory(img);
  ASSERT_EQ(dir[0].name, "fine");
  ASSERT_EQ(dir[0].table_size, 576u);
  EXPECT_EQ(peek(img, dir[0].table_offset + 2 * 8, 8), 1u);  // all ones
  EXPECT_EQ(peek(img, dir[0].table_offset + 3 * 8, 8), 0u);  // all zeros
  EXPECT_NE(peek(img, dir[0].table_offset + 544 * 8, 8), 0u);  // 8.5 GiB
  EXPECT_NE(peek(img, dir[0].table_offset + 575 * 8, 8), 0u);  // the end
  CheckReport rep;
  auto image = open_image(img, false);
  ASSERT_TRUE(image->check(Repair::None, &rep).ok());
  EXPECT_TRUE(rep.clean()) << ::testing::PrintToString(rep.messages);
}

TEST(Bitmaps, InUseBitmapIsReportedInconsistentAndLeftAsItWas) {
  TempDir d;
  std::string img = d / "a.qcow2";
  make_three_bitmaps(img);
  auto before = directory(img);
  patch32(img, before[0].at + 12, 3);  // b0: in use, as after a crash
  {
    auto image = open_image(img, true);
    ASSERT_TRUE(image);
    auto list = image->bitmaps();
    EXPECT_TRUE(list[0].inconsistent);
    EXPECT_FALSE(list[0].recording);
    EXPECT_TRUE(list[1].recording);
    DirtyExtent e;
    EXPECT_EQ(image->dirty_status("b0", 0, 4096, &e),
              std::make_error_code(std::errc::state_not_recoverable));
    auto data = pattern(4096, 2);
    ASSERT_FALSE(image->write(9 << 20, data, zero_below()));
  }
  qemu_check_clean(img);
  auto after = directory(img);
  EXPECT_EQ(after[0].flags, 3u);
  EXPECT_EQ(after[0].table_offset, before[0].table_offset);
  EXPECT_EQ(after[1].flags, 2u);
  EXPECT_EQ(qemu_dirty(img, "b1"),
            expected_dirty({{9 << 20, 4096}, {20 << 20, 4096}}, 128 << 10, 64 << 20));
  CheckReport rep;
  auto image = open_image(img, false);
  ASSERT_TRUE(image->check(Repair::None, &rep).ok());
  EXPECT_TRUE(rep.clean()) << ::testing::PrintToString(rep.messages);
}

// Damage QEMU refuses the whole image for: a read-write open fails and the
// file is not touched; read-only, the image reads and checks clean.
void expect_refused_and_untouched(const std::string& img, const std::string& why) {
  int st = 0;
  std::string qemu = sh("qemu-img info " + q(img), &st);
  EXPECT_NE(st, 0) << "qemu accepts it: " << qemu;
  auto before = slurp(img);
  std::unique_ptr<Image> image;
  Status s = try_open(img, true, &image);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find(why), std::string::npos) << s.message();
  EXPECT_EQ(before, slurp(img));
  image = open_image(img, false);
  ASSERT_TRUE(image);
  EXPECT_FALSE(image->bitmaps_status().ok());
  EXPECT_TRUE(image->bitmaps().empty());
  std::vector<std::byte> buf(4096);
  EXPECT_FALSE(image->read(20 << 20, buf, zero_below()));
  EXPECT_EQ(buf[0], std::byte{3});
  CheckReport rep;
  ASSERT_TRUE(image->check(Repair::None, &rep).ok());
  EXPECT_EQ(rep.leaks, 0u) << ::testing::PrintToString(rep.messages);
  image.reset();
  EXPECT_EQ(before, slurp(img));
}

TEST(Bitmaps, UnknownFlagRefusesReadWriteOpen) {
  TempDir d;
  std::string img = d / "a.qcow2";
  make_three_bitmaps(img);
  patch32(img, directory(img)[1].at + 12, 2 | 4);
  expect_refused_and_untouched(img, "unknown flags 0x4");
}

TEST(Bitmaps, CorruptTableEntryRefusesReadWriteOpen) {
  TempDir d;
  std::string img = d / "a.qcow2";
  make_three_bitmaps(img);
  auto dir = directory(img);
  uint64_t e = peek(img, dir[0].table_offset, 8);
  ASSERT_NE(e, 0u);
  patch64(img, dir[0].table_offset, e | 2);  // a reserved bit
  expect_refused_and_untouched(img, "table entry 0");
}

TEST(Bitmaps, BrokenDirectoryRefusesReadWriteOpen) {
  TempDir d;
  std::string img = d / "a.qcow2";
  make_three_bitmaps(img);
  uint64_t ext = bitmaps_ext_at(img);
  patch32(img, ext, 2);  // three entries, the header names two
  expect_refused_and_untouched(img, "more than the 2 bitmaps");
}

TEST(Bitmaps, DirectoryBeyondEndOfFileRefusesReadWriteOpen) {
  TempDir d;
  std::string img = d / "a.qcow2";
  make_three_bitmaps(img);
  patch64(img, bitmaps_ext_at(img) + 16, 1ull << 40);
  auto before = slurp(img);
  std::unique_ptr<Image> image;
  Status s = try_open(img, true, &image);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("bitmap directory"), std::string::npos) << s.message();
  EXPECT_EQ(before, slurp(img));
  image = open_image(img, false);
  ASSERT_TRUE(image);
  EXPECT_FALSE(image->bitmaps_status().ok());
}

TEST(Bitmaps, StaleExtensionWithoutTheAutoclearBitIsIgnored) {
  TempDir d;
  std::string img = d / "a.qcow2";
  make_three_bitmaps(img);
  patch64(img, 88, 0);  // as a program without bitmap support leaves it
  auto image = open_image(img, true);
  ASSERT_TRUE(image);
  EXPECT_TRUE(image->bitmaps().empty());
  EXPECT_TRUE(image->bitmaps_status().ok());
  CheckReport rep;
  ASSERT_TRUE(image->check(Repair::None, &rep).ok());
  // The same leaks as qemu-img check finds.
  std::string out = sh("qemu-img check " + q(img));
  EXPECT_GT(rep.leaks, 0u);
  EXPECT_NE(out.find(std::to_string(rep.leaks) + " leaked clusters were found"),
            std::string::npos) << out;
}

TEST(Bitmaps, CheckCountsBitmapClustersAsQemuDoes) {
  TempDir d;
  std::string img = d / "a.qcow2";
  make_three_bitmaps(img);
  qemu_check_clean(img);
  for (bool rw : {false, true}) {
    auto image = open_image(img, rw);
    CheckReport rep;
    ASSERT_TRUE(image->check(Repair::None, &rep).ok());
    EXPECT_TRUE(rep.clean()) << rw << ::testing::PrintToString(rep.messages);
  }
  qemu_check_clean(img);
}

// Kill -9 at every write of open, writes and close: refcounts are never
// wrong, the next read-write open repairs the leaks without touching live
// bitmap clusters, and the bitmaps are either written back or in use.
TEST(Bitmaps, CrashAtAnyWriteLeavesExactRefcountsAndUsableBitmaps) {
  TempDir d;
  std::string img = d / "a.qcow2";
  make_three_bitmaps(img);
  auto pristine = slurp(img);
  auto workload = [](Image& image) {
    auto data = pattern(100000, 5);
    for (int i = 0; i < 6; ++i) {
      uint64_t off = (uint64_t(i) * 7654321) % ((60 << 20));
      if (image.write(off, data, zero_below())) return;
      if (i == 3 && image.flush()) return;
    }
    (void)image.close();
  };
  int total;
  {
    auto mem = std::shared_ptr<File>(make_memory_file());
    ASSERT_FALSE(mem->pwrite(pristine, 0));
    auto faulty = std::make_shared<FaultyFile>(mem);
    std::unique_ptr<Image> image;
    ASSERT_TRUE(Image::open(faulty, {}, &image).ok());
    workload(*image);
    total = faulty->pwrites();
  }
  ASSERT_GT(total, 10);
  for (int n = 0; n <= total; ++n) {
    auto mem = std::shared_ptr<File>(make_memory_file());
    ASSERT_FALSE(mem->pwrite(pristine, 0));
    auto faulty = std::make_shared<FaultyFile>(mem);
    faulty->fail_pwrite_after(n, /*sticky=*/true);
    {
      std::unique_ptr<Image> image;
      if (Image::open(faulty, {}, &image).ok()) workload(*image);
    }
    {
      OpenOptions o;
      o.read_only = true;
      std::unique_ptr<Image> image;
      Status st = Image::open(mem, o, &image);
      ASSERT_TRUE(st.ok()) << "after " << n << " writes: " << st.message();
      CheckReport rep;
      ASSERT_TRUE(image->check(Repair::None, &rep).ok());
      EXPECT_EQ(rep.corruptions, 0u) << "after " << n << " writes: "
                                     << ::testing::PrintToString(rep.messages);
      EXPECT_TRUE(image->bitmaps_status().ok()) << image->bitmaps_status().message();
    }
    std::unique_ptr<Image> image;
    Status st = Image::open(mem, {}, &image);  // repairs if dirty
    ASSERT_TRUE(st.ok()) << "after " << n << " writes: " << st.message();
    CheckReport rep;
    ASSERT_TRUE(image->check(Repair::None, &rep).ok());
    EXPECT_TRUE(rep.clean()) << "after " << n << " writes: "
                             << ::testing::PrintToString(rep.messages);
    // A kill while the directory is rewritten in place drops the bitmaps
    // (the autoclear bit is off then), as with QEMU. Otherwise d0 is never
    // touched, and b0 is usable or inconsistent, never wrong.
    auto list = image->bitmaps();
    if (list.empty()) {
      EXPECT_EQ(image->info().autoclear_features, 0u) << "after " << n;
      continue;
    }
    ASSERT_EQ(list.size(), 3u) << "after " << n << " writes";
    EXPECT_FALSE(list[2].inconsistent);
    if (!list[0].inconsistent) {
      auto dirty = our_dirty(*image, "b0");
      EXPECT_FALSE(dirty.empty());
    }
  }
}

TEST(Bitmaps, RepairingACorruptImageStartsRecording) {
  TempDir d;
  std::string img = d / "a.qcow2";
  make_three_bitmaps(img);
  patch64(img, 72, 2);  // the corrupt bit
  {
    auto image = open_image(img, true);
    ASSERT_TRUE(image);
    EXPECT_FALSE(image->bitmaps()[0].recording);
    CheckReport rep;
    ASSERT_TRUE(image->check(Repair::All, &rep).ok());
    ASSERT_FALSE(image->corrupt());
    EXPECT_TRUE(image->bitmaps()[0].recording);
    auto data = pattern(4096, 4);
    ASSERT_FALSE(image->write(40 << 20, data, zero_below()));
  }
  qemu_check_clean(img);
  EXPECT_EQ(qemu_dirty(img, "b0"),
            expected_dirty({{20 << 20, 4096}, {40 << 20, 4096}}, 64 << 10, 64 << 20));
}

// Other layouts: tiny clusters with 1-bit refcounts, subclusters, and an
// external data file (bitmap clusters live in the image file).
class BitmapLayouts : public ::testing::TestWithParam<std::string> {};

TEST_P(BitmapLayouts, WritesAreRecordedAndQemuChecksClean) {
  TempDir d;
  std::string img = d / "l.qcow2";
  std::string opts = GetParam();
  if (auto at = opts.find("DIR/"); at != std::string::npos)
    opts.replace(at, 3, d.path());  // qemu resolves names against its cwd
  run("qemu-img create -q -f qcow2 -o " + opts + " " + q(img) + " 32M");
  run("qemu-img bitmap --add -g 4K " + q(img) + " b0");
  OpenOptions o;
  std::unique_ptr<Image> image;
  {
    HeaderInfo h;
    ASSERT_TRUE(Image::probe(open_file(img, false), &h).ok());
    if (h.has_data_file) o.data_file = open_file(h.data_file, true);
  }
  std::vector<Extent> writes = {{12345, 6789}, {(20 << 20) - 1, 2}, {(32 << 20) - 4096, 4096}};
  {
    image = open_image(img, true, o);
    ASSERT_TRUE(image);
    auto data = pattern(6789, 3);
    for (auto& w : writes)
      ASSERT_FALSE(image->write(w.offset, std::span(data.data(), w.length), zero_below()));
    ASSERT_FALSE(image->discard(1 << 20, 8192, DiscardMode::Zero, zero_below()));
    ASSERT_FALSE(image->close());
  }
  writes.push_back({1 << 20, 8192});
  qemu_check_clean(img);
  EXPECT_EQ(qemu_info(img).find("in-use"), std::string::npos);
  EXPECT_EQ(qemu_dirty(img, "b0"), expected_dirty(writes, 4096, 32 << 20));
}

INSTANTIATE_TEST_SUITE_P(All, BitmapLayouts,
                         ::testing::Values("cluster_size=512,refcount_bits=1",
                                           "cluster_size=128k,extended_l2=on",
                                           "data_file=DIR/l.data"),
                         [](const auto& p) { return std::to_string(p.index); });

TEST(Bitmaps, ConcurrentWritesAndQueries) {
  TempDir d;
  std::string img = d / "a.qcow2";
  make_three_bitmaps(img);
  auto image = open_image(img, true);
  ASSERT_TRUE(image);
  std::atomic<bool> stop{false};
  std::thread reader([&] {
    while (!stop) (void)our_dirty(*image, "b0");
  });
  std::vector<std::thread> writers;
  for (int t = 0; t < 3; ++t)
    writers.emplace_back([&, t] {
      auto data = pattern(4096, t);
      for (int i = 0; i < 200; ++i)
        EXPECT_FALSE(image->write((uint64_t(t * 200 + i) << 16), data, zero_below()));
    });
  for (auto& w : writers) w.join();
  stop = true;
  reader.join();
  EXPECT_EQ(our_dirty(*image, "b0"),
            (std::vector<Extent>{{0, 600ull << 16}}));
  ASSERT_FALSE(image->close());
  qemu_check_clean(img);
  EXPECT_EQ(qemu_dirty(img, "b0"), (std::vector<Extent>{{0, 600ull << 16}}));
}

}  // namespace
}  // namespace layerd::qcow2::test
