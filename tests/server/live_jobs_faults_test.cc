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
// LAYERD_FAULT_ROUNDS sets the rounds per crash test (default 3; the cancel
// tests do one fewer).
#include <sched.h>
#include <signal.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <optional>
#include <random>
#include <sstream>
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

// Rounds per crash test (cancel tests: one fewer, at least one).
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

// The number of locks on `file` in /proc/locks (any process).
size_t lock_count(const std::string& file) {
  struct stat st {};
  if (::stat(file.c_str(), &st) != 0) return 0;
  const std::string inode = ":" + std::to_string(st.st_ino) + " ";
  size_t n = 0;
  std::istringstream in(read_text_file("/proc/locks"));
  for (std::string line; std::getline(in, line);)
    if (line.find(inode) != std::string::npos) ++n;
  return n;
}

enum class Job {
  IntermediateCommit,
  DepthFirstCommit,
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
    case Job::DepthFirstCommit: return "depth-first commit";
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
      case Job::DepthFirstCommit:
        args["top"] = path("mid.qcow2");
        args["base"] = path("base.qcow2");
        if (job == Job::DepthFirstCommit) args["depth-first"] = true;
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
        case Job::DepthFirstCommit: {
          json::object args{{"device", "disk"}, {"top", path("mid.qcow2")},
                            {"base", path("base.qcow2")}, {"speed", kSpeed}};
          if (job == Job::DepthFirstCommit) args["depth-first"] = true;
          execute("block-commit", args);
          killer = kill_after(uniform(0, 1000));
          break;
        }
        case Job::Stream:
          execute("block-stream", {{"device", "disk"}, {"speed", kSpeed}});
          killer = kill_after(uniform(0, 800));  // the client's writes leave less to copy
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
          // The reply comes at once; the flushes, the switch (and the
          // emptying) take some tens of milliseconds after it.
          killer = kill_after(uniform(0, job == Job::ActiveCommitPivot ? 60 : 80));
          execute("block-job-complete", {{"device", "disk"}});
          *returned = true;
          break;
        }
        case Job::Snapshot:
          killer = kill_after(uniform(0, 60));
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
      case Job::DepthFirstCommit:
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
TEST_F(LiveJobFaults, KillDuringDepthFirstCommitKeepsTheChainAndTheData) {
  crash_rounds(Job::DepthFirstCommit);
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

// --- A full disk under the job's target ---------------------------------------

class LiveJobFullDisk : public LiveJobFaults {
 protected:
  // The number of locks on `file` in /proc/locks (any process).
size_t lock_count(const std::string& file) {
  struct stat st {};
  if (::stat(file.c_str(), &st) != 0) return 0;
  const std::string inode = ":" + std::to_string(st.st_ino) + " ";
  size_t n = 0;
  std::istringstream in(read_text_file("/proc/locks"));
  for (std::string line; std::getline(in, line);)
    if (line.find(inode) != std::string::npos) ++n;
  return n;
}

// A tmpfs of `size` at <work>/small; skips the test where it cannot be
  // mounted.
  void mount_small(const std::string& size) {
    small_ = std::make_unique<Tmpfs>(work_ / "small", size);
    if (!small_->ok()) GTEST_SKIP() << "cannot mount a tmpfs: " << small_->error();
  }
  void TearDown() override {
    LiveJobFaults::TearDown();
    small_.reset();
  }
  std::string small(const std::string& name) const { return (work_ / "small" / name).string(); }

  // base (0x11 at 0..512K, on the small tmpfs) <- mid (0x22 at 1M..7M)
  // <- top (0x33 at 2M..3M): committing needs 6 MiB more in the base.
  void make_chain_over_small_base() {
    run_expect({"qemu-img", "create", "-q", "-f", "qcow2", small("base.qcow2"), "8M"});
    run_expect({"qemu-io", "-c", "write -P 0x11 0 512k", small("base.qcow2")});
    run_expect({"qemu-img", "create", "-q", "-f", "qcow2", "-b", small("base.qcow2"), "-F",
                "qcow2", path("mid.qcow2")});
    run_expect({"qemu-io", "-c", "write -P 0x22 1M 6M", path("mid.qcow2")});
    run_expect({"qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
                path("top.qcow2")});
    run_expect({"qemu-io", "-c", "write -P 0x33 2M 1M", path("top.qcow2")});
  }

  // A commit into the full base: BLOCK_JOB_ERROR (write), then
  // BLOCK_JOB_COMPLETED with an error; the chain stays, the client goes on.
  void commit_into_full_base(bool active) {
    ASSERT_NO_FATAL_FAILURE(mount_small("2m"));
    make_chain_over_small_base();
    ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
    const auto chain_before = chain();
    ASSERT_EQ(chain_before.size(), 3u);
    Nbd h = connect();
    Client client(h.get(), read_all(h.get()), active ? 21 : 22);
    client.start();
    client.wait_ops(50);
    json::object args{{"device", "disk"}, {"base", small("base.qcow2")}};
    if (!active) args["top"] = path("mid.qcow2");
    execute("block-commit", args);
    json::object error = wait_event("BLOCK_JOB_ERROR");
    EXPECT_EQ(error["operation"], "write") << json::serialize(error);
    EXPECT_EQ(error["action"], "report") << json::serialize(error);
    json::object done = wait_event("BLOCK_JOB_COMPLETED");
    ASSERT_TRUE(done.contains("error")) << json::serialize(done);
    EXPECT_NE(std::string(done["error"].as_string()).find("No space"), std::string::npos)
        << json::serialize(done);
    EXPECT_FALSE(saw("BLOCK_JOB_READY"));
    EXPECT_EQ(chain(), chain_before);
    EXPECT_TRUE(execute("query-block-jobs").as_array().empty());
    client.wait_ops(200);
    client.stop();
    EXPECT_EQ(client.wrong_read(), "");
    EXPECT_EQ(client.io_error(), "");
    h.reset();
    stop_server();
    check_clean(path("top.qcow2"));
    check_clean(path("mid.qcow2"));
    check_no_corruption(small("base.qcow2"));
    EXPECT_EQ(content_mismatch(qemu_view(path("top.qcow2")), client.model()), "");
  }

  std::unique_ptr<Tmpfs> small_;
};

TEST_F(LiveJobFullDisk, IntermediateCommitIntoAFullBaseFailsAndKeepsTheChain) {
  commit_into_full_base(false);
}

TEST_F(LiveJobFullDisk, ActiveCommitIntoAFullBaseFailsAndKeepsTheChain) {
  commit_into_full_base(true);
}

// The client's writes would go to the full top too: it only reads.
TEST_F(LiveJobFullDisk, StreamIntoAFullTopFailsAndReadsStayCorrect) {
  ASSERT_NO_FATAL_FAILURE(mount_small("1m"));
  make_chain();  // base <- mid <- top in <work>; the top is replaced
  run_expect({"qemu-img", "create", "-q", "-f", "qcow2", "-b", path("mid.qcow2"), "-F", "qcow2",
              small("top.qcow2")});
  run_expect({"qemu-io", "-c", "write -P 0x33 6M 256k", small("top.qcow2")});
  // The chain below lies in <work>, the top's parent directory.
  ASSERT_NO_FATAL_FAILURE(start_server(small("top.qcow2"), {"--image-dir", work_.string()}));
  const auto chain_before = chain();
  ASSERT_EQ(chain_before.size(), 3u);
  const auto content = qemu_view(small("top.qcow2"));
  Nbd h = connect();
  Client client(h.get(), content, 23, /*writes=*/false);
  client.start();
  execute("block-stream", {{"device", "disk"}});
  json::object error = wait_event("BLOCK_JOB_ERROR");
  EXPECT_EQ(error["operation"], "write") << json::serialize(error);
  json::object done = wait_event("BLOCK_JOB_COMPLETED");
  EXPECT_TRUE(done.contains("error")) << json::serialize(done);
  EXPECT_EQ(chain(), chain_before);
  client.wait_ops(300);
  EXPECT_TRUE(server_->running());
  client.stop();
  EXPECT_EQ(client.wrong_read(), "");
  EXPECT_EQ(client.io_error(), "");
  h.reset();
  stop_server();
  check_no_corruption(small("top.qcow2"));
  EXPECT_EQ(content_mismatch(qemu_view(small("top.qcow2")), content), "");
}

TEST_F(LiveJobFullDisk, SnapshotIntoAFullOrMissingDirectoryIsRefused) {
  ASSERT_NO_FATAL_FAILURE(mount_small("256k"));
  {  // fill it
    std::vector<uint8_t> chunk(64 << 10, 0xaa);
    FILE* f = std::fopen(small("fill").c_str(), "wb");
    ASSERT_NE(f, nullptr);
    while (std::fwrite(chunk.data(), 1, chunk.size(), f) == chunk.size() && std::fflush(f) == 0) {
    }
    std::fclose(f);
  }
  make_chain();
  ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
  const auto chain_before = chain();
  Nbd h = connect();
  Client client(h.get(), read_all(h.get()), 24);
  client.start();
  client.wait_ops(50);
  std::string why = refused("blockdev-snapshot-sync",
                            {{"device", "disk"}, {"snapshot-file", small("sn.qcow2")}});
  EXPECT_NE(why.find("No space"), std::string::npos) << why;
  EXPECT_FALSE(fs::exists(small("sn.qcow2")));
  why = refused("blockdev-snapshot-sync",
                {{"device", "disk"}, {"snapshot-file", path("nodir/sn.qcow2")}});
  EXPECT_NE(why.find("No such file"), std::string::npos) << why;
  EXPECT_EQ(chain(), chain_before);
  client.wait_ops(200);
  // Still possible where there is room.
  execute("blockdev-snapshot-sync", {{"device", "disk"}, {"snapshot-file", path("sn.qcow2")}});
  client.wait_ops(100);
  client.stop();
  EXPECT_EQ(client.wrong_read(), "");
  EXPECT_EQ(client.io_error(), "");
  EXPECT_EQ(chain().size(), chain_before.size() + 1);
  h.reset();
  stop_server();
  check_clean(path("sn.qcow2"));
  check_clean(path("top.qcow2"));
  EXPECT_EQ(content_mismatch(qemu_view(path("sn.qcow2")), client.model()), "");
}

// --- Cancel at any point ------------------------------------------------------

class LiveJobCancel : public LiveJobFaults {
 protected:
  void cancel_rounds(Job job) {
    for (int round = 0; round < std::max(1, rounds() - 1); ++round) {
      const uint64_t seed = stable_hash(std::string("cancel ") + job_name(job)) +
                            static_cast<uint64_t>(round);
      SCOPED_TRACE(std::string("cancel ") + job_name(job) + ", round " + std::to_string(round) +
                   ", seed " + std::to_string(seed));
      std::mt19937_64 rng(seed);
      begin_round(round);
      make_chain();
      ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
      const auto chain_before = chain();
      Nbd h = connect();
      Client client(h.get(), read_all(h.get()), static_cast<uint32_t>(seed));
      client.start();
      client.wait_ops(20);
      int64_t max_ms = 0;
      switch (job) {
        case Job::IntermediateCommit:
        case Job::DepthFirstCommit: {
          json::object args{{"device", "disk"}, {"top", path("mid.qcow2")},
                            {"base", path("base.qcow2")}, {"speed", kSpeed}};
          if (job == Job::DepthFirstCommit) args["depth-first"] = true;
          execute("block-commit", args);
          max_ms = 800;
          break;
        }
        case Job::Stream:
          execute("block-stream", {{"device", "disk"}, {"speed", kSpeed}});
          max_ms = 1000;
          break;
        default:
          execute("block-commit", {{"device", "disk"}, {"speed", kSpeed}});
          max_ms = 1200;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(
          std::uniform_int_distribution<int64_t>(0, max_ms)(rng)));
      bool cancelled = true;
      try {
        execute("block-job-cancel", {{"device", "disk"}, {"force", true}});
      } catch (const ctl::QmpError& e) {
        cancelled = false;  // it had ended already
      }
      auto end = wait_for({"BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"});
      ASSERT_TRUE(end.has_value()) << events_text();
      if ((*end)["event"] == "BLOCK_JOB_CANCELLED") {
        EXPECT_TRUE(cancelled);
        EXPECT_EQ(chain(), chain_before) << events_text();
        EXPECT_FALSE(saw("BLOCK_JOB_ERROR")) << events_text();
      } else {
        // Too late: it had finished (the active commit cannot: it waits in
        // ready).
        EXPECT_NE(job, Job::ActiveCommitCopying) << events_text();
        EXPECT_FALSE((*end)["data"].as_object().contains("error")) << events_text();
      }
      client.wait_ops(100);
      // The job again, to its end, with the client still going.
      if (chain().size() == chain_before.size()) {
        EXPECT_TRUE(run_job(job)) << events_text();
      }
      client.wait_ops(100);
      client.stop();
      EXPECT_EQ(client.wrong_read(), "");
      EXPECT_EQ(client.io_error(), "");
      const auto final_chain = chain();
      h.reset();
      stop_server();
      for (const char* f : {"base.qcow2", "mid.qcow2", "top.qcow2"}) check_clean(path(f));
      EXPECT_EQ(content_mismatch(qemu_view(final_chain[0]), client.model()), "");
      if (HasFailure()) {
        ADD_FAILURE() << "server log:\n" << read_text_file(work_ / "server.log");
        return;
      }
    }
  }
};

TEST_F(LiveJobCancel, CancelledIntermediateCommitKeepsTheChainAndRunsAgain) {
  cancel_rounds(Job::IntermediateCommit);
}
TEST_F(LiveJobCancel, CancelledDepthFirstCommitKeepsTheChainAndRunsAgain) {
  cancel_rounds(Job::DepthFirstCommit);
}
TEST_F(LiveJobCancel, CancelledActiveCommitKeepsTheChainAndRunsAgain) {
  cancel_rounds(Job::ActiveCommitCopying);
}
TEST_F(LiveJobCancel, CancelledStreamKeepsTheChainAndRunsAgain) {
  cancel_rounds(Job::Stream);
}

// --- Refusals -----------------------------------------------------------------

TEST_F(LiveJobFaults, RefusesToCommitOrStreamImagesAnotherExportServes) {
  make_chain();
  const auto mid_view = qemu_view(path("mid.qcow2"));
  ASSERT_NO_FATAL_FAILURE(start_server(
      "",
      {"--export", "name=disk,file=" + path("top.qcow2") + ",format=qcow2", "--export",
       "name=b,file=" + path("mid.qcow2") + ",format=qcow2,read-only=on"},
      /*single_export=*/false));
  const auto chain_before = chain();
  ASSERT_EQ(chain_before.size(), 3u);
  Nbd h = connect();
  Client client(h.get(), read_all(h.get()), 31);
  client.start();
  std::string why = refused("block-commit", {{"device", "disk"}, {"top", path("mid.qcow2")},
                                             {"base", path("base.qcow2")}});
  EXPECT_NE(why.find("export 'b'"), std::string::npos) << why;
  why = refused("block-commit", {{"device", "disk"}});
  EXPECT_NE(why.find("export 'b'"), std::string::npos) << why;
  why = refused("block-stream", {{"device", "disk"}});
  EXPECT_NE(why.find("export 'b'"), std::string::npos) << why;
  // What touches nothing b serves is allowed: a stream down to mid.
  execute("block-stream", {{"device", "disk"}, {"base", path("mid.qcow2")}});
  json::object done = wait_event("BLOCK_JOB_COMPLETED");
  EXPECT_FALSE(done.contains("error")) << json::serialize(done);
  EXPECT_EQ(chain(), chain_before);
  client.wait_ops(200);
  client.stop();
  EXPECT_EQ(client.wrong_read(), "");
  EXPECT_EQ(client.io_error(), "");
  {
    Nbd b = connect("b");
    EXPECT_EQ(content_mismatch(read_all(b.get()), mid_view), "") << "export b";
  }
  h.reset();
  stop_server();
  for (const char* f : {"base.qcow2", "mid.qcow2", "top.qcow2"}) check_clean(path(f));
}

// The lock of another process on the base: QEMU refuses the command; a
// job that fails at once with the lock error is as good (nothing changed).
TEST_F(LiveJobFaults, RefusesToCommitIntoABaseAnotherProcessHolds) {
  make_chain();
  ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
  const auto chain_before = chain();
  Nbd h = connect();
  Client client(h.get(), read_all(h.get()), 32);
  client.start();
  {
    // layerd holds the same lock bytes: wait for the holder's own locks.
    const size_t ours = lock_count(path("base.qcow2"));
    InteractiveProcess holder({"qemu-io", "-r", "-f", "qcow2", path("base.qcow2")});
    ASSERT_TRUE(wait_until([&] { return lock_count(path("base.qcow2")) > ours; }, 10s));
    for (bool active : {false, true}) {
      SCOPED_TRACE(active ? "active commit" : "intermediate commit");
      json::object args{{"device", "disk"}, {"base", path("base.qcow2")}};
      if (!active) args["top"] = path("mid.qcow2");
      std::string why;
      try {
        execute("block-commit", args);
        auto end = wait_for({"BLOCK_JOB_COMPLETED", "BLOCK_JOB_READY"}, 20s);
        ASSERT_TRUE(end.has_value()) << events_text();
        if ((*end)["event"] == "BLOCK_JOB_READY") {
          execute("block-job-cancel", {{"device", "disk"}, {"force", true}});
          wait_event("BLOCK_JOB_CANCELLED");
        } else if ((*end)["data"].as_object().contains("error")) {
          why = std::string((*end)["data"].as_object()["error"].as_string());
        }
      } catch (const ctl::QmpError& e) {
        why = e.desc;
      }
      EXPECT_NE(why.find("lock"), std::string::npos) << why;
      EXPECT_EQ(chain(), chain_before);
      client.wait_ops(100);
    }
  }
  // The holder is gone: the commit goes through.
  EXPECT_TRUE(run_job(Job::IntermediateCommit)) << events_text();
  EXPECT_EQ(chain().size(), 2u);
  client.wait_ops(100);
  client.stop();
  EXPECT_EQ(client.wrong_read(), "");
  EXPECT_EQ(client.io_error(), "");
  h.reset();
  stop_server();
  for (const char* f : {"base.qcow2", "top.qcow2"}) check_clean(path(f));
  EXPECT_EQ(content_mismatch(qemu_view(path("top.qcow2")), client.model()), "");
}

// --- The rate limit -----------------------------------------------------------

class LiveJobSpeed : public LiveJobFaults {
 protected:
  // Seconds from the command to BLOCK_JOB_COMPLETED.
  double timed(const std::string& cmd, json::object args) {
    const auto t0 = std::chrono::steady_clock::now();
    execute(cmd, args);
    json::object done = wait_event("BLOCK_JOB_COMPLETED");
    const auto t1 = std::chrono::steady_clock::now();
    EXPECT_FALSE(done.contains("error")) << json::serialize(done);
    return std::chrono::duration<double>(t1 - t0).count();
  }

  // The job on a fresh chain (`make` in a round directory) takes `expected`
  // seconds within 10%. Never faster; slower only by noise (the flushes at
  // its end on a loaded machine): the better of two runs counts.
  void expect_duration(const std::function<void()>& make, const std::string& cmd,
                       const std::function<json::object()>& args, double expected) {
    double best = 1e9;
    for (int run = 0; run < 2 && best > expected * 1.1; ++run) {
      begin_round(run);
      make();
      ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
      const double s = timed(cmd, args());
      EXPECT_GE(s, expected * 0.9) << "run " << run;
      best = std::min(best, s);
      stop_server();
    }
    EXPECT_LE(best, expected * 1.1);
  }
};

// D = 8 MiB allocated below an empty top, S = 2 MiB/s: 4 s.
TEST_F(LiveJobSpeed, StreamTakesDataOverSpeedSeconds) {
  expect_duration(
      [&] {
        run_expect({"qemu-img", "create", "-q", "-f", "qcow2", path("base.qcow2"), "8M"});
        run_expect({"qemu-io", "-c", "write -P 0x11 0 8M", path("base.qcow2")});
        run_expect({"qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                    path("top.qcow2")});
      },
      "block-stream", [&] { return json::object{{"device", "disk"}, {"speed", 2 * MiB}}; }, 4.0);
}

// D = 8 MiB in mid, committed into an empty base at S = 2 MiB/s: 4 s.
TEST_F(LiveJobSpeed, CommitTakesDataOverSpeedSeconds) {
  expect_duration(
      [&] {
        run_expect({"qemu-img", "create", "-q", "-f", "qcow2", path("base.qcow2"), "8M"});
        run_expect({"qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                    path("mid.qcow2")});
        run_expect({"qemu-io", "-c", "write -P 0x22 0 8M", path("mid.qcow2")});
        run_expect({"qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
                    path("top.qcow2")});
      },
      "block-commit",
      [&] {
        return json::object{{"device", "disk"}, {"top", path("mid.qcow2")}, {"speed", 2 * MiB}};
      },
      4.0);
}


// The scheduling policy (SCHED_*) of each thread of `pid` whose name
// starts with `prefix` (/proc/PID/task/TID/stat, field 41).
std::vector<int> thread_policies(pid_t pid, const std::string& prefix) {
  std::vector<int> out;
  std::error_code ec;
  for (const auto& t : fs::directory_iterator("/proc/" + std::to_string(pid) + "/task", ec)) {
    std::ifstream comm(t.path() / "comm");
    std::string name;
    std::getline(comm, name);
    if (name.rfind(prefix, 0) != 0) continue;
    std::ifstream stat(t.path() / "stat");
    std::string line;
    std::getline(stat, line);
    std::istringstream fields(line.substr(line.rfind(')') + 2));  // from field 3 on
    std::string f;
    for (int i = 3; i <= 41 && fields >> f; ++i)
      if (i == 41) out.push_back(std::stoi(f));
  }
  return out;
}

// The bulk copy gives way to clients: the job's thread ("job:ID") copies in
// the background class (SCHED_IDLE, overlay/job_cpu.h), its copy lane
// ("lane:ID", overlay/copy_lane.h) in the normal one, and both go with the
// job.
TEST_F(LiveJobSpeed, TheBulkCopyRunsInTheBackgroundCpuClass) {
  begin_round(0);
  run_expect({"qemu-img", "create", "-q", "-f", "qcow2", path("base.qcow2"), "8M"});
  run_expect({"qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
              path("mid.qcow2")});
  run_expect({"qemu-io", "-c", "write -P 0x22 0 8M", path("mid.qcow2")});
  run_expect({"qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
              path("top.qcow2")});
  ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
  execute("block-commit", {{"device", "disk"}, {"job-id", "bulk"}, {"top", path("mid.qcow2")},
                           {"speed", 2 * MiB}});
  std::vector<int> policies;
  wait_until([&] {
    policies = thread_policies(server_->pid(), "job:bulk");
    return !policies.empty() && policies[0] == SCHED_IDLE;
  }, 3s);
  EXPECT_EQ(policies, std::vector<int>{SCHED_IDLE});
  EXPECT_EQ(thread_policies(server_->pid(), "lane:bulk"), std::vector<int>{SCHED_OTHER});
  json::object done = wait_event("BLOCK_JOB_COMPLETED");
  EXPECT_FALSE(done.contains("error")) << json::serialize(done);
  wait_until([&] { return thread_policies(server_->pid(), "job:").empty(); }, 3s);
  EXPECT_EQ(thread_policies(server_->pid(), "job:"), std::vector<int>{});
  EXPECT_EQ(thread_policies(server_->pid(), "lane:"), std::vector<int>{});
}

// How many of the pages of `path` are in the page cache (mincore(2)).
size_t resident_pages(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  const size_t size = static_cast<size_t>(fs::file_size(path));
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) return 0;
  std::vector<unsigned char> pages((size + 4095) / 4096);
  const bool ok = ::mincore(map, size, pages.data()) == 0;
  ::munmap(map, size);
  size_t n = 0;
  for (unsigned char p : pages) n += p & 1;
  return ok ? n : 0;
}

// A commit of 64 MiB in mid into an empty base beside busy loops on every
// CPU, with or without a client doing verified I/O throughout; afterwards
// the base holds what mid held and the pages of base.qcow2 in the page
// cache are counted.
class LiveJobGivingWay : public LiveJobFaults {
 protected:
  void make_files() {
    run_expect({"qemu-img", "create", "-q", "-f", "qcow2", path("base.qcow2"), "64M"});
    run_expect({"qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                path("mid.qcow2")});
    run_expect({"qemu-io", "-c", "write -P 0x5a 0 64M", path("mid.qcow2")});
    run_expect({"qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
                path("top.qcow2")});
  }
  size_t commit_beside_busy_cpus(bool with_client, bool give_way = true) {
    begin_round(0);
    make_files();
    start_server(path("top.qcow2"));
    if (HasFatalFailure()) return 0;
    Nbd h = connect();
    std::optional<Client> client;
    if (with_client) {
      // Verified reads only: fast enough for a busy client on any disk.
      client.emplace(h.get(), std::vector<uint8_t>(kDisk, 0x5a), 41, /*writes=*/false);
      client->start();
      client->wait_ops(100);
    }
    std::atomic<bool> stop{false};
    std::vector<std::thread> hogs;
    for (unsigned i = 0; i < 2 * std::max(1u, std::thread::hardware_concurrency()); ++i)
      hogs.emplace_back([&] {
        while (!stop.load(std::memory_order_relaxed)) {
        }
      });
    json::object args{{"device", "disk"}, {"top", path("mid.qcow2")}};
    if (!give_way) args["give-way"] = false;
    execute("block-commit", args);
    json::object done = wait_event("BLOCK_JOB_COMPLETED", 120s);
    stop.store(true);
    for (auto& t : hogs) t.join();
    EXPECT_FALSE(done.contains("error")) << json::serialize(done);
    const size_t resident = resident_pages(path("base.qcow2"));
    if (client) {
      client->stop();
      EXPECT_EQ(client->wrong_read(), "");
      EXPECT_EQ(client->io_error(), "");
    }
    h.reset();
    stop_server();
    run_expect({"qemu-img", "check", "-q", path("base.qcow2")});
    const RunResult read = run_expect({"qemu-io", "-c", "read -P 0x5a 0 64M", path("base.qcow2")});
    EXPECT_EQ(read.out.find("Pattern verification failed"), std::string::npos) << read.out;
    return resident;
  }
  static constexpr size_t kCommittedPages = (64u << 20) / 4096;
};

// Busy clients and busy CPUs: the copy goes past the page cache.
TEST_F(LiveJobGivingWay, BesideABusyClientTheCommitBypassesThePageCache) {
  {  // O_DIRECT is what is tested: not where it keeps pages cached (tmpfs)
    struct statfs sfs {};
    const std::string probe = (dir_.path() / "direct-probe").string();
    const int fd = ::open(probe.c_str(), O_RDWR | O_CREAT | O_DIRECT | O_CLOEXEC, 0600);
    if (fd >= 0) ::close(fd);
    if (fd < 0 || ::statfs(dir_.path().c_str(), &sfs) != 0 || sfs.f_type == TMPFS_MAGIC)
      GTEST_SKIP() << "no O_DIRECT past the page cache in " << dir_.path();
  }
  const size_t resident = commit_beside_busy_cpus(true);
  EXPECT_LT(resident, kCommittedPages / 2) << "pages of base.qcow2 in the page cache";
}

// Busy clients and CPUs, but asked not to give way ("give-way": false):
// the copy goes on through the page cache.
TEST_F(LiveJobGivingWay, AskedNotToGiveWayTheCommitGoesThroughThePageCache) {
  const size_t resident = commit_beside_busy_cpus(true, false);
  EXPECT_GT(resident, kCommittedPages * 3 / 4) << "pages of base.qcow2 in the page cache";
}

// "give-way" takes a bool; block-stream takes it too.
TEST_F(LiveJobGivingWay, GiveWayMustBeABool) {
  begin_round(0);
  make_files();
  ASSERT_NO_FATAL_FAILURE(start_server(path("top.qcow2")));
  EXPECT_NE(refused("block-commit", {{"device", "disk"}, {"top", path("mid.qcow2")},
                                     {"give-way", "no"}}),
            "");
  execute("block-stream", {{"device", "disk"}, {"give-way", false}});
  json::object done = wait_event("BLOCK_JOB_COMPLETED", 120s);
  EXPECT_FALSE(done.contains("error")) << json::serialize(done);
}

// Busy CPUs but no client: the copy goes on through the page cache.
TEST_F(LiveJobGivingWay, WithoutClientsTheCommitGoesThroughThePageCache) {
  const size_t resident = commit_beside_busy_cpus(false);
  EXPECT_GT(resident, kCommittedPages * 3 / 4) << "pages of base.qcow2 in the page cache";
}

}  // namespace
}  // namespace layerd::test
