// The read path against images written by qemu-img/qemu-io: every byte our
// Image reads must equal what `qemu-img convert -O raw` produces.
#include <gtest/gtest.h>

#include <cstring>
#include <thread>

#include "tests/qcow2/faulty_file.h"
#include "test_util.h"

namespace layerd::qcow2::test {
namespace {

struct Fmt {
  const char* name;
  std::string create_opts;  // -o ...
  uint64_t size;
};

class ReadFormats : public ::testing::TestWithParam<Fmt> {};

// Writes a mix of data, partial clusters, zeros and discards with qemu-io.
void scribble(const std::string& img, uint64_t size) {
  std::string c = "qemu-io -f qcow2 '" + img + "'";
  auto q = [&](const std::string& cmd) { c += " -c '" + cmd + "'"; };
  q("write -P 0x11 0 64k");
  q("write -P 0x22 70000 5000");
  q("write -P 0x33 200k 300k");
  q("write -P 0x44 1000 512");
  q("write -z 250k 100k");
  q("discard 400k 64k");
  q("write -P 0x55 " + std::to_string(size - 3000) + " 3000");
  q("write -P 0x66 " + std::to_string(size / 2) + " 1M");
  q("write -z " + std::to_string(size / 2 + 128 * 1024) + " 256k");
  run(c);
}

TEST_P(ReadFormats, ReadsWhatQemuWrote) {
  TempDir d;
  std::string img = d / "a.qcow2";
  const Fmt& f = GetParam();
  run("qemu-img create -q -f qcow2 " + f.create_opts + " '" + img + "' " +
      std::to_string(f.size));
  scribble(img, f.size);
  auto image = open_image(img, false);
  ASSERT_TRUE(image);
  EXPECT_EQ(image->size(), f.size);
  expect_same(read_all(*image), qemu_raw(img, d.path()));
  // Unaligned small reads too.
  auto oracle = qemu_raw(img, d.path());
  std::mt19937_64 rng(42);
  std::vector<std::byte> buf(70000);
  for (int i = 0; i < 200; ++i) {
    uint64_t len = rng() % buf.size() + 1;
    uint64_t off = rng() % (f.size - len);
    ASSERT_FALSE(image->read(off, std::span(buf.data(), len), zero_below()));
    ASSERT_EQ(0, std::memcmp(buf.data(), oracle.data() + off, len)) << off;
  }
}

INSTANTIATE_TEST_SUITE_P(
    All, ReadFormats,
    ::testing::Values(
        Fmt{"v3_64k", "-o cluster_size=64k", 8 << 20},
        Fmt{"v2_64k", "-o compat=0.10", 8 << 20},
        Fmt{"v3_512", "-o cluster_size=512", 4 << 20},
        Fmt{"v3_4k_odd", "-o cluster_size=4k", (6 << 20) + 1536},
        Fmt{"v3_2M", "-o cluster_size=2M", 16 << 20},
        Fmt{"v3_extl2_64k", "-o extended_l2=on,cluster_size=64k", 8 << 20},
        Fmt{"v3_extl2_16k", "-o extended_l2=on,cluster_size=16k", 4 << 20},
        Fmt{"v3_refcount1", "-o refcount_bits=1", 8 << 20},
        Fmt{"v3_refcount64", "-o refcount_bits=64", 8 << 20},
        Fmt{"v3_prealloc", "-o preallocation=metadata", 8 << 20}),
    [](const auto& pinfo) { return std::string(pinfo.param.name); });

class Compressed : public ::testing::TestWithParam<const char*> {};

TEST_P(Compressed, ReadsCompressedClusters) {
  TempDir d;
  std::string raw = d / "src.raw", img = d / "c.qcow2";
  run("qemu-img create -q -f raw '" + raw + "' 4M");
  run("qemu-io -f raw '" + raw + "' -c 'write -P 0x5a 0 1M' -c 'write -P 0x11 2M 100k'"
      " -c 'write -P 0 3M 64k'");
  // Make the data less trivially compressible in part.
  run("dd if=/dev/urandom of='" + raw + "' bs=4k count=8 seek=100 conv=notrunc status=none");
  run(std::string("qemu-img convert -c -O qcow2 -o compression_type=") +
      GetParam() + " '" + raw + "' '" + img + "'");
  auto image = open_image(img, false);
  ASSERT_TRUE(image);
  expect_same(read_all(*image, 12345), slurp(raw));
  MapExtent m;
  ASSERT_FALSE(image->block_status(0, image->size(), &m));
  EXPECT_EQ(m.kind, ExtentKind::Data);
  EXPECT_TRUE(m.compressed);
}

INSTANTIATE_TEST_SUITE_P(All, Compressed, ::testing::Values("zlib", "zstd"));

TEST(Read, BackingChainThroughBelowReader) {
  TempDir d;
  std::string base = d / "base.qcow2", top = d / "top.qcow2";
  run("qemu-img create -q -f qcow2 '" + base + "' 4M");
  run("qemu-io -f qcow2 '" + base + "' -c 'write -P 0xaa 0 4M'");
  run("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 '" + top + "' 6M");
  run("qemu-io -f qcow2 '" + top + "' -c 'write -P 0xbb 100k 10k' -c 'write -z 1M 128k'"
      " -c 'write -P 0xcc 5M 10k'");
  auto b = open_image(base, false);
  auto t = open_image(top, false);
  ASSERT_TRUE(b && t);
  EXPECT_EQ(t->backing_file(), "base.qcow2");
  EXPECT_EQ(t->backing_format(), "qcow2");
  int calls = 0;
  auto below = [&](uint64_t off, std::span<std::byte> buf) -> std::error_code {
    ++calls;
    uint64_t n = off < b->size() ? std::min<uint64_t>(buf.size(), b->size() - off) : 0;
    if (n < buf.size()) std::memset(buf.data() + n, 0, buf.size() - n);
    return n ? b->read(off, buf.first(n), zero_below()) : std::error_code{};
  };
  std::vector<std::byte> all(t->size());
  ASSERT_FALSE(t->read(0, all, below));
  expect_same(all, qemu_raw(top, d.path()));
  EXPECT_GT(calls, 0);
  EXPECT_LT(calls, 10);  // unallocated runs are coalesced
}

TEST(Read, SnapshotViews) {
  TempDir d;
  std::string img = d / "s.qcow2";
  run("qemu-img create -q -f qcow2 '" + img + "' 4M");
  run("qemu-io -f qcow2 '" + img + "' -c 'write -P 0x01 0 1M'");
  run("qemu-img snapshot -c first '" + img + "'");
  run("qemu-io -f qcow2 '" + img + "' -c 'write -P 0x02 512k 1M'");
  run("qemu-img snapshot -c second '" + img + "'");
  run("qemu-io -f qcow2 '" + img + "' -c 'write -P 0x03 0 64k' -c 'discard 1M 64k'");
  auto image = open_image(img, false);
  ASSERT_TRUE(image);
  auto snaps = image->snapshots();
  ASSERT_EQ(snaps.size(), 2u);
  EXPECT_EQ(snaps[0].name, "first");
  EXPECT_EQ(snaps[1].name, "second");
  EXPECT_EQ(snaps[0].virtual_size, 4u << 20);
  expect_same(read_all(*image), qemu_raw(img, d.path()));
  for (auto& s : snaps) {
    std::unique_ptr<Image> view;
    ASSERT_TRUE(image->open_snapshot(s.name, &view).ok());
    EXPECT_TRUE(view->read_only());
    std::string raw = d / "snap.raw";
    run("qemu-img convert -U -O raw -l snapshot.name=" + s.name + " '" + img +
        "' '" + raw + "'");
    expect_same(read_all(*view), slurp(raw));
    std::byte x[1] = {};
    EXPECT_EQ(view->write(0, x, zero_below()),
              std::make_error_code(std::errc::operation_not_permitted));
  }
  std::unique_ptr<Image> byid;
  EXPECT_TRUE(image->open_snapshot("1", &byid).ok());
  EXPECT_FALSE(image->open_snapshot("nope", &byid).ok());
}

TEST(Read, HugeImageBeyond2TiB) {
  TempDir d;
  std::string img = d / "big.qcow2";
  run("qemu-img create -q -f qcow2 '" + img + "' 5T");
  uint64_t off = 4ull << 40;
  run("qemu-io -f qcow2 '" + img + "' -c 'write -P 0x77 " + std::to_string(off) +
      " 128k'");
  auto image = open_image(img, false);
  ASSERT_TRUE(image);
  std::vector<std::byte> buf(256 * 1024);
  ASSERT_FALSE(image->read(off - 64 * 1024, buf, zero_below()));
  for (size_t i = 0; i < buf.size(); ++i) {
    std::byte want = (i >= 65536 && i < 65536 + 131072) ? std::byte{0x77} : std::byte{0};
    ASSERT_EQ(buf[i], want) << i;
  }
  MapExtent m;
  ASSERT_FALSE(image->block_status(off, 1 << 20, &m));
  EXPECT_EQ(m.kind, ExtentKind::Data);
  EXPECT_EQ(m.length, 128u * 1024);
}

// block_status agrees with `qemu-img map --output=json`.
TEST(Read, BlockStatusMatchesQemuMap) {
  TempDir d;
  std::string img = d / "m.qcow2";
  run("qemu-img create -q -f qcow2 '" + img + "' 8M");
  scribble(img, 8 << 20);
  auto image = open_image(img, false);
  ASSERT_TRUE(image);
  // Build our own map, then compare per 4k block with qemu-img map.
  std::string js = run("qemu-img map --output=json '" + img + "'");
  // Parse crude JSON lines: { "start": N, "length": N, "depth": 0, "present": b, "zero": b, "data": b, "offset": N}
  struct Q { uint64_t start, length; bool present, zero, data; uint64_t offset; bool has_off; };
  std::vector<Q> qs;
  size_t p = 0;
  auto num = [&](const std::string& key, size_t from, uint64_t* v) {
    size_t k = js.find("\"" + key + "\":", from);
    if (k == std::string::npos) return false;
    *v = std::stoull(js.substr(k + key.size() + 3));
    return true;
  };
  auto flag = [&](const std::string& key, size_t from) {
    size_t k = js.find("\"" + key + "\":", from);
    return js.compare(k + key.size() + 3, 4, "true") == 0 ||
           js.compare(k + key.size() + 4, 4, "true") == 0;
  };
  while ((p = js.find("{", p)) != std::string::npos) {
    size_t e = js.find("}", p);
    Q q{};
    num("start", p, &q.start);
    num("length", p, &q.length);
    q.present = flag("present", p);
    q.zero = flag("zero", p);
    q.data = flag("data", p);
    size_t ko = js.find("\"offset\"", p);
    q.has_off = ko != std::string::npos && ko < e;
    if (q.has_off) num("offset", p, &q.offset);
    qs.push_back(q);
    p = e;
  }
  ASSERT_FALSE(qs.empty());
  for (const Q& q : qs) {
    for (uint64_t off = q.start; off < q.start + q.length; off += 4096) {
      MapExtent m;
      ASSERT_FALSE(image->block_status(off, 4096, &m));
      if (!q.present) {
        EXPECT_EQ(m.kind, ExtentKind::Unallocated) << off;
      } else if (q.data) {
        EXPECT_EQ(m.kind, ExtentKind::Data) << off;
        if (q.has_off) {
          EXPECT_EQ(m.host_offset, q.offset + (off - q.start)) << off;
        }
      } else {
        EXPECT_EQ(m.kind, ExtentKind::Zero) << off;
      }
    }
  }
  // Extents merge: the first 64k of data is one extent.
  MapExtent m;
  ASSERT_FALSE(image->block_status(0, 8 << 20, &m));
  EXPECT_EQ(m.kind, ExtentKind::Data);
  EXPECT_GE(m.length, 64u * 1024);
}

TEST(Read, HeaderFacts) {
  TempDir d;
  std::string img = d / "h.qcow2";
  run("qemu-img create -q -f qcow2 '" + img + "' 1G");
  auto image = open_image(img, false);
  ASSERT_TRUE(image);
  EXPECT_EQ(image->version(), 3u);
  EXPECT_EQ(image->cluster_size(), 65536u);
  EXPECT_EQ(image->size(), 1ull << 30);
  EXPECT_FALSE(image->dirty());
  EXPECT_FALSE(image->corrupt());
  EXPECT_EQ(image->feature_name(0, 0), "dirty bit");
  EXPECT_TRUE(image->backing_file().empty());
}

TEST(Read, ConcurrentReadersAgree) {
  TempDir d;
  std::string img = d / "c.qcow2";
  run("qemu-img create -q -f qcow2 -o cluster_size=4k '" + img + "' 16M");
  scribble(img, 16 << 20);
  auto oracle = qemu_raw(img, d.path());
  OpenOptions o;
  o.l2_cache_bytes = 3 * 4096;  // force eviction under contention
  auto image = open_image(img, false, o);
  ASSERT_TRUE(image);
  std::atomic<int> bad{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t)
    ts.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      std::vector<std::byte> buf(8192);
      for (int i = 0; i < 2000; ++i) {
        uint64_t off = rng() % (oracle.size() - buf.size());
        if (image->read(off, buf, zero_below()) ||
            std::memcmp(buf.data(), oracle.data() + off, buf.size()))
          ++bad;
      }
    });
  for (auto& th : ts) th.join();
  EXPECT_EQ(bad, 0);
}

