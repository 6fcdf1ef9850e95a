// A full file system under an export, end to end: on a small tmpfs the
// test mounts, layerd serves a qcow2 image, a raw image, and (-s) the
// throwaway overlay of a qcow2 image on a roomy disk (kept there with
// --keep-overlay); a libnbd client writes past what the tmpfs holds. The
// client must get ENOSPC (NBD_ENOSPC), not EIO and not success; what it
// wrote before reads back; the server goes on serving (a second client
// reads); once space is freed the same write succeeds and later ones too;
// and after shutdown qemu-img check finds the image clean and qemu-img
// reads what was acknowledged.
// Mounting needs root: elsewhere the tests skip, saying so.
//
// LostWriteBack: the disk under a raw export fails the write-back of what
// the client wrote (a loop device over a full tmpfs): every flush from
// then on fails.
//
// (tests/server/live_jobs_faults_test.cc fills a disk under block jobs;
// tests/qcow2/fault_sweep_test.cc injects ENOSPC at every I/O of the
// engine. Here it is the real binary on a real full file system.)
#include <libnbd.h>

#include <cerrno>
#include <fstream>
#include <string>
#include <vector>

#include "tests/server/harness.h"

namespace layerd::test {
namespace {

constexpr uint64_t MiB = 1 << 20;
constexpr uint64_t kDiskSize = 32 * MiB;   // the export, far larger than the tmpfs
constexpr uint64_t kChunk = 256 * 1024;    // one client write
constexpr uint32_t kSeed = 7;

class FullDisk : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    ASSERT_FALSE(server_binary().empty()) << "LAYERD_BIN is not set";
    tmpfs_ = std::make_unique<Tmpfs>(dir_ / "small", "8m");
    if (!tmpfs_->ok()) GTEST_SKIP() << "cannot mount a tmpfs here: " << tmpfs_->error();
  }
  void TearDown() override {
    server_.stop();
    tmpfs_.reset();
  }

  fs::path small(const std::string& name) const { return dir_ / "small" / name; }
  bool overlay() const { return GetParam() == "overlay"; }
  bool qcow2() const { return GetParam() != "raw"; }
  std::string format() const { return qcow2() ? "qcow2" : "raw"; }
  // The file the client's writes land in: the image, or the kept overlay
  // (found once layerd has exited).
  fs::path image() const {
    if (overlay()) return dir_ / "base.qcow2";
    return small(qcow2() ? "disk.qcow2" : "disk.raw");
  }
  fs::path written_file() const {
    if (!overlay()) return image();
    for (const auto& e : fs::directory_iterator(dir_ / "small"))
      if (e.path().extension() == ".qcow2") return e.path();
    return {};
  }

  void make_image() {
    if (qcow2()) {
      RunResult r = run({"qemu-img", "create", "-q", "-f", "qcow2", image().string(),
                         std::to_string(kDiskSize)});
      ASSERT_EQ(r.exit_code, 0) << r.out;
    } else {
      RunResult r = run({"truncate", "-s", std::to_string(kDiskSize), image().string()});
      ASSERT_EQ(r.exit_code, 0) << r.out;
    }
    // Space to free later: 2 MiB the test deletes once the disk is full.
    std::vector<char> filler(2 * MiB, 'x');
    std::ofstream(small("filler"), std::ios::binary).write(filler.data(), std::streamsize(filler.size()));
    ASSERT_EQ(fs::file_size(small("filler")), 2 * MiB);
  }

  void start_server() {
    ServerOptions o;
    o.args = {"-f", format(), "-t", "-e", "2", "-x", "disk", "-k", (dir_ / "nbd.sock").string()};
    if (overlay())
      o.args.insert(o.args.end(), {"-s", "--temp-dir", small("").string(), "--keep-overlay",
                                   small("").string()});
    o.args.push_back(image().string());
    o.unix_socket = dir_ / "nbd.sock";
    o.log_file = dir_ / "server.log";
    ASSERT_TRUE(server_.start(std::move(o))) << server_.error();
  }

