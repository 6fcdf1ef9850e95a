// Live chain operations end to end: layerd with a QMP socket, a client
// doing verified I/O the whole time (every read compared with a model of
// the disk that every acknowledged write updated), and qemu-img as the
// oracle for the files afterwards: live snapshots, stream, intermediate
// commit, active commit with pivot and with cancel, commit-and-empty, and
// the refusals.
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <random>
#include <thread>

#include <boost/json.hpp>

#include "server/layerctl/qmp_client.h"
#include "tests/server/harness.h"
#include "tests/server/qcow2_tools.h"

namespace layerd::test {
namespace {

namespace json = boost::json;
using ctl::QmpClient;
using qcow2e2e::run_expect;

constexpr uint64_t kDisk = 8 << 20;
constexpr uint32_t kBlock = 4096;

// One libnbd connection that writes and reads random 4 KiB-aligned ranges
// and checks every read against its model of the disk, on a thread of its
// own, until stopped.
class VerifiedClient {
 public:
  VerifiedClient(nbd_handle* h, uint32_t seed) : h_(h), rng_(seed) {
    model_.resize(kDisk);
    EXPECT_EQ(nbd_pread(h_, model_.data(), kDisk, 0, 0), 0) << nbd_error_text();
  }
  ~VerifiedClient() { stop(); }

  void start() {
    thread_ = std::thread([this] { loop(); });
  }
  // Stops the thread and returns the model.
  const std::vector<uint8_t>& stop() {
    running_ = false;
    if (thread_.joinable()) thread_.join();
    return model_;
  }
  uint64_t ops() const { return ops_.load(); }
  // Waits until at least `n` more operations completed.
  void wait_ops(uint64_t n) {
    uint64_t target = ops() + n;
    wait_until([&] { return ops() >= target || !failure_.empty(); }, 60s);
  }
  std::string failure() const { return failure_; }
  const std::vector<uint8_t>& model() const { return model_; }

 private:
  void loop() {
    std::vector<uint8_t> buf;
    while (running_ && failure_.empty()) {
      const uint64_t blocks = 1 + rng_() % 32;
      const uint64_t offset = (rng_() % (kDisk / kBlock - blocks)) * kBlock;
      const size_t len = blocks * kBlock;
      buf.resize(len);
      switch (rng_() % 4) {
        case 0: {  // write
          const uint8_t v = static_cast<uint8_t>(rng_());
          for (size_t i = 0; i < len; ++i) buf[i] = static_cast<uint8_t>(v + i / 512);
          if (nbd_pwrite(h_, buf.data(), len, offset, 0) != 0) {
            failure_ = "write failed: " + nbd_error_text();
            break;
          }
          std::copy(buf.begin(), buf.end(), model_.begin() + static_cast<ptrdiff_t>(offset));
          break;
        }
        case 1:
          if (rng_() % 4 == 0) {  // zero
            if (nbd_zero(h_, len, offset, 0) != 0) {
              failure_ = "zero failed: " + nbd_error_text();
              break;
            }
            std::fill_n(model_.begin() + static_cast<ptrdiff_t>(offset), len, 0);
            break;
          }
          [[fallthrough]];
        default: {  // read and verify
          if (nbd_pread(h_, buf.data(), len, offset, 0) != 0) {
            failure_ = "read failed: " + nbd_error_text();
            break;
          }
          int64_t d = first_difference(
              buf, std::span<const uint8_t>(model_.data() + offset, len));
          if (d >= 0)
            failure_ = "read at " + std::to_string(offset + static_cast<uint64_t>(d)) +
                       " returned " + std::to_string(buf[d]) + ", expected " +
                       std::to_string(model_[offset + d]);
        }
      }
      ops_.fetch_add(1);
    }
  }

  nbd_handle* h_;
  std::mt19937_64 rng_;
  std::vector<uint8_t> model_;
  std::atomic<bool> running_{true};
  std::atomic<uint64_t> ops_{0};
  std::string failure_;
  std::thread thread_;
};

class LiveJobs : public ::testing::Test {
 protected:
  void SetUp() override {
    if (server_is_qemu_nbd()) GTEST_SKIP() << "layerd's control socket";
  }
  void TearDown() override {
    qmp_.reset();
    if (server_.running()) server_.stop();
  }

  std::string path(const std::string& name) const { return (dir_.path() / name).string(); }

  // A qcow2 image `name` over `backing` (named as it is, next to it), of
  // its size unless `size` is given.
  void create_overlay(const std::string& name, const std::string& backing,
                      const std::string& size = "", const std::string& backing_format = "qcow2") {
    std::vector<std::string> cmd{"qemu-img", "create", "-q", "-f", "qcow2", "-b", backing,
                                 "-F", backing_format, path(name)};
    if (!size.empty()) cmd.push_back(size);
    run_expect(cmd);
  }

  // base (0x11 over 0..4M) <- mid (0x22 at 2M..3M, zeros at 3.5M..4M)
  // <- top (0x33 at 3M..3.5M), 8 MiB each.
  void make_chain() {
    run_expect({"qemu-img", "create", "-q", "-f", "qcow2", path("base.qcow2"), "8M"});
    run_expect({"qemu-io", "-c", "write -P 0x11 0 4M", path("base.qcow2")});
    create_overlay("mid.qcow2", "base.qcow2");
    run_expect({"qemu-io", "-c", "write -P 0x22 2M 1M", "-c", "write -z 3584k 512k",
                path("mid.qcow2")});
    create_overlay("top.qcow2", "mid.qcow2");
    run_expect({"qemu-io", "-c", "write -P 0x33 3M 512k", path("top.qcow2")});
  }

  void start_server(const std::string& file, std::vector<std::string> extra = {}) {
    ServerOptions o;
    o.args = {"-t", "-e", "0", "-f", "qcow2", "-x", "disk", "-k", socket().string(),
              "--qmp", qmp_socket().string()};
    o.args.insert(o.args.end(), extra.begin(), extra.end());
    if (file.empty()) {  // exports given by --export in `extra`
      o.args.erase(o.args.begin() + 5, o.args.begin() + 7);  // -x disk
    } else {
      o.args.push_back(file);
    }
    o.unix_socket = socket();
    o.log_file = dir_.path() / "server.log";
    ASSERT_TRUE(server_.start(o)) << server_.error();
    ASSERT_TRUE(wait_until([&] { return unix_socket_listening(qmp_socket()); }, 10s));
    qmp_ = std::make_unique<QmpClient>(qmp_socket().string());
  }