TEST(Read, ContiguousClustersAreOnePreadAndStatusNeedsNoIo) {
  auto mem = std::shared_ptr<File>(make_memory_file());
  CreateOptions co;
  co.size = 64 << 20;
  ASSERT_TRUE(Image::create(*mem, co).ok());
  {
    std::unique_ptr<Image> w;
    ASSERT_TRUE(Image::open(mem, {}, &w).ok());
    std::vector<std::byte> buf(4 << 20, std::byte{3});
    ASSERT_FALSE(w->write(0, buf, zero_below()));
  }
  auto faulty = std::make_shared<FaultyFile>(mem);
  std::unique_ptr<Image> img;
  OpenOptions o;
  o.read_only = true;
  ASSERT_TRUE(Image::open(faulty, o, &img).ok());
  std::vector<std::byte> buf(2 << 20);
  ASSERT_FALSE(img->read(0, std::span(buf.data(), 4096), zero_below()));  // loads the L2
  int before = faulty->preads();
  ASSERT_FALSE(img->read(12345, buf, zero_below()));
  EXPECT_EQ(faulty->preads() - before, 1);
  EXPECT_EQ(buf[0], std::byte{3});
  before = faulty->preads();
  MapExtent m;
  ASSERT_FALSE(img->block_status(0, 64 << 20, &m));
  EXPECT_EQ(m.kind, ExtentKind::Data);
  EXPECT_EQ(m.length, 4u << 20);
  ASSERT_FALSE(img->block_status(4 << 20, 60 << 20, &m));
  EXPECT_EQ(m.kind, ExtentKind::Unallocated);
  EXPECT_EQ(m.length, 60u << 20);
  EXPECT_EQ(faulty->preads() - before, 0);
  // Unallocated ranges go below in one call.
  int calls = 0;
  auto below = [&](uint64_t, std::span<std::byte> b) {
    ++calls;
    std::memset(b.data(), 0, b.size());
    return std::error_code{};
  };
  std::vector<std::byte> big(8 << 20);
  ASSERT_FALSE(img->read(3 << 20, big, below));
  EXPECT_EQ(calls, 1);
}

}  // namespace
}  // namespace layerd::qcow2::test
