// --image-opts: the FILE argument as a qemu block option string, the way
// qemu-nbd users write it:
//
//   driver=qcow2,file.driver=file,file.filename=disk.qcow2
//   driver=raw,file.filename=disk.tar,offset=1536,size=1G
//   driver=file,filename=disk.img
//   driver=compress,file.driver=qcow2,file.file.filename=out.qcow2
//
// The string is split as QEMU splits it (QemuOpts), then read as a stack
// of block nodes, each one's options prefixed with the path to it
// ("file.", "file.file.", ...). The stacks layerd can serve, top first:
// [raw] [compress] [qcow2] file, where a missing top driver means "probe
// the format, as without -f". Options that map onto layerd's own are taken
// (read-only, discard, detect-zeroes, cache.direct, cache.no-flush,
// force-share, aio, l2-cache-size, backing= for no backing file, ...);
// anything else is refused with a message naming the key. Parsing is pure
// (no I/O): files are opened later, with the rest of the export.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace layerd {

enum class DetectZeroes;

// What an --image-opts string asks for.
struct ImageOpts {
  std::string filename;       // the file node's filename
  std::string format;         // "qcow2", "raw", or "" to probe (no top driver)
  // The raw driver's window: the export starts `offset` bytes into what is
  // below and is `size` bytes long (else reaches to its end).
  uint64_t offset = 0;
  std::optional<uint64_t> size;
  bool compress = false;      // driver=compress over the qcow2 node
  bool no_backing = false;    // backing= (or backing=null): no backing file
  // Settings of the nodes, for the export (the last one given wins).
  std::optional<bool> read_only;
  std::optional<bool> force_share;
  std::optional<bool> discard_unmap;
  std::optional<DetectZeroes> detect_zeroes;
  std::optional<bool> cache_direct;
  std::optional<bool> cache_no_flush;
  std::optional<uint64_t> l2_cache_bytes;
};

// Splits "key=value,key=value,..." as QEMU's QemuOpts does: ",," in a value
// is a comma; a first item without '=' is the value of `implied_key`; a
// later item "key" alone means key=on, and "nokey" key=off; "id" is
// dropped. Keys keep the order given (a repeated key appears twice).
// Returns an error message, or "".
std::string split_qemu_opts(std::string_view text, std::string_view implied_key,
                            std::vector<std::pair<std::string, std::string>>* out);

// Parses an --image-opts string. Returns an error message naming the key at
// fault (e.g. "option 'file.aio-max-batch' of driver 'file' is not supported
// by layerd"), or "".
std::string parse_image_opts(std::string_view text, ImageOpts* out);

}  // namespace layerd
