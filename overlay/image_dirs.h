// Where the names an image records may lead: the allowed image directories
// (--image-dir; by default the directory of the exported image).
//
// An image is data, possibly a stranger's: its backing file and data file
// names, and the file names a QMP client sends (block-export-add,
// blockdev-snapshot-sync), must not make layerd open /etc/shadow or a
// device. So every such name is opened beneath one of the allowed
// directories with openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
// relative to a descriptor of that directory taken when the policy was
// made: the kernel resolves the name, so `..`, symlinks pointing out and
// files swapped in during the lookup cannot lead elsewhere (no string
// prefix test decides it). A name is tried beneath each directory it names
// (as written, made absolute, then with its symlinks resolved, so that a
// symlink into another allowed directory works); the first open wins.
//
// `/` among the directories turns confinement off (today's plain open,
// qemu-nbd's behaviour). Protocol names (`nbd:`, `http://`, `file:`,
// `json:`...) are refused whatever the directories: layerd opens local
// files only.
//
// Thread safety: immutable once built; copies share the directory
// descriptors, which close with the last copy.
#pragma once

#include <sys/stat.h>

#include <memory>
#include <string>
#include <system_error>
#include <vector>

#include "qcow2/file.h"

namespace layerd {

class ImageDirs {
 public:
  // Adds `dir` (opened now, O_PATH). false with `error` if it cannot be
  // opened or is not a directory.
  bool add(const std::string& dir, std::string* error);

  // True if `/` is among the directories: names are followed anywhere.
  bool everywhere() const { return everywhere_; }

  // "/img, /data" for messages.
  std::string describe() const;

  // A descriptor of `path` opened with `flags` (open(2) flags) beneath an
  // allowed directory, or -1 with `ec` set: EXDEV when it lies outside all
  // of them (message: outside()), ENOSYS without openat2 (message:
  // explain()), or the error of the open (ENOENT...).
  int open_fd(const std::string& path, int flags, std::error_code& ec) const;

  // open_fd() as a File.
  std::unique_ptr<File> open(const std::string& path, const FileOptions& options,
                             std::error_code& ec) const;

  // The identity of `path` (fstat of an O_PATH descriptor opened as
  // open_fd() opens it). false with `ec` set.
  bool stat(const std::string& path, struct stat* st, std::error_code& ec) const;

  // The message for an error of open_fd() about the file `what` names
  // ("backing file '/etc/x' of '/img/top.qcow2'"; `path` is that file):
  // for EXDEV the refusal with the --image-dir that would allow it, for
  // ENOSYS and ELOOP why layerd cannot follow it; "" for other errors
  // (the caller words those as any failed open).
  std::string explain(std::error_code ec, const std::string& what,
                      const std::string& path) const;

 private:
  struct Dir;
  std::vector<std::shared_ptr<const Dir>> dirs_;
  bool everywhere_ = false;
};

// The protocol prefix of `name` ("nbd:", "http:", "json:", "file:"), as
// qemu recognises one: a colon before the first slash. "" for a plain file
// name (write "./a:b" for a local file with a colon).
std::string protocol_prefix(const std::string& name);

// The refusal of a protocol name for the file `what` names, or "" if
// `name` is a plain file name.
std::string refuse_protocol_name(const std::string& what, const std::string& name);

}  // namespace layerd