  fs::path socket() const { return dir_.path() / "nbd.sock"; }
  fs::path qmp_socket() const { return dir_.path() / "qmp.sock"; }

  Nbd connect() {
    return nbd_connect_to_unix(socket(), [](nbd_handle* h) { nbd_set_export_name(h, "disk"); });
  }

  json::value execute(const std::string& cmd, json::object args = {}) {
    return qmp_->execute(cmd, args);
  }
  // The QMP error text of `cmd`, failing the test if it succeeds.
  std::string refused(const std::string& cmd, json::object args) {
    try {
      qmp_->execute(cmd, args);
    } catch (const ctl::QmpError& e) {
      return e.desc;
    }
    ADD_FAILURE() << cmd << " " << json::serialize(args) << " was accepted";
    return {};
  }

  // Waits for event `name` of job `id`; returns its data.
  json::object wait_event(const std::string& name, const std::string& id = "disk",
                          Millis timeout = 60s) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      auto ev = qmp_->next_event(std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now()));
      if (!ev) break;
      events_.push_back(json::serialize(*ev));
      if ((*ev)["event"].as_string() != name) continue;
      json::object data = (*ev)["data"].as_object();
      const char* key = name == "JOB_STATUS_CHANGE" ? "id" : "device";
      if (data.contains(key) && data[key].as_string() == id) return data;
    }
    ADD_FAILURE() << "no " << name << " for " << id << "; events: " << ::testing::PrintToString(events_);
    return {};
  }

  // The guest view of `file` (its chain) as qemu-img reads it.
  std::vector<uint8_t> qemu_view(const std::string& file) {
    const std::string out = path("view.raw");
    run_expect({"qemu-img", "convert", "-U", "-O", "raw", file, out});
    auto data = read_file_range(out, 0, kDisk);
    fs::remove(out);
    return data;
  }

  // Waits for the job's BLOCK_JOB_COMPLETED and expects no error in it.
  json::object expect_completed(const std::string& id = "disk") {
    json::object done = wait_event("BLOCK_JOB_COMPLETED", id);
    EXPECT_FALSE(done.contains("error")) << json::serialize(done);
    return done;
  }

  // Lets the client do `more` operations, stops it and returns its model.
  std::vector<uint8_t> finish_client(VerifiedClient& client, uint64_t more) {
    client.wait_ops(more);
    std::vector<uint8_t> model = client.stop();
    EXPECT_EQ(client.failure(), "");
    return model;
  }

  // Disconnects `h` and the control client and stops the server cleanly.
  void stop_server(Nbd* h = nullptr) {
    if (h) h->reset();
    qmp_.reset();
    EXPECT_EQ(server_.stop(), 0) << server_.log();
  }

  void expect_clean(const std::string& file) {
    RunResult r = run({"qemu-img", "check", "-U", file});
    EXPECT_EQ(r.exit_code, 0) << file << ": " << r.out << r.err;
  }

  std::string backing_of(const std::string& file) {
    RunResult r = run_expect({"qemu-img", "info", "-U", "--output=json", file});
    json::object o = json::parse(r.out).as_object();
    return o.contains("backing-filename") ? std::string(o["backing-filename"].as_string()) : "";
  }

  TempDir dir_;
  Server server_;
  std::unique_ptr<QmpClient> qmp_;
  std::vector<std::string> events_;
};

TEST_F(LiveJobs, SnapshotsSwitchToNewOverlaysWithoutFailingARequest) {
  make_chain();
  ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
  Nbd h = connect();
  VerifiedClient client(h.get(), 1);
  client.start();
  for (const char* name : {"sn1.qcow2", "sn2.qcow2", "cur.qcow2"}) {
    client.wait_ops(200);
    execute("blockdev-snapshot-sync",
            {{"device", "disk"}, {"snapshot-file", path(name)}, {"format", "qcow2"}});
  }
  const auto model = finish_client(client, 300);
  // The chain: cur <- sn2 <- sn1 <- top <- mid <- base, as query-block says.
  json::value blocks = execute("query-block");
  json::object image = blocks.as_array()[0].as_object()["inserted"].as_object()["image"].as_object();
  std::vector<std::string> chain;
  for (json::object* i = &image;;) {
    chain.push_back(std::string(fs::path(std::string((*i)["filename"].as_string())).filename()));
    if (!i->contains("backing-image")) break;
    i = &(*i)["backing-image"].as_object();
  }
  EXPECT_EQ(chain, (std::vector<std::string>{"cur.qcow2", "sn2.qcow2", "sn1.qcow2",
                                             "top.qcow2", "mid.qcow2", "base.qcow2"}));
  stop_server(&h);
  for (const char* f : {"sn1.qcow2", "sn2.qcow2", "cur.qcow2", "top.qcow2"}) expect_clean(path(f));
  EXPECT_EQ(backing_of(path("cur.qcow2")), path("sn2.qcow2"));
  EXPECT_EQ(qemu_view(path("cur.qcow2")), model);
}

TEST_F(LiveJobs, StreamPullsTheChainIntoTheTopWhileClientsWrite) {
  make_chain();
  ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
  const auto before = qemu_view(path("top.qcow2"));
  Nbd h = connect();
  VerifiedClient client(h.get(), 2);
  client.start();
  client.wait_ops(100);
  // Slow enough that the client's I/O runs across the whole copy.
  execute("block-stream", {{"device", "disk"}, {"speed", 8 << 20}});
  json::value jobs = execute("query-block-jobs");
  ASSERT_EQ(jobs.as_array().size(), 1u);
  EXPECT_EQ(jobs.as_array()[0].as_object()["type"].as_string(), "stream");
  json::object done = expect_completed();
  EXPECT_EQ(done["offset"].to_number<uint64_t>(), kDisk);
  const auto model = finish_client(client, 100);
  stop_server(&h);
  expect_clean(path("top.qcow2"));
  EXPECT_EQ(backing_of(path("top.qcow2")), "");
  EXPECT_EQ(qemu_view(path("top.qcow2")), model);
  EXPECT_NE(before, model);  // the client did write
}

