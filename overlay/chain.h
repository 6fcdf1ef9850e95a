// A backing chain as one Layer: the top image over its backing images.
//
// Each qcow2 image answers only for itself; the chain asks the next image
// down for whatever an image does not hold, and reads zeros below the
// bottom or past the end of a backing image shorter than its overlay.
// Backing images are opened read-only and never written, so other readers
// may share them. Only the top image is written. Every file is locked as
// QEMU locks it (overlay/image_locks.h).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "overlay/layer.h"

namespace layerd {

enum class ImageFormat { Raw, Qcow2 };

// Parses "raw" or "qcow2"; false for anything else.
bool parse_image_format(const std::string& name, ImageFormat* out);

struct ChainOptions {
  bool read_only = false;   // the top image too
  // O_DIRECT (--cache=none). Raw images only for now: their unaligned
  // requests go through a bounce buffer; qcow2 refuses it.
  bool direct = false;
  uint64_t l2_cache_bytes = 128ull << 20;  // per qcow2 image, an upper bound
  // Open the external data file a qcow2 image names (data_file). Off by
  // default: an image must not make the server open arbitrary host files.
  // Relative names resolve against the image's directory (qemu resolves
  // them against its working directory).
  bool allow_data_files = false;
  size_t max_depth = 4096;
  // -U: lock no permission away from other users (QEMU's force-share), so
  // an image another process writes can still be served. Read-only only.
  bool force_share = false;
};

// What one image of an opened chain is, for logs and `layerctl info`.
struct ChainMember {
  std::string path;
  ImageFormat format;
  uint64_t size;
};

struct OpenedChain {
  std::shared_ptr<Layer> layer;
  std::vector<ChainMember> members;  // [0] is the top
};

// Opens `path` as `format` and, for qcow2, its whole backing chain: backing
// names resolve against the directory of the image naming them, the
// backing format comes from the image's header extension (never probed; a
// missing one is an error), `json:` names and loops are refused, and an
// image another process uses in a conflicting way is refused. On failure
// returns false and sets `error` to a message naming the image at fault.
bool open_chain(const std::string& path, ImageFormat format,
                const ChainOptions& options, OpenedChain* out,
                std::string* error);

}  // namespace layerd
