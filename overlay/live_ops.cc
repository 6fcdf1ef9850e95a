// Live snapshot, stream and commit (see live_ops.h for the guarantees).
//
// The jobs read from the Graph they started on (holding it keeps its
// nodes open) and never take one image's lock while reading another:
// data is read into the job's buffer first, then written. Pieces are
// kCopyPiece bytes, aligned, so one piece is one pread and one pwrite in
// the common case.
#include "overlay/live_ops.h"

#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <optional>
#include <vector>

#include <fmt/format.h>

#include "overlay/copy_lane.h"
#include "qcow2/file.h"

namespace layerd {
namespace {

namespace fs = std::filesystem;

constexpr uint64_t kCopyPiece = 2 << 20;
// A job starts the write-back of its target every this many bytes copied,
// so that the disk writes while the job copies and the final flush finds
// little left (instead of the whole copy, all still in the page cache).
constexpr uint64_t kStartWritebackEvery = 16 << 20;
// A depth-first commit drops what it copied from the image it empties
// after every batch of this much (a flush of the base each): what a kill
// makes the next run copy again.
constexpr uint64_t kDepthFirstBatch = 64 << 20;
constexpr uint64_t kMirrorGranularity = 64 << 10;
// Active commit turns to sync mode once this little is left to copy: the
// rest is copied while client requests wait (a bounded pause).
constexpr uint64_t kSyncThreshold = 4 << 20;
// Passes of the tracking copy that leave at least 90% of the dirty bytes
// of the one before, after which an active commit turns to sync mode
// early.
constexpr int kStalledPasses = 3;

// The depth of the node that `name` names (QEMU's "top"/"base" file
// names): the path it was opened by, or another name of the same file.
// Snapshot views are not chain members of their own.
bool find_node(const Graph& g, const std::string& name, size_t* depth) {
  for (size_t i = 0; i < g.nodes.size(); ++i)
    if (g.nodes[i]->path == name) return (*depth = i), true;
  for (size_t i = 0; i < g.nodes.size(); ++i)
    if (g.nodes[i]->snapshot_id.empty() && same_file(g.nodes[i]->path, name))
      return (*depth = i), true;
  return false;
}

// The backing name to record in the image at `above` for the node at
// `below`: the name the chain already used for it, when it resolves from
// `above`'s directory to the same file; else its absolute path.
std::string backing_name(const Graph& g, size_t above, size_t below) {
  const BlockNode& b = *g.nodes[below];
  const fs::path dir = fs::path(g.nodes[above]->path).parent_path();
  const BlockNode& named_by = *g.nodes[below - 1];
  if (named_by.image) {
    const std::string& used = named_by.image->backing_file();
    fs::path resolved = fs::path(used).is_absolute() ? fs::path(used) : dir / used;
    if (!used.empty() && same_file(resolved.string(), b.path)) return used;
  }
  std::error_code ec;
  fs::path abs = fs::absolute(b.path, ec);
  return ec ? b.path : abs.lexically_normal().string();
}

// The files of the nodes [from, to] of `g`.
std::vector<std::string> files_of(const Graph& g, size_t from, size_t to) {
  std::vector<std::string> files;
  for (size_t i = from; i <= to && i < g.nodes.size(); ++i) files.push_back(g.nodes[i]->path);
  return files;
}

std::string refuse_shared(const LiveTarget& t, const Graph& g, size_t from,
                          size_t to) {
  for (size_t i = from; i <= to && i < g.nodes.size(); ++i) {
    std::string user = t.other_user ? t.other_user(*g.nodes[i]) : std::string();
    if (!user.empty())
      return fmt::format("'{}' is also used by {}; the operation would change "
                         "what it serves", g.nodes[i]->path, user);
  }
  return {};
}

// Replaces `current` by a graph of `nodes` (same filters, no mirror),
// provided the export still serves `expected`.
// `*made` (if given) is the new graph.
std::error_code switch_graph(GraphLayer& layer, const Graph* expected,
                             std::vector<std::shared_ptr<BlockNode>> nodes,
                             const std::function<std::error_code()>& at_switch = {},
                             std::shared_ptr<const Graph>* made = nullptr) {
  return layer.change([&](const Graph& current, std::shared_ptr<const Graph>* next) {
    if (&current != expected) return std::make_error_code(std::errc::device_or_resource_busy);
    if (at_switch)
      if (auto ec = at_switch()) return ec;
    *next = Graph::make(std::move(nodes), current.copy_on_read);
    if (made) *made = *next;
    return std::error_code{};
  });
}

// Makes what a job wrote into the node durable. While clients are served,
// its write-back goes a step at a time first (write_back_in_steps), so
// that their requests to the same disk never queue behind a job's whole
// backlog of copied data; while their requests are paused (`paused`),
// in one fdatasync, which takes less time in all.
std::error_code flush_node(const BlockNode& node, bool paused = false) {
  if (node.image) {
    if (!paused)
      if (auto ec = node.image->write_back_in_steps()) return ec;
    return node.image->flush();
  }
  if (!paused)
    if (auto ec = node.raw->write_back_in_steps()) return ec;
  return node.raw->flush();
}

// Writes what the nodes [from, to) hold of [offset, offset + length)
// into the node at `to` (reading what the graph shows from `from` down).
// Consecutive data extents, whichever image holds them, are read with one
// walk and written with one write; zeros become zero writes. `*failed_op`
// says which side failed.
std::error_code copy_down(const Graph& g, size_t from, size_t to,
                          uint64_t offset, uint64_t length,
                          DirectIoBuffer& buf, const char** failed_op,
                          uint64_t* copied) {
  BlockNode& target = *g.nodes[to];
  const size_t below = to + 1;
  auto below_reader = [&](uint64_t off, std::span<std::byte> b) {
    return read_graph(g, below, off, b);
  };
  uint64_t run_start = offset, run_length = 0;  // data not written yet
  auto write_run = [&]() -> std::error_code {
    if (run_length == 0) return {};
    buf.resize(std::max<size_t>(buf.size(), run_length));
    std::span<std::byte> data(buf.data(), run_length);
    if (auto ec = read_graph(g, from, run_start, data)) {
      *failed_op = "read";
      return ec;
    }
    std::error_code ec = target.raw ? target.raw->pwrite(data, run_start)
                                    : target.image->write(run_start, data, below_reader);
    if (ec) {
      *failed_op = "write";
      return ec;
    }
    *copied += run_length;
    run_length = 0;
    return {};
  };
  while (length > 0) {
    Extent e;
    if (auto ec = allocation_between(g, from, to, offset, length, &e)) {
      *failed_op = "read";
      return ec;
    }
    const uint64_t n = std::min(e.length, length);
    if (e.depth != 0 && !e.zero) {
      if (run_length == 0) run_start = offset;
      run_length += n;
    } else {
      if (auto ec = write_run()) return ec;
      if (e.depth != 0) {  // zeros
        std::error_code ec = target.raw ? target.raw->write_zeroes(offset, n)
                                        : target.image->write_zeroes(offset, n, true, below_reader);
        if (ec) {
          *failed_op = "write";
          return ec;
        }
        *copied += n;
      }
    }
    offset += n;
    length -= n;
  }
  return write_run();
}

// Makes the base hold at least `size` bytes (a commit of larger images
// into it). What it gains reads as zeros, as it did through the chain, at
// every moment: a raw file grows by truncation, a qcow2 image over a
// longer backing file with its new area zero in the same step.
std::error_code grow_base(const Graph& g, size_t base, uint64_t size,
                          GraphLayer& layer, std::string* error) {
  BlockNode& node = *g.nodes[base];
  const uint64_t old = node.size;
  if (old >= size) return {};
  auto failed = [&](std::error_code ec, const std::string& why) {
    *error = fmt::format("cannot grow '{}' to {} bytes (the size of what is committed "
                         "into it): {}", node.path, size, why);
    return ec;
  };
  if (!node.image) {
    if (node.raw->size() != old)
      return failed(std::make_error_code(std::errc::not_supported),
                    "it is served as a part of its file");
    if (auto ec = node.raw->truncate(size)) return failed(ec, ec.message());
    if (auto ec = node.raw->flush()) return failed(ec, ec.message());
  } else {
    const bool longer_below = base + 1 < g.nodes.size() && g.nodes[base + 1]->size > old;
    auto below = [&](uint64_t off, std::span<std::byte> b) {
      return read_graph(g, base + 1, off, b);
    };
    qcow2::Status st = longer_below ? node.image->grow_reading_zeros(size, below)
                                    : node.image->grow(size);
    if (!st.ok()) return failed(st.code(), st.message());
  }
  // The node's size is read by the graph walk: change it with requests
  // paused (the ranges it gains are shadowed by the committed images).
  return layer.change([&](const Graph&, std::shared_ptr<const Graph>*) {
    node.size = size;
    return std::error_code{};
  });
}

// --- Jobs ----------------------------------------------------------------------

class LiveJob : public BlockJob {
 public:
  LiveJob(const LiveTarget& t, std::string id, std::string type,
          std::shared_ptr<const Graph> g, uint64_t speed, JobObserver* observer)
      : BlockJob(std::move(id), std::move(type), t.device, observer),
        target_(t),
        graph_(std::move(g)),
        speed_(speed) {}