  Nbd connect() {
    return nbd_connect_to_unix(dir_ / "nbd.sock",
                               [](nbd_handle* h) { nbd_set_export_name(h, "disk"); });
  }

  // Writes chunk `i` (its pattern); 0 or the errno the client got.
  static int write_chunk(nbd_handle* h, uint64_t i) {
    auto data = pattern(i * kChunk, kChunk, kSeed);
    if (nbd_pwrite(h, data.data(), data.size(), i * kChunk, 0) == 0) return 0;
    return nbd_get_errno();
  }

  // "" if chunks [0, n) read back through `h` as written.
  static std::string check_chunks(nbd_handle* h, uint64_t n) {
    std::vector<uint8_t> got(kChunk);
    for (uint64_t i = 0; i < n; ++i) {
      if (nbd_pread(h, got.data(), got.size(), i * kChunk, 0) != 0)
        return "reading chunk " + std::to_string(i) + ": " + nbd_error_text();
      if (got != pattern(i * kChunk, kChunk, kSeed))
        return "chunk " + std::to_string(i) + " does not read back";
    }
    return "";
  }

  TempDir dir_;
  std::unique_ptr<Tmpfs> tmpfs_;
  Server server_;
};

TEST_P(FullDisk, ClientGetsEnospcAndWritesWorkAgainOnceSpaceIsFreed) {
  ASSERT_NO_FATAL_FAILURE(make_image());
  ASSERT_NO_FATAL_FAILURE(start_server());
  Nbd h = connect();
  ASSERT_TRUE(h);

  // Fill it: every write succeeds until one gets ENOSPC.
  uint64_t written = 0;
  int err = 0;
  while (written * kChunk < kDiskSize && (err = write_chunk(h.get(), written)) == 0) ++written;
  ASSERT_LT(written * kChunk, kDiskSize) << "the tmpfs never filled";
  EXPECT_EQ(err, ENOSPC) << "the write past the tmpfs's capacity: " << nbd_error_text();
  EXPECT_GT(written, 8u);
  // What was acknowledged is there and stays there; a flush works (it
  // needs no new space).
  EXPECT_EQ(nbd_flush(h.get(), 0), 0) << nbd_error_text();
  EXPECT_EQ(check_chunks(h.get(), written), "");
  // Still full: the same answer, and the server keeps serving others.
  EXPECT_EQ(write_chunk(h.get(), written), ENOSPC) << nbd_error_text();
  {
    Nbd other = connect();
    ASSERT_TRUE(other);
    EXPECT_EQ(check_chunks(other.get(), written), "");
  }

  // Space freed: the write that failed now succeeds, and a few more.
  fs::remove(small("filler"));
  for (int i = 0; i < 4; ++i) {
    ASSERT_EQ(write_chunk(h.get(), written), 0)
        << "chunk " << written << " after freeing space: " << nbd_error_text();
    ++written;
  }
  EXPECT_EQ(nbd_flush(h.get(), 0), 0) << nbd_error_text();
  EXPECT_EQ(check_chunks(h.get(), written), "");
  EXPECT_TRUE(server_.running());

  // After shutdown: the image is clean and holds what was acknowledged.
  h.reset();
  EXPECT_EQ(server_.stop(), 0) << server_.log();
  const fs::path file = written_file();
  ASSERT_FALSE(file.empty()) << "no overlay kept in " << small("");
  if (qcow2()) {
    RunResult r = run({"qemu-img", "check", file.string()});
    EXPECT_EQ(r.exit_code, 0) << r.out;
  }
  const fs::path raw = dir_ / "oracle.raw";  // on the roomy disk, not the tmpfs
  RunResult r = run({"qemu-img", "convert", "-f", format(), "-O", "raw", file.string(),
                     raw.string()});
  ASSERT_EQ(r.exit_code, 0) << r.out;
  auto content = read_file_range(raw, 0, kDiskSize);
  ASSERT_EQ(content.size(), kDiskSize);
  const uint64_t end = written * kChunk;
  EXPECT_EQ(first_difference(std::span(content).first(end), pattern(0, end, kSeed)), -1);
  EXPECT_TRUE(all_zero(std::span(content).subspan(end)));
}

