// Range and flag checks shared by every layer, done once before the virtual
// implementation runs.
#include "overlay/layer.h"

namespace layerd {
namespace {

bool in_range(uint64_t offset, uint64_t length, uint64_t size) {
  return offset <= size && length <= size - offset;
}

std::error_code invalid() {
  return std::make_error_code(std::errc::invalid_argument);
}
std::error_code read_only() {
  return std::make_error_code(std::errc::operation_not_permitted);
}

}  // namespace

std::error_code Layer::read(uint64_t offset, std::span<std::byte> buf) {
  if (!in_range(offset, buf.size(), size_)) return invalid();
  if (buf.empty()) return {};
  return do_read(offset, buf);
}

std::error_code Layer::try_read_nowait(uint64_t offset,
                                       std::span<std::byte> buf) {
  if (!in_range(offset, buf.size(), size_)) return invalid();
  if (buf.empty()) return {};
  return do_read_nowait(offset, buf);
}

std::error_code Layer::do_read_nowait(uint64_t, std::span<std::byte>) {
  return std::make_error_code(std::errc::resource_unavailable_try_again);
}

std::error_code Layer::write(uint64_t offset, std::span<const std::byte> data,
                             bool fua) {
  if (!caps_.writable) return read_only();
  if (!in_range(offset, data.size(), size_)) return invalid();
  if (data.empty()) return fua ? do_flush() : std::error_code{};
  return do_write(offset, data, fua);
}

std::error_code Layer::write_zeroes(uint64_t offset, uint64_t length,
                                    ZeroFlags f) {
  if (!caps_.writable) return read_only();
  if (!in_range(offset, length, size_)) return invalid();
  if (f.fast_only && !caps_.fast_zero)
    return std::make_error_code(std::errc::operation_not_supported);
  if (length == 0) return f.fua ? do_flush() : std::error_code{};
  return do_write_zeroes(offset, length, f);
}

std::error_code Layer::trim(uint64_t offset, uint64_t length, bool fua) {
  if (!caps_.writable) return read_only();
  if (!in_range(offset, length, size_)) return invalid();
  if (length == 0) return fua ? do_flush() : std::error_code{};
  return do_trim(offset, length, fua);
}

std::error_code Layer::flush() { return do_flush(); }

std::error_code Layer::cache(uint64_t offset, uint64_t length) {
  if (!in_range(offset, length, size_)) return invalid();
  if (length == 0) return {};
  return do_cache(offset, length);
}

std::error_code Layer::do_cache(uint64_t, uint64_t) { return {}; }

std::error_code Layer::block_status(uint64_t offset, uint64_t length,
                                    std::span<Extent> out, size_t* count) {
  *count = 0;
  if (!in_range(offset, length, size_) || length == 0 || out.empty())
    return invalid();
  std::error_code ec = do_block_status(offset, length, out, count);
  if (!ec && (*count == 0 || *count > out.size())) {
    *count = 0;
    return std::make_error_code(std::errc::io_error);
  }
  return ec;
}

}  // namespace layerd
