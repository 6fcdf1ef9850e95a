// Correctness of layerd's qcow2 engine against qemu, one cell per image
// option.
//
// Every cell builds a backing chain with qemu-img and qemu-io (the options
// under test, data written by qemu, zero clusters, discards, compressed
// clusters, internal snapshots, ...), then:
//
//   ServedContentMatchesQemu   serves the top image with layerd and checks
//                              `qemu-img compare top.qcow2 nbd://layerd`,
//                              that block status calls nothing zero that
//                              has data, and that serving it read-write and
//                              closing leaves `qemu-img check` clean.
//   RandomWritesMatchQemuIo    copies the top image, applies the same seeded
//                              random writes, zero writes, trims and flushes
//                              through layerd (libnbd) and through qemu-io
//                              (on the copy), then checks: layerd reads what
//                              an in-memory model says; `qemu-img compare`
//                              of the two files; `qemu-img check` of layerd's
//                              file; internal snapshots are untouched; and
//                              the other way round, layerd serving the file
//                              qemu wrote reads what qemu reads from it.
//   Qcow2ConcurrentMatrix      (a subset of the cells) batches of up to 10
//                              requests in flight at once on one connection,
//                              byte-disjoint but in the same clusters, then
//                              the same comparisons with qemu-io.
//
// Cells with an external data file run layerd with --allow-data-file (and
// check that without it layerd refuses, naming the file and the option).
// With LAYERD_BIN=/usr/bin/qemu-nbd the whole matrix passes too (the
// layerd-only refusal check is skipped), which keeps the tests honest about
// qemu's semantics.
//
// Everything random comes from Rng seeded with a hash of the cell name, so
// a failure reproduces by running the same cell again. A failing operation
// is reported with its index and the qemu-io form of the last operations.
//
// TRIM: NBD leaves the content of a trimmed range unspecified, and layerd
// and qemu legitimately differ in the details (qemu drops the unaligned head
// and tail of a discard and may ignore one altogether; layerd zeroes
// partial clusters over a backing file). So each trim is checked on its own
// (every byte of the range reads as either its old value or zero, which is
// what layerd promises: zero clusters over a backing file, unallocated
// clusters without one, partial clusters untouched or zeroed) and is then
// followed by a write_zeroes of the same range on both sides. The contents
// compared afterwards are fully specified, while the trim has still changed
// the metadata (freed clusters, zero clusters, refcounts) that the following
// operations, the comparison and `qemu-img check` go through.
//
// Both sides run with discard=unmap (layerd --discard=unmap, qemu-io -d
// unmap) so that trims and zero writes with may_trim reach the engine.
#include <libnbd.h>

#include <algorithm>
#include <cstdint>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "tests/server/harness.h"
#include "tests/server/qcow2_tools.h"

