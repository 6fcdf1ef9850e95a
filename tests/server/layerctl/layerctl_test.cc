// End-to-end tests of layerctl ($LAYERCTL_BIN), with qemu-img and qemu-io
// as the oracle: images layerctl creates must pass `qemu-img check` and
// read back in qemu-io; what layerctl prints about images made by qemu
// must match what qemu-img prints about them.
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include <boost/json.hpp>
#include <gtest/gtest.h>

#include "tests/server/harness.h"

namespace layerd::test {
namespace {

namespace json = boost::json;

// $LAYERCTL_BIN if set by hand, else the build's layerctl, in the
// layerctl/ folder beside $LAYERD_BIN (which ctest sets).
std::string ctl_binary() {
  if (const char* bin = std::getenv("LAYERCTL_BIN"); bin && *bin) return bin;
  if (const char* server = std::getenv("LAYERD_BIN"); server && *server) {
    fs::path built = fs::path(server).parent_path() / "layerctl" / "layerctl";
    if (fs::is_regular_file(built)) return built.string();
  }
  return "";
}

RunResult ctl(std::vector<std::string> args) {
  args.insert(args.begin(), ctl_binary());
  return run(args);
}

RunResult qemu_img(std::vector<std::string> args) {
  args.insert(args.begin(), "qemu-img");
  return run(args);
}

// Runs qemu-io on a qcow2 image with the given -c commands; fails the
// test if it does not succeed.
void qemu_io(const fs::path& image, const std::vector<std::string>& commands,
             const std::string& format = "qcow2") {
  std::vector<std::string> argv = {"qemu-io", "-f", format};
  for (const auto& c : commands) {
    argv.push_back("-c");
    argv.push_back(c);
  }
  argv.push_back(image.string());
  RunResult r = run(argv);
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  ASSERT_EQ(r.out.find("failed"), std::string::npos) << r.describe();
}

json::value parse(const std::string& text) {
  boost::system::error_code ec;
  json::value v = json::parse(text, ec);
  EXPECT_FALSE(ec) << "not JSON: " << text;
  return v;
}

// The same command run by qemu-img and layerctl must print the same
// stdout and exit with the same code.
void expect_same_as_qemu(const std::vector<std::string>& args) {
  RunResult q = qemu_img(args);
  RunResult l = ctl(args);
  std::string what;
  for (const auto& a : args) what += a + " ";
  EXPECT_EQ(l.exit_code, q.exit_code) << what << "\nqemu-img: " << q.describe()
                                      << "\nlayerctl: " << l.describe();
  EXPECT_EQ(l.out, q.out) << what << "\nlayerctl stderr: " << l.err;
}

void expect_qemu_check_clean(const fs::path& image) {
  RunResult r = qemu_img({"check", image.string()});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("No errors were found on the image."), std::string::npos)
      << r.describe();
}

json::object qemu_info(const fs::path& image) {
  RunResult r = qemu_img({"info", "--output=json", image.string()});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  json::value v = parse(r.out);
  return v.is_object() ? v.get_object() : json::object{};
}

std::vector<uint8_t> file_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

uint64_t be64_at(const std::vector<uint8_t>& b, size_t off) {
  return load_be64(b.data() + off);
}

// Host offset of the L2 table of guest cluster 0, and of that cluster.
struct Cluster0 {
  uint64_t l2_offset = 0;
  uint64_t host_offset = 0;
  uint32_t cluster_bits = 0;
  uint64_t refcount_table_offset = 0;
};
Cluster0 locate_cluster0(const fs::path& image) {
  auto b = file_bytes(image);
  Cluster0 c;
  c.cluster_bits = load_be32(b.data() + 20);
  uint64_t l1 = be64_at(b, 40);
  c.refcount_table_offset = be64_at(b, 48);
  c.l2_offset = be64_at(b, l1) & 0x00fffffffffffe00ull;
  c.host_offset = be64_at(b, c.l2_offset) & 0x00fffffffffffe00ull;
  return c;
}

class LayerctlTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (ctl_binary().empty()) GTEST_SKIP() << "LAYERCTL_BIN is not set";
  }
  std::string path(std::string_view name) const { return (dir_ / name).string(); }

  // A qcow2 image made by qemu-img with data, zeros and a discard.
  std::string make_qemu_image(std::string_view name, const std::string& size = "8M",
                              std::vector<std::string> opts = {}) {
    std::vector<std::string> argv = {"create", "-q", "-f", "qcow2"};
    argv.insert(argv.end(), opts.begin(), opts.end());
    argv.push_back(path(name));
    argv.push_back(size);
    RunResult r = qemu_img(argv);
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    return path(name);
  }

  // base (8M) <- mid (8M) <- top (12M, larger than its backing), with data,
  // zero clusters, a discard and an internal snapshot on top.
  std::string make_three_image_chain() {
    std::string base = make_qemu_image("base.qcow2");
    qemu_io(base, {"write -P 1 0 1M", "write -z 2M 1M", "write -P 3 5M 64k",
                   "write -P 4 6M 64k"});
    std::string mid = make_qemu_image("mid.qcow2", "8M", {"-b", base, "-F", "qcow2"});
    qemu_io(mid, {"write -P 2 512k 1M", "write -z 5M 64k", "write -P 6 7M 4k"});
    std::string top = make_qemu_image("top.qcow2", "12M", {"-b", "mid.qcow2", "-F", "qcow2"});
    qemu_io(top, {"write -P 5 3M 128k", "discard 6M 64k", "write -P 7 10M 64k"});
    RunResult r = qemu_img({"snapshot", "-c", "snap1", top});
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    return top;
  }

  TempDir dir_;
};