TEST_F(LiveJobs, StreamToABaseKeepsTheBaseBelow) {
  make_chain();
  ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
  Nbd h = connect();
  VerifiedClient client(h.get(), 3);
  client.start();
  execute("block-stream", {{"device", "disk"}, {"base", path("base.qcow2")}});
  json::object done = expect_completed();
  const auto model = finish_client(client, 200);
  stop_server(&h);
  expect_clean(path("top.qcow2"));
  EXPECT_EQ(backing_of(path("top.qcow2")), "base.qcow2");
  EXPECT_EQ(qemu_view(path("top.qcow2")), model);
}

TEST_F(LiveJobs, IntermediateCommitShortensTheChainWhileClientsWrite) {
  make_chain();
  const auto base_view = qemu_view(path("base.qcow2"));
  ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
  Nbd h = connect();
  VerifiedClient client(h.get(), 4);
  client.start();
  client.wait_ops(100);
  execute("block-commit", {{"device", "disk"}, {"top", path("mid.qcow2")},
                           {"base", path("base.qcow2")}, {"speed", 4 << 20}});
  json::object done = expect_completed();
  const auto model = finish_client(client, 200);
  json::value blocks = execute("query-block");
  EXPECT_EQ(blocks.as_array()[0].as_object()["inserted"].as_object()["backing_file_depth"].to_number<uint64_t>(), 1u);
  stop_server(&h);
  for (const char* f : {"top.qcow2", "base.qcow2"}) expect_clean(path(f));
  EXPECT_EQ(backing_of(path("top.qcow2")), "base.qcow2");
  EXPECT_EQ(qemu_view(path("top.qcow2")), model);
  // The base now holds what mid held: 0x22 at 2M..3M, zeros at 3.5M..4M.
  auto base_after = qemu_view(path("base.qcow2"));
  EXPECT_EQ(base_after[2 << 20], 0x22);
  EXPECT_EQ(base_after[(3 << 20) + (600 << 10)], 0);
  EXPECT_EQ(base_after[0], base_view[0]);
}

// Seed 004's picture, at the chain's granularity: the guest view before,
// after phase one (base == guest view), after a write E, and after the
// pivot (the export reads the base alone).
TEST_F(LiveJobs, ActiveCommitMirrorsWritesAndPivotsToTheBase) {
  make_chain();
  ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
  Nbd h = connect();
  VerifiedClient client(h.get(), 5);
  client.start();
  client.wait_ops(100);
  execute("block-commit", {{"device", "disk"}, {"base", path("base.qcow2")}});
  wait_event("BLOCK_JOB_READY");
  // In sync: every write from now on reaches the base too.
  client.wait_ops(300);
  json::value jobs = execute("query-block-jobs");
  EXPECT_TRUE(jobs.as_array()[0].as_object()["ready"].as_bool());
  execute("block-job-complete", {{"device", "disk"}});
  json::object done = expect_completed();
  const auto model = finish_client(client, 200);
  json::value blocks = execute("query-block");
  json::object inserted = blocks.as_array()[0].as_object()["inserted"].as_object();
  EXPECT_EQ(inserted["file"].as_string(), path("base.qcow2"));
  EXPECT_EQ(inserted["backing_file_depth"].to_number<uint64_t>(), 0u);
  stop_server(&h);
  expect_clean(path("base.qcow2"));
  EXPECT_EQ(qemu_view(path("base.qcow2")), model);
}

// A copy slower than the client's writes (a speed limit here; on a fast
// machine, writes outpacing an unthrottled copy) never leaves less dirty
// behind: the job turns to sync mode early, so that client writes reach
// the base too, and then gets ready and pivots with every byte right.
TEST_F(LiveJobs, AnActiveCommitSlowerThanTheWritesStillGetsReady) {
  make_chain();
  ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
  Nbd h = connect();
  VerifiedClient client(h.get(), 12);
  client.start();
  client.wait_ops(100);
  execute("block-commit", {{"device", "disk"}, {"base", path("base.qcow2")}, {"speed", 8 << 20}});
  wait_event("BLOCK_JOB_READY", "disk", 120s);
  client.wait_ops(300);
  execute("block-job-complete", {{"device", "disk"}});
  expect_completed();
  const auto model = finish_client(client, 200);
  stop_server(&h);
  expect_clean(path("base.qcow2"));
  EXPECT_EQ(qemu_view(path("base.qcow2")), model);
}

TEST_F(LiveJobs, CancellingAReadyActiveCommitKeepsTheChain) {
  make_chain();
  ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
  Nbd h = connect();
  VerifiedClient client(h.get(), 6);
  client.start();
  execute("block-commit", {{"device", "disk"}});
  wait_event("BLOCK_JOB_READY");
  client.wait_ops(200);
  execute("block-job-cancel", {{"device", "disk"}});
  // Without force, a ready job ends as completed, without the pivot.
  json::object done = expect_completed();
  const auto model = finish_client(client, 200);
  json::value blocks = execute("query-block");
  EXPECT_EQ(blocks.as_array()[0].as_object()["inserted"].as_object()["file"].as_string(),
            path("top.qcow2"));
  stop_server(&h);
  for (const char* f : {"top.qcow2", "mid.qcow2", "base.qcow2"}) expect_clean(path(f));
  EXPECT_EQ(qemu_view(path("top.qcow2")), model);
}

TEST_F(LiveJobs, CommitAndEmptyKeepsTheTopActiveAndEmpty) {
  make_chain();
  ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
  Nbd h = connect();
  VerifiedClient client(h.get(), 7);
  client.start();
  client.wait_ops(200);
  execute("block-commit", {{"device", "disk"}, {"empty", true}});
  wait_event("BLOCK_JOB_READY");
  client.wait_ops(200);
  execute("block-job-complete", {{"device", "disk"}});
  json::object done = expect_completed();
  // The top is still the active image, now directly over the base.
  json::value blocks = execute("query-block");
  json::object inserted = blocks.as_array()[0].as_object()["inserted"].as_object();
  EXPECT_EQ(inserted["file"].as_string(), path("top.qcow2"));
  EXPECT_EQ(inserted["backing_file_depth"].to_number<uint64_t>(), 1u);
  const auto model = finish_client(client, 200);
  stop_server(&h);
  for (const char* f : {"top.qcow2", "base.qcow2"}) expect_clean(path(f));
  EXPECT_EQ(backing_of(path("top.qcow2")), "base.qcow2");
  EXPECT_EQ(qemu_view(path("top.qcow2")), model);
}

