// Shared pieces of layerctl's commands: errors that end a command with an
// exit code, qemu-style number and size formatting, the JSON printer, and
// opening images (one, or a whole backing chain) the way qemu-img does.
//
// layerctl is single-threaded; nothing here is thread safe.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <boost/json.hpp>

#include "overlay/chain.h"
#include "qcow2/file.h"
#include "qcow2/image.h"

namespace layerd::ctl {

// Ends the current command: main prints "layerctl: <message>" (unless the
// message is empty) on stderr and exits with `code`.
struct CommandError : std::runtime_error {
  CommandError(int exit_code, const std::string& message)
      : std::runtime_error(message), code(exit_code) {}
  int code;
};

// Usage mistakes: exit 1 with a hint to --help.
[[noreturn]] void usage_error(const std::string& message);
// Anything else that makes the command fail with exit 1.
[[noreturn]] void fail(const std::string& message);

// "64M", "1.5G", "512" (bytes), suffixes K M G T P E (any case) and B.
// Returns false on syntax errors, negative values or overflow.
bool parse_size(const std::string& text, uint64_t* out);

// qemu's size_to_str: "1.26 MiB", "196 KiB", "0 B".
std::string human_size(uint64_t bytes);

// qemu's path_combine: `name` relative to the directory of `base_path`
// (kept relative if `base_path` is), unchanged if absolute.
std::string combine_path(const std::string& base_path, const std::string& name);

// JSON text as qemu-img prints it: 4-space indentation, `"key": value`,
// objects in insertion order. No trailing newline.
std::string pretty_json(const boost::json::value& v);

// Bytes the file occupies on disk (st_blocks * 512); 0 if unknown.
uint64_t allocated_size(const std::string& path);

// "qcow2" if `path` starts with the qcow2 magic, "raw" otherwise (and for
// files too short to tell). Fails if the file cannot be opened.
ImageFormat probe_format(const std::string& path);

// Parses -f / -F values ("raw", "qcow2"); fails with qemu-img's message.
ImageFormat parse_format_arg(const std::string& name, const std::string& file);

// One opened image of a chain.
struct OpenedImage {
  std::string filename;  // as the user named it, or combined for backings
  ImageFormat format = ImageFormat::Raw;
  std::shared_ptr<File> file;
  std::shared_ptr<qcow2::Image> image;  // qcow2 only
  std::shared_ptr<File> data_file;      // qcow2 with an external data file
  std::string data_file_path;
  uint64_t size = 0;  // virtual size
};

struct OpenFlags {
  bool writable = false;
  bool repair_dirty_on_open = true;
  // Only the header and tables are read, never guest data (qemu-img
  // info): no "consistent read" lock is taken.
  bool metadata_only = false;
  // -U: lock nothing away from other users; read-only opens only.
  bool force_share = false;
};

// Opens one image (not its backing), locking it as qemu-img would
// (overlay/image_locks.h). Fails with "Could not open ..." on errors, and
// with qemu-img's "Failed to get ... lock" message when another process
// uses the image in a conflicting way.
OpenedImage open_image(const std::string& path, ImageFormat format,
                       OpenFlags flags = {});

// Opens `path` and its whole backing chain with `flags` (read-only ones),
// [0] being the top. Backing formats come from the headers; a chain that
// does not record one is refused (formats of backing files are never
// probed).
std::vector<OpenedImage> open_image_chain(const std::string& path,
                                          ImageFormat format,
                                          OpenFlags flags = {});

}  // namespace layerd::ctl