namespace layerd::test {
namespace {

using namespace qcow2e2e;

constexpr uint64_t KiB = 1024;
constexpr uint64_t MiB = 1024 * KiB;

// Pattern files for `qemu-io write -s FILE`: position-dependent bytes (see
// harness pattern()), so data written to the wrong place is noticed, which
// single-byte -P patterns would not show.
constexpr int kPatternFiles = 4;
constexpr uint64_t kPatternLen = 256 * KiB;
constexpr uint32_t kPatternSeedBase = 1000;

enum class Backing { None, Qcow2, Raw };

struct Cell {
  std::string name;
  std::string compat = "1.1";
  uint64_t cluster = 64 * KiB;
  int refcount_bits = 16;
  bool extended_l2 = false;
  std::string compression;  // "zlib"/"zstd": top made by `convert -c`
  bool prealloc_metadata = false;
  bool lazy_refcounts = false;
  int snapshots = 0;  // internal snapshots taken while building the top
  Backing backing = Backing::None;  // type of the bottom image if chain > 1
  int chain = 1;                    // images in the chain, the top included
  uint64_t size = 16 * MiB;
  uint64_t bottom_size = 0;  // size of the bottom image; 0: same as size
  bool zero_over_backing = false;
  bool data_file = false;  // external data file (top only)
  // qemu-io aborts after writing to a lazy-refcounts top: the image is left
  // dirty with refcounts too low, which the next read-write open repairs.
  bool qemu_abort = false;
  int ops = 150;           // random operations in RandomWritesMatchQemuIo
};

std::ostream& operator<<(std::ostream& os, const Cell& c) { return os << c.name; }

Cell V(std::string name) {
  Cell c;
  c.name = std::move(name);
  return c;
}

std::vector<Cell> Cells() {
  std::vector<Cell> v;
  auto add = [&](Cell c) { v.push_back(std::move(c)); };
  // Versions and cluster sizes.
  { Cell c = V("v2_c64k"); c.compat = "0.10"; add(c); }
  { Cell c = V("v3_c64k"); add(c); }
  { Cell c = V("v2_c512"); c.compat = "0.10"; c.cluster = 512; c.size = 8 * MiB; add(c); }
  { Cell c = V("v3_c512"); c.cluster = 512; c.size = 8 * MiB; add(c); }
  { Cell c = V("v2_c4k"); c.compat = "0.10"; c.cluster = 4 * KiB; add(c); }
  { Cell c = V("v3_c4k"); c.cluster = 4 * KiB; add(c); }
  { Cell c = V("v2_c2m"); c.compat = "0.10"; c.cluster = 2 * MiB; c.size = 64 * MiB; c.ops = 50; add(c); }
  { Cell c = V("v3_c2m"); c.cluster = 2 * MiB; c.size = 64 * MiB; c.ops = 50; add(c); }
  // Refcount widths (v3 only).
  { Cell c = V("v3_refcount1"); c.refcount_bits = 1; add(c); }
  { Cell c = V("v3_refcount1_c512"); c.refcount_bits = 1; c.cluster = 512; c.size = 8 * MiB; add(c); }
  { Cell c = V("v3_refcount64"); c.refcount_bits = 64; add(c); }
  // 64 refcounts per 512-byte block: many refcount blocks, and the
  // refcount table has to grow while the image fills.
  { Cell c = V("v3_refcount64_c512"); c.refcount_bits = 64; c.cluster = 512; c.size = 8 * MiB; add(c); }
  // A virtual size that is not a multiple of the cluster size.
  { Cell c = V("odd_size"); c.size = 16 * MiB + 1536; add(c); }
  { Cell c = V("v2_odd_size_backing"); c.compat = "0.10"; c.size = 16 * MiB + 3584; c.backing = Backing::Qcow2; c.chain = 2; c.bottom_size = 16 * MiB + 1024; add(c); }
  // Extended L2 entries (subclusters); needs clusters of 16K or more.
  { Cell c = V("extl2_c64k"); c.extended_l2 = true; add(c); }
  { Cell c = V("extl2_c2m"); c.extended_l2 = true; c.cluster = 2 * MiB; c.size = 64 * MiB; c.ops = 50; add(c); }
  { Cell c = V("extl2_c32k_backing"); c.extended_l2 = true; c.cluster = 32 * KiB; c.backing = Backing::Qcow2; c.chain = 2; add(c); }
  // Compressed clusters.
  { Cell c = V("zlib_compressed"); c.compression = "zlib"; add(c); }
  { Cell c = V("zstd_compressed"); c.compression = "zstd"; add(c); }
  { Cell c = V("v2_zlib_compressed"); c.compat = "0.10"; c.compression = "zlib"; add(c); }
  { Cell c = V("zstd_compressed_c4k"); c.compression = "zstd"; c.cluster = 4 * KiB; add(c); }
  { Cell c = V("zstd_compressed_extl2"); c.compression = "zstd"; c.extended_l2 = true; add(c); }
  // Preallocation, lazy refcounts.
  { Cell c = V("prealloc_metadata"); c.prealloc_metadata = true; add(c); }
  { Cell c = V("v2_prealloc_metadata"); c.compat = "0.10"; c.prealloc_metadata = true; add(c); }
  { Cell c = V("lazy_refcounts"); c.lazy_refcounts = true; add(c); }
  { Cell c = V("lazy_dirty_left_by_qemu"); c.lazy_refcounts = true; c.qemu_abort = true; add(c); }
  // Internal snapshots (shared clusters, refcount > 1, COPIED flag clear).
  { Cell c = V("snapshots"); c.snapshots = 2; add(c); }
  { Cell c = V("v2_snapshots"); c.compat = "0.10"; c.snapshots = 2; add(c); }
  { Cell c = V("snapshots_compressed"); c.snapshots = 1; c.compression = "zlib"; add(c); }
  // Backing files.
  { Cell c = V("backing_qcow2"); c.backing = Backing::Qcow2; c.chain = 2; add(c); }
  { Cell c = V("v2_backing_qcow2"); c.compat = "0.10"; c.backing = Backing::Qcow2; c.chain = 2; add(c); }
  { Cell c = V("backing_raw"); c.backing = Backing::Raw; c.chain = 2; add(c); }
  { Cell c = V("backing_short_qcow2"); c.backing = Backing::Qcow2; c.chain = 2; c.bottom_size = 5 * MiB + 1536; add(c); }
  { Cell c = V("backing_short_raw"); c.backing = Backing::Raw; c.chain = 2; c.bottom_size = 3 * MiB + 512; add(c); }
  { Cell c = V("zero_over_backing"); c.backing = Backing::Qcow2; c.chain = 2; c.zero_over_backing = true; add(c); }
  { Cell c = V("v2_zero_over_backing"); c.compat = "0.10"; c.backing = Backing::Qcow2; c.chain = 2; c.zero_over_backing = true; add(c); }
  { Cell c = V("extl2_zero_over_backing"); c.extended_l2 = true; c.backing = Backing::Raw; c.chain = 2; c.zero_over_backing = true; add(c); }
  { Cell c = V("snapshots_over_backing"); c.snapshots = 1; c.backing = Backing::Qcow2; c.chain = 2; add(c); }
  // Chains.
  { Cell c = V("chain3"); c.backing = Backing::Qcow2; c.chain = 3; add(c); }
  { Cell c = V("chain3_raw_base_c4k"); c.backing = Backing::Raw; c.chain = 3; c.cluster = 4 * KiB; add(c); }
  { Cell c = V("chain20"); c.backing = Backing::Qcow2; c.chain = 20; c.size = 8 * MiB; c.ops = 100; add(c); }
  // External data file.
  { Cell c = V("data_file"); c.data_file = true; add(c); }
  return v;
}

std::string cell_name(const ::testing::TestParamInfo<Cell>& info) { return info.param.name; }

// --- Operations ----------------------------------------------------------------

struct Op {
  enum Kind { Write, Zero, Trim, Flush } kind = Write;
  uint64_t off = 0;
  uint64_t len = 0;
  int pattern_file = -1;  // Write: -1 for a one-byte pattern
  uint8_t byte = 0;
  bool fua = false;
  bool may_trim = false;  // Zero: not NBD_CMD_FLAG_NO_HOLE / qemu-io -u
};

// A random range: lengths from 1 byte to 3 clusters (sometimes up to 1 MiB),
// offsets aligned to the cluster, the subcluster, 512 bytes, or not at all,
// or ending at the end of the disk.
void random_range(Rng& rng, uint64_t size, uint64_t cluster, uint64_t max_len,
                  uint64_t* off, uint64_t* len, uint64_t hot = 0) {
  uint64_t l;
  switch (rng.below(4)) {
    case 0: l = cluster * rng.between(1, 3); break;
    case 1: l = rng.between(1, 3 * cluster); break;
    case 2: l = rng.between(1, 4096); break;
    default: l = 512 * rng.between(1, std::max<uint64_t>(1, 3 * cluster / 512)); break;
  }
  l = std::min(l, max_len);
  // Now and then a long request that spans many clusters (and, with small
  // clusters, many L2 tables and refcount blocks).
  if (rng.chance(1, 16)) l = rng.between(1, std::max<uint64_t>(max_len, 1 * MiB));
  uint64_t o;
  switch (rng.below(5)) {
    case 4: o = size - std::min(l, size); break;  // up to the very end
    case 0: o = rng.below(size / cluster) * cluster; break;
    case 1: o = rng.below(size / 512) * 512; break;
    case 2: {
      uint64_t sub = std::max<uint64_t>(512, cluster / 32);
      o = rng.below(size / sub) * sub;
      break;
    }
    default: o = rng.below(size); break;
  }
  // Around a spot worth a closer look (the end of a short backing file).
  if (hot && rng.chance(1, 6)) o = hot - std::min(hot, rng.below(2 * cluster));
  if (o >= size) o = size - 1;
  l = std::max<uint64_t>(1, std::min(l, size - o));
  *off = o;
  *len = l;
}

// Relative weights of writes, zero writes, trims and flushes.
struct Mix {
  int write, zero, trim, flush;
};

Op random_op(Rng& rng, uint64_t size, uint64_t cluster, Mix mix, uint64_t hot = 0) {
  Op op;
  int total = mix.write + mix.zero + mix.trim + mix.flush;
  int r = static_cast<int>(rng.below(static_cast<uint64_t>(total)));
  if (r < mix.write) op.kind = Op::Write;
  else if (r < mix.write + mix.zero) op.kind = Op::Zero;
  else if (r < mix.write + mix.zero + mix.trim) op.kind = Op::Trim;
  else op.kind = Op::Flush;
  if (op.kind == Op::Flush) return op;
  random_range(rng, size, cluster, 3 * cluster, &op.off, &op.len, hot);
  if (op.kind == Op::Write) {
    if (op.len <= kPatternLen && rng.chance(1, 2))
      op.pattern_file = static_cast<int>(rng.below(kPatternFiles));
    else
      op.byte = static_cast<uint8_t>(rng.between(1, 255));
    op.fua = rng.chance(1, 8);
  }
  op.may_trim = rng.chance(1, 2);
  return op;
}

// The same operation as qemu-io commands (a trim is followed by a zero write
// of the same range, see the comment at the top).
std::vector<std::string> qemu_io_commands(const Op& op, const fs::path& dir) {
  const std::string range = std::to_string(op.off) + " " + std::to_string(op.len);
  switch (op.kind) {
    case Op::Write:
      if (op.pattern_file >= 0)
        return {std::string("write -q ") + (op.fua ? "-f " : "") + "-s " +
                (dir / ("pattern" + std::to_string(op.pattern_file))).string() + " " + range};
      return {std::string("write -q ") + (op.fua ? "-f " : "") + "-P " +
              std::to_string(op.byte) + " " + range};
    case Op::Zero:
      return {std::string("write -q -z ") + (op.may_trim ? "-u " : "") + range};
    case Op::Trim:
      return {"discard -q " + range,
              std::string("write -q -z ") + (op.may_trim ? "-u " : "") + range};
    case Op::Flush:
      return {"flush"};
  }
  return {};
}

std::vector<std::string> qemu_io_commands(const std::vector<Op>& ops, const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& op : ops)
    for (auto& c : qemu_io_commands(op, dir)) out.push_back(std::move(c));
  return out;
}

// --- The fixture -----------------------------------------------------------------

class Qcow2Matrix : public ::testing::TestWithParam<Cell> {
 protected:
  const Cell& cell() const { return GetParam(); }
  fs::path top() const { return dir_ / "top.qcow2"; }
  fs::path pattern_file(int k) const { return dir_ / ("pattern" + std::to_string(k)); }