TEST_F(LiveJobs, AJobOutlivesTheControlClientThatStartedIt) {
  make_chain();
  ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
  execute("block-stream", {{"device", "disk"}, {"speed", 4 << 20}});
  qmp_.reset();  // gone mid-job
  qmp_ = std::make_unique<QmpClient>(qmp_socket().string());
  json::value jobs = execute("query-block-jobs");
  ASSERT_EQ(jobs.as_array().size(), 1u);
  json::object done = expect_completed();
}

TEST_F(LiveJobs, CommitGrowsASmallerBaseAndReopensItReadOnlyAfter) {
  // base is 4 MiB under 8 MiB images; mid writes past its end.
  run_expect({"qemu-img", "create", "-q", "-f", "qcow2", path("base.qcow2"), "4M"});
  run_expect({"qemu-io", "-c", "write -P 0x11 0 4M", path("base.qcow2")});
  create_overlay("mid.qcow2", "base.qcow2", "8M");
  run_expect({"qemu-io", "-c", "write -P 0x22 3M 3M", path("mid.qcow2")});
  create_overlay("top.qcow2", "mid.qcow2", "8M");
  ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
  Nbd h = connect();
  VerifiedClient client(h.get(), 8);
  client.start();
  auto base_ro = [&] {
    json::object img = execute("query-block").as_array()[0].as_object()["inserted"]
                           .as_object()["image"].as_object();
    while (img.contains("backing-image")) img = img["backing-image"].as_object();
    return img["ro"].as_bool();
  };
  EXPECT_TRUE(base_ro());
  execute("block-commit", {{"device", "disk"}, {"top", path("mid.qcow2")}, {"speed", 2 << 20}});
  EXPECT_FALSE(base_ro());  // written in place while the job runs
  json::object done = expect_completed();
  EXPECT_TRUE(base_ro());
  const auto model = finish_client(client, 200);
  stop_server(&h);
  RunResult info = run_expect({"qemu-img", "info", "-U", "--output=json", path("base.qcow2")});
  EXPECT_EQ(json::parse(info.out).as_object()["virtual-size"].to_number<uint64_t>(), kDisk);
  expect_clean(path("base.qcow2"));
  EXPECT_EQ(qemu_view(path("top.qcow2")), model);
}

// A raw base grows by truncation (its new area reads zeros, as the chain
// read past its end), and the commit into it works as into qcow2.
TEST_F(LiveJobs, CommitIntoARawBaseGrowsItAndShortensTheChain) {
  run_expect({"qemu-img", "create", "-q", "-f", "raw", path("base.raw"), "4M"});
  run_expect({"qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4M", path("base.raw")});
  create_overlay("mid.qcow2", "base.raw", "8M", "raw");
  run_expect({"qemu-io", "-c", "write -P 0x22 3M 2M", "-c", "write -z 1M 64k", path("mid.qcow2")});
  create_overlay("top.qcow2", "mid.qcow2", "8M");
  ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
  Nbd h = connect();
  VerifiedClient client(h.get(), 10);
  client.start();
  client.wait_ops(100);
  execute("block-commit", {{"device", "disk"}, {"top", path("mid.qcow2")}, {"speed", 4 << 20}});
  expect_completed();
  const auto model = finish_client(client, 200);
  stop_server(&h);
  EXPECT_EQ(fs::file_size(path("base.raw")), kDisk);
  EXPECT_EQ(backing_of(path("top.qcow2")), "base.raw");
  expect_clean(path("top.qcow2"));
  EXPECT_EQ(qemu_view(path("top.qcow2")), model);
  auto base = read_file_range(path("base.raw"), 0, kDisk);
  EXPECT_EQ(base[0], 0x11);
  EXPECT_EQ(base[(1 << 20) + 100], 0);  // mid's zero write
  EXPECT_EQ(base[(4 << 20) + 100], 0x22);
  EXPECT_EQ(base[(6 << 20) + 100], 0);  // past the old end: zeros, as before
}

// A base smaller than its own backing file grows with its new area zero,
// so that the backing file's data there never shows through (what the
// chain read past the base's end was zeros).
TEST_F(LiveJobs, CommitIntoABaseOverALongerBackingFileKeepsZerosPastItsOldEnd) {
  run_expect({"qemu-img", "create", "-q", "-f", "qcow2", path("back.qcow2"), "8M"});
  run_expect({"qemu-io", "-c", "write -P 0x44 0 8M", path("back.qcow2")});
  create_overlay("base.qcow2", "back.qcow2", "4M");
  run_expect({"qemu-io", "-c", "write -P 0x11 0 1M", path("base.qcow2")});
  create_overlay("mid.qcow2", "base.qcow2", "8M");
  run_expect({"qemu-io", "-c", "write -P 0x22 3M 2M", path("mid.qcow2")});
  create_overlay("top.qcow2", "mid.qcow2", "8M");
  const auto before = qemu_view(path("top.qcow2"));
  ASSERT_EQ(before[(6 << 20) + 100], 0);
  ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
  Nbd h = connect();
  VerifiedClient client(h.get(), 11);
  client.start();
  client.wait_ops(100);
  execute("block-commit", {{"device", "disk"}, {"top", path("mid.qcow2")},
                           {"base", path("base.qcow2")}, {"speed", 4 << 20}});
  expect_completed();
  const auto model = finish_client(client, 200);
  stop_server(&h);
  for (const char* f : {"top.qcow2", "base.qcow2", "back.qcow2"}) expect_clean(path(f));
  EXPECT_EQ(backing_of(path("top.qcow2")), "base.qcow2");
  EXPECT_EQ(qemu_view(path("top.qcow2")), model);
  auto base = qemu_view(path("base.qcow2"));  // through back.qcow2
  EXPECT_EQ(base[100], 0x11);
  EXPECT_EQ(base[(2 << 20) + 100], 0x44);
  EXPECT_EQ(base[(4 << 20) + 100], 0x22);
  EXPECT_EQ(base[(6 << 20) + 100], 0);
  EXPECT_EQ(base[kDisk - 1], 0);
}