 protected:
  // A failure of `op` with `ec` at `what`: reported, and the job's error.
  // The work of the job type; afterwards the job lets go of the graph, so
  // that images it dropped close (and unlock) now, not when the job object
  // goes.
  virtual std::string work() = 0;
  std::string run() final {
    std::string error = work();
    graph_.reset();
    return error;
  }

  // Pieces of kCopyPiece, smaller under a low speed limit (an eighth of a
  // second's worth, at least 64 KiB), so that progress and the limit stay
  // smooth and a pause or cancel is seen soon.
  uint64_t piece() const {
    const uint64_t s = speed();
    if (s == 0) return kCopyPiece;
    return std::clamp<uint64_t>(s / 8 / (64 << 10) * (64 << 10), 64 << 10, kCopyPiece);
  }

  std::string io_failure(const char* op, std::error_code ec, const std::string& what) {
    report_io_error(op);
    return fmt::format("{}: {}", what, ec.message());
  }

  // Counts `n` bytes copied into `node` and starts its write-back every
  // kStartWritebackEvery. Not while client requests wait: it may block on
  // a full device queue.
  void wrote_into(const BlockNode& node, uint64_t n) {
    unwritten_back_ += n;
    if (unwritten_back_ < kStartWritebackEvery) return;
    unwritten_back_ = 0;
    if (node.image) node.image->start_writeback();
    else if (node.raw) node.raw->start_writeback();
  }

  LiveTarget target_;
  std::shared_ptr<const Graph> graph_;
  uint64_t speed_;
  DirectIoBuffer buf_;  // aligned: bulk copies go past the page cache
  DirectIoBuffer lane_buf_;  // the CopyLane's
  uint64_t unwritten_back_ = 0;  // bytes copied since the last start_writeback
};

class StreamJob final : public LiveJob {
 public:
  StreamJob(const LiveTarget& t, std::string id, std::shared_ptr<const Graph> g,
            size_t base, std::string backing, uint64_t speed, JobObserver* o)
      : LiveJob(t, std::move(id), "stream", std::move(g), speed, o),
        base_(base),
        backing_(std::move(backing)) {}