// --- create ---------------------------------------------------------------------

TEST_F(LayerctlTest, CreateDefaultQcow2PrintsQemuFormattingLineAndPassesQemuCheck) {
  RunResult l = ctl({"create", "-f", "qcow2", path("l.qcow2"), "64M"});
  ASSERT_EQ(l.exit_code, 0) << l.describe();
  RunResult q = qemu_img({"create", "-f", "qcow2", path("l.qcow2.q"), "64M"});
  ASSERT_EQ(q.exit_code, 0);
  std::string expected = q.out;
  expected.replace(expected.find("l.qcow2.q"), 9, "l.qcow2");
  EXPECT_EQ(l.out, expected);
  expect_qemu_check_clean(path("l.qcow2"));
  json::object info = qemu_info(path("l.qcow2"));
  EXPECT_EQ(info["virtual-size"], 64 << 20);
  EXPECT_EQ(info["cluster-size"], 65536);
  EXPECT_EQ(info["format-specific"].at("data").at("compat"), "1.1");
}

TEST_F(LayerctlTest, CreateWithEachOptionAgreesWithQemuImg) {
  const std::vector<std::string> option_sets = {
      "compat=0.10", "compat=v2", "compat=1.1", "cluster_size=512",
      "cluster_size=2M", "cluster_size=16k,extended_l2=on", "refcount_bits=1",
      "refcount_bits=8", "refcount_bits=64", "lazy_refcounts=on",
      "compression_type=zstd", "preallocation=metadata",
      "compat=v2,preallocation=metadata", "data_file=DATA",
      "data_file=DATA,data_file_raw=on",
      "cluster_size=32768,extended_l2=on,refcount_bits=8,lazy_refcounts=on,"
      "compression_type=zstd"};
  int n = 0;
  for (const auto& o : option_sets) {
    SCOPED_TRACE(o);
    std::string mine = path("l" + std::to_string(n) + ".qcow2");
    std::string theirs = path("q" + std::to_string(n) + ".qcow2");
    // External data files: absolute names, one per image (relative ones
    // are relative to the working directory, as in QEMU).
    std::string my_data = path("l" + std::to_string(n) + ".data");
    std::string their_data = path("q" + std::to_string(n) + ".data");
    ++n;
    std::string my_o = o, their_o = o;
    if (auto at = o.find("DATA"); at != std::string::npos) {
      my_o.replace(at, 4, my_data);
      their_o.replace(at, 4, their_data);
    }
    RunResult l = ctl({"create", "-f", "qcow2", "-o", my_o, mine, "3M"});
    ASSERT_EQ(l.exit_code, 0) << l.describe();
    RunResult q = qemu_img({"create", "-f", "qcow2", "-o", their_o, theirs, "3M"});
    ASSERT_EQ(q.exit_code, 0) << q.describe();
    std::string expected = q.out;
    expected.replace(expected.find(theirs), theirs.size(), mine);
    if (auto at = expected.find(their_data); at != std::string::npos)
      expected.replace(at, their_data.size(), my_data);
    EXPECT_EQ(l.out, expected);
    json::object a = qemu_info(mine);
    json::object b = qemu_info(theirs);
    for (const char* key : {"virtual-size", "cluster-size", "format"})
      EXPECT_EQ(a[key], b[key]) << key;
    json::object& fa = a["format-specific"].as_object()["data"].as_object();
    json::object& fb = b["format-specific"].as_object()["data"].as_object();
    if (fa.contains("data-file")) {
      EXPECT_EQ(fa["data-file"], json::value(my_data));
      fa.erase("data-file");
      fb.erase("data-file");
    }
    EXPECT_EQ(fa, fb);
    // qemu can write and read it, and it is (and stays) consistent.
    qemu_io(mine, {"write -P 7 0 100k", "read -P 7 0 100k", "write -z 1M 64k"});
    expect_qemu_check_clean(mine);
  }
}

