// Image locks between layerd and QEMU's programs: what layerd serves,
// qemu-img, qemu-io and qemu-nbd may not write (or, while it is served
// writable, even open without -U), and layerd refuses an image that qemu-io
// writes unless it serves it read-only with -U. The same tests pass with
// LAYERD_BIN=/usr/bin/qemu-nbd, except those that check layerd's messages
// and its -U (which qemu-nbd 7.2 does not have).
#include <string>
#include <vector>

#include "tests/server/harness.h"

namespace layerd::test {
namespace {

constexpr int kWriteTakenByte = 101;  // QEMU: 100 + BLK_PERM_WRITE's bit

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

class Locking : public ::testing::Test {
 protected:
  fs::path image() const { return dir_ / "disk.qcow2"; }
  fs::path socket() const { return dir_ / "s.sock"; }

  void create_qcow2(const fs::path& file, const std::vector<std::string>& extra = {}) {
    std::vector<std::string> argv{"qemu-img", "create", "-q", "-f", "qcow2"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    argv.push_back(file.string());
    argv.push_back("4M");
    RunResult r = run(argv);
    ASSERT_EQ(r.exit_code, 0) << r.describe();
  }

  // Serves `file` on socket() with `extra` options; false if it did not
  // come up.
  bool serve(const std::vector<std::string>& extra, const fs::path& file) {
    ServerOptions o;
    o.args = {"-t", "-k", socket().string()};
    o.args.insert(o.args.end(), extra.begin(), extra.end());
    o.args.push_back(file.string());
    o.unix_socket = socket();
    o.log_file = dir_ / "server.log";
    return server_.start(o);
  }

  // qemu-io running `command` on `file`; returns its result.
  static RunResult qemu_io(const std::vector<std::string>& options,
                           const std::string& command, const fs::path& file) {
    std::vector<std::string> argv{"qemu-io"};
    argv.insert(argv.end(), options.begin(), options.end());
    argv.insert(argv.end(), {"-c", command, file.string()});
    return run(argv);
  }

  TempDir dir_;
  Server server_;
};

TEST_F(Locking, AWritableExportKeepsQemuOutUnlessItForceShares) {
  ASSERT_NO_FATAL_FAILURE(create_qcow2(image()));
  ASSERT_TRUE(serve({"-f", "qcow2"}, image())) << server_.error();

  RunResult info = run({"qemu-img", "info", image().string()});
  EXPECT_NE(info.exit_code, 0) << info.describe();
  EXPECT_TRUE(contains(info.err, "Failed to get shared \"write\" lock")) << info.describe();

  RunResult write = qemu_io({"-f", "qcow2"}, "write 0 4k", image());
  EXPECT_NE(write.exit_code, 0) << write.describe();
  EXPECT_TRUE(contains(write.err, "Failed to get \"write\" lock")) << write.describe();

  RunResult shared = run({"qemu-img", "info", "-U", image().string()});
  EXPECT_EQ(shared.exit_code, 0) << shared.describe();

  // A second server is refused as well.
  RunResult second = run_server_binary({"-f", "qcow2", "-k", (dir_ / "2.sock").string(),
                                        image().string()});
  EXPECT_NE(second.exit_code, 0) << second.describe();

  // Once the server is gone, so are its locks.
  EXPECT_EQ(server_.stop(), 0);
  write = qemu_io({"-f", "qcow2"}, "write 0 4k", image());
  EXPECT_EQ(write.exit_code, 0) << write.describe();
}

TEST_F(Locking, AReadOnlyExportLetsQemuReadButNotWrite) {
  ASSERT_NO_FATAL_FAILURE(create_qcow2(image()));
  ASSERT_TRUE(serve({"-f", "qcow2", "-r"}, image())) << server_.error();

  for (const char* cmd : {"info", "map", "check"}) {
    RunResult r = run({"qemu-img", cmd, image().string()});
    EXPECT_EQ(r.exit_code, 0) << cmd << ": " << r.describe();
  }
  RunResult read = qemu_io({"-r", "-f", "qcow2"}, "read 0 4k", image());
  EXPECT_EQ(read.exit_code, 0) << read.describe();

  RunResult write = qemu_io({"-f", "qcow2"}, "write 0 4k", image());
  EXPECT_NE(write.exit_code, 0) << write.describe();
  EXPECT_TRUE(contains(write.err, "Failed to get \"write\" lock")) << write.describe();
}

TEST_F(Locking, BackingImagesOfAWritableExportStayReadable) {
  const fs::path base = dir_ / "base.qcow2";
  ASSERT_NO_FATAL_FAILURE(create_qcow2(base));
  ASSERT_NO_FATAL_FAILURE(create_qcow2(image(), {"-b", "base.qcow2", "-F", "qcow2"}));
  ASSERT_TRUE(serve({"-f", "qcow2"}, image())) << server_.error();

  RunResult info = run({"qemu-img", "info", base.string()});
  EXPECT_EQ(info.exit_code, 0) << info.describe();
  RunResult read = qemu_io({"-r", "-f", "qcow2"}, "read 0 4k", base);
  EXPECT_EQ(read.exit_code, 0) << read.describe();
  // Backing images are read-only to layerd, and nobody may change them
  // underneath it.
  RunResult write = qemu_io({"-f", "qcow2"}, "write 0 4k", base);
  EXPECT_NE(write.exit_code, 0) << write.describe();
  RunResult top = run({"qemu-img", "info", image().string()});
  EXPECT_NE(top.exit_code, 0) << top.describe();
}

TEST_F(Locking, ARawExportRefusesResizingAsQemuNbdDoes) {
  const fs::path raw = dir_ / "disk.raw";
  create_pattern_image(raw, 1 << 20, 7);
  ASSERT_TRUE(serve({"-f", "raw"}, raw)) << server_.error();
  RunResult resize = run({"qemu-img", "resize", "-f", "raw", raw.string(), "2M"});
  EXPECT_NE(resize.exit_code, 0) << resize.describe();
  EXPECT_TRUE(contains(resize.err, "Failed to get \"resize\" lock")) << resize.describe();
  RunResult info = run({"qemu-img", "info", "-f", "raw", raw.string()});
  EXPECT_EQ(info.exit_code, 0) << info.describe();
}

TEST_F(Locking, AnImageQemuIoWritesIsRefusedUnlessServedReadOnlyWithForceShare) {
  SKIP_UNLESS_LAYERD();
  ASSERT_NO_FATAL_FAILURE(create_qcow2(image()));
  InteractiveProcess holder({"qemu-io", "-f", "qcow2", image().string()});
  ASSERT_TRUE(wait_until([&] { return image_lock_byte_held(image(), kWriteTakenByte); }, 10s))
      << "qemu-io did not open the image";

  RunResult writable = run_server_binary({"-f", "qcow2", "-k", socket().string(),
                                          image().string()});
  EXPECT_EQ(writable.exit_code, 1) << writable.describe();
  EXPECT_TRUE(contains(writable.err,
                       "is in use: another process has it open and does not share "
                       "the \"write\" lock (is QEMU or qemu-nbd using it?); serve it "
                       "read-only with -r -U to read it anyway"))
      << writable.describe();

  RunResult read_only = run_server_binary({"-f", "qcow2", "-r", "-k", socket().string(),
                                           image().string()});
  EXPECT_EQ(read_only.exit_code, 1) << read_only.describe();
  EXPECT_TRUE(contains(read_only.err,
                       "is in use: another process holds the \"write\" lock (is QEMU "
                       "or qemu-nbd using it?); pass -U/--force-share to read it anyway"))
      << read_only.describe();

  ASSERT_TRUE(serve({"-f", "qcow2", "-r", "-U"}, image())) << server_.error();
  Nbd h = nbd_connect_to_unix(socket());
  ASSERT_TRUE(h);
  std::vector<uint8_t> buf(4096);
  EXPECT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), 0, 0), 0) << nbd_error_text();
  EXPECT_TRUE(holder.running());
}

TEST_F(Locking, ForceShareNeedsReadOnly) {
  SKIP_UNLESS_LAYERD();
  ASSERT_NO_FATAL_FAILURE(create_qcow2(image()));
  RunResult r = run_server_binary({"-U", "-f", "qcow2", "-k", socket().string(),
                                   image().string()});
  EXPECT_EQ(r.exit_code, 1) << r.describe();
  EXPECT_TRUE(contains(r.err, "-U/--force-share can only be used with -r/--read-only"))
      << r.describe();
}

}  // namespace
}  // namespace layerd::test