 protected:
  std::string work() override {
    const Graph& g = *graph_;
    qcow2::Image& top = *g.nodes[0]->image;
    const uint64_t size = top.size();
    const uint64_t cs = top.cluster_size();
    set_len(size);
    BulkCopy bulk(*this);
    for (uint64_t pos = 0; pos < size;) {
      if (!checkpoint()) return {};
      const uint64_t piece = std::min(this->piece(), size - pos);
      uint64_t copied = 0;
      for (uint64_t at = pos; at < pos + piece;) {
        Extent e;
        if (auto ec = allocation_between(g, 0, base_, at, pos + piece - at, &e))
          return io_failure("read", ec, "reading the chain");
        // Held by an image that goes (depth 2 and more): into the top, in
        // whole clusters (populate leaves those a client wrote alone).
        if (e.depth > 1) {
          const uint64_t first = at / cs * cs;
          const uint64_t last = std::min((at + e.length + cs - 1) / cs * cs,
                                         (size + cs - 1) / cs * cs);
          buf_.resize(last - first);
          std::span<std::byte> data(buf_);
          const uint64_t inside = std::min(last, size) - first;
          std::fill(buf_.begin() + static_cast<ptrdiff_t>(inside), buf_.end(), std::byte{0});
          if (auto ec = read_graph(g, 1, first, data.first(inside)))
            return io_failure("read", ec, "reading the chain");
          if (auto ec = top.populate(first, data))
            return io_failure("write", ec, fmt::format("writing '{}'", g.nodes[0]->path));
          copied += inside;
        }
        at += e.length;
      }
      pos += piece;
      add_offset(piece);
      wrote_into(*g.nodes[0], copied);
      throttle(copied);
    }
    if (!checkpoint()) return {};
    return finish();
  }

 private:
  // The top holds everything the streamed images held: make it durable,
  // then name the new backing image in one step, then drop them.
  std::string finish() {
    const Graph& g = *graph_;
    qcow2::Image& top = *g.nodes[0]->image;
    if (auto ec = flush_node(*g.nodes[0])) return io_failure("write", ec, "flushing the top");
    finishing();
    const bool to_base = base_ < g.nodes.size();
    const std::string name = !to_base ? "" : backing_.empty() ? backing_name(g, 0, base_) : backing_;
    const std::string format = to_base ? format_name(g.nodes[base_]->format) : "";
    qcow2::Status st = top.change_backing_file(name, format);
    if (!st.ok()) {
      report_io_error("write");
      return fmt::format("rewriting the backing file of '{}': {}", g.nodes[0]->path, st.message());
    }
    std::vector<std::shared_ptr<BlockNode>> nodes{g.nodes[0]};
    nodes.insert(nodes.end(), g.nodes.begin() + static_cast<ptrdiff_t>(base_), g.nodes.end());
    if (auto ec = switch_graph(*target_.layer, &g, std::move(nodes)))
      return fmt::format("switching the export's graph: {}", ec.message());
    return {};
  }

  const size_t base_;  // the first node kept below the top
  const std::string backing_;
};

class CommitJob final : public LiveJob {
 public:
  CommitJob(const LiveTarget& t, std::string id, std::shared_ptr<const Graph> g,
            size_t top, size_t base, std::string backing, bool empty,
            bool depth_first, uint64_t speed, JobObserver* o)
      : LiveJob(t, std::move(id), "commit", std::move(g), speed, o),
        top_(top),
        base_(base),
        backing_(std::move(backing)),
        empty_(empty),
        depth_first_(depth_first) {}

 protected:
  bool completable() const override { return top_ == 0; }

  std::string work() override {
    // start_commit made the base writable.
    std::string error;
    if (auto ec = grow_base(*graph_, base_, graph_->nodes[top_]->size, *target_.layer, &error)) {
      restore_base();
      return error;
    }
    error = top_ == 0 ? run_active() : depth_first_ ? run_depth_first() : run_intermediate();
    restore_base();
    return error;
  }

 private:
  void restore_base() {
    // After a pivot the base is the export's top and stays writable.
    if (pivoted_) return;
    std::string error;
    if (!target_.registry->set_writable(graph_->nodes[base_], false, &error))
      std::fprintf(stderr, "layerd: job %s: %s\n", id().c_str(), error.c_str());
  }

  // Copies what [from, base) holds of the whole disk into the base, two
  // pieces at a time: the job's thread one, its lane the next (alone
  // where no lane thread can be made).
  std::string copy_all(const Graph& g, size_t from) {
    const uint64_t size = g.nodes[from]->size;
    set_len(size);
    const char* lane_op = "read";  // the lane's results: outlive the lane
    uint64_t lane_copied = 0;
    std::optional<CopyLane> lane;  // before BulkCopy: in the normal CPU class
    try {
      lane.emplace(id(), job_nice());
    } catch (const std::system_error&) {
    }
    BulkCopy bulk(*this);
    for (uint64_t pos = 0; pos < size;) {
      if (!checkpoint()) return {};
      const uint64_t piece = std::min(this->piece(), size - pos);
      // Giving way, the copy runs on the job's thread alone (in the
      // background class, which every client thread preempts at once).
      const bool two = lane && !bulk.direct_io();
      const uint64_t next = two ? std::min(this->piece(), size - pos - piece) : 0;
      lane_op = "read";
      lane_copied = 0;
      if (next > 0)
        lane->start([&, at = pos + piece, next] {
          return copy_down(g, from, base_, at, next, lane_buf_, &lane_op, &lane_copied);
        });
      const char* op = "read";
      uint64_t copied = 0;
      std::error_code ec = copy_down(g, from, base_, pos, piece, buf_, &op, &copied);
      const std::error_code lane_ec = next > 0 ? lane->wait() : std::error_code{};
      if (ec || lane_ec)
        return io_failure(ec ? op : lane_op, ec ? ec : lane_ec,
                          fmt::format("committing into '{}'", g.nodes[base_]->path));
      pos += piece + next;
      add_offset(piece + next);
      wrote_into(*g.nodes[base_], copied + lane_copied);
      throttle(copied + lane_copied);
    }
    return {};
  }

