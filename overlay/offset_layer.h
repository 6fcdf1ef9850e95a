// A window into another Layer: byte 0 of the window is byte `offset` of
// the layer below, and the window reaches to its end (or is `length`
// bytes long: --image-opts driver=raw,offset=N,size=N). qemu-nbd's -o
// (a raw driver with an offset over the image's format), for a disk inside
// a bigger file (a tar or OVA member, a partition).
#pragma once

#include <memory>
#include <optional>

#include "overlay/layer.h"

namespace layerd {

// Fails (nullptr) when the window does not fit in `below`; a window of 0
// bytes is allowed, as qemu-nbd allows it. Every call is forwarded with
// the offset added; capabilities are those of `below`.
std::shared_ptr<Layer> make_offset_layer(std::shared_ptr<Layer> below,
                                         uint64_t offset,
                                         std::optional<uint64_t> length = {});

}  // namespace layerd
