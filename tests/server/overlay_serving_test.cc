// Overlays and the block graph, end to end: -s (a throwaway overlay), -l
// (an internal snapshot), -s -l, per-client overlays and sessions, kept
// overlays, copy-on-read, qemu:allocation-depth, and several exports in
// one process (--export, --config). qemu-img and qemu-io are the oracle for
// what the files hold; every base file must stay byte-identical.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <thread>

#include "tests/server/harness.h"
#include "tests/server/qcow2_tools.h"

namespace layerd::test {
namespace {

using qcow2e2e::Rng;
using qcow2e2e::run_expect;

uint64_t file_hash(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  std::vector<char> buf(1 << 20);
  uint64_t h = 0xcbf29ce484222325ULL;
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    for (std::streamsize i = 0; i < in.gcount(); ++i) {
      h ^= static_cast<uint8_t>(buf[i]);
      h *= 0x100000001b3ULL;
    }
  }
  return h;
}

class OverlayServing : public ::testing::Test {
 protected:
  void SetUp() override {
    if (server_is_qemu_nbd()) GTEST_SKIP() << "layerd-only options";
  }

  // base.qcow2 (0x11 in 0..2M, snapshot "snap1", then 0x22 in 0..1M)
  // <- mid.qcow2 (0x33 at 2M..3M) <- top.qcow2 (0x44 at 3M..3.5M); 8 MiB.
  void make_chain() {
    run_expect({"qemu-img", "create", "-q", "-f", "qcow2", base(), "8M"});
    run_expect({"qemu-io", "-c", "write -P 0x11 0 2M", base()});
    run_expect({"qemu-img", "snapshot", "-c", "snap1", base()});
    run_expect({"qemu-io", "-c", "write -P 0x22 0 1M", base()});
    run_expect({"qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F",
                "qcow2", mid()});
    run_expect({"qemu-io", "-c", "write -P 0x33 2M 1M", mid()});
    run_expect({"qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F",
                "qcow2", top()});
    run_expect({"qemu-io", "-c", "write -P 0x44 3M 512k", top()});
  }

  std::vector<uint64_t> hashes() const {
    return {file_hash(base()), file_hash(mid()), file_hash(top())};
  }

  bool start(const std::vector<std::string>& args, Server& server, const fs::path& socket) {
    ServerOptions o;
    o.args = {"-k", socket.string(), "-t", "-e", "0"};
    o.args.insert(o.args.end(), args.begin(), args.end());
    o.unix_socket = socket;
    o.log_file = dir_ / (socket.filename().string() + ".log");
    bool ok = server.start(o);
    if (!ok) ADD_FAILURE() << server.error();
    return ok;
  }
  bool start(const std::vector<std::string>& args) { return start(args, server_, socket()); }

  Nbd connect(const std::string& name = "", const fs::path& socket = {}) {
    return nbd_connect_to_unix(socket.empty() ? this->socket() : socket,
                               [&](nbd_handle* h) {
                                 nbd_set_export_name(h, name.c_str());
                                 nbd_add_meta_context(h, "qemu:allocation-depth");
                               });
  }

  static void expect_bytes(nbd_handle* h, uint64_t offset, size_t length, uint8_t value) {
    std::vector<uint8_t> got(length);
    ASSERT_EQ(nbd_pread(h, got.data(), length, offset, 0), 0) << nbd_error_text();
    std::vector<uint8_t> want(length, value);
    ASSERT_EQ(first_difference(got, want), -1)
        << "at offset " << offset << " expected 0x" << std::hex << int(value);
  }
  static void write_bytes(nbd_handle* h, uint64_t offset, size_t length, uint8_t value) {
    std::vector<uint8_t> data(length, value);
    ASSERT_EQ(nbd_pwrite(h, data.data(), length, offset, 0), 0) << nbd_error_text();
  }

  std::string uri(const std::string& name = "", const fs::path& socket = {}) const {
    return "nbd+unix:///" + name + "?socket=" +
           (socket.empty() ? this->socket() : socket).string();
  }
  std::string map(const std::string& context, const std::string& name = "") {
    RunResult r = run({"nbdinfo", "--map=" + context, uri(name)});
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    return r.out;
  }

  fs::path socket() const { return dir_ / "s.sock"; }
  std::string base() const { return (dir_ / "base.qcow2").string(); }
  std::string mid() const { return (dir_ / "mid.qcow2").string(); }
  std::string top() const { return (dir_ / "top.qcow2").string(); }