  std::string run_intermediate() {
    const Graph& g = *graph_;
    std::string error = copy_all(g, top_);
    if (!error.empty() || cancelled()) return error;
    if (auto ec = flush_base(g)) return io_failure("write", ec, "flushing the base");
    finishing();
    return rebase_and_drop(g, top_ - 1, backing_);
  }

  // The base holds all that the nodes between `above` and the base held,
  // durably: `above` names the base (in one header write; `backing`, or
  // the name the chain used), then the graph drops those nodes.
  std::string rebase_and_drop(const Graph& g, size_t above, const std::string& backing) {
    std::string error;
    const std::shared_ptr<BlockNode> above_node = g.nodes[above];
    const bool reopen_above = !above_node->writable;
    if (reopen_above && !target_.registry->set_writable(above_node, true, &error))
      return error;
    const std::string name = backing.empty() ? backing_name(g, above, base_) : backing;
    qcow2::Status st = above_node->image->change_backing_file(
        name, format_name(g.nodes[base_]->format));
    if (reopen_above) {
      std::string ignored;
      (void)target_.registry->set_writable(above_node, false, &ignored);
    }
    if (!st.ok()) {
      report_io_error("write");
      return fmt::format("rewriting the backing file of '{}': {}", above_node->path, st.message());
    }
    std::vector<std::shared_ptr<BlockNode>> nodes(g.nodes.begin(),
                                                  g.nodes.begin() + static_cast<ptrdiff_t>(above) + 1);
    nodes.insert(nodes.end(), g.nodes.begin() + static_cast<ptrdiff_t>(base_), g.nodes.end());
    std::shared_ptr<const Graph> next;
    if (auto ec = switch_graph(*target_.layer, &g, std::move(nodes), {}, &next))
      return fmt::format("switching the export's graph: {}", ec.message());
    base_ = above + 1;
    graph_ = std::move(next);
    return {};
  }

  // --- Depth-first commit (seed 002) ------------------------------------------
  //
  // The image right above the base goes first: what it alone holds (no
  // image above it in the commit shadows it) is copied into the base and,
  // once the base has it durably, dropped from the image (unallocated: it
  // reads from the base now, the same data). Then the image above it names
  // the base and the graph drops the emptied image; then the next one up.
  // Every step keeps what every read returns, and a job killed or
  // cancelled at any point leaves a valid chain in which what was copied
  // is no longer allocated above the base: running the commit again copies
  // only what is left (and the last batch that was not yet dropped, at
  // most kDepthFirstBatch). Each image of the commit is writable while it
  // is emptied. Progress (offset/len) counts the bytes to copy, so a run
  // again shows what is left.

  std::string run_depth_first() {
    const uint64_t size = graph_->nodes[top_]->size;
    uint64_t left = 0;  // progress: the bytes to copy
    for (size_t d = top_; d < base_; ++d) {
      for (uint64_t pos = 0; pos < size;) {
        Extent e;
        if (auto ec = allocation_between(*graph_, top_, d + 1, pos, size - pos, &e))
          return io_failure("read", ec, "reading the chain");
        if (e.depth == d + 1) left += e.length;
        pos += e.length;
      }
    }
    set_len(left);
    while (base_ - 1 >= top_) {
      const size_t d = base_ - 1;
      std::string error;
      const std::shared_ptr<BlockNode> node = graph_->nodes[d];
      if (!node->writable && !target_.registry->set_writable(node, true, &error)) return error;
      error = empty_into_base(*graph_, d, size);
      if (error.empty() && !cancelled())
        if (auto ec = flush_base(*graph_)) error = io_failure("write", ec, "flushing the base");
      if (!error.empty() || cancelled()) {
        std::string ignored;
        (void)target_.registry->set_writable(node, false, &ignored);
        return error;
      }
      if (d == top_) finishing();
      error = rebase_and_drop(*graph_, d - 1, d == top_ ? backing_ : std::string());
      std::string ignored;
      (void)target_.registry->set_writable(node, false, &ignored);
      if (!error.empty()) return error;
    }
    return {};
  }

