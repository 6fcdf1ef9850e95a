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

struct Graph {
  std::vector<std::shared_ptr<BlockNode>> nodes;  // [0] is the top
  // Reads of data from below the top also write it into the top (whole
  // clusters; a client write to the same cluster always wins).
  bool copy_on_read = false;

  // Derived from the top image.
  uint32_t zero_granularity = 0;  // whole units become zero clusters
  bool zero_clusters = false;     // v3

  // A graph over `nodes`, whose [0] must be a qcow2 image.
  static std::shared_ptr<const Graph> make(
      std::vector<std::shared_ptr<BlockNode>> nodes, bool copy_on_read);
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

  // The current graph.
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
  mutable std::mutex change_mutex_;  // serializes change(); guards graph_ writes
  std::shared_ptr<const Graph> graph_;  // read inside the gate
};

}  // namespace layerd