  std::vector<uint8_t> pattern_data(int k, uint64_t len) const {
    return pattern(0, len, kPatternSeedBase + static_cast<uint32_t>(k));
  }

  std::string create_options(bool is_top) const {
    const Cell& c = cell();
    std::string o = "compat=" + c.compat + ",cluster_size=" + std::to_string(c.cluster);
    if (c.refcount_bits != 16) o += ",refcount_bits=" + std::to_string(c.refcount_bits);
    if (c.extended_l2) o += ",extended_l2=on";
    if (is_top) {
      if (c.prealloc_metadata) o += ",preallocation=metadata";
      if (c.lazy_refcounts) o += ",lazy_refcounts=on";
      // qemu-img resolves a relative name against its working directory
      // when it creates the file, so give it the full path.
      if (c.data_file) o += ",data_file=" + (dir_ / "top.data").string();
    }
    return o;
  }

  // Random data and zero writes (and, on qcow2, discards) as qemu-io
  // commands, for building images.
  std::vector<std::string> populate_commands(Rng& rng, int count, uint64_t size,
                                             bool qcow2) const {
    std::vector<Op> ops;
    Mix mix = qcow2 ? Mix{70, 15, 15, 0} : Mix{85, 15, 0, 0};
    for (int i = 0; i < count; ++i) ops.push_back(random_op(rng, size, cell().cluster, mix));
    std::vector<std::string> cmds;
    for (const auto& op : ops) {
      auto c = qemu_io_commands(op, dir_.path());
      // A plain discard while building (no zero write after it): qemu's
      // own result is the reference, whatever it is.
      if (op.kind == Op::Trim) c.resize(1);
      cmds.insert(cmds.end(), c.begin(), c.end());
    }
    return cmds;
  }