  // Copies what node `d` (right above the base) holds and no node of the
  // commit above it shadows into the base, and unallocates it in `d` once
  // the base has it durably, batch by batch.
  std::string empty_into_base(const Graph& g, size_t d, uint64_t size) {
    qcow2::Image& image = *g.nodes[d]->image;
    const uint64_t held = g.nodes[d]->size;  // past it, `d` reads zeros
    std::vector<std::pair<uint64_t, uint64_t>> copied_ranges;
    uint64_t batch = 0;
    auto drop_copied = [&]() -> std::string {
      if (copied_ranges.empty()) return {};
      if (auto ec = flush_base(g)) return io_failure("write", ec, "flushing the base");
      auto below = [&](uint64_t off, std::span<std::byte> b) { return read_graph(g, base_, off, b); };
      for (auto [off, len] : copied_ranges)
        if (auto ec = image.discard(off, len, qcow2::DiscardMode::Unallocate, below))
          return io_failure("write", ec, fmt::format("emptying '{}'", g.nodes[d]->path));
      copied_ranges.clear();
      batch = 0;
      return {};
    };
    BulkCopy bulk(*this);
    for (uint64_t pos = 0; pos < size;) {
      if (!checkpoint()) return drop_copied();
      const uint64_t piece = std::min(this->piece(), size - pos);
      uint64_t copied = 0;
      for (uint64_t at = pos; at < pos + piece;) {
        Extent e;
        if (auto ec = allocation_between(g, top_, d + 1, at, pos + piece - at, &e))
          return io_failure("read", ec, "reading the chain");
        if (e.depth == d + 1) {
          const char* op = "read";
          if (auto ec = copy_down(g, d, base_, at, e.length, buf_, &op, &copied))
            return io_failure(op, ec, fmt::format("committing into '{}'", g.nodes[base_]->path));
          if (at < held) copied_ranges.emplace_back(at, std::min(e.length, held - at));
          add_offset(e.length);
        }
        at += e.length;
      }
      pos += piece;
      wrote_into(*g.nodes[base_], copied);
      batch += copied;
      if (batch >= kDepthFirstBatch)
        if (std::string error = drop_copied(); !error.empty()) return error;
      throttle(copied);
    }
    return drop_copied();
  }

  // --- Active commit ---------------------------------------------------------

  // Copies the dirty ranges from `from` on (all of them with `all`);
  // `locked`: under the mirror's range lock (sync mode).
  // One pass over the dirty map. `throttled`: the speed limit applies and
  // a pause or cancel is seen between pieces; `locked`: client writes
  // reach the base too (sync mode), so each piece is copied under the
  // range lock. Only a throttled copy that holds no range lock a client
  // may wait for runs in the background CPU class.
  std::string copy_dirty(const Graph& g, Mirror& m, bool throttled, bool locked) {
    uint64_t cursor = 0, offset = 0, length = 0;
    std::optional<BulkCopy> bulk;
    // Nobody waits for the copy; it must gain on the writes, so it does
    // not give way to busy clients (BulkCopy).
    if (throttled && !locked) bulk.emplace(*this, false);
    while (m.take_dirty(cursor, piece(), &offset, &length)) {
      if (throttled && !checkpoint()) return {};
      const char* op = "read";
      uint64_t copied = 0;
      if (locked) m.lock_range(offset, length);
      std::error_code ec = copy_down(g, 0, base_, offset, length, buf_, &op, &copied);
      if (locked) m.unlock_range(offset, length);
      if (ec) {
        m.mark_dirty(offset, length);
        return io_failure(op, ec, fmt::format("committing into '{}'", g.nodes[base_]->path));
      }
      cursor = offset + length;
      add_offset(length);
      set_len(std::max(len_now(), offset_done() + m.dirty_bytes()));
      // Not while requests are paused (neither throttled nor locked).
      if (throttled && !locked) wrote_into(*g.nodes[base_], copied);
      if (throttled) throttle(copied);
    }
    return {};
  }

  // Installs the mirror (tracking), marks everything the images above
  // the base hold as dirty, and copies until little is left; then, with
  // requests paused, the rest, and turns to sync mode. When the copy does
  // not gain on the client writes (a pass leaves 90% or more of what the
  // one before left dirty, kStalledPasses times: writes faster than the copy, or a low
  // speed limit), it turns to sync mode early, as QEMU's
  // copy-mode=write-blocking: client writes then reach the base as well,
  // so what is dirty only shrinks, and the rest is copied under the range
  // locks before the job is ready.
  std::string run_active() {
    auto mirror = std::make_shared<Mirror>(graph_->nodes[base_], base_,
                                           graph_->nodes[0]->size, kMirrorGranularity);
    std::shared_ptr<const Graph> mirrored;
    std::error_code ec = target_.layer->change(
        [&](const Graph& current, std::shared_ptr<const Graph>* next) {
          if (&current != graph_.get())
            return std::make_error_code(std::errc::device_or_resource_busy);
          auto g = std::make_shared<Graph>(current);
          g->mirror = mirror;
          mirrored = g;
          *next = g;
          return std::error_code{};
        });
    if (ec) return fmt::format("installing the mirror: {}", ec.message());
    const Graph& g = *mirrored;
    std::string error = mark_allocated(g, *mirror);
    uint64_t last_dirty = UINT64_MAX;
    int stalled = 0;
    while (error.empty() && !cancelled()) {
      error = copy_dirty(g, *mirror, true, false);
      if (!error.empty() || cancelled()) break;
      const uint64_t dirty = mirror->dirty_bytes();
      const bool early = dirty > kSyncThreshold &&
                         (dirty >= last_dirty / 10 * 9 ? ++stalled : (stalled = 0)) >= kStalledPasses;
      last_dirty = dirty;
      if (dirty > kSyncThreshold && !early) continue;
      // What was copied becomes durable before the base takes client
      // writes (which then wait only for what little the pivot flushes).
      if (auto e = flush_base(g)) {
        error = io_failure("write", e, "flushing the base");
        break;
      }
      ec = target_.layer->change([&](const Graph& current, std::shared_ptr<const Graph>*) {
        if (&current != &g) return std::make_error_code(std::errc::device_or_resource_busy);
        if (!early) error = copy_dirty(g, *mirror, false, false);
        if (error.empty()) mirror->set_sync(true);
        return std::error_code{};
      });
      if (ec) error = fmt::format("entering sync: {}", ec.message());
      // Early: the rest, while client writes reach the base too.
      while (early && error.empty() && !cancelled() && mirror->dirty_bytes() != 0)
        error = copy_dirty(g, *mirror, true, true);
      break;
    }
    if (!error.empty() || cancelled()) {
      drop_mirror(g);
      return error;
    }
    std::string sync_error;
    ReadyEnd end = wait_ready([&] { return copy_dirty(g, *mirror, false, true); }, &sync_error);
    if (end == ReadyEnd::Complete) return empty_ ? empty_top(g) : pivot(g);
    drop_mirror(g);
    return end == ReadyEnd::Error ? sync_error : std::string();
  }

