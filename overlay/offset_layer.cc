#include "overlay/offset_layer.h"

namespace layerd {
namespace {

class OffsetLayer final : public Layer {
 public:
  OffsetLayer(std::shared_ptr<Layer> below, uint64_t offset, uint64_t length)
      : Layer(length, below->capabilities()),
        below_(std::move(below)),
        offset_(offset) {}

 protected:
  std::error_code do_read(uint64_t offset, std::span<std::byte> buf) override {
    return below_->read(offset_ + offset, buf);
  }
  std::error_code do_read_nowait(uint64_t offset,
                                 std::span<std::byte> buf) override {
    return below_->try_read_nowait(offset_ + offset, buf);
  }
  std::error_code do_write(uint64_t offset, std::span<const std::byte> data,
                           bool fua) override {
    return below_->write(offset_ + offset, data, fua);
  }
  std::error_code do_write_zeroes(uint64_t offset, uint64_t length,
                                  ZeroFlags f) override {
    return below_->write_zeroes(offset_ + offset, length, f);
  }
  std::error_code do_trim(uint64_t offset, uint64_t length, bool fua) override {
    return below_->trim(offset_ + offset, length, fua);
  }
  std::error_code do_flush() override { return below_->flush(); }
  std::error_code do_cache(uint64_t offset, uint64_t length) override {
    return below_->cache(offset_ + offset, length);
  }
  std::error_code do_block_status(uint64_t offset, uint64_t length,
                                  std::span<Extent> out,
                                  size_t* count) override {
    return below_->block_status(offset_ + offset, length, out, count);
  }

 private:
  const std::shared_ptr<Layer> below_;
  const uint64_t offset_;
};

}  // namespace

std::shared_ptr<Layer> make_offset_layer(std::shared_ptr<Layer> below,
                                         uint64_t offset,
                                         std::optional<uint64_t> length) {
  if (!below || offset > below->size()) return nullptr;
  const uint64_t room = below->size() - offset;
  if (length && *length > room) return nullptr;
  if (offset == 0 && (!length || *length == room)) return below;
  return std::make_shared<OffsetLayer>(std::move(below), offset, length.value_or(room));
}

}  // namespace layerd