  TempDir dir_;
  Server server_;
};

// --- -s -----------------------------------------------------------------

TEST_F(OverlayServing, SnapshotModeWritesLeaveEveryFileByteIdentical) {
  ASSERT_NO_FATAL_FAILURE(make_chain());
  const auto before = hashes();
  ASSERT_TRUE(start({"-s", "-f", "qcow2", top()}));
  {
    Nbd h = connect();
    ASSERT_TRUE(h);
    EXPECT_EQ(nbd_is_read_only(h.get()), 0);
    Rng rng(7);
    std::vector<uint8_t> shadow(8 << 20);
    ASSERT_EQ(nbd_pread(h.get(), shadow.data(), shadow.size(), 0, 0), 0);
    for (int i = 0; i < 400; ++i) {
      uint64_t off = rng.below(8 << 20);
      size_t len = static_cast<size_t>(std::min<uint64_t>(rng.between(1, 200000), (8 << 20) - off));
      uint8_t v = static_cast<uint8_t>(rng.next());
      std::vector<uint8_t> d(len, v);
      ASSERT_EQ(nbd_pwrite(h.get(), d.data(), len, off, 0), 0) << nbd_error_text();
      std::fill_n(shadow.begin() + static_cast<long>(off), len, v);
      if (i % 50 == 0) {
        uint64_t z = rng.below(127) * 65536;
        ASSERT_EQ(nbd_zero(h.get(), 65536, z, 0), 0) << nbd_error_text();
        std::fill_n(shadow.begin() + static_cast<long>(z), 65536, 0);
      }
    }
    ASSERT_EQ(nbd_flush(h.get(), 0), 0);
    std::vector<uint8_t> got(shadow.size());
    ASSERT_EQ(nbd_pread(h.get(), got.data(), got.size(), 0, 0), 0);
    EXPECT_EQ(first_difference(got, shadow), -1);
  }
  EXPECT_EQ(server_.stop(), 0);
  EXPECT_EQ(hashes(), before);
  run_expect({"qemu-img", "check", top()});
}

TEST_F(OverlayServing, SnapshotModeWithReadOnlyServesReadOnlyAsQemuNbd) {
  ASSERT_NO_FATAL_FAILURE(make_chain());
  ASSERT_TRUE(start({"-s", "-r", "-f", "qcow2", top()}));
  Nbd h = connect();
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_is_read_only(h.get()), 1);
  ASSERT_NO_FATAL_FAILURE(expect_bytes(h.get(), 3 << 20, 512 << 10, 0x44));
}

TEST_F(OverlayServing, KeepOverlayThatCannotBeKeptIsRefusedAtStart) {
  ASSERT_NO_FATAL_FAILURE(make_chain());
  RunResult r = run_server_binary({"-s", "--keep-overlay", (dir_ / "missing").string(),
                                   "--temp-dir", dir_.path().string(), "-k",
                                   socket().string(), top()});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("cannot be kept there"), std::string::npos) << r.err;
  fs::create_directory(dir_ / "keep");
  r = run_server_binary({"--overlay=per-client", "-l", "snap1", "--keep-overlay",
                         (dir_ / "keep").string(), "--temp-dir", dir_.path().string(), "-k",
                         socket().string(), base()});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("cannot keep an overlay of internal snapshot"), std::string::npos)
      << r.err;
}

TEST_F(OverlayServing, SnapshotModeOverlayLeavesNoFileEvenAfterKill9) {
  ASSERT_NO_FATAL_FAILURE(make_chain());
  fs::path tmp = dir_ / "tmp";
  fs::create_directory(tmp);
  ASSERT_TRUE(start({"-s", "--temp-dir", tmp.string(), "-f", "qcow2", top()}));
  {
    Nbd h = connect();
    ASSERT_TRUE(h);
    ASSERT_NO_FATAL_FAILURE(write_bytes(h.get(), 0, 1 << 20, 0x99));
    ASSERT_NO_FATAL_FAILURE(expect_bytes(h.get(), 0, 1 << 20, 0x99));
    EXPECT_TRUE(fs::is_empty(tmp));  // the overlay has no name
    // ... but the server holds it open, in that directory.
    bool found = false;
    for (auto& fd : fs::directory_iterator("/proc/" + std::to_string(server_.pid()) + "/fd")) {
      std::error_code ec;
      std::string target = fs::read_symlink(fd.path(), ec).string();
      if (target.rfind(tmp.string(), 0) == 0) found = true;
    }
    EXPECT_TRUE(found);
  }
  server_.signal(SIGKILL);
  server_.wait_exit(5s);
  EXPECT_TRUE(fs::is_empty(tmp));
}

TEST_F(OverlayServing, KeptOverlayIsAValidOverlayOfTheChainWithItsClusterSize) {
  run_expect({"qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", base(), "8M"});
  run_expect({"qemu-io", "-c", "write -P 0x11 0 8M", base()});
  fs::path keep = dir_ / "keep";
  fs::create_directory(keep);
  ASSERT_TRUE(start({"-s", "--temp-dir", dir_.path().string(), "--keep-overlay", keep.string(),
                     "-x", "vm", "-f", "qcow2", base()}));
  {
    Nbd h = connect("vm");
    ASSERT_TRUE(h);
    ASSERT_NO_FATAL_FAILURE(write_bytes(h.get(), 4096, 8192, 0x77));
  }
  EXPECT_EQ(server_.stop(), 0);
  std::vector<fs::path> kept;
  for (auto& f : fs::directory_iterator(keep)) kept.push_back(f.path());
  ASSERT_EQ(kept.size(), 1u);
  EXPECT_EQ(kept[0].filename().string().rfind("vm-", 0), 0u) << kept[0];
  run_expect({"qemu-img", "check", kept[0].string()});
  RunResult info = run_expect({"qemu-img", "info", "--output=json", kept[0].string()});
  EXPECT_NE(info.out.find("\"cluster-size\": 4096"), std::string::npos) << info.out;
  EXPECT_NE(info.out.find("\"backing-filename-format\": \"qcow2\""), std::string::npos) << info.out;
  run_expect({"qemu-io", "-c", "read -P 0x11 0 4k", "-c", "read -P 0x77 4k 8k", "-c",
              "read -P 0x11 12k 8180k", kept[0].string()});
  // layerd serves the kept file over the original chain too, once the
  // chain's directory is allowed (the kept file is in keep/).
  Server again;
  ASSERT_TRUE(start({"-r", "-f", "qcow2", "--image-dir", dir_.path().string(),
                     kept[0].string()},
                    again, dir_ / "again.sock"));
  Nbd h = connect("", dir_ / "again.sock");
  ASSERT_TRUE(h);
  ASSERT_NO_FATAL_FAILURE(expect_bytes(h.get(), 4096, 8192, 0x77));
  ASSERT_NO_FATAL_FAILURE(expect_bytes(h.get(), 0, 4096, 0x11));
}

