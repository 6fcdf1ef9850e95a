// -o OFFSET: the export starts OFFSET bytes into the image, raw or qcow2,
// with qemu-nbd 7.2 as the oracle: the same data, the same size (qemu-nbd
// rounds it up to 512 bytes, layerd keeps it exact), writes landing at
// OFFSET + their offset in the image, and qemu-nbd's refusals.

#include <libnbd.h>

#include <string>
#include <vector>

#include "tests/server/harness.h"
#include "tests/server/qcow2_tools.h"

namespace layerd::test {
namespace {

using qcow2e2e::run_expect;

constexpr uint64_t kRawSize = 1 << 20;

class OffsetExport : public ::testing::Test {
 protected:
  void SetUp() override {
    if (server_is_qemu_nbd()) GTEST_SKIP() << "compares layerd with qemu-nbd";
  }
  fs::path sock() const { return dir_ / "s.sock"; }

  void Start(Server& s, const std::string& binary, std::vector<std::string> args,
             const fs::path& file) {
    ServerOptions o;
    o.binary = binary;
    o.args = std::move(args);
    o.args.insert(o.args.end(), {"-k", sock().string(), file.string()});
    o.unix_socket = sock();
    o.log_file = dir_ / (binary.empty() ? "layerd.log" : "qemu-nbd.log");
    ASSERT_TRUE(s.start(o)) << s.error();
  }

  // Size and first `length` bytes of the export of `binary` (layerd if
  // empty) with `args`.
  std::pair<int64_t, std::vector<uint8_t>> Serve(const std::string& binary,
                                                 std::vector<std::string> args,
                                                 const fs::path& file, size_t length) {
    Server s;
    Start(s, binary, std::move(args), file);
    Nbd h = nbd_connect_to_unix(sock());
    if (!h) return {};
    int64_t size = nbd_get_size(h.get());
    std::vector<uint8_t> data(length);
    EXPECT_EQ(nbd_pread(h.get(), data.data(), length, 0, 0), 0) << nbd_error_text();
    h.reset();
    s.stop();
    return {size, data};
  }

