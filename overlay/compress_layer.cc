// The compress filter (see compress_layer.h). Each request is cut at
// cluster boundaries: whole clusters go to the image (or `below`) in one
// call per run, each partial cluster is merged in a per-thread buffer of
// one cluster and written whole. A range lock over cluster-aligned ranges
// orders requests that share clusters.
#include "overlay/compress_layer.h"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

namespace layerd {
namespace {

// Cluster-aligned ranges in flight; lock() waits until no held range
// overlaps.
class RangeLock {
 public:
  RangeLock() { held_.reserve(64); }

  void lock(uint64_t begin, uint64_t end) {
    std::unique_lock l(mutex_);
    changed_.wait(l, [&] {
      return std::none_of(held_.begin(), held_.end(), [&](const auto& r) {
        return r.first < end && begin < r.second;
      });
    });
    held_.emplace_back(begin, end);
  }

  void unlock(uint64_t begin, uint64_t end) {
    {
      std::lock_guard l(mutex_);
      auto it = std::find(held_.begin(), held_.end(), std::make_pair(begin, end));
      *it = held_.back();
      held_.pop_back();
    }
    changed_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<std::pair<uint64_t, uint64_t>> held_;
};

class CompressLayer final : public Layer {
 public:
  CompressLayer(std::shared_ptr<Layer> below, std::shared_ptr<qcow2::Image> top)
      : Layer(below->size(), below->capabilities()),
        below_(std::move(below)),
        top_(std::move(top)),
        cluster_(top_->cluster_size()) {
    // Compressing takes CPU time: never on the server's I/O thread.
    caps_.buffered_writes = false;
  }

 protected:
  std::error_code do_read(uint64_t offset, std::span<std::byte> buf) override {
    return below_->read(offset, buf);
  }
  std::error_code do_read_nowait(uint64_t offset, std::span<std::byte> buf) override {
    return below_->try_read_nowait(offset, buf);
  }
  std::error_code do_flush() override { return below_->flush(); }
  std::error_code do_cache(uint64_t offset, uint64_t length) override {
    return below_->cache(offset, length);
  }
  std::error_code do_block_status(uint64_t offset, uint64_t length,
                                  std::span<Extent> out, size_t* count) override {
    return below_->block_status(offset, length, out, count);
  }

  std::error_code do_write(uint64_t offset, std::span<const std::byte> data,
                           bool fua) override {
    return each_part(offset, data.size(), [&](uint64_t pos, uint64_t len, bool whole) {
      auto part = data.subspan(pos - offset, len);
      if (whole) return top_->write_compressed(pos, part, fua);
      return merge(pos, len, part.data(), fua);
    });
  }

  std::error_code do_write_zeroes(uint64_t offset, uint64_t length,
                                  ZeroFlags f) override {
    // A merge is an ordinary write, never a fast zero.
    const uint64_t end = offset + length;
    if (f.fast_only && (offset % cluster_ || (end % cluster_ && end != size_)))
      return std::make_error_code(std::errc::not_supported);
    return each_part(offset, length, [&](uint64_t pos, uint64_t len, bool whole) {
      if (whole) return below_->write_zeroes(pos, len, f);
      return merge(pos, len, nullptr, f.fua);
    });
  }

  std::error_code do_trim(uint64_t offset, uint64_t length, bool fua) override {
    const uint64_t begin = offset / cluster_ * cluster_;
    const uint64_t end = end_of(offset + length);
    ranges_.lock(begin, end);
    std::error_code ec = below_->trim(offset, length, fua);
    ranges_.unlock(begin, end);
    return ec;
  }

 private:
  // The end of the cluster that `pos` is in (or ends), capped at the size.
  uint64_t end_of(uint64_t pos) const {
    return std::min<uint64_t>((pos + cluster_ - 1) / cluster_ * cluster_, size_);
  }

  // Calls fn(pos, len, whole) for each run of whole clusters (the last
  // cluster of the disk counts as whole when the range reaches the end of
  // the disk) and each partial cluster of [offset, offset + length), with
  // the clusters it touches locked.
  template <typename Fn>
  std::error_code each_part(uint64_t offset, uint64_t length, Fn fn) {
    const uint64_t end = offset + length;
    uint64_t pos = offset;
    while (pos < end) {
      const uint64_t cluster_begin = pos / cluster_ * cluster_;
      uint64_t part_end, lock_end;
      bool whole = false;
      if (pos == cluster_begin && (end - pos >= cluster_ || end == size_)) {
        part_end = end == size_ ? end : end / cluster_ * cluster_;
        lock_end = part_end;
        whole = true;
      } else {
        part_end = std::min(end, cluster_begin + cluster_);
        lock_end = std::min<uint64_t>(cluster_begin + cluster_, size_);
      }
      ranges_.lock(cluster_begin, lock_end);
      std::error_code ec = fn(pos, part_end - pos, whole);
      ranges_.unlock(cluster_begin, lock_end);
      if (ec) return ec;
      pos = part_end;
    }
    return {};
  }

  // Writes the cluster that [pos, pos + len) lies in, compressed, with
  // the bytes at `data` (zeros if nullptr) in that range and the rest as it
  // reads now. Its cluster is locked.
  std::error_code merge(uint64_t pos, uint64_t len, const std::byte* data, bool fua) {
    const uint64_t begin = pos / cluster_ * cluster_;
    const uint64_t end = std::min<uint64_t>(begin + cluster_, size_);
    thread_local std::vector<std::byte> buffer;
    buffer.resize(end - begin);
    std::span<std::byte> cluster(buffer.data(), end - begin);
    if (auto ec = below_->read(begin, cluster)) return ec;
    if (data)
      std::memcpy(cluster.data() + (pos - begin), data, len);
    else
      std::memset(cluster.data() + (pos - begin), 0, len);
    return top_->write_compressed(begin, cluster, fua);
  }

  const std::shared_ptr<Layer> below_;
  const std::shared_ptr<qcow2::Image> top_;
  const uint64_t cluster_;
  RangeLock ranges_;
};

}  // namespace

std::shared_ptr<Layer> make_compress_layer(std::shared_ptr<Layer> below,
                                           std::shared_ptr<qcow2::Image> top) {
  return std::make_shared<CompressLayer>(std::move(below), std::move(top));
}

}  // namespace layerd
