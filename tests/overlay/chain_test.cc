// Backing chains opened with open_chain(), checked against qemu without a
// server: chains built by qemu-img and qemu-io (zero clusters over backing
// data, discards, raw and short backing files, v2 and v3, subclusters,
// compressed clusters, preallocated metadata, 20 images), then
//
//   ContentMatchesQemu         every byte the Layer reads equals what
//                              `qemu-img convert -O raw` reads;
//   BlockStatusMatchesQemuMap  block_status() agrees with
//                              `qemu-img map --output=json` on which image
//                              of the chain provides each range (the
//                              qemu:allocation-depth answer), never calls
//                              data zero, and only calls zero what reads as
//                              zeros;
//   LayerWritesMatchQemuIo     seeded writes (some FUA), zero writes (with
//                              may_trim, and fast_only, which must either
//                              succeed or fail with ENOTSUP and change
//                              nothing), trims (each then zeroed on both
//                              sides, see tests/server/qcow2_matrix_test.cc)
//                              and flushes through the Layer, the same
//                              through qemu-io on a copy; once the Layer is
//                              closed, `qemu-img compare` and `qemu-img
//                              check` of the written image.
//   LayerWritesWithTinyL2CacheMatchQemuIo
//                              the same with the smallest L2 cache, so that
//                              (with 512-byte clusters) tables are evicted,
//                              written back and reloaded all the time.
#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <ostream>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "overlay/chain.h"
#include "overlay/layer.h"
#include "tests/server/harness.h"
#include "tests/server/qcow2_tools.h"

namespace layerd::test {
namespace {

using namespace qcow2e2e;

constexpr uint64_t KiB = 1024;
constexpr uint64_t MiB = 1024 * KiB;

struct ChainSpec {
  std::string name;
  // qemu-img create -o options of every qcow2 image.
  std::string options = "compat=1.1";
  uint64_t cluster = 64 * KiB;
  int images = 3;              // the top included
  bool raw_base = false;       // the bottom image is raw
  uint64_t base_size = 0;      // 0: same as size
  uint64_t size = 16 * MiB;
  std::string compressed;      // top made with convert -c (no backing then)
  std::string top_options;     // extra options for the top image
};

std::ostream& operator<<(std::ostream& os, const ChainSpec& s) { return os << s.name; }

std::vector<ChainSpec> Specs() {
  std::vector<ChainSpec> v;
  auto S = [](std::string name) {
    ChainSpec s;
    s.name = std::move(name);
    return s;
  };
  v.push_back(S("chain3"));
  { auto s = S("v2_chain3"); s.options = "compat=0.10"; v.push_back(s); }
  { auto s = S("raw_base_short_c4k"); s.images = 2; s.raw_base = true; s.base_size = 3 * MiB + 512; s.cluster = 4 * KiB; v.push_back(s); }
  { auto s = S("qcow2_base_short"); s.images = 2; s.base_size = 5 * MiB + 1536; v.push_back(s); }
  { auto s = S("extl2_over_backing"); s.images = 2; s.options = "compat=1.1,extended_l2=on"; v.push_back(s); }
  { auto s = S("c512_over_raw"); s.images = 2; s.raw_base = true; s.cluster = 512; s.size = 4 * MiB; v.push_back(s); }
  { auto s = S("zstd_compressed"); s.images = 1; s.compressed = "zstd"; v.push_back(s); }
  // qemu allows preallocation over a backing file only with subclusters.
  { auto s = S("extl2_prealloc_over_backing"); s.images = 2; s.options = "compat=1.1,extended_l2=on"; s.top_options = ",preallocation=metadata"; v.push_back(s); }
  { auto s = S("prealloc"); s.images = 1; s.top_options = ",preallocation=metadata"; v.push_back(s); }
  { auto s = S("chain20"); s.images = 20; s.size = 8 * MiB; v.push_back(s); }
  return v;
}

// A random range: 1 byte to 3 clusters, aligned or not.
void random_range(Rng& rng, uint64_t size, uint64_t cluster, uint64_t* off, uint64_t* len) {
  uint64_t l = rng.chance(1, 2) ? cluster * rng.between(1, 3) : rng.between(1, 3 * cluster);
  uint64_t o = rng.chance(1, 2) ? rng.below(size / cluster) * cluster : rng.below(size);
  *off = o;
  *len = std::max<uint64_t>(1, std::min(l, size - o));
}

class ChainTest : public ::testing::TestWithParam<ChainSpec> {
 protected:
  const ChainSpec& spec() const { return GetParam(); }
  fs::path top() const { return dir_ / "top.qcow2"; }