TEST_F(LiveJobs, StreamTurnsZeroDataIntoZeroClusters) {
  make_chain();
  run_expect({"qemu-io", "-c", "write -P 0 5M 1M", path("mid.qcow2")});  // zeros as data
  ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
  execute("block-stream", {{"device", "disk"}});
  json::object done = expect_completed();
  stop_server();
  RunResult map = run_expect({"qemu-img", "map", "-U", "--output=json", path("top.qcow2")});
  bool zero_at_5m = false;
  const json::value extents = json::parse(map.out);
  for (const auto& e : extents.as_array()) {
    const json::object& o = e.as_object();
    const uint64_t start = o.at("start").to_number<uint64_t>();
    const uint64_t len = o.at("length").to_number<uint64_t>();
    if (start <= (5u << 20) && (5u << 20) < start + len)
      zero_at_5m = o.at("zero").as_bool() && !o.at("data").as_bool();
  }
  EXPECT_TRUE(zero_at_5m) << map.out;
  expect_clean(path("top.qcow2"));
}

TEST_F(LiveJobs, CommitAndEmptyGivesTheTopsSpaceBack) {
  make_chain();
  run_expect({"qemu-io", "-c", "write -P 0x44 0 6M", path("top.qcow2")});
  const uint64_t before = allocated_bytes(path("top.qcow2"));
  ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
  execute("block-commit", {{"device", "disk"}, {"empty", true}});
  wait_event("BLOCK_JOB_READY");
  execute("block-job-complete", {{"device", "disk"}});
  json::object done = expect_completed();
  const uint64_t after = allocated_bytes(path("top.qcow2"));
  EXPECT_LT(after, before / 8) << before << " -> " << after;
  stop_server();
  RunResult map = run_expect({"qemu-img", "map", "-U", "--output=json", path("top.qcow2")});
  EXPECT_EQ(map.out.find("\"depth\": 0"), std::string::npos) << map.out;
  expect_clean(path("top.qcow2"));
}

// Seed 004's picture, one letter per 64 KiB cluster ('-' reads as zeros):
//   base: AAAA--------   sn1: --BBBB------   sn2: -----CCCC---
//   cur:  D-------DD--   guest sees DABBBCCCDD--
class SeedPicture : public LiveJobs {
 protected:
  static constexpr uint64_t kUnit = 64 << 10;
  static constexpr size_t kUnits = 12;

  void make_picture() {
    auto fill = [&](const std::string& file, const std::string& row) {
      std::vector<std::string> argv{"qemu-io"};
      for (size_t i = 0; i < row.size(); ++i)
        if (row[i] != '-')
          argv.insert(argv.end(), {"-c", fmt("write -P 0x%x %llu 64k", row[i],
                                             static_cast<unsigned long long>(i * kUnit))});
      argv.push_back(file);
      run_expect(argv);
    };
    run_expect({"qemu-img", "create", "-q", "-f", "qcow2", path("base.qcow2"), "768k"});
    fill(path("base.qcow2"), "AAAA--------");
    const char* chain[][2] = {{"sn1.qcow2", "base.qcow2"}, {"sn2.qcow2", "sn1.qcow2"},
                              {"cur.qcow2", "sn2.qcow2"}};
    for (auto& [file, backing] : chain)
      run_expect({"qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2",
                  path(file)});
    fill(path("sn1.qcow2"), "--BBBB------");
    fill(path("sn2.qcow2"), "-----CCCC---");
    fill(path("cur.qcow2"), "D-------DD--");
  }

  static std::string fmt(const char* f, int a, unsigned long long b) {
    char buf[128];
    std::snprintf(buf, sizeof buf, f, a, b);
    return buf;
  }

  // One letter per unit of `data`: the unit's first byte, '-' for zero;
  // '?' if the unit is not uniform.
  static std::string letters(const std::vector<uint8_t>& data) {
    std::string out;
    for (size_t u = 0; u * kUnit < data.size(); ++u) {
      uint8_t c = data[u * kUnit];
      for (size_t i = 0; i < kUnit; ++i)
        if (data[u * kUnit + i] != c) c = '?';
      out.push_back(c == 0 ? '-' : static_cast<char>(c));
    }
    return out;
  }

  std::string view_of(const std::string& file) {
    const std::string out = path("view.raw");
    run_expect({"qemu-img", "convert", "-U", "-O", "raw", file, out});
    auto data = read_file_range(out, 0, kUnits * kUnit);
    fs::remove(out);
    return letters(data);
  }

  std::string guest_view(nbd_handle* h) {
    std::vector<uint8_t> data(kUnits * kUnit);
    EXPECT_EQ(nbd_pread(h, data.data(), data.size(), 0, 0), 0) << nbd_error_text();
    return letters(data);
  }

  void write_e(nbd_handle* h, size_t unit) {
    std::vector<uint8_t> e(kUnit, 'E');
    ASSERT_EQ(nbd_pwrite(h, e.data(), e.size(), unit * kUnit, 0), 0) << nbd_error_text();
  }
};

TEST_F(SeedPicture, PhaseOneMakesTheBaseTheGuestViewAndInvalidatesTheSnapshots) {
  make_picture();
  ASSERT_NO_FATAL_FAILURE(start_server(path("cur.qcow2")));
  Nbd h = connect();
  EXPECT_EQ(guest_view(h.get()), "DABBBCCCDD--");
  execute("block-commit", {{"device", "disk"}, {"base", path("base.qcow2")}});
  wait_event("BLOCK_JOB_READY");
  EXPECT_EQ(guest_view(h.get()), "DABBBCCCDD--");
  // Cancelled without force once ready: completed, no pivot; the base is
  // written back and shows the guest's view on its own.
  execute("block-job-cancel", {{"device", "disk"}});
  wait_event("BLOCK_JOB_COMPLETED");
  EXPECT_EQ(guest_view(h.get()), "DABBBCCCDD--");
  stop_server(&h);
  EXPECT_EQ(view_of(path("base.qcow2")), "DABBBCCCDD--");
  EXPECT_EQ(view_of(path("sn1.qcow2")), "DABBBBCCDD--");
  EXPECT_EQ(view_of(path("sn2.qcow2")), "DABBBCCCCD--");
  EXPECT_EQ(view_of(path("cur.qcow2")), "DABBBCCCDD--");
  for (const char* f : {"base.qcow2", "sn1.qcow2", "sn2.qcow2", "cur.qcow2"}) expect_clean(path(f));
}