  std::string mark_allocated(const Graph& g, Mirror& m) {
    const uint64_t size = g.nodes[0]->size;
    for (uint64_t pos = 0; pos < size;) {
      Extent e;
      if (auto ec = allocation_between(g, 0, base_, pos, size - pos, &e))
        return io_failure("read", ec, "reading the chain");
      if (e.depth != 0) m.mark_dirty(pos, e.length);
      pos += e.length;
    }
    set_len(m.dirty_bytes());
    return {};
  }

  void drop_mirror(const Graph& g) {
    (void)switch_graph(*target_.layer, &g,
                       std::vector<std::shared_ptr<BlockNode>>(graph_->nodes));
  }

  // `paused`: with client requests paused (see flush_node).
  std::error_code flush_base(const Graph& g, bool paused = false) {
    return flush_node(*g.nodes[base_], paused);
  }

  // The base is in sync: it becomes the export's top.
  // Copies what fell out of sync (a failed write to the base left it
  // dirty) and flushes the base; `paused`: with requests paused (no
  // client write races, so no range lock).
  std::string drain(const Graph& g, bool paused) {
    std::string error = copy_dirty(g, *g.mirror, false, !paused);
    if (error.empty() && g.mirror->dirty_bytes() != 0)
      error = "the base did not stay in sync";
    if (error.empty())
      if (auto ec = flush_base(g, paused)) error = io_failure("write", ec, "flushing the base");
    return error;
  }

  std::string pivot(const Graph& g) {
    if (std::string error = drain(g, false); !error.empty()) {
      drop_mirror(g);
      return error;
    }
    finishing();
    std::vector<std::shared_ptr<BlockNode>> nodes(g.nodes.begin() + static_cast<ptrdiff_t>(base_),
                                                  g.nodes.end());
    std::string error;
    auto ec = switch_graph(*target_.layer, &g, std::move(nodes), [&]() -> std::error_code {
      // Writes that failed on the base since the drain: copied now.
      if (g.mirror->dirty_bytes() == 0) return {};
      error = drain(g, true);
      return error.empty() ? std::error_code{} : std::make_error_code(std::errc::io_error);
    });
    if (ec) {
      drop_mirror(g);
      return error.empty() ? fmt::format("pivoting: {}", ec.message()) : error;
    }
    pivoted_ = true;
    return {};
  }

  // The base is in sync: the top stays the export's top, over the base,
  // and is emptied (its data lives in the base now). In order, each step
  // keeping the content: the base durable, the top's backing name, then
  // the emptying.
  std::string empty_top(const Graph& g) {
    if (std::string error = drain(g, false); !error.empty()) {
      drop_mirror(g);
      return error;
    }
    finishing();
    qcow2::Image& top = *g.nodes[0]->image;
    std::string error;
    std::vector<std::shared_ptr<BlockNode>> nodes{g.nodes[0]};
    nodes.insert(nodes.end(), g.nodes.begin() + static_cast<ptrdiff_t>(base_), g.nodes.end());
    // The base has every flushed write already (a client's flush reaches
    // it in sync mode) and the job's copies were flushed just above.
    auto ec = switch_graph(*target_.layer, &g, std::move(nodes), [&]() -> std::error_code {
      // The top's data must all be in the base before the top is emptied.
      if (g.mirror->dirty_bytes() != 0) {
        error = drain(g, true);
        if (!error.empty()) return std::make_error_code(std::errc::io_error);
      }
      if (base_ > 1) {
        qcow2::Status st = top.change_backing_file(
            backing_.empty() ? backing_name(g, 0, base_) : backing_,
            format_name(g.nodes[base_]->format));
        if (!st.ok()) {
          error = fmt::format("rewriting the backing file of '{}': {}", g.nodes[0]->path, st.message());
          return st.code();
        }
      }
      qcow2::Status st = top.make_empty();
      if (!st.ok()) {
        error = fmt::format("emptying '{}': {}", g.nodes[0]->path, st.message());
        return st.code();
      }
      return {};
    });
    if (ec) {
      drop_mirror(g);
      return error.empty() ? fmt::format("emptying: {}", ec.message()) : error;
    }
    return {};
  }