  // Random data writes, zero writes and discards, as qemu-io commands.
  std::vector<std::string> populate(Rng& rng, int count, uint64_t size, bool qcow2) {
    std::vector<std::string> cmds;
    for (int i = 0; i < count; ++i) {
      uint64_t off, len;
      random_range(rng, size, spec().cluster, &off, &len);
      const std::string range = std::to_string(off) + " " + std::to_string(len);
      uint64_t r = rng.below(10);
      if (r < 7 || (!qcow2 && r < 8))
        cmds.push_back("write -q -P " + std::to_string(rng.between(1, 255)) + " " + range);
      else if (r < 9)
        cmds.push_back(std::string("write -q -z ") + (rng.chance(1, 2) ? "-u " : "") + range);
      else
        cmds.push_back("discard -q " + range);
    }
    return cmds;
  }

  void Build() {
    const ChainSpec& s = spec();
    Rng rng(stable_hash(s.name));
    const std::string opts = s.options + ",cluster_size=" + std::to_string(s.cluster);
    std::string below, below_fmt;
    for (int i = 0; i < s.images; ++i) {
      const bool is_top = i == s.images - 1;
      const uint64_t size = i == 0 && s.base_size ? s.base_size : s.size;
      if (i == 0 && !is_top && s.raw_base) {
        ASSERT_EQ(run_expect({"qemu-img", "create", "-q", "-f", "raw", (dir_ / "l0.raw").string(),
                              std::to_string(size)}).exit_code, 0);
        ASSERT_EQ(qemu_io(dir_ / "l0.raw", "raw", populate(rng, 30, size, false)).exit_code, 0);
        below = "l0.raw";
        below_fmt = "raw";
        continue;
      }
      const std::string name = is_top ? "top.qcow2" : "l" + std::to_string(i) + ".qcow2";
      if (is_top && !s.compressed.empty()) {
        fs::path src = dir_ / "src.raw";
        ASSERT_EQ(run_expect({"qemu-img", "create", "-q", "-f", "raw", src.string(),
                              std::to_string(size)}).exit_code, 0);
        ASSERT_EQ(qemu_io(src, "raw", populate(rng, 40, size, false)).exit_code, 0);
        ASSERT_EQ(run_expect({"qemu-img", "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o",
                              opts + ",compression_type=" + s.compressed, src.string(),
                              top().string()}).exit_code, 0);
      } else {
        std::vector<std::string> argv{"qemu-img", "create", "-q", "-f", "qcow2", "-o",
                                      opts + (is_top ? s.top_options : "")};
        if (!below.empty()) argv.insert(argv.end(), {"-b", below, "-F", below_fmt});
        argv.insert(argv.end(), {(dir_ / name).string(), std::to_string(size)});
        ASSERT_EQ(run_expect(argv).exit_code, 0);
      }
      ASSERT_EQ(qemu_io(dir_ / name, "qcow2", populate(rng, s.images > 5 ? 6 : 30, size, true))
                    .exit_code, 0);
      below = name;
      below_fmt = "qcow2";
    }
  }

  std::shared_ptr<Layer> Open(bool read_only, uint64_t l2_cache_bytes = ChainOptions{}.l2_cache_bytes) {
    OpenedChain chain;
    std::string error;
    ChainOptions o;
    o.read_only = read_only;
    o.l2_cache_bytes = l2_cache_bytes;
    if (!open_chain(top().string(), ImageFormat::Qcow2, o, &chain, &error)) {
      ADD_FAILURE() << "open_chain: " << error;
      return nullptr;
    }
    EXPECT_EQ(chain.nodes.size(), static_cast<size_t>(spec().images));
    return chain.layer;
  }

  std::vector<uint8_t> QemuContent(const fs::path& image) {
    fs::path raw = dir_ / "qemu.raw";
    run_expect({"qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", image.string(),
                raw.string()});
    auto v = read_file_range(raw, 0, spec().size);
    fs::remove(raw);
    return v;
  }

  static std::vector<uint8_t> LayerContent(Layer& layer) {
    std::vector<uint8_t> v(layer.size());
    for (uint64_t o = 0; o < v.size(); o += 4 * MiB) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(4 * MiB, v.size() - o));
      std::span<std::byte> buf(reinterpret_cast<std::byte*>(v.data() + o), n);
      if (auto ec = layer.read(o, buf)) {
        ADD_FAILURE() << "read at " << o << ": " << ec.message();
        return {};
      }
    }
    return v;
  }

