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
  // The disk's size; 0: file->size(). Bytes past the end of the file read
  // as zeros (and report as a hole); writing them grows the file.
  uint64_t size = 0;
  // The format was guessed (no -f): refuse writes that would make the
  // first 512 bytes look like an image format header (EPERM), so that a
  // client cannot turn the raw image into, say, a qcow2 image naming a
  // backing file of its choice the next time it is probed. As qemu does.
  bool refuse_format_headers = false;
};

// Serves `file` as a disk. Block status comes from SEEK_DATA/SEEK_HOLE, so
// holes of a sparse file report as HOLE|ZERO.
std::shared_ptr<Layer> make_raw_layer(std::shared_ptr<File> file,
                                      RawLayerOptions options);

// Bytes that image probing (layerd's or qemu's) looks at.
inline constexpr size_t kProbeBytes = 512;

// Whether the first bytes of a disk look like the header of an image format
// qemu recognizes when probing (qcow, qcow2, QED, VMDK, VDI, VHD, VHDX,
// LUKS, Parallels, Bochs, cloop) rather than raw data. `head` holds up to
// kProbeBytes bytes.
bool looks_like_image_header(std::span<const std::byte> head);

}  // namespace layerd
