// QMP commands and job events (see control.h). Argument names, replies
// and error texts follow qapi/block-core.json and qemu-storage-daemon 7.2.
#include "server/control.h"

#include <sys/stat.h>

#include <fmt/format.h>

#include "overlay/graph.h"
#include "overlay/live_ops.h"
#include "server/log.h"

namespace layerd {
namespace json = boost::json;

namespace {

// The nodes an export reads: its graph, or the shared base under
// per-client overlays. Empty for a raw image served directly.
std::vector<std::shared_ptr<BlockNode>> nodes_of(const Export& e) {
  if (e.per_client) return e.per_client->base;
  if (auto g = std::dynamic_pointer_cast<GraphLayer>(e.layer)) return g->graph()->nodes;
  return {};
}

json::object image_info(const std::vector<std::shared_ptr<BlockNode>>& nodes, size_t i) {
  const BlockNode& n = *nodes[i];
  json::object o;
  o["filename"] = n.path;
  o["format"] = format_name(n.format);
  o["virtual-size"] = n.size.load();
  struct stat st {};
  if (::stat(n.path.c_str(), &st) == 0) o["actual-size"] = static_cast<uint64_t>(st.st_blocks) * 512;
  if (n.image) {
    o["cluster-size"] = n.image->cluster_size();
    o["dirty-flag"] = n.image->dirty();
    if (!n.snapshot_id.empty()) o["snapshot-id"] = n.snapshot_id;
    if (!n.image->backing_file().empty()) {
      o["backing-filename"] = n.image->backing_file();
      if (!n.image->backing_format().empty())
        o["backing-filename-format"] = n.image->backing_format();
    }
  }
  o["ro"] = !n.writable;  // layerd: how layerd has the file open now
  o["depth"] = i;         // layerd: 0 for the top
  if (i + 1 < nodes.size()) {
    o["full-backing-filename"] = nodes[i + 1]->path;
    o["backing-image"] = image_info(nodes, i + 1);
  }
  return o;
}

json::object job_info_json(const JobInfo& j) {
  return json::object{{"type", j.type},
                      {"device", j.id},
                      {"len", j.len},
                      {"offset", j.offset},
                      {"busy", j.busy},
                      {"paused", j.paused},
                      {"speed", j.speed},
                      {"io-status", "ok"},
                      {"ready", j.ready},
                      {"status", job_status_name(j.status)},
                      {"auto-finalize", true},
                      {"auto-dismiss", true}};
}

json::object job_event_data(const JobInfo& j) {
  return json::object{{"type", j.type}, {"device", j.id}, {"len", j.len},
                      {"offset", j.offset}, {"speed", j.speed}};
}

uint64_t speed_argument(const json::object& args) {
  int64_t speed = qmp_optional_int(args, "speed", 0);
  if (speed < 0) qmp_fail("Parameter 'speed' expects a non-negative value");
  return static_cast<uint64_t>(speed);
}

// QEMU's job options that layerd has one answer to.
void refuse_unsupported_job_options(const json::object& args) {
  if (!qmp_optional_bool(args, "auto-finalize", true))
    qmp_fail("'auto-finalize': false is not supported by layerd");
  if (!qmp_optional_bool(args, "auto-dismiss", true))
    qmp_fail("'auto-dismiss': false is not supported by layerd");
  std::string on_error = qmp_optional_string(args, "on-error", "report");
  if (on_error != "report")
    qmp_fail(fmt::format("on-error '{}' is not supported by layerd (only 'report')", on_error));
}

[[noreturn]] void fail_job_not_found(const std::string& id) {
  throw QmpError{"DeviceNotActive", fmt::format("Block job '{}' not found", id)};
}

}  // namespace

Control::Control(ExportRegistry& exports, ImageRegistry& images, QmpServer& qmp,
                 ExportOpener open_export)
    : exports_(exports), images_(images), qmp_(qmp), open_export_(std::move(open_export)) {}

Control::~Control() { cancel_all_jobs(); }

void Control::cancel_all_jobs() {
  std::map<std::string, std::unique_ptr<BlockJob>> jobs;
  {
    std::lock_guard lock(mutex_);
    jobs.swap(jobs_);
  }
  for (auto& [_, job] : jobs) job->cancel(true);
  for (auto& [_, job] : jobs) job->wait_finished();
}

void Control::register_commands() {
  auto bind = [this](json::value (Control::*fn)(const json::object&)) {
    return [this, fn](const json::object& args) {
      std::lock_guard one_change_at_a_time(commands_mutex_);
      return (this->*fn)(args);
    };
  };
  qmp_.add_command("query-block", bind(&Control::query_block));
  qmp_.add_command("query-block-jobs", bind(&Control::query_block_jobs));
  qmp_.add_command("blockdev-snapshot-sync", bind(&Control::snapshot_sync));
  qmp_.add_command("block-commit", bind(&Control::block_commit));
  qmp_.add_command("block-stream", bind(&Control::block_stream));
  qmp_.add_command("block-job-cancel", bind(&Control::job_cancel));
  qmp_.add_command("block-job-complete", bind(&Control::job_complete));
  qmp_.add_command("block-job-pause", bind(&Control::job_pause));
  qmp_.add_command("block-job-resume", bind(&Control::job_resume));
  qmp_.add_command("block-job-set-speed", bind(&Control::job_set_speed));
  qmp_.add_command("block-job-dismiss", bind(&Control::job_dismiss));
  qmp_.add_command("block-export-add", bind(&Control::export_add));
  qmp_.add_command("block-export-del", bind(&Control::export_del));
  qmp_.add_command("query-block-exports", bind(&Control::query_exports));
}

// --- Events ---------------------------------------------------------------------

void Control::status_changed(const JobInfo& info) {
  qmp_.emit("JOB_STATUS_CHANGE",
            json::object{{"id", info.id}, {"status", job_status_name(info.status)}});
}

void Control::ready(const JobInfo& info) {
  log_info("job '{}': ready", info.id);
  qmp_.emit("BLOCK_JOB_READY", job_event_data(info));
}

void Control::completed(const JobInfo& info, const std::string& error) {
  json::object data = job_event_data(info);
  if (!error.empty()) {
    data["error"] = error;
    log_error("job '{}' failed: {}", info.id, error);
  } else {
    log_info("job '{}': completed", info.id);
  }
  qmp_.emit("BLOCK_JOB_COMPLETED", std::move(data));
}

void Control::cancelled(const JobInfo& info) {
  log_info("job '{}': cancelled", info.id);
  qmp_.emit("BLOCK_JOB_CANCELLED", job_event_data(info));
}

void Control::io_error(const JobInfo& info, const std::string& operation) {
  qmp_.emit("BLOCK_JOB_ERROR", json::object{{"device", info.id},
                                            {"operation", operation},
                                            {"action", "report"}});
}

// --- Jobs -------------------------------------------------------------------------

void Control::reap_finished_jobs() {
  for (auto it = jobs_.begin(); it != jobs_.end();) {
    if (it->second->finished()) {
      it->second->wait_finished();
      it = jobs_.erase(it);
    } else {
      ++it;
    }
  }
}

BlockJob& Control::find_job(const std::string& id) {
  std::lock_guard lock(mutex_);
  reap_finished_jobs();
  auto it = jobs_.find(id);
  if (it == jobs_.end()) fail_job_not_found(id);
  return *it->second;
}

void Control::refuse_job_id_in_use(const std::string& id) {
  std::lock_guard lock(mutex_);
  reap_finished_jobs();
  if (jobs_.count(id)) qmp_fail(fmt::format("Job ID '{}' already in use", id));
}

std::unique_lock<std::mutex> Control::hold_commands() {
  return std::unique_lock(commands_mutex_);
}

std::string Control::job_on(const std::string& name) {
  std::lock_guard lock(mutex_);
  reap_finished_jobs();
  for (const auto& [id, job] : jobs_)
    if (job->device() == name)
      return fmt::format("export '{}' has a block job running ({} '{}')", name, job->type(), id);
  return {};
}

std::string Control::refuse_new_export(const Export& e) {
  std::vector<std::string> files;
  for (const auto& n : nodes_of(e)) files.push_back(n->path);
  if (files.empty()) files.push_back(e.spec.file);  // a raw image served directly
  std::lock_guard lock(mutex_);
  reap_finished_jobs();
  for (const auto& [_, job] : jobs_)
    for (const std::string& busy : job->files())
      for (const std::string& f : files)
        if (same_file(f, busy))
          return fmt::format("Node '{}' is busy: block device is in use by block job: {}",
                             busy, job->type());
  return {};
}

void Control::add_job(std::unique_ptr<BlockJob> job) {
  std::lock_guard lock(mutex_);
  jobs_[job->id()] = std::move(job);
}

void Control::live_target(const std::string& device, LiveTarget* out, bool as_node) {
  auto e = exports_.find(device);
  if (!e && as_node)  // QEMU looks for a device or a node by that name
    qmp_fail(fmt::format("Cannot find device='{}' nor node-name='{}'", device, device));
  if (!e) throw QmpError{"DeviceNotFound", fmt::format("Device '{}' not found", device)};
  {
    std::lock_guard lock(mutex_);
    reap_finished_jobs();
    for (const auto& [id, job] : jobs_)
      if (job->device() == device)
        qmp_fail(fmt::format("Node '{}' is busy: block device is in use by block job: {}",
                             device, job->type()));
  }
  if (!e->bitmaps.empty())
    qmp_fail(fmt::format("export '{}' exports dirty bitmaps (-B), which would not follow "
                         "its chain through a live change", device));
  if (e->per_client || e->temp)
    qmp_fail(fmt::format("export '{}' serves throwaway overlays (-s, --overlay); "
                         "its chain cannot change", device));
  if (e->spec.compress)
    qmp_fail(fmt::format("export '{}' compresses every write (--image-opts "
                         "driver=compress); its chain cannot change", device));
  out->device = device;
  out->layer = std::dynamic_pointer_cast<GraphLayer>(e->layer);
  out->registry = &images_;
  out->image_dirs = e->image_dirs;
  out->other_user = [this, device](const BlockNode& node) -> std::string {
    for (const auto& other : exports_.all()) {
      if (other->name == device) continue;
      for (const auto& n : nodes_of(*other))
        if (n.get() == &node || (n->snapshot_of && n->snapshot_of.get() == &node))
          return fmt::format("export '{}'", other->name);
      if (nodes_of(*other).empty() && same_file(other->spec.file, node.path))
        return fmt::format("export '{}'", other->name);
    }
    return {};
  };
}

json::value Control::query_block_jobs(const json::object&) {
  std::lock_guard lock(mutex_);
  reap_finished_jobs();
  json::array out;
  for (const auto& [_, job] : jobs_) out.push_back(job_info_json(job->info()));
  return out;
}

json::value Control::snapshot_sync(const json::object& args) {
  qmp_only_arguments(args, {"device", "node-name", "snapshot-file", "snapshot-node-name",
                            "format", "mode"});
  std::string device = qmp_optional_string(args, "device");
  if (device.empty()) device = qmp_optional_string(args, "node-name");
  if (device.empty()) qmp_fail("Cannot find device='' nor node-name=''");
  SnapshotRequest r;
  r.file = qmp_required_string(args, "snapshot-file");
  r.format = qmp_optional_string(args, "format", "qcow2");
  std::string mode = qmp_optional_string(args, "mode", "absolute-paths");
  if (mode != "absolute-paths" && mode != "existing")
    qmp_fail(fmt::format("Parameter 'mode' does not accept value '{}'", mode));
  r.existing = mode == "existing";
  LiveTarget t;
  live_target(device, &t, true);
  std::string error;
  if (!live_snapshot(t, r, &error)) qmp_fail(error);
  log_info("export '{}': live snapshot, now writing '{}'", device, r.file);
  return json::object{};
}

json::value Control::block_commit(const json::object& args) {
  qmp_only_arguments(args, {"job-id", "device", "base-node", "base", "top-node", "top",
                            "backing-file", "speed", "on-error", "filter-node-name",
                            "auto-finalize", "auto-dismiss", "empty", "depth-first",
                            "give-way"});
  const std::string device = qmp_required_string(args, "device");
  refuse_unsupported_job_options(args);
  CommitRequest r;
  r.job_id = qmp_optional_string(args, "job-id");
  r.top = qmp_optional_string(args, "top", qmp_optional_string(args, "top-node"));
  r.base = qmp_optional_string(args, "base", qmp_optional_string(args, "base-node"));
  r.backing_file = qmp_optional_string(args, "backing-file");
  r.speed = speed_argument(args);
  r.empty = qmp_optional_bool(args, "empty", false);
  r.depth_first = qmp_optional_bool(args, "depth-first", false);
  r.give_way = qmp_optional_bool(args, "give-way", true);
  LiveTarget t;
  live_target(device, &t);
  refuse_job_id_in_use(r.job_id.empty() ? device : r.job_id);
  std::string error;
  auto job = start_commit(t, r, this, &error);
  if (!job) qmp_fail(error);
  add_job(std::move(job));
  return json::object{};
}

json::value Control::block_stream(const json::object& args) {
  qmp_only_arguments(args, {"job-id", "device", "base", "base-node", "backing-file",
                            "bottom", "speed", "on-error", "filter-node-name",
                            "auto-finalize", "auto-dismiss", "give-way"});
  const std::string device = qmp_required_string(args, "device");
  refuse_unsupported_job_options(args);
  if (args.contains("bottom")) qmp_fail("'bottom' is not supported by layerd; use 'base'");
  StreamRequest r;
  r.job_id = qmp_optional_string(args, "job-id");
  r.base = qmp_optional_string(args, "base", qmp_optional_string(args, "base-node"));
  r.backing_file = qmp_optional_string(args, "backing-file");
  r.speed = speed_argument(args);
  r.give_way = qmp_optional_bool(args, "give-way", true);
  LiveTarget t;
  live_target(device, &t, true);
  refuse_job_id_in_use(r.job_id.empty() ? device : r.job_id);
  std::string error;
  auto job = start_stream(t, r, this, &error);
  if (!job) qmp_fail(error);
  add_job(std::move(job));
  return json::object{};
}

json::value Control::job_cancel(const json::object& args) {
  qmp_only_arguments(args, {"device", "force"});
  find_job(qmp_required_string(args, "device")).cancel(qmp_optional_bool(args, "force", false));
  return json::object{};
}

json::value Control::job_complete(const json::object& args) {
  qmp_only_arguments(args, {"device"});
  std::string error;
  if (!find_job(qmp_required_string(args, "device")).complete(&error)) qmp_fail(error);
  return json::object{};
}

json::value Control::job_pause(const json::object& args) {
  qmp_only_arguments(args, {"device"});
  if (!find_job(qmp_required_string(args, "device")).pause()) qmp_fail("Job is already paused");
  return json::object{};
}

json::value Control::job_resume(const json::object& args) {
  qmp_only_arguments(args, {"device"});
  const std::string id = qmp_required_string(args, "device");
  if (!find_job(id).resume()) qmp_fail("Can't resume a job that was not paused");
  return json::object{};
}

json::value Control::job_set_speed(const json::object& args) {
  qmp_only_arguments(args, {"device", "speed"});
  const std::string id = qmp_required_string(args, "device");
  int64_t speed = qmp_required_int(args, "speed");
  if (speed < 0) qmp_fail("Parameter 'speed' expects a non-negative value");
  find_job(id).set_speed(static_cast<uint64_t>(speed));
  return json::object{};
}

json::value Control::job_dismiss(const json::object& args) {
  qmp_only_arguments(args, {"id"});
  const std::string id = qmp_required_string(args, "id");
  // Jobs dismiss themselves once concluded: a job still found is running.
  const JobStatus status = find_job(id).status();
  qmp_fail(fmt::format("Job '{}' in state '{}' cannot accept command verb 'dismiss'", id,
                       job_status_name(status)));
}

// --- Exports and the graph ------------------------------------------------------

json::value Control::query_block(const json::object& args) {
  qmp_only_arguments(args, {"flat"});
  json::array out;
  for (const auto& e : exports_.all()) {
    json::object info{{"device", e->name}, {"qdev", ""}, {"type", "unknown"},
                      {"removable", false}, {"locked", false}};
    auto nodes = nodes_of(*e);
    json::object inserted;
    const bool ro = !e->layer->capabilities().writable || e->policy.read_only;
    if (nodes.empty()) {
      inserted = json::object{{"file", e->spec.file}, {"node-name", e->spec.file},
                              {"ro", ro}, {"drv", "raw"}, {"backing_file_depth", 0},
                              {"encrypted", false}, {"detect_zeroes", "off"},
                              {"image", json::object{{"filename", e->spec.file},
                                                     {"format", "raw"},
                                                     {"virtual-size", e->layer->size()}}}};
    } else {
      inserted = json::object{{"file", nodes[0]->path}, {"node-name", nodes[0]->path},
                              {"ro", ro}, {"drv", format_name(nodes[0]->format)},
                              {"backing_file_depth", nodes.size() - 1},
                              {"encrypted", false}, {"detect_zeroes", "off"},
                              {"image", image_info(nodes, 0)}};
      if (nodes.size() > 1) inserted["backing_file"] = nodes[1]->path;
      if (e->per_client) inserted["overlay"] = "per-client";  // layerd
      if (e->temp) inserted["overlay"] = "temp";
    }
    info["inserted"] = std::move(inserted);
    out.push_back(std::move(info));
  }
  return out;
}

json::value Control::query_exports(const json::object& args) {
  qmp_only_arguments(args, {});
  json::array out;
  for (const auto& e : exports_.all()) {
    auto nodes = nodes_of(*e);
    out.push_back(json::object{{"type", "nbd"},
                               {"id", e->name},
                               {"node-name", nodes.empty() ? e->spec.file : nodes[0]->path},
                               {"shutting-down", false}});
  }
  return out;
}

// block-export-add type=nbd: QEMU names a block node; layerd names the
// image file ("node-name" is its path) and opens its chain as --export does.
json::value Control::export_add(const json::object& args) {
  qmp_only_arguments(args, {"type", "id", "node-name", "name", "description", "writable",
                            "writethrough", "iothread", "fixed-iothread", "bitmaps",
                            "allocation-depth", "format"});
  if (qmp_required_string(args, "type") != "nbd")
    qmp_fail("layerd exports only type 'nbd'");
  ExportSpec spec;
  const std::string id = qmp_required_string(args, "id");
  spec.name = qmp_optional_string(args, "name", id);
  spec.file = qmp_required_string(args, "node-name");
  spec.format = qmp_optional_string(args, "format");
  spec.description = qmp_optional_string(args, "description");
  spec.read_only = !qmp_optional_bool(args, "writable", false);
  spec.allocation_depth = qmp_optional_bool(args, "allocation-depth", false);
  if (args.contains("bitmaps")) qmp_fail("'bitmaps' is not supported by layerd yet");
  if (spec.name != id)
    qmp_fail("layerd names an export by its id: 'name' must equal 'id' or be left out");
  if (exports_.find(spec.name)) qmp_fail(fmt::format("Block export id '{}' is already in use", id));
  std::string error;
  auto e = open_export_(spec, &error);
  if (!e) qmp_fail(error);
  if (auto why = refuse_new_export(*e); !why.empty()) qmp_fail(why);
  exports_.add(std::move(e));
  log_info("export '{}' added over QMP: {}", spec.name, spec.file);
  return json::object{};
}

json::value Control::export_del(const json::object& args) {
  qmp_only_arguments(args, {"id", "mode"});
  const std::string id = qmp_required_string(args, "id");
  const std::string mode = qmp_optional_string(args, "mode", "safe");
  if (mode != "safe" && mode != "hard")
    qmp_fail(fmt::format("Parameter 'mode' does not accept value '{}'", mode));
  auto e = exports_.find(id);
  if (!e) qmp_fail(fmt::format("Export '{}' is not found", id));
  {
    std::lock_guard lock(mutex_);
    reap_finished_jobs();
    for (const auto& [_, job] : jobs_)
      if (job->device() == id) qmp_fail(fmt::format("Export '{}' has a block job running", id));
  }
  // One reference is the registry's, one is ours: any more are clients.
  if (e.use_count() > 2) {
    if (mode == "safe") qmp_fail(fmt::format("export '{}' still in use", id));
    qmp_fail("mode 'hard' is not supported by layerd yet: disconnect the clients first");
  }
  exports_.replace({id}, {});
  e.reset();
  qmp_.emit("BLOCK_EXPORT_DELETED", json::object{{"id", id}});
  return json::object{};
}

}  // namespace layerd