  // Builds the chain of the cell in the temp dir, top image last.
  void Build() {
    const Cell& c = cell();
    Rng rng(stable_hash(c.name));
    for (int k = 0; k < kPatternFiles; ++k)
      write_whole_file(pattern_file(k), pattern_data(k, kPatternLen));

    std::string below_name, below_format;
    for (int i = 0; i < c.chain; ++i) {
      const bool is_top = i == c.chain - 1;
      const uint64_t size = (i == 0 && c.bottom_size) ? c.bottom_size : c.size;
      if (i == 0 && !is_top && c.backing == Backing::Raw) {
        fs::path raw = dir_ / "l0.raw";
        ASSERT_EQ(run_expect({"qemu-img", "create", "-q", "-f", "raw", raw.string(),
                              std::to_string(size)}).exit_code, 0);
        ASSERT_EQ(qemu_io(raw, "raw", populate_commands(rng, 40, size, false)).exit_code, 0);
        below_name = "l0.raw";
        below_format = "raw";
        continue;
      }
      const std::string name = is_top ? "top.qcow2" : "l" + std::to_string(i) + ".qcow2";
      const fs::path path = dir_ / name;
      if (is_top && !c.compression.empty()) {
        ASSERT_NO_FATAL_FAILURE(BuildCompressedTop(rng, below_name, below_format));
      } else {
        std::vector<std::string> argv{"qemu-img", "create", "-q", "-f", "qcow2", "-o",
                                      create_options(is_top)};
        if (!below_name.empty()) {
          argv.insert(argv.end(), {"-b", below_name, "-F", below_format});
        }
        argv.insert(argv.end(), {path.string(), std::to_string(size)});
        ASSERT_EQ(run_expect(argv).exit_code, 0);
      }
      const int writes = c.chain > 5 ? 8 : 40;
      ASSERT_EQ(qemu_io(path, "qcow2", populate_commands(rng, writes, size, true)).exit_code, 0);
      if (is_top && c.zero_over_backing) {
        // Zero clusters (v3) or written zeros (v2) over backing data: whole
        // clusters, a run of clusters, partial and unaligned ranges, with
        // and without unmap.
        const uint64_t cl = c.cluster;
        std::vector<std::string> z = {
            "write -q -z 0 " + std::to_string(cl),
            "write -q -z -u " + std::to_string(4 * cl) + " " + std::to_string(3 * cl),
            "write -q -z " + std::to_string(8 * cl + 512) + " " + std::to_string(cl),
            "write -q -z -u " + std::to_string(11 * cl + 7) + " " + std::to_string(2 * cl + 100),
            "write -q -z " + std::to_string(c.size / 2) + " " + std::to_string(16 * cl),
        };
        ASSERT_EQ(qemu_io(path, "qcow2", z).exit_code, 0);
      }
      for (int s = 1; is_top && s <= c.snapshots; ++s) {
        ASSERT_EQ(run_expect({"qemu-img", "snapshot", "-c", "s" + std::to_string(s),
                              path.string()}).exit_code, 0);
        ASSERT_EQ(qemu_io(path, "qcow2", populate_commands(rng, 25, size, true)).exit_code, 0);
      }
      below_name = name;
      below_format = "qcow2";
    }
    if (c.qemu_abort) {
      Rng arng(stable_hash(c.name) ^ 0xab);
      std::vector<std::string> argv{"qemu-io", "-f", "qcow2"};
      for (int i = 0; i < 12; ++i) {
        uint64_t off = arng.below(c.size / c.cluster) * c.cluster;
        argv.insert(argv.end(), {"-c", "write -q -P " + std::to_string(arng.between(1, 255)) +
                                           " " + std::to_string(off) + " " +
                                           std::to_string(std::min(2 * c.cluster, c.size - off))});
      }
      argv.insert(argv.end(), {"-c", "abort", top().string()});
      RunResult r = run(argv);
      ASSERT_NE(r.exit_code, 0) << "qemu-io did not abort: " << r.describe();
      RunResult info = run_expect({"qemu-img", "info", "-U", "--output=json", top().string()});
      ASSERT_NE(info.out.find("\"dirty-flag\": true"), std::string::npos)
          << "qemu-io's abort did not leave the image dirty:\n" << info.out;
      return;  // `qemu-img check` finds refcounts too low: that is the point
    }
    // qemu must consider what it built consistent, or the cell is moot.
    RunResult chk = run_expect({"qemu-img", "check", top().string()});
    ASSERT_EQ(chk.exit_code, 0);
    if (!c.compression.empty()) {
      RunResult map = run_expect({"qemu-img", "map", "--output=json", top().string()});
      // qemu 7.2's JSON map gives compressed data extents no "offset"
      // (newer versions also say "compressed": true).
      EXPECT_TRUE(map.out.find("\"data\": true}") != std::string::npos ||
                  map.out.find("\"compressed\": true") != std::string::npos)
          << "the cell meant to test compressed clusters has none:\n" << map.out;
    }
  }

