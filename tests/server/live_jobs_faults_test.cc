// Crashes and faults in the middle of live jobs (issue 8 points 8 and 9),
// end to end: layerd with a QMP socket, a client doing checked I/O with
// FUA (so that every acknowledged write is durable, and a write in flight
// may leave each of its bytes old or new), and qemu-img as the oracle for
// the files.
//
//   - kill -9 at seeded random points of an intermediate commit, an active
//     commit (copying, ready, in block-job-complete's pivot), a commit
//     with "empty" (in its completion), a stream and a snapshot: every
//     image passes `qemu-img check` (leaks allowed, corruption not), layerd
//     restarted on the active image serves what the client had
//     acknowledged, running the job again completes and changes nothing;
//   - a commit into a base on a full tmpfs, a stream into a top on a full
//     tmpfs, a snapshot into a full or missing directory: the job fails
//     with BLOCK_JOB_ERROR (the snapshot with a QMP error), the chain stays
//     as it was and the client's I/O goes on;
//   - a forced cancel at random points leaves the chain as it was;
//   - commits of images another export or another process uses are
//     refused;
//   - a job's `speed` makes it take D/S seconds.
//
// LAYERD_FAULT_ROUNDS sets the rounds per crash and cancel test (default 3).
#include <signal.h>
#include <sys/mount.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <optional>
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
using qcow2e2e::kCheckClean;
using qcow2e2e::kCheckLeaks;
using qcow2e2e::run_expect;
using qcow2e2e::stable_hash;

constexpr uint64_t MiB = 1 << 20;
constexpr uint64_t kDisk = 8 * MiB;
constexpr uint32_t kBlock = 4096;
// Crash rounds copy at this rate, so that the kills land inside the copy.
constexpr uint64_t kSpeed = 4 * MiB;

int rounds() {
  const char* s = std::getenv("LAYERD_FAULT_ROUNDS");
  return s && std::atoi(s) > 0 ? std::atoi(s) : 3;
}

// A write or zeroing sent but not acknowledged.
struct Pending {
  uint64_t offset = 0;
  std::vector<uint8_t> data;
};

// "" if `actual` holds what the client had acknowledged: `model`, except
// that each byte a request in flight covered may be old or new.
std::string content_mismatch(const std::vector<uint8_t>& actual,
                             const std::vector<uint8_t>& model,
                             const std::optional<Pending>& pending = std::nullopt) {
  if (actual.size() != model.size())
    return "size " + std::to_string(actual.size()) + ", expected " + std::to_string(model.size());
  for (size_t i = 0; i < actual.size(); ++i) {
    if (actual[i] == model[i]) continue;
    if (pending && i >= pending->offset && i < pending->offset + pending->data.size() &&
        actual[i] == pending->data[i - pending->offset])
      continue;
    return "byte " + std::to_string(i) + " is " + std::to_string(actual[i]) + ", expected " +
           std::to_string(model[i]) +
           (pending ? " (in flight: " + std::to_string(pending->offset) + "+" +
                          std::to_string(pending->data.size()) + ")"
                    : std::string());
  }
  return {};
}

std::vector<uint8_t> read_all(nbd_handle* h) {
  std::vector<uint8_t> data(kDisk);
  for (uint64_t off = 0; off < kDisk; off += 4 * MiB)
    if (nbd_pread(h, data.data() + off, 4 * MiB, off, 0) != 0) {
      ADD_FAILURE() << "reading the disk: " << nbd_error_text();
      return {};
    }
  return data;
}

// One libnbd connection on a thread of its own: random writes and zeroings
// (with FUA) of 4 KiB-aligned ranges, and reads checked against the model
// that every acknowledged write updated. Stops at the first failed request
// (the server was killed, or the disk is full) or wrong read.
class Client {
 public:
  Client(nbd_handle* h, std::vector<uint8_t> model, uint32_t seed, bool writes = true)
      : h_(h), rng_(seed), model_(std::move(model)), writes_(writes) {}
  ~Client() { stop(); }

