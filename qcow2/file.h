// The storage seam: every byte layerd reads from or writes to an image goes
// through a File. A real file, an in-memory file and a fault-injecting file
// stand behind it, so format code is tested without touching the disk.
//
// It lives at the bottom of the tree (in qcow2/, which has no other
// dependencies) because both qcow2 images and raw layers use it.
//
// Thread safety: every method may be called concurrently from several
// threads (positional I/O only, no shared file offset).
//
// Image locks follow QEMU's protocol (block/file-posix.c), so layerd, QEMU,
// qemu-nbd, qemu-img and qemu-io keep each other from writing an image the
// other uses. Each of QEMU's block permissions has two bytes in the file:
// byte 100 + bit ("I use it") and byte 200 + bit ("I do not let others use
// it"). A user read-locks the bytes of what it takes and of what it does
// not share, then checks that no other open file description holds the
// opposite byte (an exclusive F_OFD_GETLK test). The locks are Linux
// open-file-description locks on the File's first open file description:
// they belong to that one open, so two opens in one process conflict just
// as two processes do, closing another descriptor of the file releases
// nothing, closing this File releases them all, and a forked child
// (layerd --fork) shares them. reopen() keeps that first description open
// (on a second descriptor) and moves only the I/O descriptor to the new
// one, so a reopen never drops a lock.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <span>
#include <string>
#include <system_error>
#include <vector>

namespace layerd {

enum class OpenMode { ReadOnly, ReadWrite };

// QEMU's block permissions (BLK_PERM_* in include/block/block-common.h).
// The bit numbers decide which bytes are locked: they are QEMU's and must
// not change.
namespace perm {
inline constexpr uint32_t kConsistentRead = 1u << 0;
inline constexpr uint32_t kWrite = 1u << 1;
inline constexpr uint32_t kWriteUnchanged = 1u << 2;
inline constexpr uint32_t kResize = 1u << 3;
inline constexpr uint32_t kAll = kConsistentRead | kWrite | kWriteUnchanged | kResize;
}  // namespace perm

// QEMU's name of one permission bit: "consistent read", "write",
// "write unchanged", "resize".
std::string permission_name(uint32_t permission);

// The locks one open holds: the permissions it takes and those it lets
// other users take meanwhile. The default holds no lock bytes at all.
struct LockSet {
  uint32_t take = 0;
  uint32_t share = perm::kAll;
};

// Why File::lock failed: one permission and which side refuses it.
struct LockConflict {
  uint32_t permission = 0;
  // true: another user takes `permission`, which this open does not share.
  // false: this open takes `permission`, and another user does not share it.
  bool taken_by_other = false;

  // "another process holds the "write" lock" or "another process has it
  // open and does not share the "write" lock".
  std::string describe() const;
  // QEMU's wording: "Failed to get shared "write" lock" (taken by
  // another) or "Failed to get "write" lock".
  std::string qemu_message() const;
};

class File {
 public:
  virtual ~File() = default;

  // Reads buf.size() bytes at `offset`. Bytes past the end of the file read
  // as zeros (as in QEMU's file driver). Retries short reads and EINTR.
  virtual std::error_code pread(std::span<std::byte> buf, uint64_t offset) = 0;

  // Like pread, but only if it can be done without waiting for the disk
  // (the data is in the page cache). Returns
  // errc::resource_unavailable_try_again otherwise, including on files and
  // kernels that cannot tell; the caller then uses pread from a thread that
  // may block. Never returns partial data.
  virtual std::error_code pread_nowait(std::span<std::byte> buf,
                                       uint64_t offset);

  // Writes all of `data` at `offset`, extending the file if needed.
  // Retries short writes and EINTR; a write that makes no progress is
  // errc::no_space_on_device, never retried.
  virtual std::error_code pwrite(std::span<const std::byte> data,
                                 uint64_t offset) = 0;