  void WritesMatchQemuIo(uint64_t l2_cache_bytes);

  TempDir dir_;
};

TEST_P(ChainTest, ContentMatchesQemu) {
  ASSERT_NO_FATAL_FAILURE(Build());
  auto layer = Open(true);
  ASSERT_TRUE(layer);
  ASSERT_EQ(layer->size(), spec().size);
  auto mine = LayerContent(*layer);
  auto qemu = QemuContent(top());
  ASSERT_EQ(mine.size(), qemu.size());
  int64_t d = first_difference(mine, qemu);
  EXPECT_EQ(d, -1) << "byte " << d << ": layer reads " << int(mine[static_cast<size_t>(d)])
                   << ", qemu " << int(qemu[static_cast<size_t>(d)]);
}

// One entry of `qemu-img map --output=json`.
struct QemuMapEntry {
  uint64_t start = 0, length = 0;
  int depth = 0;
  bool present = false, zero = false, data = false;
};

std::vector<QemuMapEntry> parse_qemu_map(const std::string& json) {
  std::vector<QemuMapEntry> out;
  auto num = [](const std::string& line, const std::string& key) -> uint64_t {
    auto p = line.find("\"" + key + "\": ");
    if (p == std::string::npos) return 0;
    return std::strtoull(line.c_str() + p + key.size() + 4, nullptr, 10);
  };
  auto flag = [](const std::string& line, const std::string& key) {
    return line.find("\"" + key + "\": true") != std::string::npos;
  };
  size_t pos = 0;
  while ((pos = json.find('{', pos)) != std::string::npos) {
    size_t end = json.find('}', pos);
    std::string line = json.substr(pos, end - pos);
    QemuMapEntry e;
    e.start = num(line, "start");
    e.length = num(line, "length");
    e.depth = static_cast<int>(num(line, "depth"));
    e.present = flag(line, "present");
    e.zero = flag(line, "zero");
    e.data = flag(line, "data");
    out.push_back(e);
    pos = end;
  }
  return out;
}

TEST_P(ChainTest, BlockStatusMatchesQemuMap) {
  ASSERT_NO_FATAL_FAILURE(Build());
  RunResult map = run_expect({"qemu-img", "map", "-U", "--output=json", top().string()});
  ASSERT_EQ(map.exit_code, 0);
  auto entries = parse_qemu_map(map.out);
  ASSERT_FALSE(entries.empty()) << map.out;
  auto layer = Open(true);
  ASSERT_TRUE(layer);
  auto content = LayerContent(*layer);
  ASSERT_EQ(content.size(), spec().size);

  uint64_t expect_start = 0;
  int reported = 0;
  for (const auto& q : entries) {
    ASSERT_EQ(q.start, expect_start) << "qemu map is not contiguous";
    expect_start = q.start + q.length;
    uint64_t pos = q.start;
    while (pos < q.start + q.length) {
      layerd::Extent ext[16];
      size_t count = 0;
      auto ec = layer->block_status(pos, q.start + q.length - pos, ext, &count);
      ASSERT_FALSE(ec) << "block_status at " << pos << ": " << ec.message();
      ASSERT_GE(count, 1u);
      for (size_t i = 0; i < count && pos < q.start + q.length; ++i) {
        const layerd::Extent& e = ext[i];
        ASSERT_GT(e.length, 0u);
        const uint64_t len = std::min(e.length, q.start + q.length - pos);
        const uint32_t want_depth = q.present ? static_cast<uint32_t>(q.depth + 1) : 0;
        // Zeros past the end of a shorter backing image: qemu-img map calls
        // them not present, qemu-nbd -A (whose numbers layerd reports, see
        // AllocationDepthMatchesQemuNbd) counts them at that image's depth.
        const bool past_short_backing = !q.present && e.hole && e.zero;
        if (e.depth != want_depth && !past_short_backing && reported++ < 5)
          ADD_FAILURE() << "[" << pos << ", +" << len << "): depth " << e.depth
                        << ", qemu-img map says " << (q.present ? "" : "not ") << "present at depth "
                        << q.depth << " (want " << want_depth << ")";
        if (q.data && !q.zero && e.zero && reported++ < 5)
          ADD_FAILURE() << "[" << pos << ", +" << len << "): reported zero, qemu says data";
        if (e.zero) {
          std::span<const uint8_t> r(content.data() + pos, len);
          if (!all_zero(r) && reported++ < 5)
            ADD_FAILURE() << "[" << pos << ", +" << len << "): reported zero but has data";
        }
        pos += len;
      }
    }
  }
  EXPECT_EQ(expect_start, spec().size) << "qemu map does not cover the disk";
}