TEST_F(SeedPicture, AWriteInSyncReachesTheBaseAndThePivotServesTheBase) {
  make_picture();
  ASSERT_NO_FATAL_FAILURE(start_server(path("cur.qcow2")));
  Nbd h = connect();
  execute("block-commit", {{"device", "disk"}});
  wait_event("BLOCK_JOB_READY");
  // Modification E, half of it in sync (into cur and the base both), half
  // after the pivot (into the base alone).
  ASSERT_NO_FATAL_FAILURE(write_e(h.get(), 10));
  EXPECT_EQ(guest_view(h.get()), "DABBBCCCDDE-");
  execute("block-job-complete", {{"device", "disk"}});
  wait_event("BLOCK_JOB_COMPLETED");
  EXPECT_EQ(guest_view(h.get()), "DABBBCCCDDE-");
  ASSERT_NO_FATAL_FAILURE(write_e(h.get(), 0));
  EXPECT_EQ(guest_view(h.get()), "EABBBCCCDDE-");
  stop_server(&h);
  EXPECT_EQ(view_of(path("base.qcow2")), "EABBBCCCDDE-");
  // The seed's picture of the images left behind: all invalidated.
  EXPECT_EQ(view_of(path("sn1.qcow2")), "EABBBBCCDDE-");
  EXPECT_EQ(view_of(path("sn2.qcow2")), "EABBBCCCCDE-");
  EXPECT_EQ(view_of(path("cur.qcow2")), "DABBBCCCDDE-");
  for (const char* f : {"base.qcow2", "cur.qcow2"}) expect_clean(path(f));
}

TEST_F(LiveJobs, RefusesWhatCannotBeDone) {
  make_chain();
  ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
  EXPECT_NE(refused("block-commit", {{"device", "disk"}, {"top", path("base.qcow2")},
                                     {"base", path("base.qcow2")}}), "");
  EXPECT_NE(refused("block-commit", {{"device", "disk"}, {"top", path("nothere.qcow2")}})
                .find("not found"), std::string::npos);
  EXPECT_NE(refused("block-stream", {{"device", "disk"}, {"base", path("nothere.qcow2")}}), "");
  EXPECT_NE(refused("block-commit", {{"device", "nosuch"}}).find("not found"), std::string::npos);
  EXPECT_NE(refused("block-commit", {{"device", "disk"}, {"top", path("base.qcow2")},
                                     {"base", path("mid.qcow2")}}), "");
  EXPECT_NE(refused("block-job-cancel", {{"device", "nojob"}}), "");
  EXPECT_NE(refused("block-commit", {{"device", "disk"}, {"depth-first", true}})
                .find("'depth-first' needs an intermediate commit"), std::string::npos);
  // One job per chain.
  execute("block-stream", {{"device", "disk"}, {"speed", 1 << 20}});
  EXPECT_NE(refused("block-commit", {{"device", "disk"}, {"top", path("mid.qcow2")}})
                .find("busy"), std::string::npos);
  EXPECT_NE(refused("blockdev-snapshot-sync", {{"device", "disk"},
                                               {"snapshot-file", path("s.qcow2")}}), "");
  EXPECT_NE(refused("block-job-complete", {{"device", "disk"}}), "");
  execute("block-job-cancel", {{"device", "disk"}, {"force", true}});
  wait_event("BLOCK_JOB_CANCELLED");
  // The chain is as it was.
  json::value blocks = execute("query-block");
  EXPECT_EQ(blocks.as_array()[0].as_object()["inserted"].as_object()["backing_file_depth"].to_number<uint64_t>(), 2u);
}

TEST_F(LiveJobs, RefusesDuplicateJobIdsSharedTopsRawPivotsAndSubclusterStreams) {
  make_chain();
  run_expect({"qemu-img", "create", "-q", "-f", "qcow2", path("other.qcow2"), "8M"});
  run_expect({"qemu-img", "create", "-q", "-f", "raw", path("base.raw"), "8M"});
  create_overlay("overraw.qcow2", "base.raw", "", "raw");
  run_expect({"qemu-img", "create", "-q", "-f", "qcow2", path("extbase.qcow2"), "8M"});
  run_expect({"qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b",
              "extbase.qcow2", "-F", "qcow2", path("ext.qcow2")});
  auto exp = [&](const std::string& name, const std::string& file, const std::string& more = "") {
    return "name=" + name + ",file=" + path(file) + ",format=qcow2" + more;
  };
  ASSERT_NO_FATAL_FAILURE(start_server(
      "", {"--export", exp("disk", "top.qcow2"), "--export", exp("other", "other.qcow2"),
           "--export", exp("other-ro", "other.qcow2", ",read-only=on"), "--export",
           exp("raw", "overraw.qcow2"), "--export", exp("ext", "ext.qcow2")}));
  // A job id names one job, whichever export it runs on.
  execute("block-stream", {{"device", "disk"}, {"job-id", "j"}, {"speed", 1 << 20}});
  EXPECT_NE(refused("block-commit", {{"device", "raw"}, {"job-id", "j"}, {"empty", true}})
                .find("Job ID 'j' already in use"), std::string::npos);
  // A top another export serves cannot become a backing image.
  EXPECT_NE(refused("blockdev-snapshot-sync",
                    {{"device", "other"}, {"snapshot-file", path("s.qcow2")}})
                .find("export 'other-ro'"), std::string::npos);
  EXPECT_FALSE(fs::exists(path("s.qcow2")));
  // A pivot needs a qcow2 base; a stream needs whole clusters.
  EXPECT_NE(refused("block-commit", {{"device", "raw"}}).find("raw image"), std::string::npos);
  EXPECT_NE(refused("block-stream", {{"device", "ext"}}).find("subclusters"), std::string::npos);
  execute("block-job-cancel", {{"device", "j"}, {"force", true}});
  wait_event("BLOCK_JOB_CANCELLED", "j");
}