  // Makes every completed write durable (fdatasync). A file whose pages
  // may hold writes the kernel failed to write back fails every flush from
  // its first failure on (PosixFile): the kernel reports a write-back error
  // once per descriptor and marks the pages clean, so a later fdatasync
  // would succeed over lost data (QEMU's file driver does the same).
  virtual std::error_code flush() = 0;

  // Starts writing completed writes back to the storage without waiting
  // for them (a hint, so that a later flush() has less left to do; it
  // promises nothing about durability). Long copies call it as they go.
  // May wait while the device's queue is full. The default does nothing.
  virtual void start_writeback();

  // Writes completed writes back to the storage and waits for them, one
  // step of the file (kWriteBackStep bytes) at a time, so that this call
  // never queues more than a step's worth of writes at the device: a
  // reader of another file waits behind one step, not behind the whole
  // backlog (a gigabyte of dirty pages flushed at once held reads up for
  // 50 to 190 ms). Only the span that took cached writes since the last
  // call is stepped through (a clean terabyte costs nothing). Promises no
  // durability (flush() does, and then finds little left). An error is
  // a failed flush: every later flush() fails too (see flush()). Thread-
  // safe, beside reads and writes. The default does nothing.
  virtual std::error_code write_back_in_steps();
  static constexpr uint64_t kWriteBackStep = 8 << 20;

  // Sets the file's length.
  virtual std::error_code truncate(uint64_t size) = 0;

  // Deallocates the range; it reads as zeros afterwards. Returns
  // errc::operation_not_supported where the filesystem or device cannot
  // promise both (a block device's BLKDISCARD may keep old data).
  virtual std::error_code punch_hole(uint64_t offset, uint64_t length) = 0;

  // Gives the range back to the storage, which may keep its old data
  // (TRIM): BLKDISCARD on a block device. By default punch_hole().
  virtual std::error_code discard(uint64_t offset, uint64_t length);

  // Makes the range read as zeros, preferably without writing data
  // (FALLOC_FL_ZERO_RANGE); falls back to writing zeros.
  virtual std::error_code write_zeroes(uint64_t offset, uint64_t length) = 0;

  // Current length in bytes.
  virtual uint64_t size() const = 0;

  // Finds the next data or hole boundary for block status. Sets `*is_data`
  // for the extent starting at `offset` and returns its length (at most
  // `length`). Files that cannot tell report everything as data.
  virtual uint64_t extent_at(uint64_t offset, uint64_t length,
                             bool* is_data) const = 0;

  // True when the file is open for writing (after the last reopen()).
  virtual bool writable() const = 0;

  // Reopens the file in `mode` in place, for live jobs that make a backing
  // image writable and back: this File stays the same object, the locks of
  // lock() stay held throughout, and I/O from other threads goes on during
  // the call, every pread reading this same file (before or after the
  // switch; none fails because of it). writable() reports `mode` once it
  // returns. On failure (EACCES, EROFS, a block device that cannot be
  // written...) returns the error and leaves the File as it was. The caller
  // makes sure no write is in flight when going to ReadOnly (writes then
  // fail with EBADF). Files that cannot do this return
  // errc::operation_not_supported (the default).
  virtual std::error_code reopen(OpenMode mode);