INSTANTIATE_TEST_SUITE_P(Formats, FullDisk, ::testing::Values("qcow2", "raw", "overlay"),
                         [](const auto& param_info) { return param_info.param; });

// A disk that loses acknowledged writes as it writes them back: a loop
// device whose backing file lies on a 2 MiB tmpfs, exported raw. The
// client's writes are acknowledged (they reach the page cache); its flush
// gets the I/O error of their write-back, and so does every flush after
// it, for the kernel marks the lost pages clean and would report the
// error only once. Reads and the server go on. Needs root and loop
// devices; skips otherwise.
TEST(LostWriteBack, EveryClientFlushFailsFromTheFirstLostWriteBackOn) {
  ASSERT_FALSE(server_binary().empty()) << "LAYERD_BIN is not set";
  TempDir dir;
  Tmpfs tmpfs(dir / "small", "2m");
  if (!tmpfs.ok()) GTEST_SKIP() << "cannot mount a tmpfs here: " << tmpfs.error();
  const fs::path backing = dir / "small" / "backing";
  RunResult r = run({"truncate", "-s", std::to_string(kDiskSize), backing.string()});
  ASSERT_EQ(r.exit_code, 0) << r.out;
  r = run({"losetup", "-f", "--show", backing.string()});
  if (r.exit_code != 0) GTEST_SKIP() << "no loop device: " << r.out;
  const std::string device = r.out.substr(0, r.out.find('\n'));
  struct Detach {
    std::string device;
    ~Detach() { run({"losetup", "-d", device}); }
  } detach{device};

  Server server;
  ServerOptions o;
  o.args = {"-f", "raw", "-t", "-x", "disk", "-k", (dir / "nbd.sock").string(), device};
  o.unix_socket = dir / "nbd.sock";
  o.log_file = dir / "server.log";
  ASSERT_TRUE(server.start(std::move(o))) << server.error();
  Nbd h = nbd_connect_to_unix(dir / "nbd.sock",
                              [](nbd_handle* nbd) { nbd_set_export_name(nbd, "disk"); });
  ASSERT_TRUE(h);
  const uint64_t written = 8 * MiB;  // four times what the tmpfs holds
  for (uint64_t at = 0; at < written; at += kChunk) {
    auto data = pattern(at, kChunk, kSeed);
    ASSERT_EQ(nbd_pwrite(h.get(), data.data(), data.size(), at, 0), 0) << nbd_error_text();
  }
  EXPECT_EQ(nbd_flush(h.get(), 0), -1) << "the write-back into a full tmpfs should fail";
  EXPECT_EQ(nbd_get_errno(), EIO) << nbd_error_text();
  EXPECT_EQ(nbd_flush(h.get(), 0), -1) << "a second flush must not succeed over lost writes";
  EXPECT_EQ(nbd_get_errno(), EIO) << nbd_error_text();
  // A new write and its flush: still failing, the disk lost data.
  auto data = pattern(written, kChunk, kSeed);
  EXPECT_EQ(nbd_pwrite(h.get(), data.data(), data.size(), written, 0), 0) << nbd_error_text();
  EXPECT_EQ(nbd_flush(h.get(), 0), -1);
  std::vector<uint8_t> got(kChunk);
  EXPECT_EQ(nbd_pread(h.get(), got.data(), got.size(), kDiskSize - kChunk, 0), 0) << nbd_error_text();
  EXPECT_TRUE(server.running()) << server.log();
  h.reset();
  const int status = server.stop();
  EXPECT_GE(status, 0) << "layerd must exit:\n" << server.log();
  EXPECT_LT(status, 128) << "layerd must exit, not crash:\n" << server.log();
}

}  // namespace
}  // namespace layerd::test