// --- -l and -s -l ---------------------------------------------------------

TEST_F(OverlayServing, LoadSnapshotServesTheSnapshotReadOnlyInEveryForm) {
  ASSERT_NO_FATAL_FAILURE(make_chain());
  RunResult list = run_expect({"qemu-img", "snapshot", "-l", base()});
  for (std::string form : {"snap1", "1", "snapshot.name=snap1", "snapshot.id=1",
                           "snapshot.id=1,snapshot.name=snap1"}) {
    SCOPED_TRACE(form);
    Server server;
    ASSERT_TRUE(start({"-l", form, "-f", "qcow2", base()}, server, socket()));
    {
      Nbd h = connect();
      ASSERT_TRUE(h);
      EXPECT_EQ(nbd_is_read_only(h.get()), 1);
      ASSERT_NO_FATAL_FAILURE(expect_bytes(h.get(), 0, 2 << 20, 0x11));
      std::vector<uint8_t> d(512, 1);
      EXPECT_EQ(nbd_pwrite(h.get(), d.data(), d.size(), 0, 0), -1);
    }
    // Byte for byte what qemu reads of the snapshot.
    fs::path oracle = dir_ / "snap.raw";
    run_expect({"qemu-img", "convert", "-U", "-l", "snapshot.name=snap1", "-O", "raw",
                base(), oracle.string()});
    RunResult cmp = run({"qemu-img", "compare", "-f", "raw", "-F", "raw", oracle.string(),
                         uri()});
    EXPECT_EQ(cmp.exit_code, 0) << cmp.describe();
    server.stop();
  }
  RunResult bad = run_server_binary({"-l", "nosuch", "-k", socket().string(), base()});
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.err.find("no internal snapshot with id or name 'nosuch'"), std::string::npos)
      << bad.err;
  bad = run_server_binary({"-l", "snapshot.id=1,snapshot.name=other", "-k", socket().string(), base()});
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.err.find("with id '1' and name 'other'"), std::string::npos) << bad.err;
  bad = run_server_binary({"-l", "snapshot.bogus=1", "-k", socket().string(), base()});
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.err.find("snapshot.bogus"), std::string::npos) << bad.err;
}

TEST_F(OverlayServing, EightProcessesServeWritableOverlaysOnSnapshotsOfOneImage) {
  ASSERT_NO_FATAL_FAILURE(make_chain());
  run_expect({"qemu-img", "snapshot", "-c", "snap2", base()});
  const auto before = hashes();
  constexpr int kServers = 8;
  std::vector<std::unique_ptr<Server>> servers;
  for (int i = 0; i < kServers; ++i) {
    servers.push_back(std::make_unique<Server>());
    fs::path s = dir_ / ("s" + std::to_string(i) + ".sock");
    ASSERT_TRUE(start({"-s", "-l", i % 2 ? "snap2" : "snap1", "-f", "qcow2", base()},
                      *servers.back(), s));
  }
  std::vector<Nbd> handles;
  for (int i = 0; i < kServers; ++i) {
    handles.push_back(connect("", dir_ / ("s" + std::to_string(i) + ".sock")));
    ASSERT_TRUE(handles.back());
    ASSERT_NO_FATAL_FAILURE(write_bytes(handles[i].get(), 1 << 20, 256 << 10,
                                        static_cast<uint8_t>(0xa0 + i)));
  }
  for (int i = 0; i < kServers; ++i) {
    ASSERT_NO_FATAL_FAILURE(expect_bytes(handles[i].get(), 1 << 20, 256 << 10,
                                         static_cast<uint8_t>(0xa0 + i)));
    // snap1 holds 0x11 at 0..2M; snap2 was taken after 0x22 went to 0..1M.
    ASSERT_NO_FATAL_FAILURE(expect_bytes(handles[i].get(), 0, 1 << 20, i % 2 ? 0x22 : 0x11));
  }
  handles.clear();
  for (auto& s : servers) EXPECT_EQ(s->stop(), 0);
  EXPECT_EQ(hashes(), before);
}

// --- Per-client overlays --------------------------------------------------