  const size_t top_;
  size_t base_;  // moves up as a depth-first commit drops images
  const std::string backing_;
  const bool empty_;
  const bool depth_first_;
  bool pivoted_ = false;
};

std::string job_id_for(const std::string& asked, const LiveTarget& t) {
  return asked.empty() ? t.device : asked;
}

// Common refusals: a writable qcow2 chain served through a graph.
std::shared_ptr<const Graph> job_graph(const LiveTarget& t, std::string* error) {
  if (!t.layer) {
    *error = fmt::format("export '{}' is not a qcow2 chain (a raw image is served "
                         "directly; its graph cannot change)", t.device);
    return nullptr;
  }
  if (!t.layer->capabilities().writable) {
    *error = fmt::format("export '{}' is read-only", t.device);
    return nullptr;
  }
  auto g = t.layer->graph();
  if (g->mirror) {
    *error = fmt::format("export '{}' has a job running", t.device);
    return nullptr;
  }
  return g;
}

// The directory `path` would be created in, opened for creating names in
// it: beneath an allowed image directory when `dirs` confines names. -1
// with `error` set.
int open_parent_dir(const std::string& path, const ImageDirs* dirs, std::string* error) {
  std::string dir = fs::path(path).parent_path().string();
  if (dir.empty()) dir = ".";
  std::error_code ec;
  const int flags = O_RDONLY | O_DIRECTORY | O_CLOEXEC;
  int fd = dirs ? dirs->open_fd(dir, flags, ec) : ::open(dir.c_str(), flags);
  if (fd >= 0) return fd;
  if (!dirs) ec = std::error_code(errno, std::generic_category());
  *error = dirs ? dirs->explain(ec, fmt::format("snapshot file '{}'", path), path) : "";
  if (error->empty()) *error = fmt::format("cannot create '{}': {}", path, ec.message());
  return -1;
}

// Makes `path` a new empty qcow2 image over `below` (named `backing`):
// written and synced under a temporary name in the same directory, then
// renamed into place, so that a kill leaves either no file or a whole one.
// All three steps go through one descriptor of that directory (no name is
// looked up twice) and never follow a symlink at the final names.
bool create_overlay(const std::string& path, const std::string& backing,
                    const BlockNode& below, const ImageDirs* dirs, std::string* error) {
  std::error_code ec;
  if (fs::exists(path, ec)) {
    *error = fmt::format("'{}' already exists; remove it or use mode 'existing'", path);
    return false;
  }
  const int dfd = open_parent_dir(path, dirs, error);
  if (dfd < 0) return false;
  const std::string name = fs::path(path).filename().string();
  const std::string temp = "." + name + ".layerd-new";
  FileOptions fo{.mode = OpenMode::ReadWrite, .create = true};
  std::unique_ptr<File> file;
  int fd = ::openat(dfd, temp.c_str(), posix_open_flags(fo) | O_NOFOLLOW, 0644);
  if (fd >= 0) file = adopt_posix_fd(fd, fo, ec);
  else ec = std::error_code(errno, std::generic_category());
  if (!file) {
    ::close(dfd);
    *error = fmt::format("cannot create '{}': {}", path, ec.message());
    return false;
  }
  qcow2::CreateOptions co;
  co.size = below.size;
  co.backing_file = backing;
  co.backing_format = format_name(below.format);
  (void)file->truncate(0);  // a leftover of a killed attempt
  qcow2::Status st = qcow2::Image::create(*file, co);
  if (st.ok() && (ec = file->flush())) st = qcow2::Status::IoError(ec, "flush");
  file.reset();
  // No replacing: a file that appeared meanwhile stays.
  if (st.ok() &&
      ::renameat2(dfd, temp.c_str(), dfd, name.c_str(), RENAME_NOREPLACE) != 0)
    st = qcow2::Status::IoError(std::error_code(errno, std::generic_category()),
                                "renaming it into place");
  if (st.ok()) {
    // The name must survive a crash before the export writes into it.
    if (::fsync(dfd) != 0) {
      st = qcow2::Status::IoError(std::error_code(errno, std::generic_category()),
                                  "syncing its directory");
      ::unlinkat(dfd, name.c_str(), 0);
    }
  }
  if (!st.ok()) {
    ::unlinkat(dfd, temp.c_str(), 0);
    *error = fmt::format("cannot create '{}': {}", path, st.message());
  }
  ::close(dfd);
  return st.ok();
}

}  // namespace

bool live_snapshot(const LiveTarget& t, const SnapshotRequest& r, std::string* error) {
  std::shared_ptr<const Graph> g = job_graph(t, error);
  if (!g) return false;
  // Another export writing the same top would write a backing image.
  if (auto why = refuse_shared(t, *g, 0, 0); !why.empty()) {
    *error = why;
    return false;
  }
  const std::shared_ptr<BlockNode> old_top = g->nodes[0];
  if (r.format != "qcow2") {
    *error = fmt::format("snapshot format '{}' is not supported (only qcow2)", r.format);
    return false;
  }
  if (r.file.empty()) {
    *error = "Parameter 'snapshot-file' is missing";
    return false;
  }
  if (auto why = refuse_protocol_name(fmt::format("snapshot file '{}'", r.file), r.file);
      !why.empty()) {
    *error = why;
    return false;
  }
  std::error_code ec;
  const std::string backing = fs::absolute(old_top->path, ec).lexically_normal().string();
  if (!r.existing && !create_overlay(r.file, backing, *old_top, t.image_dirs.get(), error))
    return false;
  NodeOptions no;
  no.writable = true;
  no.image_dirs = t.image_dirs.get();
  std::shared_ptr<BlockNode> node =
      t.registry->open(r.file, ImageFormat::Qcow2, no, error);
  if (!node) return false;
  auto fail = [&](std::string why) {
    *error = std::move(why);
    if (!r.existing) {
      node.reset();
      std::error_code ignored;
      fs::remove(r.file, ignored);
    }
    return false;
  };
  if (node == old_top) return fail(fmt::format("'{}' is the active image", r.file));
  if (node->size != old_top->size)
    return fail(fmt::format("'{}' is {} bytes, the export {}", r.file, node->size.load(),
                            old_top->size.load()));
  if (r.existing) {
    const std::string& named = node->image->backing_file();
    fs::path resolved = fs::path(named).is_absolute()
                            ? fs::path(named)
                            : fs::path(r.file).parent_path() / named;
    if (named.empty() || !same_file(resolved.string(), old_top->path))
      return fail(fmt::format("'{}' does not have '{}' as its backing file", r.file,
                              old_top->path));
  }
  // Its dirty bit now, not at the first client write after the switch.
  if (auto e = node->image->begin_writes())
    return fail(fmt::format("'{}': {}", r.file, e.message()));
  // No flush while requests wait: the old top is written back after the
  // switch (reopened read-only), and until then a client's flush covers it
  // (GraphLayer flushes every writable image of its graph).
  std::vector<std::shared_ptr<BlockNode>> nodes{node};
  nodes.insert(nodes.end(), g->nodes.begin(), g->nodes.end());
  ec = switch_graph(*t.layer, g.get(), std::move(nodes));
  if (ec) return fail(fmt::format("switching to '{}': {}", r.file, ec.message()));
  t.registry->mark_backing(old_top, r.file);
  std::string why;
  if (!t.registry->set_writable(old_top, false, &why))
    std::fprintf(stderr, "layerd: after the snapshot: %s\n", why.c_str());
  return true;
}

std::unique_ptr<BlockJob> start_stream(const LiveTarget& t, const StreamRequest& r,
                                       JobObserver* observer, std::string* error) {
  std::shared_ptr<const Graph> g = job_graph(t, error);
  if (!g) return nullptr;
  size_t base = g->nodes.size();
  if (!r.base.empty()) {
    if (!find_node(*g, r.base, &base) || base == 0) {
      *error = fmt::format("Can't find '{}' in the backing chain", r.base);
      return nullptr;
    }
  }
  if (g->nodes[0]->image->info().extended_l2) {
    // populate() fills whole clusters only: a partly allocated cluster
    // would keep reading its other subclusters from the dropped images.
    *error = fmt::format("'{}' has subclusters (extended L2), which block-stream does "
                         "not support yet", g->nodes[0]->path);
    return nullptr;
  }
  if (!g->nodes[0]->image->has_zero_clusters() && base < g->nodes.size()) {
    *error = fmt::format("'{}' is a version 2 image, which cannot record the zeros "
                         "of a stream that keeps a base", g->nodes[0]->path);
    return nullptr;
  }
  if (auto why = refuse_shared(t, *g, 1, base - 1); !why.empty()) {
    *error = why;
    return nullptr;
  }
  auto job = std::make_unique<StreamJob>(t, job_id_for(r.job_id, t), g, base,
                                         r.backing_file, r.speed, observer);
  if (base > 1) job->set_files(files_of(*g, 1, base - 1));
  job->set_gives_way(r.give_way);
  job->start(r.speed);
  return job;
}

std::unique_ptr<BlockJob> start_commit(const LiveTarget& t, const CommitRequest& r,
                                       JobObserver* observer, std::string* error) {
  std::shared_ptr<const Graph> g = job_graph(t, error);
  if (!g) return nullptr;
  size_t top = 0, base = g->nodes.size() - 1;
  if (!r.top.empty() && !find_node(*g, r.top, &top)) {
    *error = fmt::format("Top image file {} not found", r.top);
    return nullptr;
  }
  if (!r.base.empty() && !find_node(*g, r.base, &base)) {
    *error = fmt::format("Can't find '{}' in the backing chain", r.base);
    return nullptr;
  }
  if (top == base) {
    *error = "cannot commit an image into itself";
    return nullptr;
  }
  if (base < top) {
    *error = fmt::format("'{}' is not below '{}' in the backing chain",
                         g->nodes[base]->path, g->nodes[top]->path);
    return nullptr;
  }
  if (r.empty && top != 0) {
    *error = "'empty' needs an active commit (no 'top', or the active image)";
    return nullptr;
  }
  if (r.depth_first && top == 0) {
    *error = "'depth-first' needs an intermediate commit (a 'top' below the active image)";
    return nullptr;
  }
  if (!g->nodes[base]->snapshot_id.empty()) {
    *error = fmt::format("'{}' is an internal snapshot, which cannot be written",
                         g->nodes[base]->path);
    return nullptr;
  }
  if (top == 0 && !r.empty && !g->nodes[base]->image) {
    *error = fmt::format("'{}' is a raw image: an active commit into it can only "
                         "keep the top (\"empty\": true), not pivot to it",
                         g->nodes[base]->path);
    return nullptr;
  }
  if (top == 0 && g->nodes[base]->size > g->nodes[0]->size) {
    *error = fmt::format("'{}' is larger than the active image; pivoting to it "
                         "would change the export's size", g->nodes[base]->path);
    return nullptr;
  }
  if (auto why = refuse_shared(t, *g, top, base); !why.empty()) {
    *error = why;
    return nullptr;
  }
  // Reopened here, not in the job, so that a base another process holds
  // (its lock) refuses the command itself, as in QEMU.
  if (!t.registry->set_writable(g->nodes[base], true, error)) return nullptr;
  auto job = std::make_unique<CommitJob>(t, job_id_for(r.job_id, t), g, top, base,
                                         r.backing_file, r.empty, r.depth_first, r.speed,
                                         observer);
  job->set_files(files_of(*g, top, base));
  job->set_gives_way(r.give_way);
  job->start(r.speed);
  return job;
}

}  // namespace layerd