  // Holds exactly the locks of `wanted` from now on (see the top of this
  // file); call it again to change them in place, as a reopen from
  // read-only to read-write and back does. The new bytes are locked before
  // any old one is released, so there is no moment in which this open holds
  // neither. On a conflict with another open (of any process) returns
  // errc::resource_unavailable_try_again, fills `*conflict` and keeps the
  // locks held before the call; other errors (a file system without locks)
  // likewise keep them. `conflict` may be null. The in-memory file accepts
  // every request; wrappers forward to the file they wrap.
  virtual std::error_code lock(const LockSet& wanted, LockConflict* conflict);
};

// Bulk copies bypass the page cache. While a BulkIoScope lives on a
// thread, that thread's pread and pwrite calls on files of open_posix_file
// go to the storage directly (O_DIRECT, through a second descriptor of the
// same open file, made at the first such call) wherever the buffer, the
// offset and the length meet the storage's alignment (a DirectIoBuffer's
// memory does); every other call, and every call on a file system or file
// without O_DIRECT (tmpfs, a failed open), uses the page cache as always.
// The kernel keeps the two paths coherent: a direct read first writes back
// the dirty cached pages of its range, a direct write drops the cached
// pages of its range. Why: a block job copying gigabytes through the page
// cache spends CPU time on copies, page reclaim and write-back that
// clients' requests then wait for, and pushes the pages they read out of
// the cache (docs/performance.md measures it). Scopes nest; a thread's
// scope affects that thread only.
class BulkIoScope {
 public:
  BulkIoScope();
  ~BulkIoScope();
  BulkIoScope(const BulkIoScope&) = delete;
  BulkIoScope& operator=(const BulkIoScope&) = delete;
  // Whether the calling thread is inside a scope.
  static bool active();
};

// Memory aligned for direct I/O (4096 bytes, what every Linux storage
// stack accepts), for the buffers of bulk copies.
template <typename T>
struct DirectIoAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlignment{4096};
  DirectIoAllocator() = default;
  template <typename U>
  DirectIoAllocator(const DirectIoAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlignment)); }
  void deallocate(T* p, size_t) { ::operator delete(p, kAlignment); }
  template <typename U>
  bool operator==(const DirectIoAllocator<U>&) const { return true; }
};
using DirectIoBuffer = std::vector<std::byte, DirectIoAllocator<std::byte>>;

struct FileOptions {
  OpenMode mode = OpenMode::ReadOnly;
  bool direct = false;  // O_DIRECT (--cache=none / --nocache)
  bool create = false;  // create if missing (ReadWrite only)
};

// Opens a regular file or block device. On failure returns nullptr and sets
// `ec` (ENOENT, EACCES, EISDIR, ...).
std::unique_ptr<File> open_posix_file(const std::string& path,
                                      const FileOptions& options,
                                      std::error_code& ec);

// The open(2) flags open_posix_file uses for `options` (O_CLOEXEC always).
int posix_open_flags(const FileOptions& options);

// A File for `fd`, a descriptor opened with posix_open_flags(options); it
// takes the descriptor (closed on failure too). Fails like open_posix_file
// for directories and special files.
std::unique_ptr<File> adopt_posix_fd(int fd, const FileOptions& options,
                                     std::error_code& ec);

// Opens `relative` beneath the directory open on `dir_fd` with openat2(2)
// and RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS: the kernel resolves every
// component, so a name that would lead out of the directory (a `..` above
// it, an absolute name, a symlink pointing out, also one swapped in while
// the name is resolved) fails with EXDEV, a /proc magic link with ELOOP.
// ENOSYS where the kernel has no openat2 (before Linux 5.6). `flags` as for
// open(2) (O_PATH for just the file's identity). A descriptor, or -1 with
// `ec` set.
int open_beneath(int dir_fd, const std::string& relative, int flags,
                 std::error_code& ec);

// A file with no name in directory `dir`, for throwaway overlays: made with
// O_TMPFILE where the file system has it (so it can be given a name later,
// see link_temp_file), else created and unlinked at once. Either way it
// disappears when it is closed or the process dies, even on kill -9.
// `*fd` is the file's descriptor, valid while the File lives.
std::unique_ptr<File> open_temp_file(const std::string& dir, int* fd,
                                     std::error_code& ec);

// Gives the temporary file open on `fd` the name `path` (linkat through
// /proc/self/fd), so it outlives the process. Fails with EEXIST if `path`
// exists, and with ENOENT for files that were not made with O_TMPFILE.
std::error_code link_temp_file(int fd, const std::string& path);

// True if every byte of `data` is zero: zero detection before a write
// (zero clusters, --detect-zeroes, hole chunks), shared by every layer.
bool all_zero(std::span<const std::byte> data);

// A growable file held in memory, for tests.
std::unique_ptr<File> make_memory_file(uint64_t initial_size = 0);

}  // namespace layerd