  // top.qcow2 as `qemu-img convert -c` of a raw image whose data is partly
  // compressible (one-byte patterns) and partly not (pattern files: qemu
  // then stores the cluster uncompressed), then a few more writes so that
  // compressed clusters are partially overwritten.
  void BuildCompressedTop(Rng& rng, const std::string& below_name,
                          const std::string& below_format) {
    const Cell& c = cell();
    ASSERT_TRUE(below_name.empty()) << "compressed cells have no backing";
    (void)below_format;
    fs::path src = dir_ / "src.raw";
    ASSERT_EQ(run_expect({"qemu-img", "create", "-q", "-f", "raw", src.string(),
                          std::to_string(c.size)}).exit_code, 0);
    std::vector<std::string> cmds;
    for (int i = 0; i < 24; ++i) {
      uint64_t off = rng.below(c.size / c.cluster) * c.cluster;
      uint64_t len = std::min(c.cluster * rng.between(1, 6), c.size - off);
      cmds.push_back("write -q -P " + std::to_string(rng.between(1, 255)) + " " +
                     std::to_string(off) + " " + std::to_string(len));
    }
    ASSERT_EQ(qemu_io(src, "raw", cmds).exit_code, 0);
    ASSERT_EQ(qemu_io(src, "raw", populate_commands(rng, 16, c.size, false)).exit_code, 0);
    std::string o = create_options(true);
    if (c.compat != "0.10") o += ",compression_type=" + c.compression;
    ASSERT_EQ(run_expect({"qemu-img", "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", o,
                          src.string(), top().string()}).exit_code, 0);
    fs::remove(src);
  }

  // The copy of the top image that qemu-io writes to (with its own copy of
  // the external data file, if any).
  void CopyTop(const fs::path& ref) {
    fs::copy_file(top(), ref);
    if (!cell().data_file) return;
    const fs::path data = ref.parent_path() / (ref.stem().string() + ".data");
    fs::copy_file(dir_ / "top.data", data);
    ASSERT_EQ(run_expect({"qemu-img", "amend", "-f", "qcow2", "-o", "data_file=" + data.string(),
                          ref.string()}).exit_code, 0);
  }

  // Starts layerd on `image` at `socket`; false (with the reason) if it
  // refuses. Cells with an external data file pass --allow-data-file unless
  // told not to.
  bool StartLayerd(Server& server, const fs::path& image, const fs::path& socket,
                   std::vector<std::string> extra, std::string* why,
                   bool allow_data_file = true) {
    ServerOptions o;
    o.args = {"-f", "qcow2"};
    if (cell().data_file && allow_data_file && !server_is_qemu_nbd())
      o.args.push_back("--allow-data-file");
    o.args.insert(o.args.end(), extra.begin(), extra.end());
    o.args.insert(o.args.end(), {"-k", socket.string(), "-t", "-e", "0", image.string()});
    o.unix_socket = socket;
    o.log_file = dir_ / (socket.stem().string() + ".log");
    if (server.start(std::move(o))) return true;
    *why = server.error();
    return false;
  }


  std::string compare(const fs::path& image, const fs::path& socket) {
    RunResult r = run({"qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw",
                       image.string(), unix_uri(socket)}, 60s);
    if (r.exit_code == 0) return {};
    return "qemu-img compare " + image.filename().string() + " nbd: " + r.describe();
  }

  // A connection that can ask for base:allocation block status.
  static Nbd ConnectWithBlockStatus(const fs::path& socket) {
    return nbd_connect_to_unix(socket, [](nbd_handle* h) {
      nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION);
    });
  }

  static std::vector<uint8_t> ReadAll(nbd_handle* h, uint64_t size) {
    std::vector<uint8_t> all(size);
    constexpr uint64_t kChunk = 4 * MiB;
    for (uint64_t o = 0; o < size; o += kChunk) {
      uint64_t n = std::min(kChunk, size - o);
      if (nbd_pread(h, all.data() + o, n, o, 0) != 0) {
        ADD_FAILURE() << "read at " << o << ": " << nbd_error_text();
        return {};
      }
    }
    return all;
  }

  // Block status must never claim zeros where there is data: every extent
  // with NBD_STATE_ZERO reads as zeros in `content` (the whole disk).
  static void CheckZeroExtents(nbd_handle* h, const std::vector<uint8_t>& content) {
    auto map = block_status_map(h, 0, content.size());
    ASSERT_TRUE(map.has_value());
    for (const auto& e : *map) {
      if (!(e.flags & LIBNBD_STATE_ZERO)) continue;
      std::span<const uint8_t> r(content.data() + e.offset, e.length);
      auto it = std::find_if(r.begin(), r.end(), [](uint8_t b) { return b != 0; });
      ASSERT_TRUE(it == r.end())
          << "block status says [" << e.offset << ", +" << e.length << ") (flags " << e.flags
          << ") reads as zeros, but byte " << e.offset + static_cast<uint64_t>(it - r.begin())
          << " is " << int(*it);
    }
  }

  TempDir dir_;
};