TEST_F(OverlayServing, HundredClientsWriteAtOnceAndEachReadsOnlyItsOwn) {
  ASSERT_NO_FATAL_FAILURE(make_chain());
  const auto before = hashes();
  ASSERT_TRUE(start({"--overlay=per-client", "-l", "snap1", "-x", "golden", "-f", "qcow2", base()}));
  constexpr int kClients = 100;
  std::vector<Nbd> handles(kClients);
  for (int i = 0; i < kClients; ++i) {
    handles[i] = connect("golden");
    ASSERT_TRUE(handles[i]) << i;
    EXPECT_EQ(nbd_can_multi_conn(handles[i].get()), 0);
  }
  std::vector<std::thread> writers;
  for (int t = 0; t < 4; ++t) {
    writers.emplace_back([&, t] {
      for (int i = t; i < kClients; i += 4) {
        std::vector<uint8_t> d(64 << 10, static_cast<uint8_t>(i + 1));
        EXPECT_EQ(nbd_pwrite(handles[i].get(), d.data(), d.size(), 512 << 10, 0), 0);
        EXPECT_EQ(nbd_pwrite(handles[i].get(), d.data(), 4096, 5 << 20, 0), 0);
      }
    });
  }
  for (auto& w : writers) w.join();
  for (int i = 0; i < kClients; ++i) {
    ASSERT_NO_FATAL_FAILURE(expect_bytes(handles[i].get(), 512 << 10, 64 << 10,
                                         static_cast<uint8_t>(i + 1)));
    ASSERT_NO_FATAL_FAILURE(expect_bytes(handles[i].get(), 5 << 20, 4096,
                                         static_cast<uint8_t>(i + 1)));
    ASSERT_NO_FATAL_FAILURE(expect_bytes(handles[i].get(), 0, 512 << 10, 0x11));
  }
  handles.clear();
  EXPECT_EQ(server_.stop(), 0);
  EXPECT_EQ(hashes(), before);
}

TEST_F(OverlayServing, ConnectionsOfOneSessionShareAnOverlayAndMultiConn) {
  ASSERT_NO_FATAL_FAILURE(make_chain());
  ASSERT_TRUE(start({"--overlay=per-client", "-x", "d", "-f", "qcow2", top()}));
  Nbd a = connect("d@vm1"), b = connect("d@vm1"), other = connect("d@vm2"),
      alone = connect("d");
  ASSERT_TRUE(a && b && other && alone);
  EXPECT_EQ(nbd_can_multi_conn(a.get()), 1);
  EXPECT_EQ(nbd_can_multi_conn(alone.get()), 0);
  ASSERT_NO_FATAL_FAILURE(write_bytes(a.get(), 0, 65536, 0xc1));
  ASSERT_EQ(nbd_flush(a.get(), 0), 0);
  ASSERT_NO_FATAL_FAILURE(expect_bytes(b.get(), 0, 65536, 0xc1));
  ASSERT_NO_FATAL_FAILURE(expect_bytes(other.get(), 0, 65536, 0x22));
  ASSERT_NO_FATAL_FAILURE(expect_bytes(alone.get(), 0, 65536, 0x22));
  // A session lives while one of its connections does.
  a.reset();
  ASSERT_NO_FATAL_FAILURE(expect_bytes(b.get(), 0, 65536, 0xc1));
  b.reset();
  std::this_thread::sleep_for(200ms);
  Nbd again = connect("d@vm1");
  ASSERT_TRUE(again);
  ASSERT_NO_FATAL_FAILURE(expect_bytes(again.get(), 0, 65536, 0x22));
  // Unknown names are still unknown.
  EXPECT_FALSE(nbd_try_connect_unix(socket(), [](nbd_handle* h) {
    nbd_set_export_name(h, "nosuch@vm1");
  }));
}

TEST_F(OverlayServing, PerClientOverlaysAreKeptOnDisconnect) {
  ASSERT_NO_FATAL_FAILURE(make_chain());
  fs::path keep = dir_ / "keep";
  fs::create_directory(keep);
  ASSERT_TRUE(start({"--overlay=per-client", "--temp-dir", dir_.path().string(),
                     "--keep-overlay", keep.string(), "-x", "d", "-f", "qcow2", top()}));
  {
    Nbd h = connect("d");
    ASSERT_TRUE(h);
    ASSERT_NO_FATAL_FAILURE(write_bytes(h.get(), 7 << 20, 65536, 0xd7));
    Nbd reader = connect("d");  // writes nothing: nothing to keep
    ASSERT_TRUE(reader);
  }
  ASSERT_TRUE(wait_until([&] { return !fs::is_empty(keep); }, 5s));
  std::this_thread::sleep_for(200ms);
  std::vector<fs::path> kept;
  for (auto& f : fs::directory_iterator(keep)) kept.push_back(f.path());
  ASSERT_EQ(kept.size(), 1u);
  run_expect({"qemu-img", "check", kept[0].string()});
  run_expect({"qemu-io", "-c", "read -P 0xd7 7M 64k", "-c", "read -P 0x44 3M 512k", "-c",
              "read -P 0x33 2M 1M", "-c", "read -P 0x22 0 1M", kept[0].string()});
}

