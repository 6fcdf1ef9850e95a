// Throwaway overlays (-s, per-client overlays): an empty qcow2 image with
// no name, over a chain that it never changes.
//
// The file is made in a temporary directory with O_TMPFILE (or created
// and unlinked at once where the file system lacks it), so it disappears
// when layerd exits, even on kill -9. Its cluster size (and extended L2)
// follow the image right below, so copy-on-write copies no more than a
// write to that image would. On request the overlay is kept instead: on
// release it is flushed, closed cleanly and given a name in a directory,
// as a qcow2 file whose backing file (absolute name) and format name the
// image below, so qemu and layerd can open it over the original chain.
//
// Thread safety: create() may run on any thread; the node is shared like
// any other. The destructor must run after every graph using the node is
// gone (it closes the image).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "overlay/image_registry.h"

namespace layerd {

struct TempOverlayOptions {
  std::string dir;       // where the file is made (--temp-dir)
  std::string keep_dir;  // keep it there on release (--keep-overlay); "": discard
  std::string keep_name;  // start of the kept file's name
};

// The temporary directory qemu-nbd would use: $TMPDIR, else /var/tmp.
std::string default_temp_dir();

class TempOverlay {
 public:
  // Creates the overlay over `below` ([0] is the image right below it).
  // Keeping needs O_TMPFILE and a below that a backing name can express
  // (not an internal snapshot view): refused otherwise.
  static std::unique_ptr<TempOverlay> create(
      const std::vector<std::shared_ptr<BlockNode>>& below,
      const TempOverlayOptions& options, std::string* error);

  // Whether overlays made with `options` can be kept: a file made in
  // options.dir can be given a name in options.keep_dir (same file
  // system, O_TMPFILE, a writable directory). A message saying why not,
  // or "".
  static std::string check_keep(const TempOverlayOptions& options);

  // Keeps the overlay if asked and it holds anything (and says where),
  // else lets it vanish.
  ~TempOverlay();
  TempOverlay(const TempOverlay&) = delete;
  TempOverlay& operator=(const TempOverlay&) = delete;

  const std::shared_ptr<BlockNode>& node() const { return node_; }

  // Flushes, closes and names the overlay now, in options.keep_dir; the
  // node must no longer be in use. Sets `*path` to the kept file's name.
  std::error_code keep(std::string* path);

 private:
  TempOverlay(std::shared_ptr<BlockNode> node, std::shared_ptr<File> file,
              int fd, TempOverlayOptions o)
      : node_(std::move(node)),
        file_(std::move(file)),
        created_size_(file_->size()),
        fd_(fd),
        options_(std::move(o)) {}

  std::shared_ptr<BlockNode> node_;
  std::shared_ptr<File> file_;
  uint64_t created_size_;  // the file grows with the first write
  int fd_;  // owned by file_
  TempOverlayOptions options_;
  bool kept_ = false;
};

}  // namespace layerd