TEST_P(Qcow2Matrix, ServedContentMatchesQemu) {
  ASSERT_NO_FATAL_FAILURE(Build());
  std::string why;
  if (cell().data_file && !server_is_qemu_nbd()) {
    // Without --allow-data-file layerd must not open the file an image
    // names, and must say so.
    Server refused;
    ASSERT_FALSE(StartLayerd(refused, top(), dir_ / "refused.sock", {}, &why, false))
        << "layerd opened an external data file without --allow-data-file";
    EXPECT_NE(why.find((dir_ / "top.data").string()), std::string::npos) << why;
    EXPECT_NE(why.find("--allow-data-file"), std::string::npos) << why;
  }
  Server server;
  ASSERT_TRUE(StartLayerd(server, top(), dir_ / "top.sock", {}, &why))
      << "layerd did not serve " << cell().name << ": " << why;
  EXPECT_EQ(compare(top(), dir_ / "top.sock"), "");
  {
    Nbd h = ConnectWithBlockStatus(dir_ / "top.sock");
    ASSERT_TRUE(h);
    auto all = ReadAll(h.get(), cell().size);
    ASSERT_EQ(all.size(), cell().size);
    ASSERT_NO_FATAL_FAILURE(CheckZeroExtents(h.get(), all));
    nbd_shutdown(h.get(), 0);
  }
  EXPECT_EQ(server.stop(), 0) << server.log();
  // Serving read-write and closing must not have damaged anything.
  RunResult chk = run_expect({"qemu-img", "check", top().string()});
  EXPECT_EQ(chk.exit_code, 0);
}

TEST_P(Qcow2Matrix, RandomWritesMatchQemuIo) {
  const Cell& c = cell();
  ASSERT_NO_FATAL_FAILURE(Build());
  const fs::path ref = dir_ / "ref.qcow2";
  ASSERT_NO_FATAL_FAILURE(CopyTop(ref));
  // What the internal snapshots hold must not change through writes.
  for (int s = 1; s <= c.snapshots; ++s) {
    ASSERT_EQ(run_expect({"qemu-img", "convert", "-U", "-l", "s" + std::to_string(s), "-O", "raw",
                          top().string(), (dir_ / ("snap" + std::to_string(s) + ".raw")).string()})
                  .exit_code, 0);
  }

  Server server;
  std::string why;
  const fs::path sock = dir_ / "top.sock";
  ASSERT_TRUE(StartLayerd(server, top(), sock, {"--discard=unmap"}, &why))
      << "layerd did not serve " << c.name << ": " << why;
  Nbd h = ConnectWithBlockStatus(sock);
  ASSERT_TRUE(h);
  const uint64_t size = c.size;
  ASSERT_EQ(nbd_get_size(h.get()), static_cast<int64_t>(size));

  // The model starts as what layerd serves, which ServedContentMatchesQemu
  // checks against qemu.
  std::vector<uint8_t> model = ReadAll(h.get(), size);
  ASSERT_EQ(model.size(), size);
  constexpr uint64_t kChunk = 4 * MiB;

  Rng rng(stable_hash(c.name) ^ 0x5eed);
  std::vector<Op> ops;
  std::vector<uint8_t> buf;
  std::vector<std::vector<uint8_t>> patterns;
  for (int k = 0; k < kPatternFiles; ++k) patterns.push_back(pattern_data(k, kPatternLen));

  auto where = [&](size_t i) {
    std::ostringstream os;
    os << "cell " << c.name << ", operation #" << i << "; the last operations (qemu-io form):";
    size_t from = i >= 8 ? i - 8 : 0;
    for (size_t j = from; j <= i && j < ops.size(); ++j)
      for (const auto& cmd : qemu_io_commands(ops[j], dir_.path()))
        os << "\n  #" << j << " " << cmd;
    return os.str();
  };

  for (int i = 0; i < c.ops; ++i) {
    Op op = random_op(rng, size, c.cluster, Mix{55, 20, 15, 10}, c.bottom_size);
    ops.push_back(op);
    const size_t idx = ops.size() - 1;
    int rc = 0;
    switch (op.kind) {
      case Op::Write: {
        if (op.pattern_file >= 0)
          buf.assign(patterns[static_cast<size_t>(op.pattern_file)].begin(),
                     patterns[static_cast<size_t>(op.pattern_file)].begin() +
                         static_cast<ptrdiff_t>(op.len));
        else
          buf.assign(op.len, op.byte);
        rc = nbd_pwrite(h.get(), buf.data(), op.len, op.off, op.fua ? LIBNBD_CMD_FLAG_FUA : 0);
        std::copy(buf.begin(), buf.end(), model.begin() + static_cast<ptrdiff_t>(op.off));
        break;
      }
      case Op::Zero:
        rc = nbd_zero(h.get(), op.len, op.off, op.may_trim ? 0 : LIBNBD_CMD_FLAG_NO_HOLE);
        std::fill_n(model.begin() + static_cast<ptrdiff_t>(op.off), op.len, 0);
        break;
      case Op::Trim: {
        rc = nbd_trim(h.get(), op.len, op.off, 0);
        ASSERT_EQ(rc, 0) << "trim: " << nbd_error_text() << "\n" << where(idx);
        buf.resize(op.len);
        ASSERT_EQ(nbd_pread(h.get(), buf.data(), op.len, op.off, 0), 0) << nbd_error_text();
        for (uint64_t b = 0; b < op.len; ++b) {
          uint8_t old = model[op.off + b];
          ASSERT_TRUE(buf[b] == old || buf[b] == 0)
              << "after trim, byte " << op.off + b << " reads " << int(buf[b])
              << ", neither its old value " << int(old) << " nor zero\n" << where(idx);
        }
        rc = nbd_zero(h.get(), op.len, op.off, op.may_trim ? 0 : LIBNBD_CMD_FLAG_NO_HOLE);
        std::fill_n(model.begin() + static_cast<ptrdiff_t>(op.off), op.len, 0);
        break;
      }
      case Op::Flush:
        rc = nbd_flush(h.get(), 0);
        break;
    }
    ASSERT_EQ(rc, 0) << nbd_error_text() << "\n" << where(idx);
    // Spot checks find the first bad operation, not just the end result.
    if (rng.chance(1, 4)) {
      uint64_t off, len;
      random_range(rng, size, c.cluster, 3 * c.cluster, &off, &len);
      buf.resize(len);
      ASSERT_EQ(nbd_pread(h.get(), buf.data(), len, off, 0), 0) << nbd_error_text();
      int64_t d = first_difference(buf, std::span<const uint8_t>(model).subspan(off, len));
      ASSERT_EQ(d, -1) << "read of [" << off << ", +" << len << ") differs from the model at byte "
                       << off + static_cast<uint64_t>(d) << ": got "
                       << int(buf[static_cast<size_t>(d)]) << ", want "
                       << int(model[off + static_cast<uint64_t>(d)]) << "\n" << where(idx);
    }
  }
  // Everything layerd serves now is what the model says.
  for (uint64_t o = 0; o < size; o += kChunk) {
    uint64_t n = std::min(kChunk, size - o);
    buf.resize(n);
    ASSERT_EQ(nbd_pread(h.get(), buf.data(), n, o, 0), 0) << nbd_error_text();
    int64_t d = first_difference(buf, std::span<const uint8_t>(model).subspan(o, n));
    ASSERT_EQ(d, -1) << "final read differs from the model at byte " << o + static_cast<uint64_t>(d)
                     << "\n" << where(ops.size() - 1);
  }
  ASSERT_NO_FATAL_FAILURE(CheckZeroExtents(h.get(), model));
  ASSERT_EQ(nbd_flush(h.get(), 0), 0) << nbd_error_text();
  nbd_shutdown(h.get(), 0);
  h.reset();
  ASSERT_EQ(server.stop(), 0) << server.log();

  // The same operations through qemu on the copy.
  ASSERT_EQ(qemu_io(ref, "qcow2", qemu_io_commands(ops, dir_.path())).exit_code, 0);

  // qemu reads what layerd wrote.
  EXPECT_EQ(run_expect({"qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", top().string(),
                        ref.string()}).exit_code, 0)
      << "layerd's file (first) and qemu's differ after the same operations";
  RunResult chk = run_expect({"qemu-img", "check", top().string()});
  EXPECT_EQ(chk.exit_code, 0) << "qemu-img check of the image layerd wrote";
  for (int s = 1; s <= c.snapshots; ++s) {
    const std::string name = "s" + std::to_string(s);
    fs::path after = dir_ / ("snap" + std::to_string(s) + "-after.raw");
    ASSERT_EQ(run_expect({"qemu-img", "convert", "-U", "-l", name, "-O", "raw", top().string(),
                          after.string()}).exit_code, 0);
    EXPECT_EQ(run_expect({"qemu-img", "compare", "-f", "raw", "-F", "raw",
                          (dir_ / ("snap" + std::to_string(s) + ".raw")).string(),
                          after.string()}).exit_code, 0)
        << "internal snapshot " << name << " changed through writes to the active image";
  }

  // layerd reads what qemu wrote.
  Server reader;
  ASSERT_TRUE(StartLayerd(reader, ref, dir_ / "ref.sock", {"-r"}, &why)) << why;
  EXPECT_EQ(compare(ref, dir_ / "ref.sock"), "");
  EXPECT_EQ(reader.stop(), 0) << reader.log();
}

