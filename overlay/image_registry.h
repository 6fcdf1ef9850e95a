// One open image per file.
//
// Every graph, export, view and (later) job that uses a file gets the same
// BlockNode, and so the same qcow2::Image with its caches: the registry
// keys open images by device and inode, so two names of one file (a
// symlink, a relative and an absolute path) are one node. Internal
// snapshot views are nodes of their own, keyed by file and snapshot id.
//
// Access rules between users of one file inside the process:
//   - a file opened writable is shared by every later writable or
//     read-only export of it (they see each other's writes);
//   - a file that is the backing image of a graph must not change under
//     its overlays, so it cannot also be opened writable, and a writable
//     file cannot become a backing image;
//   - a file opened read-only cannot later be opened writable by an
//     export (block jobs reopen nodes in place with set_writable).
// Each refusal names the file and the user that holds it.
//
// Thread safety: open() and open_snapshot() may be called from any thread;
// the registry holds only weak references, so a node closes when the last
// graph using it goes away.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <tuple>

#include "overlay/image_dirs.h"
#include "overlay/image_locks.h"
#include "qcow2/file.h"
#include "qcow2/image.h"

namespace layerd {

enum class ImageFormat { Raw, Qcow2 };

// Parses "raw" or "qcow2"; false for anything else.
bool parse_image_format(const std::string& name, ImageFormat* out);
const char* format_name(ImageFormat f);

// Which internal snapshot to open: "ID_OR_NAME" (an id, else a name), or
// qemu-nbd's "snapshot.id=ID,snapshot.name=NAME" forms, where every given
// field must match.
struct SnapshotSelector {
  std::string id_or_name;
  std::string id;
  std::string name;
  bool empty() const { return id_or_name.empty() && id.empty() && name.empty(); }
  std::string describe() const;
  bool operator==(const SnapshotSelector&) const = default;
};

// One opened image: a qcow2 Image (possibly a snapshot view) or a raw file.
struct BlockNode {
  std::string path;  // as first named (resolved for backing images)
  ImageFormat format = ImageFormat::Raw;
  // Virtual size. Changes only while the graphs using the node are paused
  // (a commit grows its base), but is read by queries at any time.
  std::atomic<uint64_t> size{0};
  std::atomic<bool> writable{false};  // changes only under the registry's mutex
  std::string snapshot_id;  // set for an internal snapshot view
  std::shared_ptr<const BlockNode> snapshot_of;  // the view's active image
  std::shared_ptr<qcow2::Image> image;  // qcow2
  std::shared_ptr<File> raw;            // raw
  std::shared_ptr<File> file;           // the image file itself (both)
  std::shared_ptr<File> data_file;      // qcow2 with an external data file
  std::string data_file_path;
};

struct NodeOptions {
  bool writable = false;
  // Opened as a backing image of `named_by` (or under a throwaway
  // overlay): it must not change, so a writable node is not shared.
  bool backing = false;
  std::string named_by;  // for messages
  bool direct = false;   // O_DIRECT (raw only)
  uint64_t l2_cache_bytes = 128ull << 20;
  bool allow_data_files = false;
  // Where the names the image records (its data file) may lead and, unless
  // `trusted_name`, where its own name may (overlay/image_dirs.h): a name
  // outside is refused. nullptr: anywhere (tools that own their images).
  const ImageDirs* image_dirs = nullptr;
  bool trusted_name = false;  // the user named the file itself
  // For check and repair tools: repair a dirty image at open (as a server
  // does), and whether a writable open of a corrupt image is refused.
  bool repair_dirty_on_open = true;
  bool refuse_corrupt = true;
  // QEMU's image locks (overlay/image_locks.h): the access they are taken
  // for (by default Write or Read, from `writable`), and -U.
  std::optional<Access> lock_access;
  bool force_share = false;
  // If set, a lock conflict is also described here (for tools that word
  // it as qemu-img does), with the path of the file in the way.
  LockConflict* conflict = nullptr;
  std::string* conflict_path = nullptr;
};

// Whether two names name one file (device and inode), as the registry
// tells files apart; false if either cannot be looked up.
bool same_file(const std::string& a, const std::string& b);

// Opens one image file (and its external data file) without sharing it,
// for tools that own their images (layerctl). The registry opens through
// this too. nullptr with `error` set on failure.
std::shared_ptr<BlockNode> open_block_node(const std::string& path,
                                           ImageFormat format,
                                           const NodeOptions& options,
                                           std::string* error);

class ImageRegistry {
 public:
  // The node for `path` opened as `format`, shared if the file is open
  // already. On failure returns nullptr and sets `error`.
  std::shared_ptr<BlockNode> open(const std::string& path, ImageFormat format,
                                  const NodeOptions& options,
                                  std::string* error);

  // A read-only view of the internal snapshot `which` of the qcow2 node
  // `active`.
  std::shared_ptr<BlockNode> open_snapshot(
      const std::shared_ptr<BlockNode>& active, const SnapshotSelector& which,
      std::string* error);

  // Block jobs: makes `node` (a qcow2 image or raw file, not a snapshot
  // view) writable or read-only in place, with QEMU's locks for the new use
  // taken before the old ones go; everyone using the node goes on using
  // it (no close and reopen). Going read-only writes everything back first
  // (Image::reopen_read_only). false with `error` when it cannot (another
  // process holds the file, the file cannot be written, bitmaps in the
  // way); the node is then as it was, except after a failed write-back on
  // the way to read-only: its image is read-only all the same (its
  // flushes report the error), and so are its files and the node. The
  // image's own reopen runs without the registry's lock (other calls go on
  // meanwhile; an open() of the same file waits for it); a second call for
  // the same node meanwhile fails.
  bool set_writable(const std::shared_ptr<BlockNode>& node, bool writable,
                    std::string* error);
  // Records that `node` is now the backing image of `named_by` (after a
  // live snapshot), so that no export may open it writable.
  void mark_backing(const std::shared_ptr<BlockNode>& node,
                    const std::string& named_by);

  // The number of files (and views) open now, for tests and logs.
  size_t open_count() const;

 private:
  struct Entry {
    std::weak_ptr<BlockNode> node;
    bool backing = false;  // some user has it as a backing image
    std::string backing_of;
  };
  using Key = std::tuple<dev_t, ino_t, std::string>;  // snapshot id or ""

  std::shared_ptr<BlockNode> share(Entry& entry, const std::string& path,
                                   const NodeOptions& options,
                                   std::string* error);

  mutable std::mutex mutex_;
  std::map<Key, Entry> entries_;
  std::set<const BlockNode*> reopening_;  // in set_writable, between the locks
  std::condition_variable reopened_;      // a node left reopening_
};

}  // namespace layerd
