// The graph walk, top to bottom. Reads: each qcow2 image fills what it
// holds and calls back for the rest ("read below"), which recurses to the
// next node; raw images and the zeros below the bottom end the walk. Block
// status: the first node that says anything but "not here" for a range
// decides it, and its depth is the answer for qemu:allocation-depth.
// Copy-on-read: before a read, the clusters of the range that the top does
// not hold are read from below and handed to Image::populate, which
// writes only clusters still unallocated, so a racing client write wins.
#include "overlay/graph.h"

#include <algorithm>
#include <cstdio>
#include <cstring>

namespace layerd {
namespace {

std::error_code would_block() {
  return std::make_error_code(std::errc::resource_unavailable_try_again);
}

template <bool nowait>
std::error_code read_walk(const Graph& g, size_t depth, uint64_t offset,
                          std::span<std::byte> buf);

// The reader for what lies below node `depth`, handed to that image.
template <bool nowait>
struct Below {
  const Graph* graph;
  size_t depth;
  std::error_code operator()(uint64_t offset, std::span<std::byte> buf) const {
    // A nowait read must not answer from below the top of a copy-on-read
    // graph: a worker reads it and copies it up.
    if (nowait && depth == 0 && graph->copy_on_read) return would_block();
    return read_walk<nowait>(*graph, depth + 1, offset, buf);
  }
};

template <bool nowait>
std::error_code read_walk(const Graph& g, size_t depth, uint64_t offset,
                          std::span<std::byte> buf) {
  if (depth >= g.nodes.size() || offset >= g.nodes[depth]->size) {
    std::memset(buf.data(), 0, buf.size());
    return {};
  }
  const BlockNode& node = *g.nodes[depth];
  if (buf.size() > node.size - offset) {  // a shorter backing image
    size_t inside = static_cast<size_t>(node.size - offset);
    std::memset(buf.data() + inside, 0, buf.size() - inside);
    buf = buf.first(inside);
  }
  if constexpr (nowait) {
    if (node.raw) return node.raw->pread_nowait(buf, offset);
    return node.image->read_nowait(offset, buf, Below<true>{&g, depth});
  } else {
    if (node.raw) return node.raw->pread(buf, offset);
    return node.image->read(offset, buf, Below<false>{&g, depth});
  }
}

// Block status of the nodes [depth, to): the first that says anything but
// "not here" decides. Below `to`, a hole of depth 0.
std::error_code status_at(const Graph& g, size_t depth, size_t to,
                          uint64_t offset, uint64_t length, Extent* e) {
  for (;; ++depth) {
    if (depth >= to || depth >= g.nodes.size()) {
      *e = Extent{.length = length, .hole = true, .zero = true, .depth = 0};
      return {};
    }
    if (offset >= g.nodes[depth]->size) {
      // Past the end of a shorter backing image: it reads as zeros there,
      // and qemu counts them as allocated in it.
      *e = Extent{.length = length, .hole = true, .zero = true,
                  .depth = static_cast<uint32_t>(depth + 1)};
      return {};
    }
    const BlockNode& node = *g.nodes[depth];
    length = std::min(length, node.size - offset);
    const uint32_t here = static_cast<uint32_t>(depth + 1);
    if (node.raw) {
      bool is_data = true;
      uint64_t len = node.raw->extent_at(offset, length, &is_data);
      if (len == 0 || len > length) len = length;
      // A raw image holds every byte of its range (holes read as zeros):
      // it is the depth whatever its sparseness.
      *e = Extent{.length = len, .hole = !is_data, .zero = !is_data, .depth = here};
      return {};
    }
    qcow2::MapExtent m;
    if (auto ec = node.image->block_status(offset, length, &m)) return ec;
    if (m.length == 0 || m.length > length)
      return std::make_error_code(std::errc::io_error);
    length = m.length;
    if (m.kind == qcow2::ExtentKind::Data) {
      *e = Extent{.length = length, .hole = false, .zero = false, .depth = here};
      return {};
    }
    if (m.kind == qcow2::ExtentKind::Zero) {
      *e = Extent{.length = length, .hole = true, .zero = true, .depth = here};
      return {};
    }
    // Unallocated here: the same (possibly shortened) range, one down.
  }
}

constexpr uint64_t kCopyUpPiece = 1 << 20;

// A failed copy never fails the read (its data came from below all the
// same); the first one is reported, as it usually means the top is full.
void log_copy_failure(std::error_code ec) {
  static std::atomic<bool> reported{false};
  if (!reported.exchange(true))
    std::fprintf(stderr, "layerd: copy-on-read into the top image failed (%s); "
                         "reads go on without copying\n", ec.message().c_str());
}

// Copies the clusters of [offset, offset + length) that the top does not
// hold into the top. Runs the top leaves unallocated are copied whole
// clusters at a time; a cluster the top holds part of is left alone. The
// image end counts as a cluster end.
void copy_up(const Graph& g, uint64_t offset, uint64_t length) {
  qcow2::Image& top = *g.nodes.front()->image;
  const uint64_t size = top.size();
  const uint64_t cs = top.cluster_size();
  const uint64_t end = std::min((offset + length + cs - 1) / cs * cs, size);
  thread_local std::vector<std::byte> scratch;
  for (uint64_t pos = offset / cs * cs; pos < end;) {
    qcow2::MapExtent m;
    if (top.block_status(pos, end - pos, &m) || m.length == 0) return;
    const uint64_t run_end = pos + m.length;
    const uint64_t first = (pos + cs - 1) / cs * cs;
    const uint64_t last =
        run_end == size ? (size + cs - 1) / cs * cs : run_end / cs * cs;
    // In pieces of a bounded size, so that large reads do not grow the
    // scratch buffer of every worker.
    const uint64_t piece = std::max<uint64_t>(cs, kCopyUpPiece / cs * cs);
    for (uint64_t at = first; m.kind == qcow2::ExtentKind::Unallocated && at < last;
         at += piece) {
      scratch.resize(std::min(piece, last - at));
      std::span<std::byte> data(scratch);
      const uint64_t inside = std::min(at + data.size(), size) - at;
      std::memset(data.data() + inside, 0, data.size() - inside);
      if (auto ec = read_walk<false>(g, 1, at, data.first(inside))) return;
      if (auto ec = top.populate(at, data)) {
        log_copy_failure(ec);
        return;
      }
    }
    pos = run_end;
  }
}

Capabilities capabilities_of(bool writable) {
  return Capabilities{.writable = writable,
                      .trim = true,
                      .fast_zero = true,
                      .cheap_block_status = true,
                      .multi_conn_safe = true,
                      .buffered_writes = true};
}

// Runs a client's change of the top (`top_op`) under the graph's mirror:
// tracked for the job's copy, or also made on the target (`target_op`,
// given the target node and the reader below it) before it completes.
template <typename TopOp, typename TargetOp>
std::error_code mirrored(const Graph& g, uint64_t offset, uint64_t length,
                         TopOp top_op, TargetOp target_op) {
  Mirror& m = *g.mirror;
  if (!m.in_sync()) {
    std::error_code ec = top_op();
    m.mark_dirty(offset, length);  // even a failed write may have changed it
    return ec;
  }
  m.lock_range(offset, length);
  std::error_code ec = top_op();
  if (ec || target_op(*m.target(), Below<false>{&g, m.target_depth()}))
    m.mark_dirty(offset, length);
  m.unlock_range(offset, length);
  return ec;
}

}  // namespace

std::error_code read_graph(const Graph& g, size_t depth, uint64_t offset,
                           std::span<std::byte> buf) {
  return read_walk<false>(g, depth, offset, buf);
}

std::error_code allocation_between(const Graph& g, size_t from, size_t to,
                                   uint64_t offset, uint64_t length, Extent* e) {
  return status_at(g, from, to, offset, length, e);
}

// --- Mirror ----------------------------------------------------------------

Mirror::Mirror(std::shared_ptr<BlockNode> target, size_t target_depth,
               uint64_t size, uint64_t granularity)
    : target_(std::move(target)),
      target_depth_(target_depth),
      size_(size),
      granularity_(granularity),
      words_(((size + granularity - 1) / granularity + 63) / 64) {
  bits_ = std::make_unique<std::atomic<uint64_t>[]>(words_);
  for (size_t i = 0; i < words_; ++i) bits_[i].store(0);
}

void Mirror::mark_dirty(uint64_t offset, uint64_t length) {
  if (length == 0 || offset >= size_) return;
  const uint64_t first = offset / granularity_;
  const uint64_t last = (std::min(offset + length, size_) - 1) / granularity_;
  for (uint64_t b = first; b <= last; ++b)
    bits_[b / 64].fetch_or(1ull << (b % 64), std::memory_order_acq_rel);
}

bool Mirror::take_dirty(uint64_t from, uint64_t max_length, uint64_t* offset,
                        uint64_t* length) {
  const uint64_t chunks = (size_ + granularity_ - 1) / granularity_;
  uint64_t b = from / granularity_;
  while (b < chunks) {
    uint64_t word = bits_[b / 64].load(std::memory_order_acquire) >> (b % 64);
    if (word == 0) {
      b = (b / 64 + 1) * 64;
      continue;
    }
    b += static_cast<uint64_t>(__builtin_ctzll(word));
    break;
  }
  if (b >= chunks) return false;
  const uint64_t max_chunks = std::max<uint64_t>(1, max_length / granularity_);
  uint64_t n = 0;
  for (; b + n < chunks && n < max_chunks; ++n) {
    const uint64_t bit = 1ull << ((b + n) % 64);
    uint64_t before = bits_[(b + n) / 64].fetch_and(~bit, std::memory_order_acq_rel);
    if (!(before & bit)) break;
  }
  *offset = b * granularity_;
  *length = std::min((b + n) * granularity_, size_) - *offset;
  return true;
}

uint64_t Mirror::dirty_bytes() const {
  uint64_t n = 0;
  for (size_t i = 0; i < words_; ++i)
    n += static_cast<uint64_t>(__builtin_popcountll(bits_[i].load()));
  return n * granularity_;
}

void Mirror::lock_range(uint64_t offset, uint64_t length) {
  const uint64_t end = offset + length;
  std::unique_lock lock(ranges_mutex_);
  ranges_changed_.wait(lock, [&] {
    for (const auto& [b, e] : ranges_)
      if (b < end && offset < e) return false;
    return true;
  });
  ranges_.emplace_back(offset, end);
}

void Mirror::unlock_range(uint64_t offset, uint64_t length) {
  std::lock_guard lock(ranges_mutex_);
  auto it = std::find(ranges_.begin(), ranges_.end(),
                      std::pair<uint64_t, uint64_t>{offset, offset + length});
  if (it != ranges_.end()) ranges_.erase(it);
  ranges_changed_.notify_all();
}

std::shared_ptr<const Graph> Graph::make(
    std::vector<std::shared_ptr<BlockNode>> nodes, bool copy_on_read) {
  auto g = std::make_shared<Graph>();
  g->nodes = std::move(nodes);
  g->copy_on_read = copy_on_read;
  const qcow2::Image& top = *g->nodes.front()->image;
  g->zero_granularity = top.subcluster_size();
  g->zero_clusters = top.has_zero_clusters();
  return g;
}

// --- Gate ------------------------------------------------------------------

void Gate::enter() {
  while (!try_enter()) {
    std::unique_lock lock(mutex_);
    changed_.wait(lock, [&] { return !(state_.load() & kPaused); });
  }
}

bool Gate::try_enter() {
  uint64_t before = state_.fetch_add(1, std::memory_order_acquire);
  if (!(before & kPaused)) return true;
  leave();
  return false;
}

void Gate::leave() {
  uint64_t after = state_.fetch_sub(1, std::memory_order_release) - 1;
  if (after == kPaused) {  // the last one out of a paused gate
    std::lock_guard lock(mutex_);
    changed_.notify_all();
  }
}

void Gate::pause() {
  state_.fetch_or(kPaused, std::memory_order_acq_rel);
  std::unique_lock lock(mutex_);
  changed_.wait(lock, [&] { return state_.load(std::memory_order_acquire) == kPaused; });
}

void Gate::resume() {
  std::lock_guard lock(mutex_);
  state_.fetch_and(~kPaused, std::memory_order_release);
  changed_.notify_all();
}

// --- GraphLayer ------------------------------------------------------------

class GraphLayer::Entered {
 public:
  explicit Entered(Gate& gate) : gate_(gate) { gate_.enter(); }
  ~Entered() { gate_.leave(); }
  Entered(const Entered&) = delete;
  Entered& operator=(const Entered&) = delete;

