// A Layer over a raw image file (or block device): offsets map one to one.
#pragma once

#include <memory>

#include "overlay/layer.h"
#include "qcow2/file.h"

namespace layerd {

struct RawLayerOptions {
  bool read_only = false;
  // With O_DIRECT files, every pread/pwrite must be aligned to this many
  // bytes in offset, length and memory; unaligned requests go through an
  // aligned bounce buffer. 0 for buffered files.
  uint32_t direct_alignment = 0;
};

// Serves `file` as a disk of exactly file->size() bytes. Block status comes
// from SEEK_DATA/SEEK_HOLE, so holes of a sparse file report as HOLE|ZERO.
std::shared_ptr<Layer> make_raw_layer(std::shared_ptr<File> file,
                                      RawLayerOptions options);

}  // namespace layerd