// --- Copy-on-read -----------------------------------------------------------

TEST_F(OverlayServing, CopyOnReadMovesReadDataIntoTheTopAndKeepsContent) {
  ASSERT_NO_FATAL_FAILURE(make_chain());
  fs::path oracle = dir_ / "before.raw";
  run_expect({"qemu-img", "convert", "-O", "raw", top(), oracle.string()});
  ASSERT_TRUE(start({"--copy-on-read", "-A", "-f", "qcow2", top()}));
  const std::string depth_before = map("qemu:allocation-depth");
  EXPECT_NE(depth_before.find("backing depth 3"), std::string::npos) << depth_before;
  {
    Nbd h = connect();
    ASSERT_TRUE(h);
    // Reads from depth 3 (0..1M: 0x22), depth 2 (2M..3M) and a read that
    // is partly in the top (3M..3.5M) and partly nowhere (zeros).
    ASSERT_NO_FATAL_FAILURE(expect_bytes(h.get(), 100, 1000000, 0x22));
    ASSERT_NO_FATAL_FAILURE(expect_bytes(h.get(), 2 << 20, 1 << 20, 0x33));
    ASSERT_NO_FATAL_FAILURE(expect_bytes(h.get(), 3 << 20, 512 << 10, 0x44));
    ASSERT_NO_FATAL_FAILURE(expect_bytes(h.get(), 4 << 20, 1 << 20, 0));
  }
  // What was read now comes from the top; 1M..2M was not read.
  const std::string depth_after = map("qemu:allocation-depth");
  for (const char* line : {"         0     1048576    1  local",
                           "   1048576     1048576    3  backing depth 3",
                           "   2097152     1572864    1  local"})
    EXPECT_NE(depth_after.find(line), std::string::npos) << line << "\n" << depth_after;
  // A full read (qemu-img compare) copies the rest and sees the same bytes.
  RunResult cmp = run({"qemu-img", "compare", "-f", "raw", "-F", "raw", oracle.string(), uri()});
  EXPECT_EQ(cmp.exit_code, 0) << cmp.describe();
  const std::string depth_full = map("qemu:allocation-depth");
  EXPECT_NE(depth_full.find("         0     3670016    1  local"), std::string::npos) << depth_full;
  EXPECT_EQ(server_.stop(), 0);
  run_expect({"qemu-img", "check", top()});
  cmp = run({"qemu-img", "compare", "-f", "raw", "-F", "qcow2", oracle.string(), top()});
  EXPECT_EQ(cmp.exit_code, 0) << cmp.describe();
  // qemu sees every copied byte in the top image itself (depth 0).
  RunResult m = run_expect({"qemu-img", "map", "--output=json", top()});
  std::istringstream lines(m.out);
  for (std::string line; std::getline(lines, line);) {
    if (line.find("\"data\": true") != std::string::npos) {
      EXPECT_NE(line.find("\"depth\": 0"), std::string::npos) << line;
    }
  }
}

