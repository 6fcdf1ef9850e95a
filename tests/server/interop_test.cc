// Interoperability with the usual clients: qemu-img, qemu-io, nbdinfo,
// nbdcopy, and -L compared with qemu-nbd -L.

#include <libnbd.h>

#include <sstream>
#include <string>
#include <vector>

#include "tests/server/harness.h"

namespace layerd::test {
namespace {

class Interop : public ServerTest {
 protected:
  // Default export "" (so URIs are nbd+unix:///?socket=...), several
  // clients allowed (nbdcopy opens four connections when multi-conn is on).
  void StartInteropServer(std::vector<std::string> extra = {}) {
    std::vector<std::string> args{"-f", "raw", "-t", "-e", "0", "-D", kDescription};
    args.insert(args.end(), extra.begin(), extra.end());
    StartServer(std::move(args));
  }
  static bool HaveTool(const std::string& tool) {
    return run({"sh", "-c", "command -v " + tool}, 5s).exit_code == 0;
  }
};

#define REQUIRE_TOOL(t) \
  do {                  \
    if (!HaveTool(t)) GTEST_SKIP() << t " is not installed"; \
  } while (0)

// --- qemu-img and qemu-io -------------------------------------------------------------

TEST_F(Interop, QemuImgConvertFromTheExportMatchesTheSource) {
  REQUIRE_TOOL("qemu-img");
  ASSERT_NO_FATAL_FAILURE(StartInteropServer());
  const fs::path out = dir_ / "out.raw";
  RunResult r = run({"qemu-img", "convert", "-f", "raw", "-O", "raw", uri(), out.string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  RunResult c = run({"qemu-img", "compare", "-f", "raw", "-F", "raw", image_path().string(),
                     out.string()});
  EXPECT_EQ(c.exit_code, 0) << c.describe();
  EXPECT_EQ(first_difference(read_file_range(out, 0, kImageSize), pattern(0, kImageSize, kSeed)), -1);
}

TEST_F(Interop, QemuImgCompareSeesAWriteMadeThroughLibnbd) {
  REQUIRE_TOOL("qemu-img");
  create_pattern_image(image_path(), kImageSize, kSeed);
  const fs::path ref = dir_ / "reference.raw";
  fs::copy_file(image_path(), ref);
  ASSERT_NO_FATAL_FAILURE(StartInteropServer());
  RunResult same = run({"qemu-img", "compare", "-f", "raw", "-F", "raw", uri(), ref.string()});
  EXPECT_EQ(same.exit_code, 0) << same.describe();
  {
    Nbd h = nbd_connect_to_unix(socket_path());
    ASSERT_TRUE(h);
    auto data = pattern(0, 512, 99);
    ASSERT_EQ(nbd_pwrite(h.get(), data.data(), data.size(), 3 << 20, 0), 0) << nbd_error_text();
  }
  RunResult differ = run({"qemu-img", "compare", "-f", "raw", "-F", "raw", uri(), ref.string()});
  EXPECT_EQ(differ.exit_code, 1) << differ.describe();
  EXPECT_NE(differ.out.find("3145728"), std::string::npos)
      << "qemu-img should name the first differing offset: " << differ.describe();
}

TEST_F(Interop, QemuIoWriteIsVisibleThroughLibnbd) {
  REQUIRE_TOOL("qemu-io");
  ASSERT_NO_FATAL_FAILURE(StartInteropServer());
  RunResult r = run({"qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", uri()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("wrote 65536/65536 bytes at offset 1048576"), std::string::npos)
      << r.describe();
  Nbd h = nbd_connect_to_unix(socket_path());
  ASSERT_TRUE(h);
  std::vector<uint8_t> buf(65536 + 2);
  ASSERT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), (1 << 20) - 1, 0), 0) << nbd_error_text();
  EXPECT_EQ(buf.front(), pattern_byte((1 << 20) - 1, kSeed));
  EXPECT_EQ(buf.back(), pattern_byte((1 << 20) + 65536, kSeed));
  for (size_t i = 1; i <= 65536; ++i) ASSERT_EQ(buf[i], 0x5a) << "at " << (1 << 20) + i - 1;
}

TEST_F(Interop, QemuIoReadVerifiesDataWrittenThroughLibnbd) {
  REQUIRE_TOOL("qemu-io");
  ASSERT_NO_FATAL_FAILURE(StartInteropServer());
  {
    Nbd h = nbd_connect_to_unix(socket_path());
    ASSERT_TRUE(h);
    std::vector<uint8_t> data(128 << 10, 0xa7);
    ASSERT_EQ(nbd_pwrite(h.get(), data.data(), data.size(), 2 << 20, 0), 0) << nbd_error_text();
  }
  RunResult r = run({"qemu-io", "-r", "-f", "raw", "-c", "read -P 0xa7 2M 128k", uri()});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(r.out.find("Pattern verification failed"), std::string::npos) << r.describe();
  EXPECT_NE(r.out.find("read 131072/131072 bytes"), std::string::npos) << r.describe();
}

TEST_F(Interop, QemuIoZeroAndDiscardReadBackAsZeros) {
  REQUIRE_TOOL("qemu-io");
  ASSERT_NO_FATAL_FAILURE(StartInteropServer({"--discard=unmap"}));
  RunResult r = run({"qemu-io", "-f", "raw", "-c", "write -z 1M 256k", "-c", "discard 2M 1M",
                     "-c", "read -P 0 1M 256k", "-c", "read -P 0 2M 1M", uri()});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(r.out.find("Pattern verification failed"), std::string::npos) << r.describe();
  EXPECT_EQ(r.err.find("error"), std::string::npos) << r.describe();
}

// --- nbdinfo -------------------------------------------------------------------------

struct MapLine {
  uint64_t offset, length;
  uint32_t type;
  bool operator==(const MapLine&) const = default;
};

std::vector<MapLine> parse_map(const std::string& text) {
  std::vector<MapLine> lines;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    MapLine m{};
    if (!(ls >> m.offset >> m.length >> m.type)) continue;
    if (!lines.empty() && lines.back().type == m.type &&
        lines.back().offset + lines.back().length == m.offset)
      lines.back().length += m.length;
    else
      lines.push_back(m);
  }
  return lines;
}

TEST_F(Interop, NbdinfoMapShowsTheHolesOfASparseImage) {
  REQUIRE_TOOL("nbdinfo");
  create_sparse_image(image_path(), kImageSize, {{1 << 20, 1 << 20}}, kSeed);
  ASSERT_NO_FATAL_FAILURE(StartInteropServer());
  RunResult r = run({"nbdinfo", "--map", uri()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  std::vector<MapLine> want = {{0, 1 << 20, 3}, {1 << 20, 1 << 20, 0}, {2 << 20, 2 << 20, 3}};
  EXPECT_EQ(parse_map(r.out), want) << r.out;
  EXPECT_NE(r.out.find("hole,zero"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("data"), std::string::npos) << r.out;
}

TEST_F(Interop, NbdinfoListShowsTheExportWithItsDescription) {
  REQUIRE_TOOL("nbdinfo");
  ASSERT_NO_FATAL_FAILURE(StartInteropServer({"-x", kExportName}));
  RunResult r = run({"nbdinfo", "--list", uri()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("export=\"disk\":"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("description: test disk"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("export-size: 4194304"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("base:allocation"), std::string::npos) << r.out;
}

TEST_F(Interop, NbdinfoJsonReportsSizeFlagsAndBlockSizes) {
  REQUIRE_TOOL("nbdinfo");
  ASSERT_NO_FATAL_FAILURE(StartInteropServer());
  RunResult r = run({"nbdinfo", "--json", uri()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  for (const char* want :
       {"\"export-size\": 4194304", "\"is_read_only\": false", "\"can_flush\": true",
        "\"can_fua\": true", "\"can_trim\": true", "\"can_zero\": true",
        "\"can_fast_zero\": true", "\"can_cache\": true", "\"can_df\": true",
        "\"can_multi_conn\": true", "\"block_size_minimum\": 1",
        "\"block_size_preferred\": 4096", "\"block_size_maximum\": 33554432",
        "\"protocol\": \"newstyle-fixed\"", "\"base:allocation\""})
    EXPECT_NE(r.out.find(want), std::string::npos) << "missing " << want << " in\n" << r.out;
}

// --- nbdcopy ------------------------------------------------------------------------

TEST_F(Interop, NbdcopyFromTheExportToAFileMatchesTheSource) {
  REQUIRE_TOOL("nbdcopy");
  ASSERT_NO_FATAL_FAILURE(StartInteropServer());
  const fs::path out = dir_ / "copy.raw";
  create_sparse_image(out, kImageSize, {}, 0);
  RunResult r = run({"nbdcopy", uri(), out.string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(first_difference(read_file_range(out, 0, kImageSize), pattern(0, kImageSize, kSeed)), -1);
}

TEST_F(Interop, NbdcopyFromAFileToTheExportWritesTheImage) {
  REQUIRE_TOOL("nbdcopy");
  ASSERT_NO_FATAL_FAILURE(StartInteropServer());
  const fs::path src = dir_ / "source.raw";
  // Mostly data, one hole: nbdcopy zeroes or trims the hole's range.
  create_sparse_image(src, kImageSize, {{0, 1 << 20}, {2 << 20, 2 << 20}}, 9);
  RunResult r = run({"nbdcopy", src.string(), uri()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  ASSERT_EQ(server_.stop(), 0);
  auto got = read_file_range(image_path(), 0, kImageSize);
  auto want = read_file_range(src, 0, kImageSize);
  EXPECT_EQ(first_difference(got, want), -1);
}

TEST_F(Interop, NbdcopyBetweenTwoExportsCopiesEveryByte) {
  REQUIRE_TOOL("nbdcopy");
  // Source: this test's server; destination: a second server on another socket.
  ASSERT_NO_FATAL_FAILURE(StartInteropServer({"-r"}));
  const fs::path dst_image = dir_ / "dst.raw";
  create_sparse_image(dst_image, kImageSize, {}, 0);
  Server dst;
  ServerOptions o;
  o.args = {"-f", "raw", "-t", "-e", "0", "-k", (dir_ / "dst.sock").string(), dst_image.string()};
  o.unix_socket = dir_ / "dst.sock";
  o.log_file = dir_ / "dst.log";
  ASSERT_TRUE(dst.start(std::move(o))) << dst.error();
  RunResult r = run({"nbdcopy", "--flush", uri(),
                     "nbd+unix:///?socket=" + (dir_ / "dst.sock").string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(dst.stop(), 0);
  EXPECT_EQ(first_difference(read_file_range(dst_image, 0, kImageSize),
                             pattern(0, kImageSize, kSeed)), -1);
}

// --- -L (list mode) -----------------------------------------------------------------

TEST_F(Interop, ListModeOutputHasQemuNbdShape) {
  ASSERT_NO_FATAL_FAILURE(StartInteropServer({"-x", kExportName}));
  RunResult r = run_server_binary({"-L", "-k", socket_path().string()});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  const std::string want =
      "exports available: 1\n"
      " export: 'disk'\n"
      "  description: test disk\n"
      "  size:  4194304\n";
  EXPECT_EQ(r.out.substr(0, want.size()), want) << r.out;
  // Writable, -e 0: flush fua trim zeroes df multi-conn cache fast-zero.
  EXPECT_NE(r.out.find("  flags: 0xded ( flush fua trim zeroes df multi cache fast-zero )\n"),
            std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("  min block: 1\n"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("  opt block: 4096\n"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("  max block: 33554432\n"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("  available meta contexts: 1\n   base:allocation\n"), std::string::npos)
      << r.out;
}

TEST_F(Interop, ListModeMatchesQemuNbdAgainstTheSameServer) {
  REQUIRE_TOOL("qemu-nbd");
  ASSERT_NO_FATAL_FAILURE(StartInteropServer({"-x", kExportName}));
  RunResult ours = run_server_binary({"-L", "-k", socket_path().string()});
  RunResult theirs = run({"qemu-nbd", "-L", "-k", socket_path().string()});
  ASSERT_EQ(theirs.exit_code, 0) << theirs.describe();
  EXPECT_EQ(ours.exit_code, 0) << ours.describe();
  EXPECT_EQ(ours.out, theirs.out);
}

TEST_F(Interop, ListModeMatchesQemuNbdAgainstAQemuNbdServer) {
  REQUIRE_TOOL("qemu-nbd");
  create_pattern_image(image_path(), kImageSize, kSeed);
  Server qemu;
  ServerOptions o;
  const fs::path sock = dir_ / "qemu.sock";
  o.args = {"-f", "raw", "-t", "-r", "-x", "other", "-D", "served by qemu-nbd", "-k",
            sock.string(), image_path().string()};
  o.unix_socket = sock;
  o.log_file = dir_ / "qemu.log";
  o.binary = "qemu-nbd";  // qemu-nbd itself, whatever LAYERD_BIN is
  ASSERT_TRUE(qemu.start(std::move(o))) << qemu.error();
  RunResult ours = run_server_binary({"--list", "-k", sock.string()});
  RunResult theirs = run({"qemu-nbd", "--list", "-k", sock.string()});
  ASSERT_EQ(theirs.exit_code, 0) << theirs.describe();
  EXPECT_EQ(ours.exit_code, 0) << ours.describe();
  EXPECT_EQ(ours.out, theirs.out);
  EXPECT_NE(ours.out.find("flags: 0x"), std::string::npos) << ours.out;
  EXPECT_NE(ours.out.find("readonly"), std::string::npos) << ours.out;
}

TEST_F(Interop, ListModeWorksOverTcp) {
  create_pattern_image(image_path(), kImageSize, kSeed);
  const uint16_t port = pick_free_port("127.0.0.1");
  ASSERT_NE(port, 0);
  ServerOptions o;
  o.args = {"-f", "raw", "-t", "-x", kExportName, "-b", "127.0.0.1", "-p", std::to_string(port),
            image_path().string()};
  o.tcp_port = port;
  o.log_file = dir_ / "server.log";
  ASSERT_TRUE(server_.start(std::move(o))) << server_.error();
  RunResult r = run_server_binary({"-L", "-b", "127.0.0.1", "-p", std::to_string(port)});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("exports available: 1\n export: 'disk'\n"), std::string::npos) << r.out;
}

TEST_F(Interop, ListModeAgainstNoServerFails) {
  RunResult r = run_server_binary({"-L", "-k", (dir_ / "nobody.sock").string()});
  EXPECT_EQ(r.exit_code, 1) << r.describe();
  EXPECT_FALSE(r.err.empty());
}

}  // namespace
}  // namespace layerd::test
