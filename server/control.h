// The control plane: the QMP commands over layerd's exports and their block
// jobs (query-block, blockdev-snapshot-sync, block-commit, block-stream,
// block-job-*, block-export-*), with QEMU's names, arguments and events.
// What layerd adds or does differently is in docs/control.md.
//
// Thread safety: the commands run on the QMP server's thread, one at a
// time; job events arrive on job threads and are handed to
// QmpServer::emit, which is thread-safe. Lock order: Control::mutex_, then
// a job's own lock (never the other way: observer calls take no lock of
// Control's).
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "overlay/block_job.h"
#include "overlay/image_registry.h"
#include "server/export.h"
#include "server/qmp.h"

namespace layerd {

class Control final : public JobObserver {
 public:
  // Opens an export for block-export-add (what main does for --export).
  using ExportOpener = std::function<std::shared_ptr<Export>(
      const ExportSpec& spec, std::string* error)>;

  Control(ExportRegistry& exports, ImageRegistry& images, QmpServer& qmp,
          ExportOpener open_export);
  ~Control() override;  // waits for running jobs to be cancelled

  // Adds the commands to `qmp` (before it starts).
  void register_commands();

  // Cancels every job and waits for them (shutdown).
  void cancel_all_jobs();

  // For a --config reload, which replaces exports from another thread:
  // while the returned lock is held no QMP command runs (so no job starts
  // and no export is added or deleted over QMP).
  std::unique_lock<std::mutex> hold_commands();
  // Why export `name` may not be replaced or removed now (a job runs on
  // it); "" if it may.
  std::string job_on(const std::string& name);
  // Why `e`, not yet installed, may not be added now: its chain uses an
  // image that a running job changes or drops (what a writer of it would
  // do would be lost, or what it serves would change); "" if it may.
  std::string refuse_new_export(const Export& e);

  // JobObserver: turned into QMP events.
  void status_changed(const JobInfo& info) override;
  void ready(const JobInfo& info) override;
  void completed(const JobInfo& info, const std::string& error) override;
  void cancelled(const JobInfo& info) override;
  void io_error(const JobInfo& info, const std::string& operation) override;

 private:
  boost::json::value query_block(const boost::json::object& args);
  boost::json::value query_block_jobs(const boost::json::object& args);
  boost::json::value snapshot_sync(const boost::json::object& args);
  boost::json::value block_commit(const boost::json::object& args);
  boost::json::value block_stream(const boost::json::object& args);
  boost::json::value job_cancel(const boost::json::object& args);
  boost::json::value job_complete(const boost::json::object& args);
  boost::json::value job_pause(const boost::json::object& args);
  boost::json::value job_resume(const boost::json::object& args);
  boost::json::value job_set_speed(const boost::json::object& args);
  boost::json::value job_dismiss(const boost::json::object& args);
  boost::json::value export_add(const boost::json::object& args);
  boost::json::value export_del(const boost::json::object& args);
  boost::json::value query_exports(const boost::json::object& args);

  // The export `device` as a live target, refusing one with a job (any
  // job on its chain) running. `as_node`: QEMU's wording for a command
  // that also takes node names.
  void live_target(const std::string& device, struct LiveTarget* out,
                   bool as_node = false);
  BlockJob& find_job(const std::string& id);
  // QEMU's refusal of a second job with the same id.
  void refuse_job_id_in_use(const std::string& id);
  void add_job(std::unique_ptr<BlockJob> job);
  void reap_finished_jobs();  // with mutex_ held

  ExportRegistry& exports_;
  ImageRegistry& images_;
  QmpServer& qmp_;
  ExportOpener open_export_;
  // Held by every command handler and by hold_commands(); taken before
  // mutex_.
  std::mutex commands_mutex_;
  std::mutex mutex_;  // guards jobs_
  std::map<std::string, std::unique_ptr<BlockJob>> jobs_;
};

}  // namespace layerd