TEST_F(LayerctlTest, CreateOverBackingTakesItsSizeAndResolvesNameAgainstImageDir) {
  fs::create_directories(dir_ / "sub");
  make_qemu_image("sub/base.qcow2", "3M");
  qemu_io(path("sub/base.qcow2"), {"write -P 9 0 64k"});
  RunResult l = ctl({"create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                     path("sub/top.qcow2")});
  ASSERT_EQ(l.exit_code, 0) << l.describe();
  EXPECT_NE(l.out.find("size=3145728 backing_file=base.qcow2 backing_fmt=qcow2"),
            std::string::npos) << l.out;
  expect_qemu_check_clean(path("sub/top.qcow2"));
  json::object info = qemu_info(path("sub/top.qcow2"));
  EXPECT_EQ(info["virtual-size"], 3 << 20);
  EXPECT_EQ(info["backing-filename"], "base.qcow2");
  EXPECT_EQ(info["backing-filename-format"], "qcow2");
  RunResult r = run({"qemu-io", "-c", "read -P 9 0 64k", path("sub/top.qcow2")});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(r.out.find("failed"), std::string::npos) << r.out;
}

TEST_F(LayerctlTest, CreateOverRawBackingWithLargerExplicitSize) {
  create_sparse_image(dir_ / "base.raw", 1 << 20, {{0, 65536}}, 3);
  RunResult l = ctl({"create", "-f", "qcow2", "-b", path("base.raw"), "-F", "raw",
                     path("top.qcow2"), "4M"});
  ASSERT_EQ(l.exit_code, 0) << l.describe();
  expect_qemu_check_clean(path("top.qcow2"));
  json::object info = qemu_info(path("top.qcow2"));
  EXPECT_EQ(info["virtual-size"], 4 << 20);
  EXPECT_EQ(info["backing-filename-format"], "raw");
}

TEST_F(LayerctlTest, CreateRefusesBackingWithoutFormatOrMissingBacking) {
  make_qemu_image("base.qcow2", "1M");
  RunResult r = ctl({"create", "-f", "qcow2", "-b", path("base.qcow2"), path("t.qcow2")});
  EXPECT_EQ(r.exit_code, 1) << r.describe();
  EXPECT_NE(r.err.find("Backing file specified without backing format"), std::string::npos);
  r = ctl({"create", "-f", "qcow2", "-b", path("none.qcow2"), "-F", "qcow2", path("t.qcow2")});
  EXPECT_EQ(r.exit_code, 1) << r.describe();
  EXPECT_NE(r.err.find("Could not open backing image"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir_ / "t.qcow2"));
}

TEST_F(LayerctlTest, CreateUnsafeSkipsOpeningTheBacking) {
  RunResult r = ctl({"create", "-f", "qcow2", "-u", "-b", "later.qcow2", "-F", "qcow2",
                     path("t.qcow2"), "1M"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  json::object info = qemu_info(path("t.qcow2"));
  EXPECT_EQ(info["backing-filename"], "later.qcow2");
}

TEST_F(LayerctlTest, CreateRawMakesASparseFileOfTheGivenSize) {
  RunResult r = ctl({"create", "-f", "raw", path("d.raw"), "1G"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(r.out, "Formatting '" + path("d.raw") + "', fmt=raw size=1073741824\n");
  EXPECT_EQ(fs::file_size(dir_ / "d.raw"), 1ull << 30);
  EXPECT_LT(allocated_bytes(dir_ / "d.raw"), 1u << 20);
}

TEST_F(LayerctlTest, CreateSizeSuffixesMatchQemu) {
  for (const char* size : {"512", "1k", "1.5M", "2G", "1T", "100"}) {
    SCOPED_TRACE(size);
    ASSERT_EQ(ctl({"create", "-q", "-f", "qcow2", path("a.qcow2"), size}).exit_code, 0);
    ASSERT_EQ(qemu_img({"create", "-q", "-f", "qcow2", path("b.qcow2"), size}).exit_code, 0);
    EXPECT_EQ(qemu_info(path("a.qcow2"))["virtual-size"],
              qemu_info(path("b.qcow2"))["virtual-size"]);
    expect_qemu_check_clean(path("a.qcow2"));
  }
}

TEST_F(LayerctlTest, CreateRejectsBadSizesAndOptionsWithExit1) {
  const std::vector<std::vector<std::string>> bad = {
      {"create", "-f", "qcow2", path("x.qcow2")},              // no size
      {"create", "-f", "qcow2", path("x.qcow2"), "12Q"},
      {"create", "-f", "qcow2", path("x.qcow2"), "-5"},
      {"create", "-f", "qcow2", "-o", "foo=bar", path("x.qcow2"), "1M"},
      {"create", "-f", "qcow2", "-o", "cluster_size=1000", path("x.qcow2"), "1M"},
      {"create", "-f", "qcow2", "-o", "compat=0.10,lazy_refcounts=on", path("x.qcow2"), "1M"},
      {"create", "-f", "qcow2", "-o", "compat=2.0", path("x.qcow2"), "1M"},
      {"create", "-f", "qcow2", "-o", "cluster_size=4k,extended_l2=on", path("x.qcow2"), "1M"},
      {"create", "-f", "qcow2", "-o", "refcount_bits=3", path("x.qcow2"), "1M"},
      {"create", "-f", "qcow2", "-o", "data_file_raw=on", path("x.qcow2"), "1M"},
      {"create", "-f", "vmdkx", path("x.img"), "1M"},
      {"create", "-f", "raw", "-o", "cluster_size=4k", path("x.raw"), "1M"},
  };
  for (const auto& args : bad) {
    RunResult r = ctl(args);
    EXPECT_EQ(r.exit_code, 1) << args[args.size() - 2] << ": " << r.describe();
    EXPECT_FALSE(r.err.empty());
  }
  // Each of these is refused by qemu-img too.
  for (const auto& args : bad)
    EXPECT_EQ(qemu_img(args).exit_code, 1) << args[args.size() - 2];
}

// --- info -----------------------------------------------------------------------

TEST_F(LayerctlTest, InfoMatchesQemuImgOnChainOfThreeWithSnapshot) {
  std::string top = make_three_image_chain();
  for (const char* out : {"--output=human", "--output=json"}) {
    expect_same_as_qemu({"info", out, top});
    expect_same_as_qemu({"info", out, "--backing-chain", top});
    expect_same_as_qemu({"info", out, "-f", "qcow2", path("mid.qcow2")});
  }
}

TEST_F(LayerctlTest, InfoMatchesQemuImgOnRawV2CompressedAndExternalDataImages) {
  create_sparse_image(dir_ / "d.raw", 4 << 20, {{1 << 20, 1 << 20}}, 1);
  std::string v2 = make_qemu_image("v2.qcow2", "4M", {"-o", "compat=0.10"});
  qemu_io(v2, {"write -P 1 0 256k"});
  ASSERT_EQ(qemu_img({"convert", "-c", "-O", "qcow2", v2, path("c.qcow2")}).exit_code, 0);
  std::string ext = make_qemu_image("e.qcow2", "4M", {"-o", "data_file=" + path("e.data")});
  std::string fancy = make_qemu_image(
      "f.qcow2", "5M",
      {"-o", "cluster_size=16k,extended_l2=on,refcount_bits=8,lazy_refcounts=on,"
             "compression_type=zstd"});
  for (const char* out : {"--output=human", "--output=json"}) {
    expect_same_as_qemu({"info", out, path("d.raw")});
    expect_same_as_qemu({"info", out, v2});
    expect_same_as_qemu({"info", out, path("c.qcow2")});
    expect_same_as_qemu({"info", out, ext});
    expect_same_as_qemu({"info", out, fancy});
  }
}

TEST_F(LayerctlTest, InfoReportsBackingRelativeToImageDirWithActualPath) {
  fs::create_directories(dir_ / "sub");
  make_qemu_image("sub/b.qcow2", "1M");
  make_qemu_image("sub/t.qcow2", "1M", {"-b", "b.qcow2", "-F", "qcow2"});
  RunResult l = ctl({"info", path("sub/t.qcow2")});
  ASSERT_EQ(l.exit_code, 0) << l.describe();
  EXPECT_NE(l.out.find("backing file: b.qcow2 (actual path: " + path("sub/b.qcow2") + ")"),
            std::string::npos) << l.out;
  RunResult j = ctl({"info", "--output=json", "--backing-chain", path("sub/t.qcow2")});
  ASSERT_EQ(j.exit_code, 0) << j.describe();
  json::value v = parse(j.out);
  ASSERT_TRUE(v.is_array());
  ASSERT_EQ(v.get_array().size(), 2u);
  EXPECT_EQ(v.get_array()[0].at("full-backing-filename"), json::value(path("sub/b.qcow2")));
  EXPECT_EQ(v.get_array()[1].at("filename"), json::value(path("sub/b.qcow2")));
}

TEST_F(LayerctlTest, InfoProbesOnlyTheNamedFile) {
  // A raw file holding a qcow2 header: probed as qcow2, but -f raw wins.
  std::string q = make_qemu_image("img", "1M");
  RunResult r = ctl({"info", "--output=json", q});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(parse(r.out).at("format"), "qcow2");
  r = ctl({"info", "--output=json", "-f", "raw", q});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(parse(r.out).at("format"), "raw");
  // A backing chain whose backing format is "raw" is opened as raw even
  // though the backing file is a qcow2 image.
  make_qemu_image("t.qcow2", "1M", {"-b", q, "-F", "raw"});
  r = ctl({"info", "--output=json", "--backing-chain", path("t.qcow2")});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(parse(r.out).at(1).at("format"), "raw");
}

TEST_F(LayerctlTest, InfoOfDirtyImageMatchesQemuImg) {
  std::string img = make_qemu_image("d.qcow2", "1M", {"-o", "lazy_refcounts=on"});
  qemu_io(img, {"write -P 1 0 64k"});
  std::vector<uint8_t> dirty_bit = {1};  // incompatible features, bit 0
  write_file_range(img, 79, dirty_bit);
  for (const char* out : {"--output=human", "--output=json"}) {
    expect_same_as_qemu({"info", out, img});
    expect_same_as_qemu({"check", out, img});
  }
  RunResult r = ctl({"info", img});
  EXPECT_NE(r.out.find("cleanly shut down: no\n"), std::string::npos) << r.out;
}

TEST_F(LayerctlTest, RawSizeIsRoundedUpToSectorsLikeQemu) {
  create_pattern_image(dir_ / "odd.raw", 300001, 1);
  for (const char* out : {"--output=human", "--output=json"}) {
    expect_same_as_qemu({"info", out, "-f", "raw", path("odd.raw")});
    expect_same_as_qemu({"map", out, "-f", "raw", path("odd.raw")});
  }
}

// --- map ------------------------------------------------------------------------

TEST_F(LayerctlTest, MapMatchesQemuImgThroughChainOfThree) {
  std::string top = make_three_image_chain();
  expect_same_as_qemu({"map", "--output=json", top});
  expect_same_as_qemu({"map", "--output=human", top});
  expect_same_as_qemu({"map", "--output=json", path("mid.qcow2")});
  expect_same_as_qemu({"map", "--output=json", path("base.qcow2")});
  expect_same_as_qemu({"map", "--output=json", "--start-offset=512k", "--max-length=5M", top});
}

TEST_F(LayerctlTest, MapJsonCoversWholeDiskWithDepthsFromTop) {
  std::string top = make_three_image_chain();
  RunResult r = ctl({"map", "--output=json", top});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  json::value v = parse(r.out);
  ASSERT_TRUE(v.is_array());
  uint64_t next = 0;
  bool saw[3] = {};
  for (const auto& e : v.get_array()) {
    EXPECT_EQ(e.at("start").to_number<uint64_t>(), next);
    next += e.at("length").to_number<uint64_t>();
    auto depth = e.at("depth").to_number<uint64_t>();
    ASSERT_LT(depth, 3u);
    if (e.at("present").as_bool()) saw[depth] = true;
  }
  EXPECT_EQ(next, 12u << 20);
  EXPECT_TRUE(saw[0] && saw[1] && saw[2]);
}

TEST_F(LayerctlTest, MapMatchesQemuImgOverRawBackingAndOnRawFiles) {
  create_sparse_image(dir_ / "b.raw", 4 << 20, {{1 << 20, 1 << 20}}, 1);
  std::string top = make_qemu_image("t.qcow2", "6M", {"-b", path("b.raw"), "-F", "raw"});
  qemu_io(top, {"write -P 2 0 64k", "write -z 1536k 64k"});
  for (const char* out : {"--output=json", "--output=human"}) {
    expect_same_as_qemu({"map", out, top});
    expect_same_as_qemu({"map", out, "-f", "raw", path("b.raw")});
  }
}

TEST_F(LayerctlTest, MapOfCompressedClustersOmitsOffsetsAndHumanRefuses) {
  std::string src = make_qemu_image("s.qcow2", "2M");
  qemu_io(src, {"write -P 1 0 256k", "write -P 2 1M 64k"});
  ASSERT_EQ(qemu_img({"convert", "-c", "-O", "qcow2", src, path("c.qcow2")}).exit_code, 0);
  expect_same_as_qemu({"map", "--output=json", path("c.qcow2")});
  RunResult r = ctl({"map", path("c.qcow2")});
  EXPECT_EQ(r.exit_code, 1) << r.describe();
  EXPECT_NE(r.err.find("compressed clusters"), std::string::npos) << r.err;
  EXPECT_EQ(r.exit_code, qemu_img({"map", path("c.qcow2")}).exit_code);
}

TEST_F(LayerctlTest, MapMatchesQemuImgOnPreallocatedSmallClusterAndExternalDataImages) {
  std::string pm = make_qemu_image("pm.qcow2", "4M", {"-o", "preallocation=metadata"});
  qemu_io(pm, {"write -P 1 64k 64k", "write -z 1M 128k"});
  std::string sc = make_qemu_image("sc.qcow2", "1M", {"-o", "cluster_size=512"});
  qemu_io(sc, {"write -P 1 0 40k", "write -P 2 100k 8k", "write -P 3 20k 4k"});
  std::string ext = make_qemu_image("e.qcow2", "4M", {"-o", "data_file=" + path("e.data")});
  qemu_io(ext, {"write -P 1 0 128k", "write -z 1M 64k"});
  for (const char* out : {"--output=json", "--output=human"}) {
    expect_same_as_qemu({"map", out, pm});
    expect_same_as_qemu({"map", out, sc});
    expect_same_as_qemu({"map", out, ext});
  }
}

// --- check ----------------------------------------------------------------------

TEST_F(LayerctlTest, CheckCleanImageExitsZeroLikeQemuImg) {
  std::string top = make_three_image_chain();
  for (const char* out : {"--output=human", "--output=json"}) {
    expect_same_as_qemu({"check", out, top});
    expect_same_as_qemu({"check", out, path("base.qcow2")});
  }
  EXPECT_EQ(ctl({"check", top}).exit_code, 0);
}

TEST_F(LayerctlTest, CheckCountsFragmentedAndCompressedClustersLikeQemuImg) {
  std::string sc = make_qemu_image("sc.qcow2", "1M", {"-o", "cluster_size=512"});
  qemu_io(sc, {"write -P 1 0 40k", "write -P 2 100k 8k", "write -P 3 20k 4k",
               "write 300k 1k"});
  std::string src = make_qemu_image("s.qcow2", "2M");
  qemu_io(src, {"write -P 1 0 256k"});
  ASSERT_EQ(qemu_img({"convert", "-c", "-O", "qcow2", src, path("c.qcow2")}).exit_code, 0);
  for (const char* out : {"--output=human", "--output=json"}) {
    expect_same_as_qemu({"check", out, sc});
    expect_same_as_qemu({"check", out, path("c.qcow2")});
  }
}

// Drops guest cluster 0 from its L2 table: its host cluster keeps
// refcount 1 with nothing referring to it, a leak.
void leak_cluster0(const fs::path& image) {
  Cluster0 c = locate_cluster0(image);
  ASSERT_NE(c.l2_offset, 0u);
  std::vector<uint8_t> zero(8, 0);
  write_file_range(image, c.l2_offset, zero);
}

// Sets the refcount of guest cluster 0's host cluster to 0 while the L2
// table still points at it: a corruption.
void zero_refcount_of_cluster0(const fs::path& image) {
  Cluster0 c = locate_cluster0(image);
  auto b = file_bytes(image);
  uint64_t block = be64_at(b, c.refcount_table_offset) & ~511ull;
  ASSERT_NE(block, 0u);
  std::vector<uint8_t> zero(2, 0);  // 16-bit refcounts
  write_file_range(image, block + 2 * (c.host_offset >> c.cluster_bits), zero);
}

TEST_F(LayerctlTest, CheckLeakedClustersExits3AndRepairLeaksFixesThem) {
  std::string img = make_qemu_image("l.qcow2", "4M");
  qemu_io(img, {"write -P 1 0 192k"});
  leak_cluster0(img);
  for (const char* out : {"--output=human", "--output=json"})
    expect_same_as_qemu({"check", out, img});
  RunResult r = ctl({"check", img});
  EXPECT_EQ(r.exit_code, 3) << r.describe();
  EXPECT_NE(r.out.find("1 leaked clusters were found on the image.\nThis means waste "
                       "of disk space, but no harm to data.\n"),
            std::string::npos) << r.out;

  fs::copy_file(img, path("q.qcow2"));
  RunResult fixed = ctl({"check", "-r", "leaks", img});
  RunResult qfixed = qemu_img({"check", "-r", "leaks", path("q.qcow2")});
  EXPECT_EQ(fixed.exit_code, 0) << fixed.describe();
  EXPECT_EQ(fixed.out, qfixed.out);
  expect_qemu_check_clean(img);
  EXPECT_EQ(ctl({"check", img}).exit_code, 0);
}

TEST_F(LayerctlTest, CheckRepairReportsFixedLeaksInJson) {
  std::string img = make_qemu_image("l.qcow2", "4M");
  qemu_io(img, {"write -P 1 0 128k"});
  leak_cluster0(img);
  fs::copy_file(img, path("q.qcow2"));
  RunResult l = ctl({"check", "-r", "all", "--output=json", img});
  RunResult q = qemu_img({"check", "-r", "all", "--output=json", path("q.qcow2")});
  EXPECT_EQ(l.exit_code, q.exit_code) << l.describe();
  json::object a = parse(l.out).as_object();
  json::object b = parse(q.out).as_object();
  for (const char* key : {"leaks-fixed", "check-errors", "total-clusters", "allocated-clusters"})
    EXPECT_EQ(a[key], b[key]) << key;
  expect_qemu_check_clean(img);
}

TEST_F(LayerctlTest, CheckCorruptionExits2AndRepairAllFixesIt) {
  std::string img = make_qemu_image("c.qcow2", "4M");
  qemu_io(img, {"write -P 1 0 128k"});
  zero_refcount_of_cluster0(img);
  for (const char* out : {"--output=human", "--output=json"})
    expect_same_as_qemu({"check", out, img});
  RunResult r = ctl({"check", img});
  EXPECT_EQ(r.exit_code, 2) << r.describe();
  EXPECT_NE(r.out.find("errors were found on the image.\nData may be corrupted"),
            std::string::npos) << r.out;
  // Repairing leaks only leaves the corruption.
  EXPECT_EQ(ctl({"check", "-r", "leaks", img}).exit_code, 2);
  RunResult fixed = ctl({"check", "-r", "all", img});
  EXPECT_EQ(fixed.exit_code, 0) << fixed.describe();
  EXPECT_NE(fixed.out.find("The following inconsistencies were found and repaired"),
            std::string::npos) << fixed.out;
  expect_qemu_check_clean(img);
  RunResult rd = run({"qemu-io", "-c", "read -P 1 0 128k", img});
  EXPECT_EQ(rd.out.find("failed"), std::string::npos) << rd.describe();
}

TEST_F(LayerctlTest, CheckOfRawExits63LikeQemuImg) {
  create_pattern_image(dir_ / "d.raw", 1 << 20, 1);
  RunResult r = ctl({"check", path("d.raw")});
  EXPECT_EQ(r.exit_code, 63) << r.describe();
  EXPECT_NE(r.err.find("does not support checks"), std::string::npos);
  EXPECT_EQ(qemu_img({"check", path("d.raw")}).exit_code, 63);
}

// With an external data file, a cluster at data-file offset 0 has an L2
// entry with offset 0 and the COPIED flag: it is allocated (qemu-img says
// 2/64 here).
TEST_F(LayerctlTest, CheckCountsExternalDataClusterAtOffsetZero) {
  std::string ext = make_qemu_image("e.qcow2", "4M", {"-o", "data_file=" + path("e.data")});
  qemu_io(ext, {"write -P 1 0 128k"});
  for (const char* out : {"--output=human", "--output=json"})
    expect_same_as_qemu({"check", out, ext});
}

// With extended L2, zero and unallocated subclusters of an allocated
// cluster keep their host offset (QEMU's ZERO_ALLOC, UNALLOCATED_ALLOC), so
// map entries carry "offset" and merge as qemu-img's do.
TEST_F(LayerctlTest, MapReportsHostOffsetsOfSubclustersInAllocatedClusters) {
  std::string img = make_qemu_image("x.qcow2", "4M", {"-o", "extended_l2=on"});
  qemu_io(img, {"write -P 1 4k 8k", "write -z 100k 4k", "write -P 2 1M 200k"});
  expect_same_as_qemu({"map", "--output=json", img});
}

// --- command line ---------------------------------------------------------------

TEST_F(LayerctlTest, HelpAndVersionExitZero) {
  RunResult r = ctl({"--help"});
  EXPECT_EQ(r.exit_code, 0);
  for (const char* cmd : {"create", "info", "map", "check"})
    EXPECT_NE(r.out.find(cmd), std::string::npos) << cmd;
  r = ctl({"--version"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find("layerctl version"), std::string::npos);
  for (const char* cmd : {"create", "info", "map", "check"}) {
    r = ctl({cmd, "--help"});
    EXPECT_EQ(r.exit_code, 0) << cmd;
    EXPECT_NE(r.out.find(std::string("usage: layerctl ") + cmd), std::string::npos) << r.out;
  }
  r = ctl({"create", "-f", "qcow2", "-o", "help"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find("cluster_size"), std::string::npos) << r.out;
}

TEST_F(LayerctlTest, ForceShareFlagIsAcceptedAsByQemuImg) {
  std::string img = make_qemu_image("a.qcow2", "1M");
  expect_same_as_qemu({"info", "-U", img});
  expect_same_as_qemu({"map", "-U", "--output=json", img});
  expect_same_as_qemu({"check", "-U", img});
}

// The same command fails in qemu-img and layerctl with the same exit code
// and the same message after the program's name.
void expect_same_failure_as_qemu(const std::vector<std::string>& args) {
  RunResult q = qemu_img(args);
  RunResult l = ctl(args);
  std::string what;
  for (const auto& a : args) what += a + " ";
  EXPECT_NE(q.exit_code, 0) << what << q.describe();
  EXPECT_EQ(l.exit_code, q.exit_code) << what << "\nqemu-img: " << q.describe()
                                      << "\nlayerctl: " << l.describe();
  const std::string qemu_prefix = "qemu-img: ", ctl_prefix = "layerctl: ";
  ASSERT_EQ(q.err.rfind(qemu_prefix, 0), 0u) << q.describe();
  ASSERT_EQ(l.err.rfind(ctl_prefix, 0), 0u) << l.describe();
  EXPECT_EQ(l.err.substr(ctl_prefix.size()), q.err.substr(qemu_prefix.size())) << what;
}

TEST_F(LayerctlTest, ImagesAnotherProcessWritesAreRefusedUnlessForceShared) {
  std::string base = make_qemu_image("base.qcow2");
  std::string top = make_qemu_image("top.qcow2", "8M", {"-b", base, "-F", "qcow2"});
  InteractiveProcess writer({"qemu-io", "-f", "qcow2", top});
  ASSERT_TRUE(wait_until([&] { return image_lock_byte_held(top, 101); }, 10s))
      << "qemu-io did not open the image";
  expect_same_failure_as_qemu({"info", top});
  expect_same_failure_as_qemu({"map", top});
  expect_same_failure_as_qemu({"check", top});
  expect_same_failure_as_qemu({"check", "-U", "-r", "all", top});
  expect_same_as_qemu({"info", "-U", top});
  expect_same_as_qemu({"info", "-U", "--backing-chain", top});
  expect_same_as_qemu({"map", "-U", "--output=json", top});
  expect_same_as_qemu({"check", "-U", top});
  // Its backing image is only read.
  expect_same_as_qemu({"info", base});
  expect_same_as_qemu({"map", "--output=json", base});
}

TEST_F(LayerctlTest, CreateLeavesAnImageInUseAlone) {
  std::string img = make_qemu_image("a.qcow2", "8M");
  InteractiveProcess reader({"qemu-io", "-r", "-f", "qcow2", img});
  ASSERT_TRUE(wait_until([&] { return image_lock_byte_held(img, 100); }, 10s))
      << "qemu-io did not open the image";
  expect_same_failure_as_qemu({"create", "-q", "-f", "qcow2", img, "1M"});
  expect_same_failure_as_qemu({"create", "-q", "-f", "raw", img, "1M"});
  expect_same_failure_as_qemu(
      {"create", "-q", "-f", "qcow2", "-o", "data_file=" + img, path("b.qcow2"), "1M"});
  expect_same_as_qemu({"info", "-U", "--output=json", img});  // still 8M
  // A backing image in use is fine: only its size is read.
  expect_same_as_qemu({"create", "-q", "-f", "qcow2", "-b", img, "-F", "qcow2",
                       path("c.qcow2")});
}

TEST_F(LayerctlTest, ImagesAnotherProcessReadsCanBeInspectedButNotRepaired) {
  std::string img = make_qemu_image("a.qcow2");
  InteractiveProcess reader({"qemu-io", "-r", "-f", "qcow2", img});
  ASSERT_TRUE(wait_until([&] { return image_lock_byte_held(img, 100); }, 10s))
      << "qemu-io did not open the image";
  expect_same_as_qemu({"info", img});
  expect_same_as_qemu({"map", "--output=json", img});
  expect_same_as_qemu({"check", img});
  expect_same_failure_as_qemu({"check", "-r", "all", img});
}

TEST_F(LayerctlTest, BadUsageExits1WithMessageOnStderr) {
  std::string img = make_qemu_image("a.qcow2", "1M");
  const std::vector<std::vector<std::string>> bad = {
      {},
      {"frobnicate"},
      {"info"},
      {"info", img, img},
      {"info", "--bogus", img},
      {"info", "--output=xml", img},
      {"info", "-f", "vmdk", img},
      {"map", "--output", "yaml", img},
      {"map"},
      {"check", "-r", "some", img},
      {"check", "-r"},
      {"check", "-x", img},
      {"create", "-f", "qcow2"},
  };
  for (const auto& args : bad) {
    RunResult r = ctl(args);
    std::string what = args.empty() ? "(no args)" : args[0];
    EXPECT_EQ(r.exit_code, 1) << what << ": " << r.describe();
    EXPECT_FALSE(r.err.empty()) << what;
    EXPECT_TRUE(r.out.empty()) << what << ": " << r.out;
  }
}

TEST_F(LayerctlTest, UnreadableOrCorruptFilesExit1WithClearMessage) {
  RunResult r = ctl({"info", path("missing.qcow2")});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("missing.qcow2"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("No such file"), std::string::npos) << r.err;

  // qcow2 magic with an impossible header.
  std::string img = make_qemu_image("bad.qcow2", "1M");
  std::vector<uint8_t> bad_version = {0, 0, 0, 9};
  write_file_range(img, 4, bad_version);
  for (const char* cmd : {"info", "map", "check"}) {
    r = ctl({cmd, img});
    EXPECT_EQ(r.exit_code, 1) << cmd << ": " << r.describe();
    EXPECT_NE(r.err.find("bad.qcow2"), std::string::npos) << cmd << ": " << r.err;
  }
  // A raw file forced to qcow2.
  create_pattern_image(dir_ / "d.raw", 1 << 20, 1);
  r = ctl({"map", "-f", "qcow2", path("d.raw")});
  EXPECT_EQ(r.exit_code, 1) << r.describe();
  // A chain whose backing file is gone.
  make_qemu_image("t.qcow2", "1M", {"-u", "-b", "gone.qcow2", "-F", "qcow2"});
  r = ctl({"map", path("t.qcow2")});
  EXPECT_EQ(r.exit_code, 1) << r.describe();
  EXPECT_NE(r.err.find("gone.qcow2"), std::string::npos) << r.err;
  EXPECT_EQ(ctl({"info", path("t.qcow2")}).exit_code, 0);  // no backing needed
}

}  // namespace
}  // namespace layerd::test
