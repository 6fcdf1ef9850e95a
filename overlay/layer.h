// The Layer interface: what an export serves from.
//
// A Layer is a virtual disk of fixed size: a raw file, a qcow2 chain, a
// throwaway overlay, a snapshot view, or a filter stacked over another layer.
// Public calls are non-virtual: they check the range and the flags once and
// then call the protected do_* implementation, so implementations can trust
// their arguments. A filter that does not change an operation forwards it.
//
// Errors are std::error_code values in the generic (errno) category; the
// server maps them to NBD errors in one place.
//
// Thread safety: all methods may be called concurrently from many threads;
// an implementation serializes internally where it must.
#pragma once

#include <cstdint>
#include <span>
#include <system_error>

namespace layerd {

// One extent of a block-status answer.
struct Extent {
  uint64_t length = 0;
  // Not allocated in this layer or any layer below it: reads come from
  // nowhere (base:allocation NBD_STATE_HOLE).
  bool hole = false;
  // Reads as zeros (NBD_STATE_ZERO).
  bool zero = false;
  // Which layer of a chain provides the data: 1 for the top, 2 for the one
  // below, ..., 0 if none (qemu:allocation-depth).
  uint32_t depth = 1;
};

struct Capabilities {
  bool writable = false;
  bool trim = false;            // trim can free space
  bool fast_zero = false;       // write_zeroes with fast_only can succeed
  bool cheap_block_status = false;  // block status needs no I/O: reads may
                                    // answer zero ranges as holes
  bool multi_conn_safe = true;  // a flush is visible to every connection
  bool buffered_writes = false;  // writes land in the page cache and rarely
                                 // wait for the disk (no O_DIRECT)
};

struct ZeroFlags {
  bool may_trim = false;   // the range may be deallocated (not NO_HOLE)
  bool fast_only = false;  // fail with ENOTSUP unless it is fast (FAST_ZERO)
  bool fua = false;
};

class Layer {
 public:
  virtual ~Layer() = default;

  uint64_t size() const { return size_; }
  const Capabilities& capabilities() const { return caps_; }

  // Fills `buf` with the bytes at `offset`. The range must lie inside the
  // layer (EINVAL otherwise).
  std::error_code read(uint64_t offset, std::span<std::byte> buf);

  // Like read, but only if it can complete without blocking on I/O (data
  // in the page cache, metadata in memory); otherwise returns
  // errc::resource_unavailable_try_again and the caller uses read() from a
  // thread that may block. Lets the server's I/O thread answer cached reads
  // itself.
  std::error_code try_read_nowait(uint64_t offset, std::span<std::byte> buf);

  // Writes `data` at `offset`; with `fua` it is durable before returning.
  // EROFS-style refusals come back as EPERM.
  std::error_code write(uint64_t offset, std::span<const std::byte> data,
                        bool fua);

  std::error_code write_zeroes(uint64_t offset, uint64_t length, ZeroFlags f);

  // Advises that the range is no longer needed; reads of it afterwards may
  // return old data or zeros.
  std::error_code trim(uint64_t offset, uint64_t length, bool fua);

  // Makes every completed write durable.
  std::error_code flush();

  // Prefetches the range (NBD_CMD_CACHE). Never changes contents.
  std::error_code cache(uint64_t offset, uint64_t length);

  // Describes the range from `offset` on into `out`, contiguous extents
  // starting at `offset`, covering at most `length` bytes and at least one
  // byte. Returns the number of extents written (>= 1), or an error.
  std::error_code block_status(uint64_t offset, uint64_t length,
                               std::span<Extent> out, size_t* count);

 protected:
  Layer(uint64_t size, Capabilities caps) : size_(size), caps_(caps) {}

  virtual std::error_code do_read(uint64_t offset, std::span<std::byte> buf) = 0;
  virtual std::error_code do_read_nowait(uint64_t offset,
                                         std::span<std::byte> buf);
  virtual std::error_code do_write(uint64_t offset,
                                   std::span<const std::byte> data, bool fua) = 0;
  virtual std::error_code do_write_zeroes(uint64_t offset, uint64_t length,
                                          ZeroFlags f) = 0;
  virtual std::error_code do_trim(uint64_t offset, uint64_t length,
                                  bool fua) = 0;
  virtual std::error_code do_flush() = 0;
  virtual std::error_code do_cache(uint64_t offset, uint64_t length);
  virtual std::error_code do_block_status(uint64_t offset, uint64_t length,
                                          std::span<Extent> out,
                                          size_t* count) = 0;

  uint64_t size_;
  Capabilities caps_;
};

}  // namespace layerd
