// Raw files: reads and writes go straight to the file. For O_DIRECT files,
// requests that are not aligned are served through a bounce buffer, and
// unaligned writes (read-modify-write of the edge blocks) are serialized so
// two of them can never lose each other's bytes in a shared block.
#include "overlay/raw_layer.h"

#include <cstdlib>
#include <cstring>
#include <mutex>

namespace layerd {
namespace {

struct AlignedBuffer {
  AlignedBuffer(size_t alignment, size_t length)
      : data(static_cast<std::byte*>(std::aligned_alloc(alignment, length))) {}
  ~AlignedBuffer() { std::free(data); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  std::byte* data;
};

class RawLayer final : public Layer {
 public:
  RawLayer(std::shared_ptr<File> file, RawLayerOptions options)
      : Layer(file->size(),
              Capabilities{.writable = !options.read_only && file->writable(),
                           .trim = true,
                           .fast_zero = true,
                           .cheap_block_status = false,
                           .multi_conn_safe = true,
                           .buffered_writes = options.direct_alignment == 0}),
        file_(std::move(file)),
        align_(options.direct_alignment) {}

 protected:
  std::error_code do_read(uint64_t offset, std::span<std::byte> buf) override {
    if (!is_aligned(offset, buf.data(), buf.size()))
      return bounced_read(offset, buf);
    return file_->pread(buf, offset);
  }

  std::error_code do_read_nowait(uint64_t offset,
                                 std::span<std::byte> buf) override {
    if (align_) return Layer::do_read_nowait(offset, buf);
    return file_->pread_nowait(buf, offset);
  }

  std::error_code do_write(uint64_t offset, std::span<const std::byte> data,
                           bool fua) override {
    std::error_code ec;
    if (!is_aligned(offset, data.data(), data.size()))
      ec = bounced_write(offset, data);
    else
      ec = file_->pwrite(data, offset);
    if (!ec && fua) ec = file_->flush();
    return ec;
  }

  std::error_code do_write_zeroes(uint64_t offset, uint64_t length,
                                  ZeroFlags f) override {
    std::error_code ec;
    if (align_ && (offset % align_ || length % align_)) {
      // Edges need read-modify-write; do the whole range as data.
      if (f.fast_only) return std::make_error_code(std::errc::operation_not_supported);
      ec = write_zero_data(offset, length);
    } else if (f.may_trim) {
      ec = file_->punch_hole(offset, length);
      if (ec) ec = file_->write_zeroes(offset, length);
    } else {
      ec = file_->write_zeroes(offset, length);
    }
    if (!ec && f.fua) ec = file_->flush();
    return ec;
  }

  std::error_code do_trim(uint64_t offset, uint64_t length, bool fua) override {
    std::error_code ec;
    if (!align_ || (offset % align_ == 0 && length % align_ == 0)) {
      ec = file_->punch_hole(offset, length);
      // Trim is advisory: a filesystem that cannot punch holes keeps data.
      if (ec == std::errc::operation_not_supported) ec.clear();
    }
    if (!ec && fua) ec = file_->flush();
    return ec;
  }

  std::error_code do_flush() override { return file_->flush(); }

  std::error_code do_block_status(uint64_t offset, uint64_t length,
                                  std::span<Extent> out,
                                  size_t* count) override {
    size_t n = 0;
    while (length > 0 && n < out.size()) {
      bool is_data = true;
      uint64_t len = file_->extent_at(offset, length, &is_data);
      if (len == 0 || len > length) len = length;
      if (n > 0 && out[n - 1].hole == !is_data) {
        out[n - 1].length += len;
      } else {
        out[n++] = Extent{.length = len, .hole = !is_data, .zero = !is_data,
                          .depth = 1};  // as qemu: a raw image holds every byte
      }
      offset += len;
      length -= len;
    }
    *count = n;
    return {};
  }

 private:
  bool is_aligned(uint64_t offset, const void* p, size_t len) const {
    return align_ == 0 || (offset % align_ == 0 && len % align_ == 0 &&
                           reinterpret_cast<uintptr_t>(p) % align_ == 0);
  }

  // The aligned window [start, start+len) that covers [offset, offset+n).
  std::pair<uint64_t, size_t> window(uint64_t offset, size_t n) const {
    uint64_t start = offset / align_ * align_;
    uint64_t end = (offset + n + align_ - 1) / align_ * align_;
    return {start, static_cast<size_t>(end - start)};
  }

  std::error_code bounced_read(uint64_t offset, std::span<std::byte> buf) {
    auto [start, len] = window(offset, buf.size());
    AlignedBuffer bounce(align_, len);
    if (!bounce.data) return std::make_error_code(std::errc::not_enough_memory);
    if (auto ec = file_->pread({bounce.data, len}, start)) return ec;
    std::memcpy(buf.data(), bounce.data + (offset - start), buf.size());
    return {};
  }

  std::error_code bounced_write(uint64_t offset, std::span<const std::byte> data) {
    auto [start, len] = window(offset, data.size());
    AlignedBuffer bounce(align_, len);
    if (!bounce.data) return std::make_error_code(std::errc::not_enough_memory);
    std::lock_guard lock(rmw_mutex_);
    if (auto ec = file_->pread({bounce.data, len}, start)) return ec;
    std::memcpy(bounce.data + (offset - start), data.data(), data.size());
    return file_->pwrite({bounce.data, len}, start);
  }

  std::error_code write_zero_data(uint64_t offset, uint64_t length) {
    constexpr size_t kPiece = 1 << 20;
    AlignedBuffer zeros(align_, kPiece);
    if (!zeros.data) return std::make_error_code(std::errc::not_enough_memory);
    std::memset(zeros.data, 0, kPiece);
    while (length > 0) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(length, kPiece));
      if (auto ec = bounced_write(offset, {zeros.data, n})) return ec;
      offset += n;
      length -= n;
    }
    return {};
  }

  std::shared_ptr<File> file_;
  uint32_t align_;
  std::mutex rmw_mutex_;
};

}  // namespace

std::shared_ptr<Layer> make_raw_layer(std::shared_ptr<File> file,
                                      RawLayerOptions options) {
  return std::make_shared<RawLayer>(std::move(file), options);
}

}  // namespace layerd