INSTANTIATE_TEST_SUITE_P(Cells, Qcow2Matrix, ::testing::ValuesIn(Cells()), cell_name);

// Concurrent requests on one connection that touch the same clusters but
// never the same bytes: allocating writes and zero writes that race for one
// unallocated, zero, compressed, shared or backing-backed cluster must all
// land. Byte-disjoint requests commute, so the result is the same as
// running them one by one, which is what qemu-io does on the copy.
class Qcow2ConcurrentMatrix : public Qcow2Matrix {};

TEST_P(Qcow2ConcurrentMatrix, ConcurrentDisjointWritesMatchQemuIo) {
  const Cell& c = cell();
  ASSERT_NO_FATAL_FAILURE(Build());
  const fs::path ref = dir_ / "ref.qcow2";
  ASSERT_NO_FATAL_FAILURE(CopyTop(ref));
  Server server;
  std::string why;
  const fs::path sock = dir_ / "top.sock";
  ASSERT_TRUE(StartLayerd(server, top(), sock, {"--discard=unmap"}, &why)) << why;
  Nbd h = nbd_connect_to_unix(sock);
  ASSERT_TRUE(h);
  const uint64_t size = c.size;
  std::vector<uint8_t> model = ReadAll(h.get(), size);
  ASSERT_EQ(model.size(), size);

  Rng rng(stable_hash(c.name) ^ 0xc0c0);
  std::vector<Op> ops;
  std::vector<std::vector<uint8_t>> patterns;
  for (int k = 0; k < kPatternFiles; ++k) patterns.push_back(pattern_data(k, kPatternLen));
  // A hot region of a few clusters, cut into disjoint pieces.
  const uint64_t region = std::min<uint64_t>(size, std::max<uint64_t>(2 * c.cluster, 16 * KiB));
  for (int batch = 0; batch < 30; ++batch) {
    uint64_t start = rng.below(size / c.cluster) * c.cluster;
    if (start + region > size) start = size - region;
    const int pieces = static_cast<int>(rng.between(2, 10));
    std::vector<uint64_t> cuts{0, region};
    for (int i = 1; i < pieces; ++i) cuts.push_back(rng.below(region));
    std::sort(cuts.begin(), cuts.end());
    cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());

    std::vector<Op> batch_ops;
    std::vector<std::vector<uint8_t>> bufs;
    bufs.reserve(cuts.size());  // no reallocation while requests are in flight
    std::vector<int64_t> cookies;
    nbd_completion_callback no_callback{};
    for (size_t i = 0; i + 1 < cuts.size(); ++i) {
      if (rng.chance(1, 5)) continue;  // leave a gap
      Op op;
      op.off = start + cuts[i];
      op.len = cuts[i + 1] - cuts[i];
      op.kind = rng.chance(1, 5) ? Op::Zero : Op::Write;
      int64_t cookie;
      if (op.kind == Op::Write) {
        if (op.len <= kPatternLen && rng.chance(1, 2)) {
          op.pattern_file = static_cast<int>(rng.below(kPatternFiles));
          const auto& p = patterns[static_cast<size_t>(op.pattern_file)];
          bufs.emplace_back(p.begin(), p.begin() + static_cast<ptrdiff_t>(op.len));
        } else {
          op.byte = static_cast<uint8_t>(rng.between(1, 255));
          bufs.emplace_back(op.len, op.byte);
        }
        op.fua = rng.chance(1, 8);
        cookie = nbd_aio_pwrite(h.get(), bufs.back().data(), op.len, op.off, no_callback,
                                op.fua ? LIBNBD_CMD_FLAG_FUA : 0);
        std::copy(bufs.back().begin(), bufs.back().end(),
                  model.begin() + static_cast<ptrdiff_t>(op.off));
      } else {
        op.may_trim = rng.chance(1, 2);
        cookie = nbd_aio_zero(h.get(), op.len, op.off, no_callback,
                              op.may_trim ? 0 : LIBNBD_CMD_FLAG_NO_HOLE);
        std::fill_n(model.begin() + static_cast<ptrdiff_t>(op.off), op.len, 0);
      }
      ASSERT_GE(cookie, 0) << nbd_error_text();
      cookies.push_back(cookie);
      batch_ops.push_back(op);
    }
    while (nbd_aio_in_flight(h.get()) > 0)
      ASSERT_NE(nbd_poll(h.get(), -1), -1) << nbd_error_text();
    for (size_t i = 0; i < cookies.size(); ++i) {
      ASSERT_EQ(nbd_aio_command_completed(h.get(), static_cast<uint64_t>(cookies[i])), 1)
          << "batch " << batch << " request " << i << ": " << nbd_error_text();
    }
    ops.insert(ops.end(), batch_ops.begin(), batch_ops.end());
    std::vector<uint8_t> got(region);
    ASSERT_EQ(nbd_pread(h.get(), got.data(), region, start, 0), 0) << nbd_error_text();
    int64_t d = first_difference(got, std::span<const uint8_t>(model).subspan(start, region));
    if (d >= 0) {
      std::ostringstream os;
      for (const auto& op : batch_ops)
        for (const auto& cmd : qemu_io_commands(op, dir_.path())) os << "\n  " << cmd;
      FAIL() << "cell " << c.name << ", batch " << batch << ": byte "
             << start + static_cast<uint64_t>(d) << " reads " << int(got[static_cast<size_t>(d)])
             << ", want " << int(model[start + static_cast<uint64_t>(d)])
             << "; the batch (all in flight at once):" << os.str();
    }
  }
  auto all = ReadAll(h.get(), size);
  ASSERT_EQ(first_difference(all, model), -1) << "final read differs from the model";
  ASSERT_EQ(nbd_flush(h.get(), 0), 0) << nbd_error_text();
  nbd_shutdown(h.get(), 0);
  h.reset();
  ASSERT_EQ(server.stop(), 0) << server.log();
  ASSERT_EQ(qemu_io(ref, "qcow2", qemu_io_commands(ops, dir_.path())).exit_code, 0);
  EXPECT_EQ(run_expect({"qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", top().string(),
                        ref.string()}).exit_code, 0);
  EXPECT_EQ(run_expect({"qemu-img", "check", top().string()}).exit_code, 0);
}

std::vector<Cell> ConcurrentCells() {
  std::vector<Cell> v;
  for (const Cell& c : Cells()) {
    static const char* const kPicked[] = {
        "v2_c64k", "v3_c64k", "v3_c512", "v3_c4k", "v3_refcount1", "extl2_c64k",
        "zstd_compressed", "v2_zlib_compressed", "prealloc_metadata", "lazy_refcounts",
        "snapshots", "v2_backing_qcow2", "backing_raw", "extl2_zero_over_backing", "chain3",
        "data_file"};
    for (const char* name : kPicked)
      if (c.name == name) v.push_back(c);
  }
  return v;
}

INSTANTIATE_TEST_SUITE_P(Cells, Qcow2ConcurrentMatrix, ::testing::ValuesIn(ConcurrentCells()),
                         cell_name);

}  // namespace
}  // namespace layerd::test