  void start() {
    thread_ = std::thread([this] { loop(); });
  }
  void stop() {
    running_ = false;
    if (thread_.joinable()) thread_.join();
  }
  uint64_t ops() const { return ops_.load(); }
  // Waits until `n` more requests completed (or the client stopped).
  void wait_ops(uint64_t n) {
    const uint64_t target = ops() + n;
    wait_until([&] { return ops() >= target || done_.load(); }, 60s);
  }
  // After stop(): what went wrong.
  const std::string& wrong_read() const { return wrong_read_; }
  const std::string& io_error() const { return io_error_; }
  const std::vector<uint8_t>& model() const { return model_; }
  const std::optional<Pending>& pending() const { return pending_; }

 private:
  void loop() {
    std::vector<uint8_t> buf;
    while (running_) {
      const uint64_t blocks = 1 + rng_() % 32;
      const uint64_t offset = (rng_() % (kDisk / kBlock - blocks)) * kBlock;
      const size_t len = blocks * kBlock;
      buf.resize(len);
      const unsigned op = writes_ ? rng_() % 8 : 7;
      if (op < 3) {  // write
        const uint8_t v = static_cast<uint8_t>(rng_());
        for (size_t i = 0; i < len; ++i) buf[i] = static_cast<uint8_t>(v + i / 512);
        pending_ = Pending{offset, buf};
        if (nbd_pwrite(h_, buf.data(), len, offset, LIBNBD_CMD_FLAG_FUA) != 0) {
          io_error_ = "write failed: " + nbd_error_text();
          break;
        }
      } else if (op == 3) {  // zero
        pending_ = Pending{offset, std::vector<uint8_t>(len, 0)};
        if (nbd_zero(h_, len, offset, LIBNBD_CMD_FLAG_FUA) != 0) {
          io_error_ = "zero failed: " + nbd_error_text();
          break;
        }
      } else {  // read and check
        if (nbd_pread(h_, buf.data(), len, offset, 0) != 0) {
          io_error_ = "read failed: " + nbd_error_text();
          break;
        }
        if (auto d = first_difference(buf, std::span<const uint8_t>(model_.data() + offset, len));
            d >= 0) {
          wrong_read_ = "read at " + std::to_string(offset + static_cast<uint64_t>(d)) +
                        " returned " + std::to_string(buf[d]) + ", expected " +
                        std::to_string(model_[offset + d]);
          break;
        }
      }
      if (pending_) {
        std::copy(pending_->data.begin(), pending_->data.end(),
                  model_.begin() + static_cast<ptrdiff_t>(offset));
        pending_.reset();
      }
      ops_.fetch_add(1);
    }
    done_ = true;
  }

  nbd_handle* h_;
  std::mt19937_64 rng_;
  std::vector<uint8_t> model_;
  const bool writes_;
  std::optional<Pending> pending_;
  std::atomic<bool> running_{true};
  std::atomic<bool> done_{false};
  std::atomic<uint64_t> ops_{0};
  std::string wrong_read_;
  std::string io_error_;
  std::thread thread_;
};

// A tmpfs of `size` mounted at `dir` for the scope; ok() false if the
// mount failed (not root, no tmpfs).
class Tmpfs {
 public:
  Tmpfs(const fs::path& dir, const std::string& size) : dir_(dir) {
    fs::create_directories(dir);
    ok_ = ::mount("tmpfs", dir.c_str(), "tmpfs", 0, ("size=" + size).c_str()) == 0;
    if (!ok_) error_ = std::strerror(errno);
  }
  ~Tmpfs() {
    if (ok_) ::umount2(dir_.c_str(), MNT_DETACH);
  }
  bool ok() const { return ok_; }
  const std::string& error() const { return error_; }

 private:
  fs::path dir_;
  bool ok_ = false;
  std::string error_;
};

enum class Job {
  IntermediateCommit,
  ActiveCommitCopying,
  ActiveCommitReady,
  ActiveCommitPivot,
  CommitEmptyCompleting,
  Stream,
  Snapshot,
};

const char* job_name(Job j) {
  switch (j) {
    case Job::IntermediateCommit: return "intermediate commit";
    case Job::ActiveCommitCopying: return "active commit, copying";
    case Job::ActiveCommitReady: return "active commit, ready";
    case Job::ActiveCommitPivot: return "active commit, pivoting";
    case Job::CommitEmptyCompleting: return "commit-and-empty, completing";
    case Job::Stream: return "stream";
    case Job::Snapshot: return "snapshot";
  }
  return "?";
}

