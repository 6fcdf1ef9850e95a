// Opening a backing chain: the top image and every image below it, through
// the ImageRegistry, as the nodes of a Graph.
//
// Backing names resolve against the directory of the image naming them,
// the backing format comes from the image's header extension (never
// probed; a missing one is an error), `json:` and other protocol names and
// loops are refused, and with ChainOptions::image_dirs every name is opened
// only inside the allowed image directories.
// Backing images are opened read-only and never written, so other readers
// may share them. Only the top image is written. Every file is locked as
// QEMU locks it (overlay/image_locks.h).
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "overlay/graph.h"
#include "overlay/image_registry.h"
#include "overlay/layer.h"

namespace layerd {

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
  // Where backing and data file names may lead (overlay/image_dirs.h);
  // nullptr: anywhere (tools). `trusted_top`: the user named the top image,
  // so only the names below it are confined.
  const ImageDirs* image_dirs = nullptr;
  bool trusted_top = true;
  size_t max_depth = 4096;
  // Serve this internal snapshot (id or name) of the top image instead of
  // its active state; read-only.
  SnapshotSelector snapshot{};
  // The chain goes under a throwaway overlay: its top is opened like a
  // backing image, so that no export may write it meanwhile.
  bool under_overlay = false;
  // The top image alone, without the backing file it names (QEMU's
  // backing=null): what it does not allocate reads as zeros.
  bool no_backing = false;
  // Where images are shared; nullptr: the process's registry.
  ImageRegistry* registry = nullptr;
  // -U: lock no permission away from other users (QEMU's force-share), so
  // an image another process writes can still be served. Read-only only.
  bool force_share = false;
  // For tools: the access images are locked for (default: Write for a
  // writable top, else Read), and where to describe a lock conflict (see
  // NodeOptions).
  std::optional<Access> lock_access{};
  LockConflict* conflict = nullptr;
  std::string* conflict_path = nullptr;
};

// The process's registry, shared by every export of a server.
ImageRegistry& process_registry();

// Opens `path` as `format` and, for qcow2, its whole backing chain
// (`nodes[0]` is the top, or the snapshot view of it). On failure returns
// false and sets `error` to a message naming the image at fault.
bool open_chain_nodes(const std::string& path, ImageFormat format,
                      const ChainOptions& options,
                      std::vector<std::shared_ptr<BlockNode>>* nodes,
                      std::string* error);

// The Layer that serves `nodes` as they are: a raw file alone is served
// directly, anything else through a GraphLayer. `format_probed`: the raw
// file's format was guessed, so writes must not give it an image header
// (RawLayerOptions::refuse_format_headers).
std::shared_ptr<Layer> serve_nodes(std::vector<std::shared_ptr<BlockNode>> nodes,
                                   bool writable, bool copy_on_read,
                                   uint32_t direct_alignment,
                                   bool format_probed = false);

struct OpenedChain {
  std::shared_ptr<Layer> layer;
  std::vector<std::shared_ptr<BlockNode>> nodes;  // [0] is the top
};

// open_chain_nodes() and serve_nodes() in one step.
bool open_chain(const std::string& path, ImageFormat format,
                const ChainOptions& options, OpenedChain* out,
                std::string* error);

}  // namespace layerd