void ChainTest::WritesMatchQemuIo(uint64_t l2_cache_bytes) {
  const ChainSpec& s = spec();
  ASSERT_NO_FATAL_FAILURE(Build());
  const fs::path ref = dir_ / "ref.qcow2";
  fs::copy_file(top(), ref);
  std::vector<std::string> cmds;
  {
    auto layer = Open(false, l2_cache_bytes);
    ASSERT_TRUE(layer);
    Rng rng(stable_hash(s.name) ^ 0x1a7e);
    std::vector<uint8_t> buf;
    for (int i = 0; i < 120; ++i) {
      uint64_t off, len;
      random_range(rng, s.size, s.cluster, &off, &len);
      const std::string range = std::to_string(off) + " " + std::to_string(len);
      const uint64_t r = rng.below(100);
      std::error_code ec;
      if (r < 50) {
        const uint32_t seed = static_cast<uint32_t>(i) + 1;
        const bool fua = rng.chance(1, 8);
        buf = pattern(off, len, seed);
        ec = layer->write(off, std::as_bytes(std::span<const uint8_t>(buf)), fua);
        // qemu-io's -s reads a file from its start: write the bytes there.
        fs::path f = dir_ / ("w" + std::to_string(i));
        write_whole_file(f, buf);
        cmds.push_back(std::string("write -q ") + (fua ? "-f " : "") + "-s " + f.string() + " " +
                       range);
      } else if (r < 70) {
        ZeroFlags f{.may_trim = rng.chance(1, 2), .fast_only = rng.chance(1, 2), .fua = false};
        std::vector<uint8_t> before;
        if (f.fast_only) {
          before.resize(len);
          ASSERT_FALSE(layer->read(off, std::as_writable_bytes(std::span<uint8_t>(before))));
        }
        ec = layer->write_zeroes(off, len, f);
        if (f.fast_only && ec == std::errc::operation_not_supported) {
          std::vector<uint8_t> after(len);
          ASSERT_FALSE(layer->read(off, std::as_writable_bytes(std::span<uint8_t>(after))));
          ASSERT_EQ(first_difference(before, after), -1)
              << "#" << i << " fast_only write_zeroes " << range << " failed but changed data";
          f.fast_only = false;
          ec = layer->write_zeroes(off, len, f);
        }
        cmds.push_back(std::string("write -q -z ") + (f.may_trim ? "-u " : "") + range);
      } else if (r < 85) {
        ec = layer->trim(off, len, rng.chance(1, 4));
        ASSERT_FALSE(ec) << "#" << i << " trim " << range << ": " << ec.message();
        ec = layer->write_zeroes(off, len, ZeroFlags{});
        cmds.push_back("discard -q " + range);
        cmds.push_back("write -q -z " + range);
      } else {
        ec = layer->flush();
        cmds.push_back("flush");
      }
      ASSERT_FALSE(ec) << "#" << i << " (" << (cmds.empty() ? "" : cmds.back())
                       << "): " << ec.message();
    }
    ASSERT_FALSE(layer->flush());
  }  // closes the chain
  ASSERT_EQ(qemu_io(ref, "qcow2", cmds).exit_code, 0);
  EXPECT_EQ(run_expect({"qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", top().string(),
                        ref.string()}).exit_code, 0);
  EXPECT_EQ(run_expect({"qemu-img", "check", top().string()}).exit_code, 0);
}

TEST_P(ChainTest, LayerWritesMatchQemuIo) { WritesMatchQemuIo(ChainOptions{}.l2_cache_bytes); }

// The smallest L2 cache (the engine keeps at least 4 tables per image):
// tables are evicted, written back and reloaded all the time.
TEST_P(ChainTest, LayerWritesWithTinyL2CacheMatchQemuIo) { WritesMatchQemuIo(1); }

INSTANTIATE_TEST_SUITE_P(Chains, ChainTest, ::testing::ValuesIn(Specs()),
                         [](const ::testing::TestParamInfo<ChainSpec>& i) { return i.param.name; });

}  // namespace
}  // namespace layerd::test