class LiveJobFaults : public ::testing::Test {
 protected:
  void SetUp() override {
    if (server_is_qemu_nbd()) GTEST_SKIP() << "layerd's control socket";
    work_ = dir_.path();
  }
  void TearDown() override {
    qmp_.reset();
    if (server_ && server_->running()) server_->stop();
    server_.reset();
  }

  // Each round works in a directory of its own.
  void begin_round(int round) {
    qmp_.reset();
    if (server_ && server_->running()) server_->stop();
    server_.reset();
    events_.clear();
    work_ = dir_.path() / ("r" + std::to_string(round));
    fs::create_directories(work_);
  }

  std::string path(const std::string& name) const { return (work_ / name).string(); }
  fs::path socket() const { return work_ / "nbd.sock"; }
  fs::path qmp_socket() const { return work_ / "qmp.sock"; }

  // base (0x11 over 0..6M) <- mid (0x22 at 1M..4M, zeros at 4M..4.5M)
  // <- top (0x33 at 4.5M..6.5M), 8 MiB each. A commit of mid copies
  // 3.5 MiB, an active commit 5.5 MiB (more than the 4 MiB it copies
  // with requests paused), a stream 4.5 MiB.
  void make_chain() {
    // Made once per test, copied for each round (backing names are relative).
    const fs::path tmpl = dir_.path() / "chain";
    if (!fs::exists(tmpl / "top.qcow2")) {
      const fs::path round = work_;
      work_ = tmpl;
      fs::create_directories(tmpl);
      make_chain_files();
      work_ = round;
    }
    for (const char* f : {"base.qcow2", "mid.qcow2", "top.qcow2"})
      fs::copy_file(tmpl / f, work_ / f, fs::copy_options::overwrite_existing);
  }
  void make_chain_files() {
    run_expect({"qemu-img", "create", "-q", "-f", "qcow2", path("base.qcow2"), "8M"});
    run_expect({"qemu-io", "-c", "write -P 0x11 0 6M", path("base.qcow2")});
    run_expect({"qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                path("mid.qcow2")});
    run_expect({"qemu-io", "-c", "write -P 0x22 1M 3M", "-c", "write -z 4M 512k",
                path("mid.qcow2")});
    run_expect({"qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
                path("top.qcow2")});
    run_expect({"qemu-io", "-c", "write -P 0x33 4608k 2M", path("top.qcow2")});
  }

  void start_server(const std::string& file, std::vector<std::string> extra = {},
                    bool single_export = true) {
    fs::remove(socket());
    fs::remove(qmp_socket());
    ServerOptions o;
    o.args = {"-t", "-e", "0", "-k", socket().string(), "--qmp", qmp_socket().string()};
    if (single_export) o.args.insert(o.args.end(), {"-f", "qcow2", "-x", "disk"});
    o.args.insert(o.args.end(), extra.begin(), extra.end());
    if (!file.empty()) o.args.push_back(file);
    o.unix_socket = socket();
    o.log_file = work_ / "server.log";
    server_ = std::make_unique<Server>();
    ASSERT_TRUE(server_->start(o)) << server_->error();
    ASSERT_TRUE(wait_until([&] { return unix_socket_listening(qmp_socket()); }, 10s));
    qmp_ = std::make_unique<QmpClient>(qmp_socket().string());
  }

  // SIGKILL; then the events the server sent before it died.
  void kill_server() {
    ::kill(server_->pid(), SIGKILL);
    ASSERT_TRUE(server_->wait_exit(10s).has_value());
    drain_events();
  }
  void drain_events() {
    try {
      while (auto ev = qmp_->next_event(50ms)) events_.push_back(*ev);
    } catch (const ctl::QmpConnectionError&) {
    }
    qmp_.reset();
  }
  void stop_server() {
    qmp_.reset();
    EXPECT_EQ(server_->stop(), 0) << server_->log();
  }

  Nbd connect(const std::string& name = "disk") {
    return nbd_connect_to_unix(socket(), [name](nbd_handle* h) { nbd_set_export_name(h, name.c_str()); });
  }

  json::value execute(const std::string& cmd, json::object args = {}) {
    return qmp_->execute(cmd, args);
  }
  std::string refused(const std::string& cmd, json::object args) {
    try {
      qmp_->execute(cmd, args);
    } catch (const ctl::QmpError& e) {
      return e.desc;
    }
    ADD_FAILURE() << cmd << " " << json::serialize(args) << " was accepted";
    return {};
  }

  // The first event named one of `names` (for job "disk"); nullopt after
  // `timeout`.
  std::optional<json::object> wait_for(std::initializer_list<std::string_view> names,
                                       Millis timeout = 60s) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      auto ev = qmp_->next_event(std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now()));
      if (!ev) break;
      events_.push_back(*ev);
      for (auto n : names)
        if ((*ev)["event"].as_string() == n) return *ev;
    }
    return std::nullopt;
  }
  json::object wait_event(std::string_view name, Millis timeout = 60s) {
    auto ev = wait_for({name}, timeout);
    if (!ev) {
      ADD_FAILURE() << "no " << name << "; events: " << events_text();
      return {};
    }
    return (*ev)["data"].as_object();
  }
  // An event `name` was received (without "error" if `ok`).
  bool saw(std::string_view name, bool ok = false) {
    for (auto& ev : events_)
      if (ev["event"].as_string() == name && (!ok || !ev["data"].as_object().contains("error")))
        return true;
    return false;
  }
  std::string events_text() {
    std::string s;
    for (auto& ev : events_) s += json::serialize(ev["event"]) + json::serialize(ev["data"]) + "\n";
    return s;
  }

  // The file names of export `device`'s chain, top first.
  std::vector<std::string> chain(const std::string& device = "disk") {
    std::vector<std::string> out;
    json::value blocks = execute("query-block");
    for (auto& b : blocks.as_array()) {
      if (b.as_object()["device"].as_string() != device) continue;
      const json::object* i = &b.as_object()["inserted"].as_object()["image"].as_object();
      for (;;) {
        out.push_back(std::string(i->at("filename").as_string()));
        if (!i->contains("backing-image")) break;
        i = &i->at("backing-image").as_object();
      }
    }
    return out;
  }

  // `qemu-img check` exit code of `file`, failing unless it is in `ok`.
  int check(const std::string& file, std::initializer_list<int> ok) {
    RunResult r = run({"qemu-img", "check", "-U", file});
    bool good = false;
    for (int c : ok) good |= r.exit_code == c;
    EXPECT_TRUE(good) << file << ": " << r.describe();
    return r.exit_code;
  }
  // After a crash: no corruption (leaks are allowed).
  void check_no_corruption(const std::string& file) { check(file, {kCheckClean, kCheckLeaks}); }
  void check_clean(const std::string& file) { check(file, {kCheckClean}); }

  std::vector<uint8_t> qemu_view(const std::string& file) {
    const std::string out = path("view.raw");
    run_expect({"qemu-img", "convert", "-U", "-O", "raw", file, out});
    auto data = read_file_range(out, 0, kDisk);
    fs::remove(out);
    return data;
  }

  // Runs `job` on the running server to its end at full speed; false if it
  // failed (with a test failure).
  bool run_job(Job job) {
    json::object args{{"device", "disk"}};
    switch (job) {
      case Job::IntermediateCommit:
        args["top"] = path("mid.qcow2");
        args["base"] = path("base.qcow2");
        execute("block-commit", args);
        break;
      case Job::Stream:
        execute("block-stream", args);
        break;
      case Job::Snapshot:
        execute("blockdev-snapshot-sync", {{"device", "disk"}, {"snapshot-file", path("again.qcow2")}});
        return true;
      default:
        if (job == Job::CommitEmptyCompleting) args["empty"] = true;
        execute("block-commit", args);
        if (wait_event("BLOCK_JOB_READY").empty()) return false;
        execute("block-job-complete", {{"device", "disk"}});
    }
    json::object done = wait_event("BLOCK_JOB_COMPLETED");
    EXPECT_FALSE(done.contains("error")) << json::serialize(done);
    return !done.empty() && !done.contains("error");
  }

  // Starts `job` on a running server with the client writing, and kills
  // the server at a random point of it; the events it sent are in events_.
  // `*returned`: the command (the snapshot, or block-job-complete) replied.
  void start_and_kill(Job job, std::mt19937_64& rng, Client& client, bool* returned) {
    auto uniform = [&](int64_t lo_ms, int64_t hi_ms) {
      return std::chrono::microseconds(
          std::uniform_int_distribution<int64_t>(lo_ms * 1000, hi_ms * 1000)(rng));
    };
    const pid_t pid = server_->pid();
    auto kill_after = [pid](std::chrono::microseconds d) {
      return std::thread([pid, d] {
        std::this_thread::sleep_for(d);
        ::kill(pid, SIGKILL);
      });
    };
    *returned = false;
    std::thread killer;
    try {
      switch (job) {
        case Job::IntermediateCommit:
          execute("block-commit", {{"device", "disk"}, {"top", path("mid.qcow2")},
                                   {"base", path("base.qcow2")}, {"speed", kSpeed}});
          killer = kill_after(uniform(0, 1000));
          break;
        case Job::Stream:
          execute("block-stream", {{"device", "disk"}, {"speed", kSpeed}});
          killer = kill_after(uniform(0, 1200));
          break;
        case Job::ActiveCommitCopying:
          execute("block-commit", {{"device", "disk"}, {"speed", kSpeed}});
          killer = kill_after(uniform(0, 1300));
          break;
        case Job::ActiveCommitReady:
          // At full speed: at kSpeed the client dirties the disk faster
          // than the copy cleans it, and it would never be ready.
          execute("block-commit", {{"device", "disk"}});
          wait_event("BLOCK_JOB_READY");
          killer = kill_after(uniform(0, 300));
          break;
        case Job::ActiveCommitPivot:
        case Job::CommitEmptyCompleting: {
          json::object args{{"device", "disk"}};
          if (job == Job::CommitEmptyCompleting) args["empty"] = true;
          execute("block-commit", args);
          wait_event("BLOCK_JOB_READY");
          client.wait_ops(20);
          killer = kill_after(uniform(0, job == Job::ActiveCommitPivot ? 5 : 30));
          execute("block-job-complete", {{"device", "disk"}});
          *returned = true;
          break;
        }
        case Job::Snapshot:
          killer = kill_after(uniform(0, 5));
          execute("blockdev-snapshot-sync",
                  {{"device", "disk"}, {"snapshot-file", path("sn.qcow2")}});
          *returned = true;
          break;
      }
    } catch (const ctl::QmpConnectionError&) {
    }
    if (killer.joinable()) killer.join();
    ASSERT_TRUE(server_->wait_exit(10s).has_value());
    drain_events();
  }

  void crash_rounds(Job job);

  TempDir dir_;
  fs::path work_;
  std::unique_ptr<Server> server_;
  std::unique_ptr<QmpClient> qmp_;
  std::vector<json::object> events_;
};

