// The block graph of an export, and the Layer that serves it while it
// changes.
//
// A Graph is an immutable list of nodes, top first (the top is a qcow2
// image; below it qcow2 images, snapshot views or one raw image), plus the
// filters on it (copy-on-read) and facts derived from the nodes. A
// GraphLayer serves the current Graph. Each request enters the layer's
// Gate, takes the current graph once and walks only that; a graph change
// builds a new Graph, and change() installs it at a quiet moment: it
// pauses new requests, waits for those in flight (worker requests, inline
// writes and nowait reads alike) to leave, swaps, and lets the paused ones
// go on the new graph. So no request ever sees two graphs, and nothing
// written on the old graph is hidden by the new one before it completed.
//
// Cost on the data path: two uncontended atomic operations per request
// (enter and leave); the nowait read path never waits (while the gate is
// paused it answers "would block" and the request goes to a worker, which
// waits there).
//
// Thread safety: every Layer call may run concurrently on many threads.
// change() and graph() may be called from any thread but not from inside a
// request of the same layer; change() calls are serialized.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "overlay/image_registry.h"
#include "overlay/layer.h"

namespace layerd {

class Mirror;

struct Graph {
  std::vector<std::shared_ptr<BlockNode>> nodes;  // [0] is the top
  // Reads of data from below the top also write it into the top (whole
  // clusters; a client write to the same cluster always wins).
  bool copy_on_read = false;
  // Active commit: client writes to the top are also tracked for, or
  // written to, a node further down (see Mirror).
  std::shared_ptr<Mirror> mirror;

  // Derived from the top image.
  uint32_t zero_granularity = 0;  // whole units become zero clusters
  bool zero_clusters = false;     // v3

  // A graph over `nodes`, whose [0] must be a qcow2 image.
  static std::shared_ptr<const Graph> make(
      std::vector<std::shared_ptr<BlockNode>> nodes, bool copy_on_read);
};

// Graph walks for jobs. read_graph reads what the graph shows from node
// `depth` down (0: what clients see). allocation_between describes the
// extent at `offset` (at most `length` bytes) as the nodes [from, to)
// alone see it: depth 0 if none of them allocates it (it reads from `to`
// and below), else Extent::depth is the first node (1-based) that does,
// with `zero` if it reads as zeros there (also past the end of a shorter
// node, as in block status).
std::error_code read_graph(const Graph& g, size_t depth, uint64_t offset,
                           std::span<std::byte> buf);
std::error_code allocation_between(const Graph& g, size_t from, size_t to,
                                   uint64_t offset, uint64_t length, Extent* e);

// Active commit's write filter. While a Mirror is in the graph, every
// client write, zeroing and trim of the top also concerns `target`, the
// node at depth `target_depth` of the same graph:
//   - Tracking mode (the first copy): the written range is marked dirty
//     after the top was written; the job copies dirty ranges from the
//     graph into the target, clearing the marks before it reads, so a
//     write racing with a copy is copied again.
//   - Sync mode (ready): the write also goes to the target before it
//     completes, under a range lock that the job's copies take too, so a
//     copy and a client write never reorder on a range. A failed target
//     write marks the range dirty for the job (the client's write stands:
//     the top has it). FUA carries over to the target write.
// The mode changes only while the graph's gate is paused.
//
// Thread safety: every call may run on many threads.
class Mirror {
 public:
  Mirror(std::shared_ptr<BlockNode> target, size_t target_depth, uint64_t size,
         uint64_t granularity);

  const std::shared_ptr<BlockNode>& target() const { return target_; }
  size_t target_depth() const { return target_depth_; }
  uint64_t granularity() const { return granularity_; }
  bool in_sync() const { return sync_.load(std::memory_order_acquire); }
  void set_sync(bool on) { sync_.store(on, std::memory_order_release); }

  void mark_dirty(uint64_t offset, uint64_t length);
  // Takes (clears) the next dirty run at or after `from`, at most
  // `max_length` bytes; false if nothing is dirty from `from` on.
  bool take_dirty(uint64_t from, uint64_t max_length, uint64_t* offset,
                  uint64_t* length);
  uint64_t dirty_bytes() const;

  // Serializes overlapping target writes (sync-mode client writes and the
  // job's copies).
  void lock_range(uint64_t offset, uint64_t length);
  void unlock_range(uint64_t offset, uint64_t length);

 private:
  const std::shared_ptr<BlockNode> target_;
  const size_t target_depth_;
  const uint64_t size_;
  const uint64_t granularity_;
  std::atomic<bool> sync_{false};
  std::unique_ptr<std::atomic<uint64_t>[]> bits_;
  const size_t words_;
  std::mutex ranges_mutex_;
  std::condition_variable ranges_changed_;
  std::vector<std::pair<uint64_t, uint64_t>> ranges_;  // locked [begin, end)
};

// Counts requests inside a layer and lets a graph change wait for a quiet
// moment. enter()/try_enter() and leave() are lock-free unless paused.
class Gate {
 public:
  // Enters, waiting while the gate is paused.
  void enter();
  // Enters unless the gate is paused.
  bool try_enter();
  void leave();
  // Stops new entries and waits until every entered request has left.
  void pause();
  void resume();

 private:
  static constexpr uint64_t kPaused = 1ull << 63;
  std::atomic<uint64_t> state_{0};  // kPaused | requests inside
  std::mutex mutex_;
  std::condition_variable changed_;
};

class GraphLayer final : public Layer {
 public:
  // Serves `graph`; writes go to its top when `writable`.
  GraphLayer(std::shared_ptr<const Graph> graph, bool writable);

  // The current graph (the one before it while a change is being made);
  // never waits.
  std::shared_ptr<const Graph> graph() const;

  // Builds the next graph from the current one and installs it while no
  // request is in flight. `build` runs with requests paused (keep it
  // short: no data copies); it may return an error, or set nothing to
  // keep the current graph. The new graph must have the same size.
  using Builder = std::function<std::error_code(
      const Graph& current, std::shared_ptr<const Graph>* next)>;
  std::error_code change(const Builder& build);

 protected:
  std::error_code do_read(uint64_t offset, std::span<std::byte> buf) override;
  std::error_code do_read_nowait(uint64_t offset,
                                 std::span<std::byte> buf) override;
  std::error_code do_write(uint64_t offset, std::span<const std::byte> data,
                           bool fua) override;
  std::error_code do_write_zeroes(uint64_t offset, uint64_t length,
                                  ZeroFlags f) override;
  std::error_code do_trim(uint64_t offset, uint64_t length, bool fua) override;
  std::error_code do_flush() override;
  std::error_code do_block_status(uint64_t offset, uint64_t length,
                                  std::span<Extent> out,
                                  size_t* count) override;

 private:
  class Entered;

  mutable Gate gate_;
  std::mutex change_mutex_;  // serializes change(); guards graph_ writes
  std::shared_ptr<const Graph> graph_;  // read inside the gate
  // The same graph for graph(), which must not wait for a change (a pause
  // may last as long as an emptying).
  std::atomic<std::shared_ptr<const Graph>> published_;
};

}  // namespace layerd