// While a job runs, no new export may use an image the job changes or
// drops: writes to it would not be mirrored (and an emptied top would lose
// them), and what it serves would change under its clients. Images the job
// leaves alone (a stream's base) may be exported.
TEST_F(LiveJobs, NoNewExportUsesAnImageARunningJobChanges) {
  make_chain();
  ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
  Nbd h = connect();
  VerifiedClient client(h.get(), 8);
  client.start();
  auto export_args = [&](const std::string& id, const std::string& file, bool writable) {
    return json::object{{"type", "nbd"}, {"id", id}, {"node-name", path(file)},
                        {"writable", writable}};
  };
  // A stream changes the top and drops mid; its base stays as it is.
  execute("block-stream", {{"device", "disk"}, {"base", path("base.qcow2")}, {"speed", 64 << 10}});
  EXPECT_NE(refused("block-export-add", export_args("x", "mid.qcow2", false))
                .find("is busy: block device is in use by block job: stream"), std::string::npos);
  execute("block-export-add", export_args("golden", "base.qcow2", false));
  execute("block-job-cancel", {{"device", "disk"}, {"force", true}});
  wait_event("BLOCK_JOB_CANCELLED");
  {
    Nbd golden = nbd_connect_to_unix(socket(), [](nbd_handle* g) { nbd_set_export_name(g, "golden"); });
    ASSERT_TRUE(golden);
  }
  ASSERT_TRUE(wait_until([&] {  // once the server has seen the client go
    try {
      execute("block-export-del", {{"id", "golden"}});
      return true;
    } catch (const ctl::QmpError&) {
      return false;
    }
  }, 10s));
  // A commit writes its base and empties (or drops) the images above it:
  // none of them may be exported until it is over.
  execute("block-commit", {{"device", "disk"}, {"base", path("base.qcow2")}, {"empty", true}});
  wait_event("BLOCK_JOB_READY");
  for (const char* f : {"top.qcow2", "mid.qcow2", "base.qcow2"})
    for (bool writable : {true, false})
      EXPECT_NE(refused("block-export-add", export_args("x", f, writable)), "") << f;
  EXPECT_NE(refused("block-export-add", export_args("x", "base.qcow2", false))
                .find("is busy: block device is in use by block job: commit"), std::string::npos);
  EXPECT_EQ(execute("query-block-exports").as_array().size(), 1u);
  execute("block-job-complete", {{"device", "disk"}});
  expect_completed();
  const auto model = finish_client(client, 200);
  stop_server(&h);
  for (const char* f : {"top.qcow2", "base.qcow2"}) expect_clean(path(f));
  EXPECT_EQ(qemu_view(path("top.qcow2")), model);
}

// A --config reload (SIGHUP) leaves an export with a running job alone,
// and adds no export of an image the job changes: it keeps every export
// as it was and says why, and the job goes on to the end.
TEST_F(LiveJobs, ConfigReloadWaitsForTheJobsOfTheExportsItWouldChange) {
  make_chain();
  const fs::path config = dir_.path() / "exports.conf";
  auto write_config = [&](const std::string& extra) {
    std::ofstream c(config, std::ios::trunc);
    c << "[export]\nname = disk\nfile = " << path("top.qcow2") << "\nformat = qcow2\n" << extra;
  };
  write_config("");
  ASSERT_NO_FATAL_FAILURE(start_server("", {"--log=info", "--config", config.string()}));
  auto refusals_logged = [&](size_t n) {
    return wait_until([&] {
      const std::string log = server_.log();
      size_t c = 0;
      for (size_t at = 0; (at = log.find("keeping the exports as they were", at)) != std::string::npos; ++at) ++c;
      return c >= n;
    }, 10s);
  };
  Nbd h = connect();
  VerifiedClient client(h.get(), 9);
  client.start();
  execute("block-commit", {{"device", "disk"}});
  wait_event("BLOCK_JOB_READY");
  write_config("read-only = on\n");  // changes the export the job runs on
  server_.signal(SIGHUP);
  ASSERT_TRUE(refusals_logged(1)) << server_.log();
  EXPECT_NE(server_.log().find("export 'disk' has a block job running"), std::string::npos)
      << server_.log();
  write_config("[export]\nname = more\nfile = " + path("base.qcow2") + "\nformat = qcow2\nread-only = on\n");
  server_.signal(SIGHUP);
  ASSERT_TRUE(refusals_logged(2)) << server_.log();
  EXPECT_NE(server_.log().find("is busy: block device is in use by block job: commit"),
            std::string::npos) << server_.log();
  EXPECT_FALSE(nbd_try_connect_unix(socket(), [](nbd_handle* m) { nbd_set_export_name(m, "more"); }));
  EXPECT_EQ(execute("query-block-jobs").as_array().size(), 1u);
  execute("block-job-complete", {{"device", "disk"}});
  expect_completed();
  const auto model = finish_client(client, 200);
  stop_server(&h);
  expect_clean(path("base.qcow2"));
  EXPECT_EQ(qemu_view(path("base.qcow2")), model);
}

TEST_F(LiveJobs, RefusesJobsOnReadOnlyExports) {
  make_chain();
  ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2"), {"-r"}));
  EXPECT_NE(refused("block-stream", {{"device", "disk"}}).find("read-only"), std::string::npos);
  EXPECT_NE(refused("blockdev-snapshot-sync",
                    {{"device", "disk"}, {"snapshot-file", path("s.qcow2")}})
                .find("read-only"), std::string::npos);
}

TEST_F(LiveJobs, PauseResumeAndSpeedShowInQueryBlockJobs) {
  make_chain();
  ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
  execute("block-stream", {{"device", "disk"}, {"speed", 1 << 20}});
  execute("block-job-pause", {{"device", "disk"}});
  // Paused once it reaches its next pause point.
  json::object job;
  ASSERT_TRUE(wait_until([&] {
    job = execute("query-block-jobs").as_array()[0].as_object();
    return job["status"].as_string() == "paused";
  }, 10s));
  EXPECT_TRUE(job["paused"].as_bool());
  EXPECT_EQ(job["status"].as_string(), "paused");
  const uint64_t at = job["offset"].to_number<uint64_t>();
  std::this_thread::sleep_for(500ms);
  EXPECT_EQ(execute("query-block-jobs").as_array()[0].as_object()["offset"].to_number<uint64_t>(), at);
  execute("block-job-set-speed", {{"device", "disk"}, {"speed", 0}});
  execute("block-job-resume", {{"device", "disk"}});
  json::object done = wait_event("BLOCK_JOB_COMPLETED");
  EXPECT_FALSE(done.contains("error"));
  EXPECT_EQ(done["speed"].to_number<uint64_t>(), 0u);
}