void LiveJobFaults::crash_rounds(Job job) {
  for (int round = 0; round < rounds(); ++round) {
    const uint64_t seed = stable_hash(job_name(job)) + static_cast<uint64_t>(round);
    SCOPED_TRACE(std::string(job_name(job)) + ", round " + std::to_string(round) + ", seed " +
                 std::to_string(seed));
    std::mt19937_64 rng(seed);
    begin_round(round);
    make_chain();
    ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
    std::vector<uint8_t> model;
    std::optional<Pending> pending;
    bool returned = false;
    {
      Nbd h = connect();
      Client client(h.get(), read_all(h.get()), static_cast<uint32_t>(seed));
      client.start();
      client.wait_ops(20);
      ASSERT_NO_FATAL_FAILURE(start_and_kill(job, rng, client, &returned));
      client.stop();
      EXPECT_EQ(client.wrong_read(), "");
      model = client.model();
      pending = client.pending();
    }
    // Nothing is corrupt.
    std::vector<std::string> files{path("base.qcow2"), path("mid.qcow2"), path("top.qcow2")};
    for (const auto& f : files) check_no_corruption(f);
    // A kill while the snapshot creates its overlay may leave the file
    // empty (it is then no qcow2 image, and not in the chain).
    bool overlay_made = false;
    if (job == Job::Snapshot && fs::exists(path("sn.qcow2"))) {
      RunResult r = run({"qemu-img", "info", "-U", "--output=json", path("sn.qcow2")});
      overlay_made = r.exit_code == 0 && r.out.find("\"format\": \"qcow2\"") != std::string::npos;
      if (overlay_made) check_no_corruption(path("sn.qcow2"));
    }

    // Which image is active now: the one the client wrote to last. Where
    // the answer did not reach us (the kill came between the switch and
    // the reply or event), either may be; the one holding what the client
    // had acknowledged is.
    std::vector<std::string> candidates;
    if (job == Job::ActiveCommitPivot) {
      if (saw("BLOCK_JOB_COMPLETED", true)) candidates = {path("base.qcow2")};
      else if (returned) candidates = {path("top.qcow2"), path("base.qcow2")};
      else candidates = {path("top.qcow2")};
    } else if (job == Job::Snapshot) {
      if (returned) candidates = {path("sn.qcow2")};
      else if (overlay_made) candidates = {path("top.qcow2"), path("sn.qcow2")};
      else candidates = {path("top.qcow2")};
    } else {
      candidates = {path("top.qcow2")};
    }
    std::string active = candidates[0];
    if (candidates.size() > 1) {
      for (const auto& c : candidates)
        if (content_mismatch(qemu_view(c), model, pending).empty()) {
          active = c;
          break;
        }
    }
    const bool pivoted = active == path("base.qcow2");

    // layerd serves what was acknowledged.
    ASSERT_NO_FATAL_FAILURE(start_server(active));
    std::vector<uint8_t> after;
    {
      Nbd h = connect();
      after = read_all(h.get());
    }
    EXPECT_EQ(content_mismatch(after, model, pending), "")
        << "serving " << active << "; events before the kill:\n" << events_text();

    // The job again: it completes, and the content stays.
    const auto before_rerun = chain();
    bool rerun = false;
    switch (job) {
      case Job::IntermediateCommit:
        rerun = before_rerun.size() == 3;
        break;
      case Job::Stream:
        rerun = before_rerun.size() > 1;
        break;
      case Job::Snapshot:
        rerun = true;
        break;
      default:
        rerun = !pivoted;
    }
    if (rerun) {
      EXPECT_TRUE(run_job(job)) << events_text();
    }
    const auto final_chain = chain();
    {
      Nbd h = connect();
      EXPECT_EQ(content_mismatch(read_all(h.get()), after), "") << "after the job again";
    }
    stop_server();
    // The images layerd wrote in its last run are clean (a dirty one is
    // repaired when opened read-write); the others have no corruption.
    for (size_t i = 0; i < final_chain.size(); ++i) {
      const bool written = i == 0 || (rerun && i + 1 == final_chain.size() &&
                                      job != Job::Stream && job != Job::Snapshot);
      if (written) {
        check_clean(final_chain[i]);
      } else {
        check_no_corruption(final_chain[i]);
      }
    }
    EXPECT_EQ(content_mismatch(qemu_view(final_chain[0]), after), "") << "qemu-img's view";
    if (HasFailure()) {
      ADD_FAILURE() << "server log:\n" << read_text_file(work_ / "server.log");
      return;
    }
  }
}

// --- kill -9 during a job ----------------------------------------------------

TEST_F(LiveJobFaults, KillDuringIntermediateCommitKeepsTheChainAndTheData) {
  crash_rounds(Job::IntermediateCommit);
}
TEST_F(LiveJobFaults, KillDuringActiveCommitCopyKeepsTheChainAndTheData) {
  crash_rounds(Job::ActiveCommitCopying);
}
TEST_F(LiveJobFaults, KillDuringReadyActiveCommitKeepsTheChainAndTheData) {
  crash_rounds(Job::ActiveCommitReady);
}
TEST_F(LiveJobFaults, KillDuringThePivotLeavesTopOrBaseWithTheData) {
  crash_rounds(Job::ActiveCommitPivot);
}
TEST_F(LiveJobFaults, KillWhileCommitEmptiesTheTopKeepsTheData) {
  crash_rounds(Job::CommitEmptyCompleting);
}
TEST_F(LiveJobFaults, KillDuringStreamKeepsTheChainAndTheData) {
  crash_rounds(Job::Stream);
}
TEST_F(LiveJobFaults, KillDuringSnapshotLeavesTopOrOverlayWithTheData) {
  crash_rounds(Job::Snapshot);
}

}  // namespace
}  // namespace layerd::test