TEST_F(OverlayServing, CopyOnReadOfZeroDataTakesNoSpace) {
  run_expect({"qemu-img", "create", "-q", "-f", "qcow2", base(), "64M"});
  run_expect({"qemu-io", "-c", "write -P 0 0 32M", base()});  // zero bytes, as data
  run_expect({"qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top()});
  ASSERT_TRUE(start({"--copy-on-read", "-f", "qcow2", top()}));
  {
    Nbd h = connect();
    ASSERT_TRUE(h);
    ASSERT_NO_FATAL_FAILURE(expect_bytes(h.get(), 0, 32 << 20, 0));
  }
  EXPECT_EQ(server_.stop(), 0);
  run_expect({"qemu-img", "check", top()});
  EXPECT_LT(fs::file_size(top()), 1u << 20);
  RunResult m = run_expect({"qemu-img", "map", "--output=json", top()});
  EXPECT_NE(m.out.find("\"length\": 33554432, \"depth\": 0, \"present\": true, \"zero\": true"),
            std::string::npos) << m.out;
}

TEST_F(OverlayServing, CopyOnReadWithSnapshotModeCopiesIntoTheOverlay) {
  ASSERT_NO_FATAL_FAILURE(make_chain());
  const auto before = hashes();
  ASSERT_TRUE(start({"-s", "--copy-on-read", "-A", "-f", "qcow2", top()}));
  {
    Nbd h = connect();
    ASSERT_TRUE(h);
    ASSERT_NO_FATAL_FAILURE(expect_bytes(h.get(), 0, 1 << 20, 0x22));
  }
  const std::string depth = map("qemu:allocation-depth");
  EXPECT_NE(depth.find("         0     1048576    1  local"), std::string::npos) << depth;
  EXPECT_EQ(server_.stop(), 0);
  EXPECT_EQ(hashes(), before);
}

TEST_F(OverlayServing, CopyOnReadRacingWritesAlwaysWin) {
  ASSERT_NO_FATAL_FAILURE(make_chain());
  ASSERT_TRUE(start({"--copy-on-read", "-f", "qcow2", top()}));
  Nbd h = connect();
  ASSERT_TRUE(h);
  // Each round: a read of a cluster that lives below (copy-on-read) and a
  // write into the same cluster in flight together; once both are done
  // the cluster holds the write.
  for (int i = 0; i < 32; ++i) {
    uint64_t off = static_cast<uint64_t>(i) * 65536;  // 0..2M: below the top
    std::vector<uint8_t> rbuf(65536), wbuf(4096, static_cast<uint8_t>(0xe0 + (i & 15)));
    int64_t r = nbd_aio_pread(h.get(), rbuf.data(), rbuf.size(), off,
                              NBD_NULL_COMPLETION, 0);
    int64_t w = nbd_aio_pwrite(h.get(), wbuf.data(), wbuf.size(), off + 8192,
                               NBD_NULL_COMPLETION, 0);
    ASSERT_GT(r, 0);
    ASSERT_GT(w, 0);
    bool read_done = false, write_done = false;
    for (int polls = 0; !read_done || !write_done; ++polls) {
      ASSERT_LT(polls, 100) << "requests did not complete";
      if (!read_done) read_done = nbd_aio_command_completed(h.get(), r) != 0;
      if (!write_done) write_done = nbd_aio_command_completed(h.get(), w) != 0;
      if (!read_done || !write_done) {
        ASSERT_GE(nbd_poll(h.get(), 100), 0);
      }
    }
    ASSERT_NO_FATAL_FAILURE(expect_bytes(h.get(), off + 8192, 4096, wbuf[0]));
  }
  h.reset();
  EXPECT_EQ(server_.stop(), 0);
  run_expect({"qemu-img", "check", top()});
}

TEST_F(OverlayServing, CopyOnReadOnAReadOnlyExportIsRefused) {
  ASSERT_NO_FATAL_FAILURE(make_chain());
  RunResult r = run_server_binary({"--copy-on-read", "-r", "-k", socket().string(), top()});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--copy-on-read cannot be used with -r"), std::string::npos) << r.err;
  r = run_server_binary({"--copy-on-read", "-l", "snap1", "-k", socket().string(), base()});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("needs -s"), std::string::npos) << r.err;
}

// --- qemu:allocation-depth ---------------------------------------------------

TEST_F(OverlayServing, AllocationDepthMatchesQemuNbd) {
  ASSERT_NO_FATAL_FAILURE(make_chain());
  run_expect({"qemu-io", "-c", "write -z 6M 1M", top()});
  fs::path raw = dir_ / "plain.raw";
  create_sparse_image(raw, 4 << 20, {{1 << 20, 1 << 20}}, 3);
  // Backing images shorter than their overlays: 1M raw <- 1.5M <- 2M.
  fs::path s0 = dir_ / "s0.raw", s1 = dir_ / "s1.qcow2", s2 = dir_ / "s2.qcow2";
  create_pattern_image(s0, 1 << 20, 4);
  run_expect({"qemu-img", "create", "-q", "-f", "qcow2", "-b", "s0.raw", "-F", "raw",
              s1.string(), "1536K"});
  run_expect({"qemu-img", "create", "-q", "-f", "qcow2", "-b", "s1.qcow2", "-F", "qcow2",
              s2.string(), "2M"});
  for (std::vector<std::string> args :
       {std::vector<std::string>{"-f", "qcow2", top()}, {"-f", "raw", raw.string()},
        {"-f", "qcow2", s2.string()}}) {
    Server ours, theirs;
    fs::path qsock = dir_ / "q.sock";
    ASSERT_TRUE(start([&] { auto a = args; a.insert(a.begin(), {"-A", "-r"}); return a; }(),
                      ours, socket()));
    ServerOptions q;
    q.binary = "/usr/bin/qemu-nbd";
    q.args = {"-A", "-r", "-t", "-k", qsock.string()};
    q.args.insert(q.args.end(), args.begin(), args.end());
    q.unix_socket = qsock;
    q.log_file = dir_ / "qemu-nbd.log";
    ASSERT_TRUE(theirs.start(q)) << theirs.error();
    for (std::string ctx : {"qemu:allocation-depth", "base:allocation"}) {
      RunResult a = run({"nbdinfo", "--map=" + ctx, uri()});
      RunResult b = run({"nbdinfo", "--map=" + ctx, uri("", qsock)});
      EXPECT_EQ(a.out, b.out) << ctx << " of " << args.back();
    }
    ours.stop();
    theirs.stop();
  }
}

TEST_F(OverlayServing, AllocationDepthIsOfferedOnlyWithA) {
  ASSERT_NO_FATAL_FAILURE(make_chain());
  ASSERT_TRUE(start({"-f", "qcow2", top()}));
  Nbd h = connect();
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_can_meta_context(h.get(), "qemu:allocation-depth"), 0);
}

// --- Several exports -------------------------------------------------------

