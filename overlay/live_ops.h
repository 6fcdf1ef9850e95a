// Live chain operations on an export's graph while clients are served:
// an external snapshot (instant), and the block jobs stream and commit
// (intermediate, and active with a mirror and a pivot or an emptying).
//
// Each keeps the guest-visible content the same at every moment and the
// chain on disk valid at every point a crash could hit (see each function
// and docs/design.md "Live jobs"):
//   - snapshot: the new overlay is created and synced before the graph
//     switches to it; the old top is then reopened read-only in place.
//   - stream: data is copied into the top (Image::populate, which never
//     overwrites what a client wrote), the top is flushed, then its
//     backing name is rewritten in one step, then the graph drops the
//     streamed images.
//   - commit: the base is reopened read-write in place, data allocated
//     between top and base is written into it (this changes nothing the
//     export shows: those ranges are shadowed), the base is flushed, the
//     image above `top` is pointed at the base in one header write, the
//     graph drops the committed images, and the base goes back to
//     read-only.
//   - active commit: as commit, with a Mirror in the graph so that client
//     writes are tracked while the first copy runs and written through to
//     the base once it is in sync (ready). Completing pivots the export to
//     the base; with `empty`, the top instead stays and is emptied (its
//     data now lives in the base). Cancelling keeps the original chain.
//
// Thread safety: called from the control thread; jobs run on their own
// threads. One operation at a time per export (the caller's rule).
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "overlay/block_job.h"
#include "overlay/graph.h"
#include "overlay/image_registry.h"

namespace layerd {

// The export a live operation works on.
struct LiveTarget {
  std::string device;  // the export's name
  std::shared_ptr<GraphLayer> layer;
  ImageRegistry* registry = nullptr;
  // Where file names the client sends (a snapshot file) may lead; nullptr:
  // anywhere.
  std::shared_ptr<const ImageDirs> image_dirs;
  // The name of another user (an export) of `node` outside this export's
  // graph, or "" if none: such a node must not be changed.
  std::function<std::string(const BlockNode& node)> other_user;
};

struct SnapshotRequest {
  std::string file;             // the new overlay
  std::string format = "qcow2";
  bool existing = false;  // mode "existing": the file is made already
};

// blockdev-snapshot-sync: puts a new empty qcow2 overlay on top of the
// export's graph. false with `error` on failure (nothing changed).
bool live_snapshot(const LiveTarget& target, const SnapshotRequest& request,
                   std::string* error);

struct StreamRequest {
  std::string job_id;
  std::string base;          // file name of the node to keep; "": all
  std::string backing_file;  // name to record; "": derived from base
  uint64_t speed = 0;
  // layerd's addition: the copy gives way to busy clients (BulkCopy in
  // block_job.h); false copies at full speed whatever they do.
  bool give_way = true;
};

struct CommitRequest {
  std::string job_id;
  std::string top;   // file name; "": the active image (active commit)
  std::string base;  // file name; "": the bottom image
  std::string backing_file;
  uint64_t speed = 0;
  // layerd's addition: an active commit that, on completion, empties the
  // active image instead of pivoting to the base.
  bool empty = false;
  // layerd's addition: an intermediate commit that empties the committed
  // images one by one, bottom first (seed 002's depth-first order), so
  // that a run again after a kill or cancel copies only what is left.
  bool depth_first = false;
  // layerd's addition, as for a stream (an active commit's tracking copy
  // never gives way).
  bool give_way = true;
};

// Validates the request and starts the job (running when returned).
// nullptr with `error` on refusal.
std::unique_ptr<BlockJob> start_stream(const LiveTarget& target,
                                       const StreamRequest& request,
                                       JobObserver* observer, std::string* error);
std::unique_ptr<BlockJob> start_commit(const LiveTarget& target,
                                       const CommitRequest& request,
                                       JobObserver* observer, std::string* error);

}  // namespace layerd
