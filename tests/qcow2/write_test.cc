// The write path against qemu-io as the oracle: the same requests go to a
// copy through qemu-io and to our Image; `qemu-img compare` must find the
// two images identical and `qemu-img check` must find ours clean.
#include <gtest/gtest.h>

#include <cstring>
#include <algorithm>
#include <thread>

#include "tests/qcow2/faulty_file.h"
#include "test_util.h"

namespace layerd::qcow2::test {
namespace {

struct Op {
  enum Kind { Write, Zero, ZeroUnmap, Discard } kind;
  uint64_t off, len;
  int pattern;
};

std::vector<Op> random_ops(uint64_t size, uint64_t cs, int n, uint64_t seed,
                           bool discards) {
  std::mt19937_64 rng(seed);
  std::vector<Op> ops;
  for (int i = 0; i < n; ++i) {
    Op op{};
    int k = static_cast<int>(rng() % 10);
    op.kind = k < 6 ? Op::Write : k < 7 ? Op::Zero : k < 8 ? Op::ZeroUnmap
                                                           : (discards ? Op::Discard : Op::Write);
    bool aligned = rng() % 3 == 0;
    uint64_t max_len = std::min<uint64_t>(size / 4, 3 * cs + 5000);
    op.len = (rng() % max_len + 1);
    op.off = rng() % (size - op.len);
    op.off &= ~511ull;  // qemu-io wants sector-aligned offsets and lengths
    op.len = (op.len + 511) & ~511ull;
    if (aligned || op.kind == Op::Discard) {
      op.off &= ~(cs - 1);
      op.len = std::max<uint64_t>(cs, op.len & ~(cs - 1));
    }
    if (op.off + op.len > size) op.len = size - op.off;
    op.pattern = static_cast<int>(rng() % 250) + 1;
    ops.push_back(op);
  }
  return ops;
}

std::string qemu_io_script(const std::vector<Op>& ops) {
  std::string s;
  for (auto& op : ops) {
    std::string r = std::to_string(op.off) + " " + std::to_string(op.len);
    switch (op.kind) {
      case Op::Write: s += " -c 'write -P " + std::to_string(op.pattern) + " " + r + "'"; break;
      case Op::Zero: s += " -c 'write -z " + r + "'"; break;
      case Op::ZeroUnmap: s += " -c 'write -z -u " + r + "'"; break;
      case Op::Discard: s += " -c 'discard " + r + "'"; break;
    }
  }
  return s;
}

template <typename Below>
void apply(Image& img, const std::vector<Op>& ops, Below&& below) {
  std::vector<std::byte> buf;
  for (auto& op : ops) {
    std::error_code ec;
    switch (op.kind) {
      case Op::Write:
        buf.assign(op.len, std::byte(op.pattern));
        ec = img.write(op.off, buf, below);
        break;
      case Op::Zero: ec = img.write_zeroes(op.off, op.len, false, below); break;
      case Op::ZeroUnmap: ec = img.write_zeroes(op.off, op.len, true, below); break;
      case Op::Discard: ec = img.discard(op.off, op.len, DiscardMode::Unallocate, below); break;
    }
    ASSERT_FALSE(ec) << "op at " << op.off << "+" << op.len << ": " << ec.message();
  }
}

struct Fmt {
  const char* name;
  std::string opts;
  uint64_t size;
};

class WriteFormats : public ::testing::TestWithParam<Fmt> {};

TEST_P(WriteFormats, MatchesQemuIo) {
  const Fmt& f = GetParam();
  TempDir d;
  std::string ours = d / "ours.qcow2", theirs = d / "theirs.qcow2";
  run("qemu-img create -q -f qcow2 " + f.opts + " '" + ours + "' " + std::to_string(f.size));
  // Some pre-existing content, including compressed clusters.
  std::string pre = "qemu-io -f qcow2 '" + ours + "' -c 'write -P 0x10 0 256k'";
  if (f.opts.find("preallocation") == std::string::npos)  // qemu cannot compress into preallocated clusters
    pre += " -c 'write -c -P 0x20 " + std::to_string(f.size / 2 & ~((2ull << 20) - 1)) + " " +
           std::to_string(f.opts.find("cluster_size=2M") != std::string::npos ? 2 << 20 : 64 << 10) + "'";
  run(pre);
  run("cp '" + ours + "' '" + theirs + "'");
  uint64_t cs = 0;
  {
    auto img = open_image(ours, true);
    ASSERT_TRUE(img);
    cs = img->cluster_size();
  }
  auto ops = random_ops(f.size, cs, 80, 7, true);
  run("qemu-io -f qcow2 '" + theirs + "'" + qemu_io_script(ops));
  {
    auto img = open_image(ours, true);
    ASSERT_TRUE(img);
    apply(*img, ops, zero_below());
    ASSERT_FALSE(img->flush());
    expect_same(read_all(*img), qemu_raw(theirs, d.path()));
  }
  run("qemu-img compare -q -f qcow2 -F qcow2 '" + ours + "' '" + theirs + "'");
  qemu_check_clean(ours);
  auto img = open_image(ours, false);
  CheckReport rep;
  ASSERT_TRUE(img->check(Repair::None, &rep).ok());
  EXPECT_TRUE(rep.clean()) << (rep.messages.empty() ? "" : rep.messages[0]);
}

INSTANTIATE_TEST_SUITE_P(
    All, WriteFormats,
    ::testing::Values(
        Fmt{"v3_64k", "", 16 << 20},
        Fmt{"v2_64k", "-o compat=0.10", 16 << 20},
        Fmt{"v3_512_rc64", "-o cluster_size=512,refcount_bits=64", 4 << 20},
        Fmt{"v3_4k_rc1", "-o cluster_size=4k,refcount_bits=1", 8 << 20},
        Fmt{"v3_4k_odd", "-o cluster_size=4k", (8 << 20) + 2560},
        Fmt{"v3_2M", "-o cluster_size=2M", 32 << 20},
        Fmt{"v3_extl2_64k", "-o extended_l2=on", 16 << 20},
        Fmt{"v3_extl2_32k_zstd", "-o extended_l2=on,cluster_size=32k,compression_type=zstd", 8 << 20},
        Fmt{"v3_rc8", "-o refcount_bits=8,cluster_size=16k", 8 << 20},
        Fmt{"v3_prealloc", "-o preallocation=metadata", 8 << 20},
        Fmt{"v3_lazy", "-o lazy_refcounts=on", 8 << 20}),
    [](const auto& pinfo) { return std::string(pinfo.param.name); });

TEST(Write, BackingChainCopyOnWrite) {
  TempDir d;
  std::string base = d / "base.qcow2", ours = d / "ours.qcow2", theirs = d / "theirs.qcow2";
  run("qemu-img create -q -f qcow2 '" + base + "' 8M");
  run("qemu-io -f qcow2 '" + base + "' -c 'write -P 0xaa 0 8M' -c 'write -P 0xbb 1M 3000'");
  for (auto& t : {ours, theirs})
    run("qemu-img create -q -f qcow2 -o cluster_size=4k -b base.qcow2 -F qcow2 '" + t + "' 8M");
  auto ops = random_ops(8 << 20, 4096, 60, 11, false);
  run("qemu-io -f qcow2 '" + theirs + "'" + qemu_io_script(ops));
  {
    auto b = open_image(base, false);
    auto img = open_image(ours, true);
    ASSERT_TRUE(b && img);
    auto below = [&](uint64_t off, std::span<std::byte> buf) {
      return b->read(off, buf, zero_below());
    };
    apply(*img, ops, below);
  }
  run("qemu-img compare -q '" + ours + "' '" + theirs + "'");
  qemu_check_clean(ours);
}

class SnapshotCow : public ::testing::TestWithParam<std::string> {};

TEST_P(SnapshotCow, SnapshotsAreCopiedOnWrite) {
  TempDir d;
  std::string img = d / "s.qcow2", theirs = d / "t.qcow2";
  run("qemu-img create -q -f qcow2 " + GetParam() + " '" + img + "' 4M");
  run("qemu-io -f qcow2 '" + img + "' -c 'write -P 0x01 0 2M'");
  run("qemu-img snapshot -c snap '" + img + "'");
  run("cp '" + img + "' '" + theirs + "'");
  uint64_t cs = open_image(img, false)->cluster_size();
  auto ops = random_ops(4 << 20, cs, 40, 3, true);
  run("qemu-io -f qcow2 '" + theirs + "'" + qemu_io_script(ops));
  {
    auto image = open_image(img, true);
    ASSERT_TRUE(image);
    apply(*image, ops, zero_below());
    std::unique_ptr<Image> view;
    ASSERT_TRUE(image->open_snapshot("snap", &view).ok());
    std::vector<std::byte> want(4 << 20, std::byte{0});
    std::memset(want.data(), 1, 2 << 20);
    expect_same(read_all(*view), want);
  }
  run("qemu-img compare -q '" + img + "' '" + theirs + "'");
  qemu_check_clean(img);
  std::string raw = d / "snap.raw";
  run("qemu-img convert -O raw -l snapshot.name=snap '" + img + "' '" + raw + "'");
  auto s = slurp(raw);
  ASSERT_EQ(s.size(), 4u << 20);
  EXPECT_EQ(s[0], std::byte{1});
  EXPECT_EQ(s[(2 << 20) - 1], std::byte{1});
  EXPECT_EQ(s[2 << 20], std::byte{0});
}

INSTANTIATE_TEST_SUITE_P(All, SnapshotCow,
                         ::testing::Values("-o cluster_size=16k", "-o compat=0.10,cluster_size=4k",
                                           "-o extended_l2=on,cluster_size=32k"));

TEST(Write, RefcountTableGrows) {
  TempDir d;
  std::string img = d / "g.qcow2";
  // 512-byte clusters with 64-bit refcounts: one refcount block covers 64
  // clusters and one table cluster covers 4096 clusters (2 MiB).
  run("qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 '" + img + "' 16M");
  std::vector<std::byte> buf(1 << 20);
  {
    auto image = open_image(img, true);
    ASSERT_TRUE(image);
    for (int i = 0; i < 12; ++i) {
      std::memset(buf.data(), i + 1, buf.size());
      ASSERT_FALSE(image->write(uint64_t(i) << 20, buf, zero_below()));
    }
    EXPECT_GT(image->info().refcount_table_clusters, 1u);
  }
  qemu_check_clean(img);
  auto v = qemu_raw(img, d.path());
  for (int i = 0; i < 12; ++i) ASSERT_EQ(v[(uint64_t(i) << 20) + 77], std::byte(i + 1));
}

TEST(Write, ContiguousClustersAreOnePwrite) {
  auto mem = std::shared_ptr<File>(make_memory_file());
  CreateOptions co;
  co.size = 64 << 20;
  ASSERT_TRUE(Image::create(*mem, co).ok());
  auto faulty = std::make_shared<FaultyFile>(mem);
  std::unique_ptr<Image> img;
  ASSERT_TRUE(Image::open(faulty, {}, &img).ok());
  std::vector<std::byte> buf(1 << 20, std::byte{7});
  ASSERT_FALSE(img->write(0, buf, zero_below()));  // allocates L2 + 16 clusters
  int before = faulty->pwrites();
  ASSERT_FALSE(img->write(4 << 20, buf, zero_below()));
  EXPECT_EQ(faulty->pwrites() - before, 1);  // data only; metadata is cached
  before = faulty->pwrites();
  ASSERT_FALSE(img->write(0, buf, zero_below()));  // in place
  EXPECT_EQ(faulty->pwrites() - before, 1);
}

TEST(Write, FailedDataWriteMapsNothing) {
  auto mem = std::shared_ptr<File>(make_memory_file());
  CreateOptions co;
  co.size = 8 << 20;
  ASSERT_TRUE(Image::create(*mem, co).ok());
  auto faulty = std::make_shared<FaultyFile>(mem);
  std::unique_ptr<Image> img;
  ASSERT_TRUE(Image::open(faulty, {}, &img).ok());
  std::vector<std::byte> buf(100000, std::byte{9});
  faulty->fail_pwrite_after(1);  // the first pwrite sets the dirty bit
  EXPECT_TRUE(img->write(12345, buf, zero_below()));
  EXPECT_TRUE(img->dirty());
  EXPECT_EQ(faulty->pwrites(), 2);
  MapExtent m;
  ASSERT_FALSE(img->block_status(0, 8 << 20, &m));
  EXPECT_EQ(m.kind, ExtentKind::Unallocated);
  // The image still works afterwards, and check sees only leaks.
  ASSERT_FALSE(img->write(12345, buf, zero_below()));
  CheckReport rep;
  ASSERT_TRUE(img->check(Repair::None, &rep).ok());
  EXPECT_EQ(rep.corruptions, 0u);
  ASSERT_TRUE(img->check(Repair::Leaks, &rep).ok());
  ASSERT_TRUE(img->check(Repair::None, &rep).ok());
  EXPECT_TRUE(rep.clean());
}

TEST(Write, LazyRefcountsDirtyBit) {
  TempDir d;
  std::string img = d / "l.qcow2";
  run("qemu-img create -q -f qcow2 -o lazy_refcounts=on '" + img + "' 4M");
  {
    auto image = open_image(img, true);
    ASSERT_TRUE(image);
    EXPECT_FALSE(image->dirty());
    std::vector<std::byte> buf(4096, std::byte{1});
    ASSERT_FALSE(image->write(0, buf, zero_below()));
    EXPECT_TRUE(image->dirty());
    std::string info = run("qemu-img info -U '" + img + "'");
    EXPECT_NE(info.find("corrupt: false"), std::string::npos);
  }
  auto image = open_image(img, false);
  EXPECT_FALSE(image->dirty());
  qemu_check_clean(img);
}

TEST(Write, ConcurrentWritersAndReaders) {
  TempDir d;
  std::string img = d / "c.qcow2";
  run("qemu-img create -q -f qcow2 -o cluster_size=4k '" + img + "' 32M");
  {
    OpenOptions o;
    o.l2_cache_bytes = 4 * 4096;
    o.refcount_cache_bytes = 2 * 4096;
    auto image = open_image(img, true, o);
    ASSERT_TRUE(image);
    std::vector<std::thread> ts;
    std::atomic<int> errors{0};
    for (int t = 0; t < 4; ++t)
      ts.emplace_back([&, t] {
        std::mt19937_64 rng(t);
        std::vector<std::byte> buf(6000);
        // Thread t owns the 8 MiB slice t; each 4k block gets byte t+1.
        for (int i = 0; i < 300; ++i) {
          uint64_t off = (uint64_t(t) << 23) + (rng() % ((8 << 20) - buf.size()));
          if (i % 3 == 2) {
            if (image->read(off, buf, zero_below())) ++errors;
            for (auto b : buf)
              if (b != std::byte{0} && b != std::byte(t + 1)) ++errors;
          } else {
            std::memset(buf.data(), t + 1, buf.size());
            if (image->write(off, buf, zero_below())) ++errors;
          }
          if (i % 50 == 0 && image->flush()) ++errors;
        }
      });
    for (auto& th : ts) th.join();
    EXPECT_EQ(errors, 0);
  }
  qemu_check_clean(img);
}

class CompressedOverwrite : public ::testing::TestWithParam<std::string> {};

TEST_P(CompressedOverwrite, BecomesNormalCluster) {
  TempDir d;
  std::string raw = d / "src.raw", ours = d / "ours.qcow2", theirs = d / "theirs.qcow2";
  run("qemu-img create -q -f raw '" + raw + "' 2M");
  run("qemu-io -f raw '" + raw + "' -c 'write -P 0x61 0 2M'");
  run("dd if=/dev/urandom of='" + raw + "' bs=1k count=16 seek=70 conv=notrunc status=none");
  run("qemu-img convert -c -O qcow2 -o " + GetParam() + " '" + raw + "' '" + ours + "'");
  run("cp '" + ours + "' '" + theirs + "'");
  run("qemu-io -f qcow2 '" + theirs + "' -c 'write -P 0x62 66000 100' -c 'write -z 1M 4k'"
      " -c 'discard 1536k 512k'");
  {
    auto img = open_image(ours, true);
    MapExtent m;
    ASSERT_FALSE(img->block_status(65536, 4096, &m));
    ASSERT_TRUE(m.compressed);
    std::vector<std::byte> buf(100, std::byte{0x62});
    ASSERT_FALSE(img->write(66000, buf, zero_below()));
    ASSERT_FALSE(img->write_zeroes(1 << 20, 4096, false, zero_below()));
    ASSERT_FALSE(img->discard(1536 * 1024, 512 * 1024, DiscardMode::Unallocate, zero_below()));
    ASSERT_FALSE(img->block_status(65536, 4096, &m));
    EXPECT_EQ(m.kind, ExtentKind::Data);
    EXPECT_FALSE(m.compressed);
  }
  run("qemu-img compare -q '" + ours + "' '" + theirs + "'");
  qemu_check_clean(ours);
}

INSTANTIATE_TEST_SUITE_P(All, CompressedOverwrite,
                         ::testing::Values("compression_type=zlib", "compression_type=zstd",
                                           "compression_type=zlib,extended_l2=on",
                                           "compression_type=zlib,cluster_size=4k"));

// Allocating writes to different bytes of the same clusters from several
// threads must not lose each other's data (the copy-on-write of one must
// not overwrite what another wrote).
TEST(Write, ConcurrentPartialWritesToSameClusters) {
  for (bool ext : {false, true}) {
    auto mem = std::shared_ptr<File>(make_memory_file());
    CreateOptions co;
    co.size = 16 << 20;
    co.extended_l2 = ext;
    ASSERT_TRUE(Image::create(*mem, co).ok());
    std::unique_ptr<Image> img;
    ASSERT_TRUE(Image::open(mem, {}, &img).ok());
    auto below = [](uint64_t, std::span<std::byte> b) {
      std::memset(b.data(), 0xee, b.size());
      return std::error_code{};
    };
    const int kThreads = 4, kClusters = 64;
    std::atomic<int> errors{0};
    std::vector<std::thread> ts;
    for (int t = 0; t < kThreads; ++t)
      ts.emplace_back([&, t] {
        std::mt19937_64 rng(t);
        std::vector<int> order(kClusters);
        for (int c = 0; c < kClusters; ++c) order[c] = c;
        std::shuffle(order.begin(), order.end(), rng);
        std::vector<std::byte> buf(1000, std::byte(t + 1));
        for (int c : order) {
          uint64_t off = uint64_t(c) * 65536 + t * 5000 + 100;
          if (img->write(off, buf, below)) ++errors;
          if (c % 16 == 0 && img->flush()) ++errors;
        }
      });
    for (auto& th : ts) th.join();
    ASSERT_EQ(errors, 0);
    std::vector<std::byte> got(kClusters * 65536);
    ASSERT_FALSE(img->read(0, got, below));
    for (int c = 0; c < kClusters; ++c)
      for (uint64_t i = 0; i < 65536; ++i) {
        std::byte want{0xee};
        for (int t = 0; t < kThreads; ++t)
          if (i >= t * 5000u + 100 && i < t * 5000u + 1100) want = std::byte(t + 1);
        ASSERT_EQ(got[c * 65536 + i], want) << "ext=" << ext << " cluster " << c << " byte " << i;
      }
    CheckReport rep;
    ASSERT_TRUE(img->check(Repair::None, &rep).ok());
    EXPECT_TRUE(rep.clean()) << ::testing::PrintToString(rep.messages);
  }
}

}  // namespace
}  // namespace layerd::qcow2::test