 private:
  Gate& gate_;
};

GraphLayer::GraphLayer(std::shared_ptr<const Graph> graph, bool writable)
    : Layer(graph->nodes.front()->size, capabilities_of(writable)),
      graph_(std::move(graph)),
      published_(graph_) {}

std::shared_ptr<const Graph> GraphLayer::graph() const { return published_.load(); }

std::error_code GraphLayer::change(const Builder& build) {
  std::lock_guard lock(change_mutex_);
  std::shared_ptr<const Graph> next;
  gate_.pause();
  std::error_code ec = build(*graph_, &next);
  if (!ec && next) {
    if (next->nodes.empty() || next->nodes.front()->size != size_)
      ec = std::make_error_code(std::errc::invalid_argument);
    else {
      std::swap(graph_, next);
      published_.store(graph_);
    }
  }
  gate_.resume();
  return ec;  // `next` (the old graph, after a swap) goes here
}

std::error_code GraphLayer::do_read(uint64_t offset, std::span<std::byte> buf) {
  Entered in(gate_);
  const Graph& g = *graph_;
  if (g.copy_on_read && g.nodes.size() > 1) copy_up(g, offset, buf.size());
  return read_walk<false>(g, 0, offset, buf);
}

std::error_code GraphLayer::do_read_nowait(uint64_t offset,
                                           std::span<std::byte> buf) {
  if (!gate_.try_enter()) return would_block();
  std::error_code ec = read_walk<true>(*graph_, 0, offset, buf);
  gate_.leave();
  return ec;
}

std::error_code GraphLayer::do_write(uint64_t offset,
                                     std::span<const std::byte> data, bool fua) {
  Entered in(gate_);
  const Graph& g = *graph_;
  auto top_write = [&] {
    return g.nodes.front()->image->write(offset, data, Below<false>{&g, 0}, fua);
  };
  if (!g.mirror) return top_write();
  return mirrored(g, offset, data.size(), top_write,
                  [&](BlockNode& target, auto below) {
                    if (!target.raw) return target.image->write(offset, data, below, fua);
                    std::error_code ec = target.raw->pwrite(data, offset);
                    return !ec && fua ? target.raw->flush() : ec;
                  });
}

// Zeros on the mirror's target, for zeroing and trimming the top. FUA
// carries over: a durable write must be durable in the image that is the
// export's after a pivot or an emptying.
static std::error_code zero_target(BlockNode& target, uint64_t offset,
                                   uint64_t length, qcow2::BelowReader below, bool fua) {
  if (!target.raw)
    return target.image->write_zeroes(offset, length, /*may_unmap=*/true, below, fua);
  std::error_code ec = target.raw->write_zeroes(offset, length);
  return !ec && fua ? target.raw->flush() : ec;
}

std::error_code GraphLayer::do_write_zeroes(uint64_t offset, uint64_t length,
                                            ZeroFlags f) {
  Entered in(gate_);
  const Graph& g = *graph_;
  // Fast only when whole (sub)clusters become zero clusters: v3 metadata,
  // no data written.
  if (f.fast_only && (!g.zero_clusters || offset % g.zero_granularity != 0 ||
                      length % g.zero_granularity != 0))
    return std::make_error_code(std::errc::operation_not_supported);
  auto top_zero = [&] {
    return g.nodes.front()->image->write_zeroes(offset, length, f.may_trim,
                                                Below<false>{&g, 0}, f.fua);
  };
  if (!g.mirror) return top_zero();
  return mirrored(g, offset, length, top_zero,
                  [&](BlockNode& target, auto below) {
                    return zero_target(target, offset, length, below, f.fua);
                  });
}

std::error_code GraphLayer::do_trim(uint64_t offset, uint64_t length, bool fua) {
  Entered in(gate_);
  const Graph& g = *graph_;
  qcow2::Image& top = *g.nodes.front()->image;
  // Over a backing image, a freed cluster must not show the older data
  // below it again: it becomes a zero cluster instead.
  auto mode = g.nodes.size() > 1 ? qcow2::DiscardMode::Zero
                                 : qcow2::DiscardMode::Unallocate;
  auto top_trim = [&] {
    std::error_code ec = top.discard(offset, length, mode, Below<false>{&g, 0});
    if (!ec && fua) ec = top.flush();
    return ec;
  };
  if (!g.mirror) return top_trim();
  // The trimmed range reads as zeros in the top (it has a backing image),
  // so the target gets zeros too.
  return mirrored(g, offset, length, top_trim,
                  [&](BlockNode& target, auto below) {
                    return zero_target(target, offset, length, below, fua);
                  });
}

// The top, and every other image of the graph that may hold unwritten
// metadata: the old top right after a live snapshot (until it is written
// back), an active commit's target (client writes reach it). For other
// images a flush is one atomic check and an uncontended mutex.
std::error_code GraphLayer::do_flush() {
  Entered in(gate_);
  const Graph& g = *graph_;
  std::error_code result = g.nodes.front()->image->flush();
  for (size_t i = 1; i < g.nodes.size(); ++i) {
    const BlockNode& n = *g.nodes[i];
    std::error_code ec;
    // A read-only image answers at once, unless it is being written back
    // (reopen_read_only), which the flush then waits for.
    if (n.image) ec = n.image->flush();
    else if (n.raw && g.mirror && g.mirror->target().get() == &n) ec = n.raw->flush();
    if (!result) result = ec;
  }
  return result;
}

std::error_code GraphLayer::do_block_status(uint64_t offset, uint64_t length,
                                            std::span<Extent> out,
                                            size_t* count) {
  Entered in(gate_);
  const Graph& g = *graph_;
  size_t n = 0;
  while (length > 0 && n < out.size()) {
    Extent e;
    if (auto ec = status_at(g, 0, g.nodes.size(), offset, length, &e)) {
      if (n > 0) break;  // report what we have; the client asks again
      return ec;
    }
    if (n > 0 && out[n - 1].hole == e.hole && out[n - 1].zero == e.zero &&
        out[n - 1].depth == e.depth) {
      out[n - 1].length += e.length;
    } else {
      out[n++] = e;
    }
    offset += e.length;
    length -= e.length;
  }
  *count = n;
  return {};
}

}  // namespace layerd