// --- Depth-first commit (seed 002) --------------------------------------------

class DepthFirstCommit : public LiveJobs {
 protected:
  // base (0x11 over 0..4M) <- a (0x22 at 1M..3M, zeros at 3.5M..4M)
  // <- b (0x33 at 2M..3.5M) <- top (0x44 at 3M..3.25M), 8 MiB each: the
  // allocation cases of seed 002. What a holds alone (1M..2M, the zeros)
  // and all that b holds are copied: 3 MiB.
  static constexpr uint64_t kToCopy = 3 << 20;
  void make_chain4() {
    run_expect({"qemu-img", "create", "-q", "-f", "qcow2", path("base.qcow2"), "8M"});
    run_expect({"qemu-io", "-c", "write -P 0x11 0 4M", path("base.qcow2")});
    create_overlay("a.qcow2", "base.qcow2");
    run_expect({"qemu-io", "-c", "write -P 0x22 1M 2M", "-c", "write -z 3584k 512k",
                path("a.qcow2")});
    create_overlay("b.qcow2", "a.qcow2");
    run_expect({"qemu-io", "-c", "write -P 0x33 2M 1536k", path("b.qcow2")});
    create_overlay("top.qcow2", "b.qcow2");
    run_expect({"qemu-io", "-c", "write -P 0x44 3M 256k", path("top.qcow2")});
  }
  json::object commit_args(uint64_t speed) {
    json::object args{{"device", "disk"}, {"top", path("b.qcow2")},
                      {"base", path("base.qcow2")}, {"depth-first", true}};
    if (speed) args["speed"] = speed;
    return args;
  }
  // The [start, end) ranges `file` itself allocates (qemu-img map).
  std::vector<std::pair<uint64_t, uint64_t>> own_ranges(const std::string& file) {
    RunResult r = run_expect({"qemu-img", "map", "-U", "--output=json", file});
    std::vector<std::pair<uint64_t, uint64_t>> out;
    const json::value map = json::parse(r.out);
    for (const auto& v : map.as_array()) {
      const json::object& e = v.as_object();
      if (e.at("depth").to_number<int>() != 0) continue;
      const auto start = e.at("start").to_number<uint64_t>();
      const auto end = start + e.at("length").to_number<uint64_t>();
      if (!out.empty() && out.back().second == start) out.back().second = end;
      else out.emplace_back(start, end);
    }
    return out;
  }
  uint64_t backing_depth() {
    json::value blocks = execute("query-block");
    return blocks.as_array()[0].as_object()["inserted"].as_object()["backing_file_depth"]
        .to_number<uint64_t>();
  }
};

TEST_F(DepthFirstCommit, EmptiesTheCommittedImagesBottomFirstWhileClientsWrite) {
  make_chain4();
  ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
  Nbd h = connect();
  VerifiedClient client(h.get(), 7);
  client.start();
  client.wait_ops(100);
  execute("block-commit", commit_args(2 << 20));
  json::object done = expect_completed();
  EXPECT_EQ(done["len"].to_number<uint64_t>(), kToCopy);
  EXPECT_EQ(done["offset"].to_number<uint64_t>(), kToCopy);
  const auto model = finish_client(client, 200);
  EXPECT_EQ(backing_depth(), 1u);
  stop_server(&h);
  EXPECT_EQ(backing_of(path("top.qcow2")), "base.qcow2");
  EXPECT_EQ(qemu_view(path("top.qcow2")), model);
  for (const char* f : {"top.qcow2", "base.qcow2", "a.qcow2", "b.qcow2"}) expect_clean(path(f));
  // What was copied is gone from the images above the base; a keeps only
  // what b shadowed (never copied from a).
  using Ranges = std::vector<std::pair<uint64_t, uint64_t>>;
  EXPECT_EQ(own_ranges(path("b.qcow2")), Ranges{});
  EXPECT_EQ(own_ranges(path("a.qcow2")), (Ranges{{2 << 20, 3 << 20}}));
  auto base = qemu_view(path("base.qcow2"));
  EXPECT_EQ(base[(1 << 20) + 5], 0x22);
  EXPECT_EQ(base[(2 << 20) + 5], 0x33);
  EXPECT_EQ(base[(3 << 20) + 5], 0x33);
  EXPECT_EQ(base[(3584 << 10) + 5], 0);
  EXPECT_EQ(base[5], 0x11);
}

// A cancel keeps what was copied (and dropped from the images above); the
// same commit again copies only the rest, each byte once over both runs.
TEST_F(DepthFirstCommit, ACancelledRunKeepsItsProgressAndTheNextCopiesOnlyTheRest) {
  make_chain4();
  ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
  Nbd h = connect();
  VerifiedClient client(h.get(), 8);
  client.start();
  client.wait_ops(100);
  execute("block-commit", commit_args(1 << 20));
  ASSERT_TRUE(wait_until([&] {
    json::value jobs = execute("query-block-jobs");
    return !jobs.as_array().empty() &&
           jobs.as_array()[0].as_object()["offset"].to_number<uint64_t>() >= (1 << 20);
  }, 20s));
  execute("block-job-cancel", {{"device", "disk"}});
  json::object cancelled = wait_event("BLOCK_JOB_CANCELLED");
  const uint64_t first = cancelled["offset"].to_number<uint64_t>();
  EXPECT_EQ(cancelled["len"].to_number<uint64_t>(), kToCopy);
  EXPECT_GE(first, 1u << 20);
  EXPECT_LT(first, kToCopy);
  client.wait_ops(100);
  EXPECT_EQ(client.failure(), "");
  execute("block-commit", commit_args(0));
  json::object done = expect_completed();
  EXPECT_EQ(done["len"].to_number<uint64_t>(), kToCopy - first);
  const auto model = finish_client(client, 200);
  EXPECT_EQ(backing_depth(), 1u);
  stop_server(&h);
  EXPECT_EQ(qemu_view(path("top.qcow2")), model);
  for (const char* f : {"top.qcow2", "base.qcow2"}) expect_clean(path(f));
}

}  // namespace
}  // namespace layerd::test
