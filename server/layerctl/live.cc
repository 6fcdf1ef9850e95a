// layerctl's live commands: block jobs, snapshots and queries on a running
// layerd (or qemu-storage-daemon) through its QMP socket. The commands and
// argument names are QEMU's (qapi/block-core.json, qapi/job.json), so the
// same command lines drive both.
//
//   layerctl --qmp PATH snapshot|commit|stream|jobs|cancel|complete|pause|
//            resume|speed|dismiss|wait|exports|info ...
//
// Exit codes of the live commands: 0 success (a job that completed without
// an error), 1 a job that failed (or a usage error), 2 a job that was
// cancelled, 3 a QMP command refused or the connection lost.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "overlay/image_registry.h"
#include "server/layerctl/commands.h"
#include "server/layerctl/qmp_client.h"
#include "server/layerctl/util.h"

namespace layerd::ctl {

namespace json = boost::json;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

namespace {

constexpr int kExitFailed = 1;
constexpr int kExitCancelled = 2;
constexpr int kExitQmp = 3;

constexpr const char* kLiveHelp =
    "usage: layerctl --qmp PATH COMMAND [options] ARGS   (--qmp may also follow\n"
    "       COMMAND)\n"
    "\n"
    "Live commands, sent to a running layerd or qemu-storage-daemon over its\n"
    "QMP socket:\n"
    "  snapshot [--wait] [--format=qcow2] [--node-name=NAME] [--output=OFMT]\n"
    "           DEVICE NEW_FILE            blockdev-snapshot-sync\n"
    "  commit   [--top=FILE | --active] [--base=FILE] [--empty | --depth-first]\n"
    "           [--speed=N] [--no-give-way] [--job-id=ID] [--wait]\n"
    "           [--output=OFMT] DEVICE      block-commit\n"
    "  stream   [--base=FILE] [--speed=N] [--no-give-way] [--job-id=ID] [--wait]\n"
    "           [--output=OFMT] DEVICE                          block-stream\n"
    "  jobs     [--output=OFMT]            query-block-jobs\n"
    "  cancel   [--force] [--wait] JOB     block-job-cancel\n"
    "  complete JOB | pause JOB | resume JOB | dismiss JOB\n"
    "  speed    JOB BYTES_PER_S            block-job-set-speed\n"
    "  wait     [--output=OFMT] JOB        follow a running job until it ends\n"
    "  exports  [--output=OFMT]            query-block-exports\n"
    "  info     [--output=OFMT] [DEVICE]   query-block (query-named-block-nodes\n"
    "                                      where there are no devices): each\n"
    "                                      device's chain, top first, with depth,\n"
    "                                      format, virtual and actual size, ro\n"
    "\n"
    "N and BYTES_PER_S take the suffixes k, M, G. A job's id is DEVICE unless\n"
    "--job-id is given. --wait follows the job until it ends, showing its\n"
    "progress; an active commit (--active) is completed (pivoted) once it is\n"
    "ready. --empty (layerd only) empties the top after the commit.\n"
    "--depth-first (layerd only, with --top) empties the committed images one\n"
    "by one as their data reaches the base, so that running the same commit\n"
    "again after a kill or a cancel copies only what is left.\n"
    "--no-give-way (layerd only) copies at full speed even while clients are\n"
    "busy (by default the copy then gives way to them: docs/control.md).\n"
    "\n"
    "Exit codes: 0 done (a job that completed), 1 a job that failed, 2 a job\n"
    "that was cancelled, 3 a command the server refused or a lost QMP\n"
    "connection.\n";

// --- Command line -------------------------------------------------------------

enum Opt : unsigned {
  kQmp = 1u << 0,
  kOutput = 1u << 1,
  kWait = 1u << 2,
  kFormat = 1u << 3,
  kNodeName = 1u << 4,
  kTop = 1u << 5,
  kBase = 1u << 6,
  kActive = 1u << 7,
  kEmpty = 1u << 8,
  kSpeed = 1u << 9,
  kJobId = 1u << 10,
  kForce = 1u << 11,
  kDepthFirst = 1u << 12,
  kNoGiveWay = 1u << 13,
};

struct LiveArgs {
  std::string qmp;
  bool as_json = false;
  bool wait = false;
  std::string format = "qcow2";
  std::optional<std::string> node_name, top, base, job_id;
  bool active = false;
  bool empty = false;
  bool depth_first = false;
  bool no_give_way = false;
  std::optional<uint64_t> speed;
  bool force = false;
  std::vector<std::string> positional;
};

uint64_t parse_speed(const std::string& text) {
  uint64_t v = 0;
  if (!parse_size(text, &v))
    usage_error(fmt::format("Invalid speed '{}': a size such as 512k, 4M", text));
  return v;
}

// Parses argv (argv[0] = the command) accepting the options in `allowed`;
// returns nullopt after printing the help for --help.
std::optional<LiveArgs> parse_live_args(int argc, char** argv, unsigned allowed,
                                        std::string qmp) {
  static const option kLong[] = {
      {"help", no_argument, nullptr, 'h'},
      {"qmp", required_argument, nullptr, 'Q'},
      {"output", required_argument, nullptr, 'O'},
      {"wait", no_argument, nullptr, 'w'},
      {"format", required_argument, nullptr, 'f'},
      {"node-name", required_argument, nullptr, 'n'},
      {"top", required_argument, nullptr, 't'},
      {"base", required_argument, nullptr, 'b'},
      {"active", no_argument, nullptr, 'a'},
      {"empty", no_argument, nullptr, 'e'},
      {"depth-first", no_argument, nullptr, 'D'},
      {"no-give-way", no_argument, nullptr, 'G'},
      {"speed", required_argument, nullptr, 's'},
      {"job-id", required_argument, nullptr, 'j'},
      {"force", no_argument, nullptr, 'F'},
      {nullptr, 0, nullptr, 0},
  };
  LiveArgs a;
  a.qmp = std::move(qmp);
  reset_getopt();
  auto need = [&](unsigned bit) {
    if (!(allowed & bit))
      usage_error(fmt::format("{}: unrecognized option '{}'", argv[0], argv[optind - 1]));
  };
  for (int c; (c = getopt_long(argc, argv, ":hf:", kLong, nullptr)) != -1;) {
    switch (c) {
      case 'h': std::fputs(kLiveHelp, stdout); return std::nullopt;
      case 'Q': a.qmp = optarg; break;
      case 'O': need(kOutput); a.as_json = parse_output_format(optarg); break;
      case 'w': need(kWait); a.wait = true; break;
      case 'f': need(kFormat); a.format = optarg; break;
      case 'n': need(kNodeName); a.node_name = optarg; break;
      case 't': need(kTop); a.top = optarg; break;
      case 'b': need(kBase); a.base = optarg; break;
      case 'a': need(kActive); a.active = true; break;
      case 'e': need(kEmpty); a.empty = true; break;
      case 'D': need(kDepthFirst); a.depth_first = true; break;
      case 'G': need(kNoGiveWay); a.no_give_way = true; break;
      case 's': need(kSpeed); a.speed = parse_speed(optarg); break;
      case 'j': need(kJobId); a.job_id = optarg; break;
      case 'F': need(kForce); a.force = true; break;
      default: bad_option(c, optarg, argv);
    }
  }
  for (int i = optind; i < argc; ++i) a.positional.emplace_back(argv[i]);
  if (a.qmp.empty())
    usage_error(fmt::format("{}: --qmp PATH (the server's QMP socket) is required",
                            argv[0]));
  return a;
}

void expect_positional(const LiveArgs& a, const char* cmd, size_t min, size_t max,
                       const char* what) {
  if (a.positional.size() < min || a.positional.size() > max)
    usage_error(fmt::format("{}: expecting {}", cmd, what));
}

// --- Small helpers ----------------------------------------------------------------

std::string str_of(const json::object& o, const char* key) {
  const json::value* v = o.if_contains(key);
  if (!v) return "";
  if (v->is_string()) return std::string(v->get_string());
  return json::serialize(*v);
}

uint64_t u64_of(const json::object& o, const char* key) {
  const json::value* v = o.if_contains(key);
  if (!v) return 0;
  if (v->is_uint64()) return v->get_uint64();
  if (v->is_int64()) return v->get_int64() < 0 ? 0 : static_cast<uint64_t>(v->get_int64());
  if (v->is_double()) return v->get_double() < 0 ? 0 : static_cast<uint64_t>(v->get_double());
  return 0;
}

bool bool_of(const json::object& o, const char* key) {
  const json::value* v = o.if_contains(key);
  return v && v->is_bool() && v->get_bool();
}

const json::object& data_of(const json::object& event) {
  static const json::object kEmpty;
  const json::value* d = event.if_contains("data");
  return d && d->is_object() ? d->get_object() : kEmpty;
}

std::string speed_text(uint64_t speed) {
  return speed ? human_size(speed) + "/s" : "unlimited";
}

std::string percent_text(uint64_t offset, uint64_t len) {
  double p = len ? 100.0 * static_cast<double>(offset) / static_cast<double>(len) : 0;
  return fmt::format("{:.1f}%", p);
}

std::string duration_text(double seconds) {
  auto s = static_cast<uint64_t>(seconds + 0.5);
  if (s >= 3600) return fmt::format("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60);
  return fmt::format("{}:{:02}", s / 60, s % 60);
}

// --- Following a job ----------------------------------------------------------------

// Follows job `job` until it ends, by its events plus query-block-jobs
// about 4 times a second for progress. Returns the exit code (0 completed,
// 2 cancelled) or throws CommandError (1 failed, 3 the job vanished).
class JobFollower {
 public:
  JobFollower(QmpClient& qmp, std::string job, bool complete_on_ready, bool as_json)
      : qmp_(qmp),
        job_(std::move(job)),
        complete_on_ready_(complete_on_ready),
        as_json_(as_json),
        tty_(::isatty(STDOUT_FILENO) == 1) {}

  int run() {
    auto next_poll = Clock::now();
    for (;;) {
      auto now = Clock::now();
      auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(next_poll - now);
      if (wait.count() < 0) wait = 0ms;
      if (auto event = qmp_.next_event(wait)) {
        if (auto code = on_event(*event)) return *code;
        continue;
      }
      poll();
      next_poll = Clock::now() + 250ms;
    }
  }

 private:
  // Handles one event; returns the exit code when the job ended.
  std::optional<int> on_event(const json::object& event) {
    std::string name = str_of(event, "event");
    const json::object& data = data_of(event);
    if (name == "JOB_STATUS_CHANGE") {
      if (str_of(data, "id") == job_) status(str_of(data, "status"));
      return std::nullopt;
    }
    if (name.rfind("BLOCK_JOB_", 0) != 0 || str_of(data, "device") != job_)
      return std::nullopt;
    if (name == "BLOCK_JOB_READY") {
      status("ready");
      if (complete_on_ready_) complete();
      return std::nullopt;
    }
    if (name == "BLOCK_JOB_ERROR") {
      note(fmt::format("I/O error on {} (action: {})", str_of(data, "operation"),
                       str_of(data, "action")));
      return std::nullopt;
    }
    if (name == "BLOCK_JOB_COMPLETED" || name == "BLOCK_JOB_CANCELLED") {
      offset_ = u64_of(data, "offset");
      len_ = u64_of(data, "len");
      end_progress_line();
      bool cancelled = name == "BLOCK_JOB_CANCELLED";
      bool failed = !cancelled && data.contains("error");
      if (as_json_) fmt::print("{}\n", pretty_json(event));
      std::fflush(stdout);
      if (failed)
        throw CommandError(kExitFailed, fmt::format("job {} failed: {}", job_,
                                                    str_of(data, "error")));
      if (cancelled) throw CommandError(kExitCancelled, fmt::format("job {} was cancelled", job_));
      if (!as_json_) fmt::print("job {}: completed ({})\n", job_, human_size(len_));
      return 0;
    }
    return std::nullopt;
  }

  void poll() {
    json::value jobs = qmp_.execute("query-block-jobs");
    const json::object* mine = nullptr;
    if (jobs.is_array())
      for (const auto& j : jobs.get_array())
        if (j.is_object() && str_of(j.get_object(), "device") == job_) mine = &j.get_object();
    if (!mine) {
      // The job's end event comes before it leaves the list, and events
      // that arrived during the query are queued: a second miss means the
      // job is gone without us seeing its end.
      if (missing_)
        throw CommandError(kExitQmp,
                           fmt::format("job {} does not exist (or ended unseen)", job_));
      missing_ = true;
      return;
    }
    missing_ = false;
    offset_ = u64_of(*mine, "offset");
    len_ = u64_of(*mine, "len");
    speed_ = u64_of(*mine, "speed");
    if (mine->contains("status")) {
      status(str_of(*mine, "status"));
    } else {
      status(bool_of(*mine, "paused") ? "paused" : bool_of(*mine, "ready") ? "ready" : "running");
    }
    if (bool_of(*mine, "ready") && complete_on_ready_) complete();
    auto now = Clock::now();
    if (samples_.empty() && first_.second == 0 && first_.first == Clock::time_point{})
      first_ = {now, offset_};
    samples_.emplace_back(now, offset_);
    while (samples_.size() > 2 && now - samples_.front().first > 10s) samples_.pop_front();
    show_progress(now);
  }

  void complete() {
    if (completed_) return;
    completed_ = true;
    qmp_.execute("block-job-complete", json::object{{"device", job_}});
    note("ready, completing");
  }

  // Bytes/s over the last 10 s of samples; over the whole run when that
  // window saw no change (a rate-limited job moves in bursts).
  double rate() const {
    auto between = [](const std::pair<Clock::time_point, uint64_t>& from,
                      const std::pair<Clock::time_point, uint64_t>& to) {
      double dt = std::chrono::duration<double>(to.first - from.first).count();
      if (dt < 0.2 || to.second <= from.second) return 0.0;
      return static_cast<double>(to.second - from.second) / dt;
    };
    if (samples_.size() < 2) return 0;
    double recent = between(samples_.front(), samples_.back());
    return recent > 0 ? recent : between(first_, samples_.back());
  }

  std::string progress_text() const {
    double r = rate();
    std::string eta = "--:--";
    if (r > 0 && len_ >= offset_) eta = duration_text(static_cast<double>(len_ - offset_) / r);
    return fmt::format("job {}: {} {} ({} of {}), {}/s, ETA {}", job_, status_,
                       percent_text(offset_, len_), human_size(offset_), human_size(len_),
                       human_size(static_cast<uint64_t>(r)), eta);
  }

  void show_progress(Clock::time_point now) {
    if (as_json_) return;
    if (tty_) {
      fmt::print("\r\033[K{}", progress_text());
      drawn_ = true;
      std::fflush(stdout);
    } else if (now - last_plain_ >= 2s) {
      last_plain_ = now;
      fmt::print("{}\n", progress_text());
      std::fflush(stdout);
    }
  }

  void status(const std::string& s) {
    if (s.empty() || s == status_) return;
    status_ = s;
    note(s);
  }

  // A line about the job that stays on the screen.
  void note(const std::string& text) {
    if (as_json_) return;
    end_progress_line();
    fmt::print("job {}: {}\n", job_, text);
    std::fflush(stdout);
  }

  void end_progress_line() {
    if (drawn_) fmt::print("\r\033[K");
    drawn_ = false;
  }

  QmpClient& qmp_;
  std::string job_;
  bool complete_on_ready_;
  bool as_json_;
  bool tty_;
  bool completed_ = false;
  bool missing_ = false;
  bool drawn_ = false;
  std::string status_;
  uint64_t offset_ = 0, len_ = 0, speed_ = 0;
  std::deque<std::pair<Clock::time_point, uint64_t>> samples_;
  std::pair<Clock::time_point, uint64_t> first_{};  // the first sample
  Clock::time_point last_plain_ = Clock::now();
};

// A job was accepted: follow it with --wait, else print its id.
int job_started(QmpClient& qmp, const LiveArgs& a, const std::string& job,
                bool complete_on_ready) {
  if (a.wait) return JobFollower(qmp, job, complete_on_ready, a.as_json).run();
  if (a.as_json)
    fmt::print("{}\n", pretty_json(json::object{{"job-id", job}}));
  else
    fmt::print("{}\n", job);
  return 0;
}

// --- The commands -------------------------------------------------------------------

int live_snapshot(QmpClient& qmp, const LiveArgs& a) {
  expect_positional(a, "snapshot", 2, 2, "DEVICE NEW_FILE");
  json::object args{{"device", a.positional[0]},
                    {"snapshot-file", a.positional[1]},
                    {"format", a.format}};
  if (a.node_name) args["snapshot-node-name"] = *a.node_name;
  // Synchronous: once it returns the overlay is in place (--wait is
  // accepted for symmetry with the job commands).
  try {
    qmp.execute("blockdev-snapshot-sync", args);
  } catch (const QmpError& e) {
    // QEMU looks `device` up among devices (BlockBackends) only; a node
    // (all there is on qemu-storage-daemon) is named by "node-name".
    if (e.desc.find("Cannot find device") == std::string::npos) throw;
    args.erase("device");
    args["node-name"] = a.positional[0];
    qmp.execute("blockdev-snapshot-sync", args);
    args.erase("node-name");
    args["device"] = a.positional[0];
  }
  if (a.as_json)
    fmt::print("{}\n", pretty_json(args));
  else
    fmt::print("{}: snapshot {}\n", a.positional[0], a.positional[1]);
  return 0;
}

// Whether `file` is the active image of export `device` (by query-block;
// false where the server does not say).
bool is_active_image(QmpClient& qmp, const std::string& device, const std::string& file) {
  json::value blocks = qmp.execute("query-block");
  if (!blocks.is_array()) return false;
  for (const auto& b : blocks.get_array()) {
    if (!b.is_object() || str_of(b.get_object(), "device") != device) continue;
    const json::value* inserted = b.get_object().if_contains("inserted");
    if (!inserted || !inserted->is_object()) return false;
    const std::string active = str_of(inserted->get_object(), "file");
    return active == file || same_file(active, file);
  }
  return false;
}

int live_commit(QmpClient& qmp, const LiveArgs& a) {
  expect_positional(a, "commit", 1, 1, "DEVICE");
  if (a.active && a.top) usage_error("commit: --top and --active exclude each other");
  if (!a.active && !a.top)
    usage_error("commit: give --top=FILE, or --active to commit the active image");
  // Committing the active image is a different job (it mirrors writes and
  // must be completed): only when asked for by name.
  if (a.top && is_active_image(qmp, a.positional[0], *a.top))
    usage_error(fmt::format("commit: '{}' is the active image of '{}'; use --active to "
                            "commit it", *a.top, a.positional[0]));
  std::string job = a.job_id.value_or(a.positional[0]);
  json::object args{{"device", a.positional[0]}, {"job-id", job}};
  if (a.top) args["top"] = *a.top;
  if (a.base) args["base"] = *a.base;
  if (a.speed) args["speed"] = *a.speed;
  if (a.empty) args["empty"] = true;
  if (a.depth_first) args["depth-first"] = true;
  if (a.no_give_way) args["give-way"] = false;
  qmp.execute("block-commit", args);
  // A commit whose top is the active image goes READY (also when --top
  // names it): --wait completes it then.
  return job_started(qmp, a, job, true);
}

int live_stream(QmpClient& qmp, const LiveArgs& a) {
  expect_positional(a, "stream", 1, 1, "DEVICE");
  std::string job = a.job_id.value_or(a.positional[0]);
  json::object args{{"device", a.positional[0]}, {"job-id", job}};
  if (a.base) args["base"] = *a.base;
  if (a.speed) args["speed"] = *a.speed;
  if (a.no_give_way) args["give-way"] = false;
  qmp.execute("block-stream", args);
  return job_started(qmp, a, job, false);
}

int live_jobs(QmpClient& qmp, const LiveArgs& a) {
  expect_positional(a, "jobs", 0, 0, "no arguments");
  json::value jobs = qmp.execute("query-block-jobs");
  if (a.as_json) {
    fmt::print("{}\n", pretty_json(jobs));
    return 0;
  }
  fmt::print("{:<16} {:<8} {:<10} {:>24} {:>7} {:>14}\n", "ID", "TYPE", "STATUS",
             "OFFSET/LEN", "PERCENT", "SPEED");
  if (!jobs.is_array()) return 0;
  for (const auto& v : jobs.get_array()) {
    if (!v.is_object()) continue;
    const json::object& j = v.get_object();
    std::string status = str_of(j, "status");
    if (status.empty()) status = bool_of(j, "paused") ? "paused" : "running";
    uint64_t off = u64_of(j, "offset"), len = u64_of(j, "len");
    fmt::print("{:<16} {:<8} {:<10} {:>24} {:>7} {:>14}\n", str_of(j, "device"),
               str_of(j, "type"), status,
               fmt::format("{}/{}", human_size(off), human_size(len)),
               percent_text(off, len), speed_text(u64_of(j, "speed")));
  }
  return 0;
}

int live_job_command(QmpClient& qmp, const std::string& cmd, const LiveArgs& a) {
  if (cmd == "speed") {
    expect_positional(a, "speed", 2, 2, "JOB BYTES_PER_S");
    qmp.execute("block-job-set-speed", json::object{{"device", a.positional[0]},
                                                    {"speed", parse_speed(a.positional[1])}});
    return 0;
  }
  expect_positional(a, cmd.c_str(), 1, 1, "JOB");
  const std::string& job = a.positional[0];
  if (cmd == "cancel") {
    json::object args{{"device", job}};
    if (a.force) args["force"] = true;
    qmp.execute("block-job-cancel", args);
    if (a.wait) return JobFollower(qmp, job, false, a.as_json).run();
    return 0;
  }
  if (cmd == "wait") return JobFollower(qmp, job, false, a.as_json).run();
  if (cmd == "dismiss") {
    qmp.execute("block-job-dismiss", json::object{{"id", job}});
    return 0;
  }
  qmp.execute("block-job-" + cmd, json::object{{"device", job}});
  return 0;
}

int live_exports(QmpClient& qmp, const LiveArgs& a) {
  expect_positional(a, "exports", 0, 0, "no arguments");
  json::value exports = qmp.execute("query-block-exports");
  if (a.as_json) {
    fmt::print("{}\n", pretty_json(exports));
    return 0;
  }
  fmt::print("{:<16} {:<8} {}\n", "ID", "TYPE", "NODE");
  if (!exports.is_array()) return 0;
  for (const auto& v : exports.get_array()) {
    if (!v.is_object()) continue;
    const json::object& e = v.get_object();
    fmt::print("{:<16} {:<8} {}{}\n", str_of(e, "id"), str_of(e, "type"),
               str_of(e, "node-name"), bool_of(e, "shutting-down") ? " (shutting down)" : "");
  }
  return 0;
}

// The image chain under an ImageInfo (top first), as a table: depth,
// file, format, virtual and actual size, and whether the server has the
// image open read-only. layerd reports "depth" and "ro" per image; for
// qemu's ImageInfo the depth is the position in the chain and "ro" is known
// only for the top (the node's), else "-".
void print_image_chain(const json::object& image, const std::string& indent,
                       std::optional<bool> top_ro) {
  struct Row {
    std::string depth, file, format, virt, actual, ro;
  };
  std::vector<Row> rows;
  const json::object* img = &image;
  for (size_t i = 0; img; ++i) {
    Row r;
    r.depth = img->contains("depth") ? str_of(*img, "depth") : std::to_string(i);
    r.file = str_of(*img, "filename");
    r.format = str_of(*img, "format");
    r.virt = human_size(u64_of(*img, "virtual-size"));
    r.actual = img->contains("actual-size") ? human_size(u64_of(*img, "actual-size")) : "-";
    if (const json::value* ro = img->if_contains("ro"); ro && ro->is_bool())
      r.ro = ro->get_bool() ? "ro" : "rw";
    else if (i == 0 && top_ro)
      r.ro = *top_ro ? "ro" : "rw";
    else
      r.ro = "-";
    rows.push_back(std::move(r));
    const json::value* b = img->if_contains("backing-image");
    img = b && b->is_object() ? &b->get_object() : nullptr;
  }
  size_t wfile = 4, wformat = 6, wvirt = 7, wactual = 6;
  for (const Row& r : rows) {
    wfile = std::max(wfile, r.file.size());
    wformat = std::max(wformat, r.format.size());
    wvirt = std::max(wvirt, r.virt.size());
    wactual = std::max(wactual, r.actual.size());
  }
  auto line = [&](const Row& r) {
    fmt::print("{}{:<5} {:<{}} {:<{}} {:>{}} {:>{}} {}\n", indent, r.depth, r.file, wfile,
               r.format, wformat, r.virt, wvirt, r.actual, wactual, r.ro);
  };
  line({"DEPTH", "FILE", "FORMAT", "VIRTUAL", "ACTUAL", "RO"});
  for (const Row& r : rows) line(r);
}

// A BlockDeviceInfo (a node, or the medium of a device), with the export
// or node name it is known by.
void print_node(const std::string& name, const json::object& node) {
  std::string what = fmt::format("{}, {}", str_of(node, "drv"),
                                 bool_of(node, "ro") ? "read-only" : "read-write");
  if (const json::value* img = node.if_contains("image"); img && img->is_object()) {
    size_t below = 0;
    for (const json::object* i = &img->get_object();;) {
      const json::value* b = i->if_contains("backing-image");
      if (!b || !b->is_object()) break;
      ++below;
      i = &b->get_object();
    }
    if (below) what += fmt::format(", {} backing image{}", below, below == 1 ? "" : "s");
  }
  // layerd: an export that serves throwaway overlays ("temp", "per-client").
  if (std::string overlay = str_of(node, "overlay"); !overlay.empty())
    what += fmt::format(", {} overlay", overlay);
  fmt::print("{}: {} ({})\n", name, str_of(node, "file"), what);
  if (const json::value* img = node.if_contains("image"); img && img->is_object())
    print_image_chain(img->get_object(), "  ", bool_of(node, "ro"));
}

int live_info(QmpClient& qmp, const LiveArgs& a) {
  expect_positional(a, "info", 0, 1, "[DEVICE]");
  std::optional<std::string> device;
  if (!a.positional.empty()) device = a.positional[0];

  // Devices (BlockBackends with a name; layerd's exports) first;
  // qemu-storage-daemon has none, so then the named nodes.
  json::value devices = qmp.execute("query-block");
  json::array picked;
  if (devices.is_array() && !devices.get_array().empty()) {
    for (const auto& v : devices.get_array()) {
      if (!v.is_object()) continue;
      const json::object& d = v.get_object();
      const json::value* ins = d.if_contains("inserted");
      std::string node = ins && ins->is_object() ? str_of(ins->get_object(), "node-name") : "";
      if (!device || str_of(d, "device") == *device || str_of(d, "qdev") == *device ||
          node == *device)
        picked.push_back(v);
    }
    if (!device || !picked.empty()) {
      if (a.as_json) {
        fmt::print("{}\n", pretty_json(device ? picked.front() : json::value(picked)));
        return 0;
      }
      bool first = true;
      for (const auto& v : picked) {
        const json::object& d = v.get_object();
        if (!first) fmt::print("\n");
        first = false;
        const json::value* ins = d.if_contains("inserted");
        if (ins && ins->is_object())
          print_node(str_of(d, "device"), ins->get_object());
        else
          fmt::print("{}: [not inserted]\n", str_of(d, "device"));
      }
      return 0;
    }
  }
  json::value nodes;
  try {
    nodes = qmp.execute("query-named-block-nodes");
  } catch (const QmpError& e) {
    // layerd has no nodes apart from its exports' images.
    if (e.error_class != "CommandNotFound") throw;
  }
  picked.clear();
  if (nodes.is_array())
    for (const auto& v : nodes.get_array())
      if (v.is_object() && (!device || str_of(v.get_object(), "node-name") == *device))
        picked.push_back(v);
  if (device && picked.empty())
    throw CommandError(kExitQmp, fmt::format("Cannot find device={} nor node-name={}",
                                             *device, *device));
  if (a.as_json) {
    fmt::print("{}\n", pretty_json(device ? picked.front() : json::value(picked)));
    return 0;
  }
  bool first = true;
  for (const auto& v : picked) {
    if (!first) fmt::print("\n");
    first = false;
    print_node(str_of(v.get_object(), "node-name"), v.get_object());
  }
  return 0;
}

}  // namespace

bool is_live_command(const std::string& name) {
  static const char* const kNames[] = {"snapshot", "commit", "stream", "jobs", "cancel",
                                       "complete", "pause", "resume", "speed", "dismiss",
                                       "wait", "exports", "info"};
  for (const char* n : kNames)
    if (name == n) return true;
  return false;
}

int cmd_live(const std::string& qmp_path, int argc, char** argv) {
  std::string cmd = argv[0];
  if (!is_live_command(cmd)) usage_error(fmt::format("Command not found: {}", cmd));
  unsigned allowed = kQmp | kOutput;
  if (cmd == "snapshot") allowed |= kWait | kFormat | kNodeName;
  if (cmd == "commit")
    allowed |= kTop | kBase | kActive | kEmpty | kDepthFirst | kSpeed | kNoGiveWay | kJobId | kWait;
  if (cmd == "stream") allowed |= kBase | kSpeed | kNoGiveWay | kJobId | kWait;
  if (cmd == "cancel") allowed |= kForce | kWait;
  auto args = parse_live_args(argc, argv, allowed, qmp_path);
  if (!args) return 0;
  try {
    QmpClient qmp(args->qmp);
    if (cmd == "snapshot") return live_snapshot(qmp, *args);
    if (cmd == "commit") return live_commit(qmp, *args);
    if (cmd == "stream") return live_stream(qmp, *args);
    if (cmd == "jobs") return live_jobs(qmp, *args);
    if (cmd == "exports") return live_exports(qmp, *args);
    if (cmd == "info") return live_info(qmp, *args);
    return live_job_command(qmp, cmd, *args);
  } catch (const QmpError& e) {
    std::fflush(stdout);
    throw CommandError(kExitQmp, e.desc);
  } catch (const QmpConnectionError& e) {
    std::fflush(stdout);
    throw CommandError(kExitQmp, e.what());
  }
}

}  // namespace layerd::ctl