  TempDir dir_;
};

TEST_F(OffsetExport, RawExportStartsAtTheOffsetAndKeepsTheExactSize) {
  const fs::path raw = dir_ / "disk.raw";
  create_pattern_image(raw, kRawSize, 3);
  auto [ours_size, ours] = Serve("", {"-r", "-f", "raw", "-o", "1000"}, raw, 64 << 10);
  auto [qemu_size, theirs] =
      Serve("/usr/bin/qemu-nbd", {"-r", "-f", "raw", "-o", "1000"}, raw, 64 << 10);
  EXPECT_EQ(ours_size, int64_t(kRawSize - 1000));
  // qemu-nbd counts in 512-byte sectors (docs/compatibility.md).
  EXPECT_EQ(qemu_size, int64_t((kRawSize - 1000 + 511) / 512 * 512));
  EXPECT_EQ(ours, theirs);
  EXPECT_EQ(ours, pattern(1000, 64 << 10, 3));
  // Hexadecimal as qemu-nbd reads it.
  auto [hex_size, hex] = Serve("", {"-r", "-f", "raw", "-o", "0x1000"}, raw, 4096);
  EXPECT_EQ(hex_size, int64_t(kRawSize - 4096));
  EXPECT_EQ(hex, pattern(4096, 4096, 3));
}

TEST_F(OffsetExport, RawWritesLandAtTheOffsetInTheFile) {
  const fs::path raw = dir_ / "disk.raw";
  create_pattern_image(raw, kRawSize, 3);
  Server s;
  ASSERT_NO_FATAL_FAILURE(Start(s, "", {"-f", "raw", "-o", "4096"}, raw));
  Nbd h = nbd_connect_to_unix(sock());
  ASSERT_TRUE(h);
  std::vector<uint8_t> data(10000, 0x5a);
  ASSERT_EQ(nbd_pwrite(h.get(), data.data(), data.size(), 100, 0), 0) << nbd_error_text();
  ASSERT_EQ(nbd_zero(h.get(), 512, 20000, 0), 0) << nbd_error_text();
  // The last byte of the export is the last byte of the file.
  uint8_t last = 0x77;
  ASSERT_EQ(nbd_pwrite(h.get(), &last, 1, kRawSize - 4096 - 1, 0), 0) << nbd_error_text();
  // Past the end of the window: refused, nothing written.
  EXPECT_EQ(nbd_pwrite(h.get(), &last, 1, kRawSize - 4096, LIBNBD_CMD_FLAG_FUA), -1);
  ASSERT_EQ(nbd_flush(h.get(), 0), 0);
  h.reset();
  s.stop();
  EXPECT_EQ(read_file_range(raw, 4096 + 100, data.size()), data);
  EXPECT_EQ(read_file_range(raw, 4096 + 20000, 512), std::vector<uint8_t>(512, 0));
  EXPECT_EQ(read_file_range(raw, 0, 4196), pattern(0, 4196, 3));
  EXPECT_EQ(read_file_range(raw, kRawSize - 1, 1), std::vector<uint8_t>{0x77});
  EXPECT_EQ(fs::file_size(raw), kRawSize);
}

TEST_F(OffsetExport, QcowOffsetIsAppliedOverTheFormatAsQemuNbdDoes) {
  const fs::path img = dir_ / "disk.qcow2";
  run_expect({"qemu-img", "create", "-q", "-f", "qcow2", img.string(), "16M"});
  qcow2e2e::qemu_io(img, "qcow2", {"write -P 0x11 0 64k", "write -P 0x22 64k 64k",
                                   "write -P 0x33 1M 4k"});
  auto [ours_size, ours] = Serve("", {"-r", "-f", "qcow2", "-o", "65536"}, img, 2 << 20);
  auto [qemu_size, theirs] =
      Serve("/usr/bin/qemu-nbd", {"-r", "-f", "qcow2", "-o", "65536"}, img, 2 << 20);
  EXPECT_EQ(ours_size, int64_t((16 << 20) - 65536));
  EXPECT_EQ(ours_size, qemu_size);
  EXPECT_EQ(ours, theirs);
  EXPECT_EQ(ours[0], 0x22);
  EXPECT_EQ(ours[(1 << 20) - 65536], 0x33);

  // Writes go to the image at OFFSET + their offset.
  Server s;
  ASSERT_NO_FATAL_FAILURE(Start(s, "", {"-f", "qcow2", "-o", "65536"}, img));
  Nbd h = nbd_connect_to_unix(sock());
  ASSERT_TRUE(h);
  std::vector<uint8_t> data(4096, 0x44);
  ASSERT_EQ(nbd_pwrite(h.get(), data.data(), data.size(), 3 << 20, 0), 0) << nbd_error_text();
  h.reset();
  s.stop();
  run_expect({"qemu-io", "-f", "qcow2", "-r", "-c",
              "read -P 0x44 " + std::to_string((3 << 20) + 65536) + " 4k", img.string()});
  RunResult check = run_expect({"qemu-img", "check", img.string()});
  EXPECT_NE(check.out.find("No errors were found"), std::string::npos) << check.out;
}

TEST_F(OffsetExport, OffsetAtTheEndGivesAnEmptyExportAndPastItIsRefused) {
  const fs::path raw = dir_ / "disk.raw";
  create_pattern_image(raw, kRawSize, 3);
  {
    Server s;
    ASSERT_NO_FATAL_FAILURE(
        Start(s, "", {"-r", "-f", "raw", "-o", std::to_string(kRawSize)}, raw));
    Nbd h = nbd_connect_to_unix(sock());
    ASSERT_TRUE(h);
    EXPECT_EQ(nbd_get_size(h.get()), 0);
    h.reset();
    s.stop();
  }
  for (const std::string& binary : {server_binary(), std::string("/usr/bin/qemu-nbd")}) {
    RunResult r = run({binary, "-r", "-f", "raw", "-o", "2000000", "-k", sock().string(),
                       raw.string()},
                      10s);
    EXPECT_EQ(r.exit_code, 1) << binary << r.describe();
    EXPECT_NE(r.err.find("Offset (2000000) cannot be greater than size of the containing "
                         "file (1048576)"),
              std::string::npos)
        << r.describe();
    EXPECT_FALSE(unix_socket_listening(sock()));
    r = run({binary, "-r", "-f", "raw", "-o", "abc", "-k", sock().string(), raw.string()},
            10s);
    EXPECT_EQ(r.exit_code, 1) << binary << r.describe();
    EXPECT_NE(r.err.find("Invalid offset 'abc'"), std::string::npos) << r.describe();
  }
}

}  // namespace
}  // namespace layerd::test