TEST_F(OverlayServing, ExportsFromTheCommandLineAndAConfigFileShareImages) {
  ASSERT_NO_FATAL_FAILURE(make_chain());
  fs::path config = dir_ / "exports.conf";
  {
    std::ofstream c(config);
    c << "# the golden image, one overlay per client\n"
         "[export]\nname = golden\nfile = " << base() << "\nsnapshot = snap1\n"
         "overlay = per-client\ndescription = golden snapshot\n";
  }
  const auto before = hashes();
  ASSERT_TRUE(start({"--export", "name=chain,file=" + top() + ",format=qcow2,description=whole chain",
                     "--export", "name=scratch,file=" + base() + ",overlay=temp,allocation-depth=on",
                     "--config", config.string()}));
  RunResult list = run({"nbdinfo", "--list", uri()});
  EXPECT_EQ(list.exit_code, 0) << list.describe();
  for (const char* s : {"export=\"chain\"", "export=\"scratch\"", "export=\"golden\"",
                        "description: whole chain", "description: golden snapshot"})
    EXPECT_NE(list.out.find(s), std::string::npos) << s << "\n" << list.out;
  Nbd chain = connect("chain"), scratch = connect("scratch"), golden = connect("golden");
  ASSERT_TRUE(chain && scratch && golden);
  ASSERT_NO_FATAL_FAILURE(write_bytes(chain.get(), 6 << 20, 4096, 0x61));
  ASSERT_NO_FATAL_FAILURE(expect_bytes(chain.get(), 6 << 20, 4096, 0x61));
  // scratch's overlay sits on base, which chain also reads (one Image).
  ASSERT_NO_FATAL_FAILURE(expect_bytes(scratch.get(), 0, 1 << 20, 0x22));
  ASSERT_NO_FATAL_FAILURE(write_bytes(scratch.get(), 6 << 20, 4096, 0x62));
  ASSERT_NO_FATAL_FAILURE(expect_bytes(chain.get(), 6 << 20, 4096, 0x61));
  ASSERT_NO_FATAL_FAILURE(expect_bytes(scratch.get(), 6 << 20, 4096, 0x62));
  ASSERT_NO_FATAL_FAILURE(expect_bytes(golden.get(), 0, 2 << 20, 0x11));
  EXPECT_EQ(nbd_can_meta_context(scratch.get(), "qemu:allocation-depth"), 1);
  EXPECT_EQ(nbd_can_meta_context(chain.get(), "qemu:allocation-depth"), 0);
  EXPECT_FALSE(nbd_try_connect_unix(socket(), [](nbd_handle* h) { nbd_set_export_name(h, "x"); }));
  chain.reset();
  scratch.reset();
  golden.reset();
  EXPECT_EQ(server_.stop(), 0);
  auto after = hashes();
  EXPECT_EQ(after[0], before[0]);
  EXPECT_EQ(after[1], before[1]);
  // An overlay over an image another export writes would see it change
  // under its feet: refused.
  RunResult r = run_server_binary({"-k", (dir_ / "x.sock").string(), "--export",
                                   "name=a,file=" + top() + ",format=qcow2", "--export",
                                   "name=b,file=" + top() + ",format=qcow2,overlay=temp"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("cannot also be the backing image of 'a throwaway overlay'"),
            std::string::npos) << r.err;
  run_expect({"qemu-io", "-c", "read -P 0x61 6M 4k", top()});
}

TEST_F(OverlayServing, BadExportKeysAndValuesAreNamed) {
  ASSERT_NO_FATAL_FAILURE(make_chain());
  struct Case {
    std::vector<std::string> args;
    std::string message;
  };
  fs::path config = dir_ / "bad.conf";
  {
    std::ofstream c(config);
    c << "[export]\nname = a\nfile = " << top() << "\ncolour = blue\n";
  }
  for (const Case& c : std::vector<Case>{
           {{"--export", "name=a,file=" + top() + ",overlay=sometimes"},
            "invalid value 'sometimes' for 'overlay'"},
           {{"--export", "name=a,fil=" + top()}, "unknown export key 'fil'"},
           {{"--export", "name=a"}, "export 'a': no file given"},
           {{"--export", "name=a,file=" + top(), "--export", "name=a,file=" + top()},
            "two exports are named 'a'"},
           {{"--export", "name=a,file=" + top() + ",read-only=maybe"},
            "invalid value 'maybe' for 'read-only'"},
           {{"--config", config.string()}, "bad.conf:4: unknown export key 'colour'"},
           {{"--export", "name=a,file=" + top(), top()}, "with --export or --config"},
           {{"--export", "name=a,file=" + base() + ",format=qcow2", "--export",
             "name=b,file=" + top() + ",format=qcow2"},
            "is served writable, so it cannot also be the backing image"},
       }) {
    std::vector<std::string> args = c.args;
    args.insert(args.begin(), {"-k", socket().string()});
    RunResult r = run_server_binary(args);
    EXPECT_EQ(r.exit_code, 1) << r.describe();
    EXPECT_NE(r.err.find(c.message), std::string::npos) << r.err;
  }
}

// An export replaced while a client is connected (SIGHUP re-reads
// --config) never changes what that client was told or what it reads;
// new clients get the new export, and a broken config changes nothing.
TEST_F(OverlayServing, ReplacedExportLeavesConnectedClientsOnTheOldOne) {
  fs::path one = dir_ / "one.raw", two = dir_ / "two.raw";
  create_pattern_image(one, 1 << 20, 1);
  create_pattern_image(two, 2 << 20, 2);
  fs::path config = dir_ / "exports.conf";
  auto write_config = [&](const std::string& text) {
    std::ofstream c(config, std::ios::trunc);
    c << text;
  };
  write_config("[export]\nname = disk\nfile = " + one.string() +
               "\nformat = raw\nread-only = on\n");
  ASSERT_TRUE(start({"--log=info", "--config", config.string()}));
  // Waits until the server has handled `n` reloads, good or bad.
  auto reloads_done = [&](size_t n) {
    auto count = [](const std::string& log, const std::string& what) {
      size_t c = 0;
      for (size_t at = 0; (at = log.find(what, at)) != std::string::npos; at += what.size()) ++c;
      return c;
    };
    return wait_until([&] {
      std::string log = server_.log();
      return count(log, ": reloaded ") + count(log, "keeping the exports as they were") >= n;
    }, 10s);
  };
  Nbd old_client = connect("disk");
  ASSERT_TRUE(old_client);
  EXPECT_EQ(nbd_get_size(old_client.get()), 1 << 20);

  write_config("[export]\nname = disk\nfile = " + two.string() +
               "\nformat = raw\n[export]\nname = extra\nfile = " + one.string() +
               "\nformat = raw\nread-only = on\n");
  server_.signal(SIGHUP);
  ASSERT_TRUE(reloads_done(1)) << server_.log();
  Nbd new_client = connect("disk");
  ASSERT_TRUE(new_client);
  EXPECT_EQ(nbd_get_size(new_client.get()), 2 << 20);
  EXPECT_EQ(nbd_is_read_only(new_client.get()), 0);
  std::vector<uint8_t> got(4096);
  ASSERT_EQ(nbd_pread(new_client.get(), got.data(), got.size(), 0, 0), 0);
  EXPECT_EQ(got, pattern(0, 4096, 2));
  // The old client still has the old export: its size, flags and data.
  EXPECT_EQ(nbd_get_size(old_client.get()), 1 << 20);
  EXPECT_EQ(nbd_is_read_only(old_client.get()), 1);
  ASSERT_EQ(nbd_pread(old_client.get(), got.data(), got.size(), 65536, 0), 0);
  EXPECT_EQ(got, pattern(65536, 4096, 1));

  // An unchanged export survives a reload whole: here a -s overlay.
  const std::string with_scratch =
      "[export]\nname = disk\nfile = " + two.string() + "\nformat = raw\n" +
      "[export]\nname = scratch\nfile = " + one.string() +
      "\nformat = raw\noverlay = temp\n";
  write_config(with_scratch);
  server_.signal(SIGHUP);
  ASSERT_TRUE(reloads_done(2)) << server_.log();
  {
    Nbd scratch = connect("scratch");
    ASSERT_TRUE(scratch);
    ASSERT_NO_FATAL_FAILURE(write_bytes(scratch.get(), 0, 4096, 0x5c));
  }
  write_config(with_scratch + "# touched\n");
  server_.signal(SIGHUP);
  ASSERT_TRUE(reloads_done(3)) << server_.log();
  EXPECT_NE(server_.log().find("2 exports, 0 opened anew"), std::string::npos) << server_.log();
  EXPECT_FALSE(nbd_try_connect_unix(socket(), [](nbd_handle* h) {
    nbd_set_export_name(h, "extra");  // gone from the file
  }));
  {
    Nbd scratch = connect("scratch");
    ASSERT_TRUE(scratch);
    ASSERT_NO_FATAL_FAILURE(expect_bytes(scratch.get(), 0, 4096, 0x5c));
  }

  // A config that does not open leaves everything as it was.
  write_config("[export]\nname = disk\nfile = " + (dir_ / "missing.raw").string() + "\n");
  server_.signal(SIGHUP);
  ASSERT_TRUE(reloads_done(4)) << server_.log();
  EXPECT_NE(server_.log().find("keeping the exports"), std::string::npos) << server_.log();
  Nbd after = connect("disk");
  ASSERT_TRUE(after);
  EXPECT_EQ(nbd_get_size(after.get()), 2 << 20);
}

// --- -v is qemu-nbd's -v ---------------------------------------------------

TEST_F(OverlayServing, VerboseLogsNothingOfItsOwnLikeQemuNbd) {
  ASSERT_NO_FATAL_FAILURE(make_chain());
  ASSERT_TRUE(start({"-v", "-f", "qcow2", top()}));
  {
    Nbd h = connect();
    ASSERT_TRUE(h);
    ASSERT_NO_FATAL_FAILURE(expect_bytes(h.get(), 3 << 20, 4096, 0x44));
  }
  EXPECT_EQ(server_.stop(), 0);
  EXPECT_EQ(server_.log(), "");
  Server logging;
  ASSERT_TRUE(start({"--log=info", "-f", "qcow2", top()}, logging, dir_ / "l.sock"));
  { Nbd h = connect("", dir_ / "l.sock"); }
  EXPECT_EQ(logging.stop(), 0);
  EXPECT_NE(logging.log().find("connected"), std::string::npos) << logging.log();
}

}  // namespace
}  // namespace layerd::test
