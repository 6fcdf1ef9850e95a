// Raw files: reads and writes go straight to the file. For O_DIRECT files,
// requests that are not aligned are served through a bounce buffer, and
// unaligned writes (read-modify-write of the edge blocks) are serialized so
// two of them can never lose each other's bytes in a shared block.
#include "overlay/raw_layer.h"

#include <array>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string_view>

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
      : Layer(options.size ? options.size : file->size(),
              Capabilities{.writable = !options.read_only && file->writable(),
                           .trim = true,
                           .fast_zero = true,
                           .cheap_block_status = false,
                           .multi_conn_safe = true,
                           .buffered_writes = options.direct_alignment == 0}),
        file_(std::move(file)),
        align_(options.direct_alignment),
        refuse_format_headers_(options.refuse_format_headers) {}

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
    if (refuse_format_headers_ && offset < kProbeBytes && !data.empty()) {
      // Check what the first bytes become, and write them, under one lock,
      // so that two writes cannot assemble a header between them. (Zero
      // writes and trims are not checked: zeros make no header.)
      std::lock_guard lock(probe_mutex_);
      std::array<std::byte, kProbeBytes> head;
      if (auto ec = do_read(0, head)) return ec;
      size_t n = std::min<size_t>(data.size(), kProbeBytes - offset);
      std::memcpy(head.data() + offset, data.data(), n);
      if (looks_like_image_header(head))
        return std::make_error_code(std::errc::operation_not_permitted);
      return write_data(offset, data, fua);
    }
    return write_data(offset, data, fua);
  }

  std::error_code write_data(uint64_t offset, std::span<const std::byte> data,
                             bool fua) {
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
      ec = file_->discard(offset, length);
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
  bool refuse_format_headers_;
  std::mutex rmw_mutex_;
  std::mutex probe_mutex_;  // writes into the first kProbeBytes
};

bool starts_with(std::span<const std::byte> head, std::string_view magic,
                 size_t at = 0) {
  return head.size() >= at + magic.size() &&
         std::memcmp(head.data() + at, magic.data(), magic.size()) == 0;
}

// qemu's VMDK text descriptor probe: comment lines and blank lines, then a
// line "version=1", "version=2" or "version=3".
bool looks_like_vmdk_descriptor(std::span<const std::byte> head) {
  std::string_view text(reinterpret_cast<const char*>(head.data()), head.size());
  size_t p = 0;
  while (p < text.size()) {
    if (text[p] == '#') {
      p = text.find('\n', p);
      if (p == std::string_view::npos) return false;
      ++p;
      continue;
    }
    if (text[p] == ' ') {
      while (p < text.size() && text[p] == ' ') ++p;
      if (p < text.size() && text[p] == '\r') ++p;
      if (p == text.size() || text[p] != '\n') return false;
      ++p;
      continue;
    }
    std::string_view rest = text.substr(p);
    for (std::string_view v : {"version=1", "version=2", "version=3"}) {
      if (rest.starts_with(v) &&
          (rest.substr(v.size()).starts_with("\n") ||
           rest.substr(v.size()).starts_with("\r\n")))
        return true;
    }
    return false;
  }
  return false;
}

}  // namespace

bool looks_like_image_header(std::span<const std::byte> head) {
  using namespace std::string_view_literals;
  static constexpr std::string_view kMagics[] = {
      "QFI\xfb"sv,                    // qcow, qcow2
      "QED\0"sv,                      // QED
      "KDMV"sv,                       // VMDK 4
      "COWD"sv,                       // VMDK 3
      "conectix"sv,                   // VHD (vpc)
      "vhdxfile"sv,                   // VHDX
      "LUKS\xba\xbe"sv,               // LUKS
      "WithoutFreeSpace"sv,           // Parallels
      "WithouFreSpacExt"sv,           // Parallels, extended
      "Bochs Virtual HD Image\0"sv,   // Bochs
      "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t "
      "iso9660 /dev/cloop $1\n"sv,    // cloop
  };
  for (std::string_view m : kMagics)
    if (starts_with(head, m)) return true;
  if (starts_with(head, "\x7f\x10\xda\xbe"sv, 64)) return true;  // VDI
  return looks_like_vmdk_descriptor(head);
}

std::shared_ptr<Layer> make_raw_layer(std::shared_ptr<File> file,
                                      RawLayerOptions options) {
  return std::make_shared<RawLayer>(std::move(file), options);
}

}  // namespace layerd
