// POSIX and in-memory implementations of the File seam.
#include "qcow2/file.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <linux/openat2.h>
#include <sys/syscall.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <condition_variable>
#include <mutex>
#include <shared_mutex>
#include <tuple>
#include <vector>

#include "qcow2/rwlock.h"
#include "qcow2/written_span.h"

namespace layerd {
namespace {

std::error_code errno_code() { return {errno, std::generic_category()}; }

// The BulkIoScopes alive on this thread.
thread_local int bulk_io_scopes = 0;

// A new open file description of the file open on `fd`, with `flags`
// (through /proc/self/fd: the same inode even if the file was renamed or
// unlinked meanwhile), or -1 with `ec` set.
int open_again(int fd, int flags, std::error_code& ec) {
  const std::string self = "/proc/self/fd/" + std::to_string(fd);
  int nfd = ::open(self.c_str(), flags | O_CLOEXEC);
  if (nfd < 0) return (ec = errno_code()), -1;
  struct stat a {}, b {};
  if (::fstat(fd, &a) != 0 || ::fstat(nfd, &b) != 0) {
    ec = errno_code();
    ::close(nfd);
    return -1;
  }
  if (a.st_dev != b.st_dev || a.st_ino != b.st_ino) {  // not the same file
    ec = std::make_error_code(std::errc::no_such_device);
    ::close(nfd);
    return -1;
  }
  return nfd;
}

// The alignment of buffers, offsets and lengths for bulk direct I/O on
// `fd`: what the kernel needs (statx STATX_DIOALIGN, Linux 6.1; 4096 where
// it does not say), and at least a page: a direct transfer then covers
// whole pages that nothing written through the page cache shares (qcow2
// metadata, a neighbouring small cluster), where a dirty cached page
// could otherwise outlive the direct write and later overwrite it. 0
// where the file has no direct I/O.
uint32_t direct_io_alignment(int fd) {
  const auto page = static_cast<uint32_t>(::sysconf(_SC_PAGESIZE));
#ifdef STATX_DIOALIGN
  struct statx stx {};
  if (::statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 &&
      (stx.stx_mask & STATX_DIOALIGN))
    return stx.stx_dio_mem_align == 0
               ? 0
               : std::max({stx.stx_dio_mem_align, stx.stx_dio_offset_align, page});
#endif
  (void)fd;
  return std::max(4096u, page);
}

std::error_code would_block() {
  return std::make_error_code(std::errc::resource_unavailable_try_again);
}

// QEMU's lock byte offsets: permission bit i is "taken" at kTakenBase + i
// and "not shared" at kUnsharedBase + i (libvirt uses byte 0).
constexpr off_t kTakenBase = 100;
constexpr off_t kUnsharedBase = 200;
constexpr int kPermissionBits = 4;

// Read-locks (or, with `lock` false, unlocks) one byte for this open file
// description.
std::error_code set_byte_lock(int fd, off_t byte, bool lock) {
  struct flock fl {};
  fl.l_type = lock ? F_RDLCK : F_UNLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  while (::fcntl(fd, F_OFD_SETLK, &fl) != 0) {
    if (errno != EINTR) return errno_code();
  }
  return {};
}

// True if another open file description holds any lock on `byte`.
std::error_code byte_locked_by_other(int fd, off_t byte, bool* locked) {
  struct flock fl {};
  fl.l_type = F_WRLCK;  // conflicts with every lock but our own
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  if (::fcntl(fd, F_OFD_GETLK, &fl) != 0) return errno_code();
  *locked = fl.l_type != F_UNLCK;
  return {};
}

// The lock bytes one open holds, as two masks of permission bits.
struct LockBytes {
  uint32_t taken = 0;
  uint32_t unshared = 0;
  static LockBytes of(const LockSet& s) {
    return {s.take & perm::kAll, ~s.share & perm::kAll};
  }
};

// The locks of one descriptor: what it holds, and the protocol's steps.
class OfdLocks {
 public:
  explicit OfdLocks(int fd) : fd_(fd) {}

  // Runs `f(fd)` with the descriptor the locks live on, with no lock
  // change in progress; `f` may return another descriptor of the same
  // open file description to use from then on (or the same one).
  template <typename F>
  std::error_code with_fd(F&& f) {
    std::lock_guard guard(mutex_);
    return f(fd_);
  }

  std::error_code set(const LockSet& wanted, LockConflict* conflict) {
    std::lock_guard guard(mutex_);
    const LockBytes before = held_;
    const LockBytes after = LockBytes::of(wanted);
    // Lock the union first, so nothing is let go before the check passes.
    std::error_code ec = move_to({before.taken | after.taken,
                                  before.unshared | after.unshared});
    if (!ec) ec = find_conflict(after, conflict);
    // Drop to the new set, or back to the old one if anything failed.
    std::error_code drop = move_to(ec ? before : after);
    return ec ? ec : drop;
  }

 private:
  // Locks and unlocks bytes until exactly `target` is held.
  std::error_code move_to(const LockBytes& target) {
    for (int i = 0; i < kPermissionBits; ++i) {
      const uint32_t bit = 1u << i;
      if (auto ec = move_bit(held_.taken, target.taken, bit, kTakenBase + i))
        return ec;
      if (auto ec = move_bit(held_.unshared, target.unshared, bit, kUnsharedBase + i))
        return ec;
    }
    return {};
  }
  std::error_code move_bit(uint32_t& held, uint32_t target, uint32_t bit,
                           off_t byte) {
    if ((held & bit) == (target & bit)) return {};
    if (auto ec = set_byte_lock(fd_, byte, target & bit)) return ec;
    held ^= bit;
    return {};
  }

  // QEMU's order: what we take against others' "not shared" bytes, then
  // what we do not share against others' "taken" bytes.
  std::error_code find_conflict(const LockBytes& wanted, LockConflict* conflict) {
    for (bool taken_by_other : {false, true}) {
      const uint32_t mask = taken_by_other ? wanted.unshared : wanted.taken;
      const off_t base = taken_by_other ? kTakenBase : kUnsharedBase;
      for (int i = 0; i < kPermissionBits; ++i) {
        if (!(mask & (1u << i))) continue;
        bool locked = false;
        if (auto ec = byte_locked_by_other(fd_, base + i, &locked)) return ec;
        if (locked) {
          if (conflict) *conflict = LockConflict{1u << i, taken_by_other};
          return would_block();
        }
      }
    }
    return {};
  }

  int fd_;  // guarded by mutex_ (with_fd may move it to a dup)
  std::mutex mutex_;
  LockBytes held_;
};

// A hold of a lock that clients may wait for, in the normal CPU class
// while it lasts: a block job's thread may run in the background class,
// where it might not get a CPU to let go (qcow2/rwlock.h's
// exclusive_hold_hook).
struct SyncHold {
  explicit SyncHold(std::mutex& m) : lock(m, std::defer_lock) {
    if (qcow2::exclusive_hold_hook) qcow2::exclusive_hold_hook->before_exclusive();
    lock.lock();
  }
  ~SyncHold() {
    lock.unlock();
    if (qcow2::exclusive_hold_hook) qcow2::exclusive_hold_hook->after_exclusive();
  }
  SyncHold(const SyncHold&) = delete;
  SyncHold& operator=(const SyncHold&) = delete;
  std::unique_lock<std::mutex> lock;
};

class PosixFile final : public File {
 public:
  PosixFile(int fd, bool writable, bool block_device, bool direct, uint64_t size)
      : fd_(fd),
        writable_(writable),
        block_device_(block_device),
        direct_(direct),
        size_(size),
        nowait_supported_(!direct),
        locks_(fd) {}
  ~PosixFile() override {
    ::close(fd_);
    if (lock_fd_ >= 0) ::close(lock_fd_);
    if (int d = direct_fd_.load(); d >= 0) ::close(d);
  }

  std::error_code pread(std::span<std::byte> buf, uint64_t offset) override {
    size_t done = 0;
    if (int d = bulk_fd(buf.data(), buf.size(), offset); d >= 0) {
      std::error_code ec;
      done = direct_transfer(buf.size(), ec, [&] {
        return ::pread(d, buf.data(), buf.size(), static_cast<off_t>(offset));
      });
      if (ec) return ec;
    }
    while (done < buf.size()) {
      ssize_t n = ::pread(fd_, buf.data() + done, buf.size() - done,
                          static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno_code();
      }
      if (n == 0) {  // end of file: the rest reads as zeros
        std::memset(buf.data() + done, 0, buf.size() - done);
        break;
      }
      done += static_cast<size_t>(n);
    }
    return {};
  }

  std::error_code pread_nowait(std::span<std::byte> buf,
                               uint64_t offset) override {
    if (!nowait_supported_.load(std::memory_order_relaxed)) return would_block();
    iovec iov{buf.data(), buf.size()};
    ssize_t n = ::preadv2(fd_, &iov, 1, static_cast<off_t>(offset), RWF_NOWAIT);
    if (n == static_cast<ssize_t>(buf.size())) return {};
    if (n < 0 && errno == EOPNOTSUPP) nowait_supported_.store(false);
    // Partly cached, at end of file, or would block: the blocking path
    // handles every one of these.
    return would_block();
  }

  std::error_code pwrite(std::span<const std::byte> data,
                         uint64_t offset) override {
    size_t done = 0;
    if (int d = bulk_fd(data.data(), data.size(), offset); d >= 0) {
      std::error_code ec;
      done = direct_transfer(data.size(), ec, [&] {
        return ::pwrite(d, data.data(), data.size(), static_cast<off_t>(offset));
      });
      if (ec) return ec;
    }
    const size_t done_direct = done;
    while (done < data.size()) {
      ssize_t n = ::pwrite(fd_, data.data() + done, data.size() - done,
                           static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        const std::error_code ec = errno_code();
        cached(offset + done_direct, offset + done);
        return ec;
      }
      // Nothing written and no error: the file cannot take more (as
      // QEMU's file driver reads a short write). Retrying would spin.
      if (n == 0) {
        cached(offset + done_direct, offset + done);
        return std::make_error_code(std::errc::no_space_on_device);
      }
      done += static_cast<size_t>(n);
    }
    cached(offset + done_direct, offset + done);
    grow_to(offset + data.size());
    return {};
  }

  std::error_code flush() override {
    std::error_code ec;
    {
      flushes_waiting_.fetch_add(1);
      SyncHold held(sync_mu_);
      flushes_waiting_.fetch_sub(1);
      if (write_back_error_ != 0) return {write_back_error_, std::generic_category()};
      int r;
      while ((r = ::fdatasync(fd_)) != 0 && errno == EINTR) {
      }
      if (r != 0) ec = write_back_failed();
      else ++flushes_done_;
    }
    flush_done_.notify_all();
    return ec;
  }

  // The whole file: only its dirty pages are visited.
  void start_writeback() override {
    if (writable_.load(std::memory_order_relaxed) && !direct_)
      (void)::sync_file_range(fd_, 0, 0, SYNC_FILE_RANGE_WRITE);
  }

  // Over the span the page cache took writes in since the last call. A
  // flush that comes goes before the next step (it waits for one step at
  // most), and once one succeeded, it wrote back all there was.
  std::error_code write_back_in_steps() override {
    constexpr unsigned kWriteAndWait =
        SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER;
    uint64_t begin, end, flushes_before;
    {
      SyncHold held(sync_mu_);  // a client's write that grows the span waits for take()
      if (write_back_error_ != 0) return {write_back_error_, std::generic_category()};
      std::tie(begin, end) = cached_writes_.take();
      flushes_before = flushes_done_;
    }
    for (uint64_t offset = begin / kWriteBackStep * kWriteBackStep; offset < end;
         offset += kWriteBackStep) {
      SyncHold held(sync_mu_);
      flush_done_.wait(held.lock, [&] { return flushes_waiting_.load() == 0; });
      if (write_back_error_ != 0) return {write_back_error_, std::generic_category()};
      if (flushes_done_ != flushes_before) return {};
      int r;
      while ((r = ::sync_file_range(fd_, static_cast<off_t>(offset),
                                    static_cast<off_t>(kWriteBackStep), kWriteAndWait)) != 0 &&
             errno == EINTR) {
      }
      if (r != 0) return write_back_failed();
    }
    return {};
  }

  std::error_code truncate(uint64_t size) override {
    if (::ftruncate(fd_, static_cast<off_t>(size)) != 0) return errno_code();
    size_.store(size);
    return {};
  }

  // On a block device too a punched hole must read as zeros, which
  // BLKDISCARD does not promise: the kernel's fallocate punches only with
  // a zeroing unmap (else EOPNOTSUPP, and the caller writes zeros).
  std::error_code punch_hole(uint64_t offset, uint64_t length) override {
    if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    static_cast<off_t>(offset), static_cast<off_t>(length)) != 0)
      return errno_code();
    return {};
  }

  std::error_code discard(uint64_t offset, uint64_t length) override {
    if (!block_device_) return punch_hole(offset, length);
    uint64_t range[2] = {offset, length};
    if (::ioctl(fd_, BLKDISCARD, range) != 0) return errno_code();
    return {};
  }

  std::error_code write_zeroes(uint64_t offset, uint64_t length) override {
    if (block_device_) {
      uint64_t range[2] = {offset, length};
      if (::ioctl(fd_, BLKZEROOUT, range) == 0) return {};
    } else if (::fallocate(fd_, FALLOC_FL_ZERO_RANGE, static_cast<off_t>(offset),
                           static_cast<off_t>(length)) == 0) {
      grow_to(offset + length);
      return {};
    }
    // Fallback: write zeros in bounded pieces.
    static const std::vector<std::byte> zeros(1 << 20);
    while (length > 0) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(length, zeros.size()));
      if (auto ec = pwrite({zeros.data(), n}, offset)) return ec;
      offset += n;
      length -= n;
    }
    return {};
  }

  uint64_t size() const override { return size_.load(); }

  uint64_t extent_at(uint64_t offset, uint64_t length,
                     bool* is_data) const override {
    *is_data = true;
    if (block_device_) return length;
    uint64_t end = offset + length;
    off_t data = ::lseek(fd_, static_cast<off_t>(offset), SEEK_DATA);
    if (data < 0) {
      // ENXIO: no data from offset to end of file: all hole.
      if (errno == ENXIO) *is_data = false;
      return length;
    }
    if (static_cast<uint64_t>(data) > offset) {
      *is_data = false;
      return std::min<uint64_t>(static_cast<uint64_t>(data), end) - offset;
    }
    off_t hole = ::lseek(fd_, static_cast<off_t>(offset), SEEK_HOLE);
    if (hole < 0 || static_cast<uint64_t>(hole) <= offset) return length;
    return std::min<uint64_t>(static_cast<uint64_t>(hole), end) - offset;
  }

  bool writable() const override { return writable_.load(); }

  std::error_code lock(const LockSet& wanted, LockConflict* conflict) override {
    return locks_.set(wanted, conflict);
  }

  // The new open file description comes from /proc/self/fd (the same
  // inode even if the file was renamed or unlinked meanwhile) and replaces
  // the old one under the same descriptor number with dup3, which the
  // kernel does atomically: a concurrent pread uses either description,
  // both of the same file. The first description, which holds the OFD
  // locks, is kept open on lock_fd_ (a dup made at the first reopen) and
  // lock() goes on working on it.
  std::error_code reopen(OpenMode mode) override {
    std::lock_guard guard(reopen_mutex_);
    const bool want_write = mode == OpenMode::ReadWrite;
    const int access = want_write ? O_RDWR : O_RDONLY;
    std::error_code ec;
    int nfd = open_again(fd_, access | (direct_ ? O_DIRECT : 0), ec);
    if (nfd < 0) return ec;
    // Keep the locking description alive before fd_ stops referring to it.
    ec = locks_.with_fd([&](int& lock_fd) -> std::error_code {
      if (lock_fd_ >= 0) return {};
      int d = ::fcntl(fd_, F_DUPFD_CLOEXEC, 0);
      if (d < 0) return errno_code();
      lock_fd_ = d;
      lock_fd = d;
      return {};
    });
    if (ec) {
      ::close(nfd);
      return ec;
    }
    int r;
    while ((r = ::dup3(nfd, fd_, O_CLOEXEC)) < 0 && errno == EINTR) {
    }
    if (r < 0) {
      ec = errno_code();
      ::close(nfd);
      return ec;
    }
    ::close(nfd);
    writable_.store(want_write);
    move_direct_fd(access);
    return {};
  }

 private:
  // The direct descriptor for a transfer of `length` bytes at `offset`
  // from or to `buffer`, or -1 for the page cache (see BulkIoScope).
  int bulk_fd(const void* buffer, size_t length, uint64_t offset) {
    if (direct_ || length == 0 || bulk_io_scopes == 0) return -1;
    if (direct_failed_.load(std::memory_order_relaxed)) return -1;
    int d = direct_fd_.load(std::memory_order_acquire);
    if (d < 0 && (d = open_direct_fd()) < 0) return -1;
    const uint64_t misaligned = reinterpret_cast<uintptr_t>(buffer) | length | offset;
    return misaligned % direct_align_ == 0 ? d : -1;
  }

  // The first bulk transfer opens the direct descriptor, in the current
  // mode; a file without direct I/O never tries again.
  int open_direct_fd() {
    std::lock_guard guard(reopen_mutex_);
    int d = direct_fd_.load(std::memory_order_relaxed);
    if (d >= 0 || direct_failed_.load(std::memory_order_relaxed)) return d;
    std::error_code ec;
    d = open_again(fd_, (writable_.load() ? O_RDWR : O_RDONLY) | O_DIRECT, ec);
    const uint32_t align = d < 0 ? 0 : direct_io_alignment(d);
    if (align == 0) {
      if (d >= 0) ::close(d);
      direct_failed_.store(true);
      return -1;
    }
    direct_align_ = align;
    direct_fd_.store(d, std::memory_order_release);
    return d;
  }

  // reopen(), with reopen_mutex_ held: the direct descriptor follows the
  // I/O descriptor into `access`, under the same number (dup3, as there),
  // so a transfer in flight uses the old description or the new one. If
  // no direct description can be had in the new mode, the number gets the
  // I/O description instead (still this file, in the new mode) and bulk
  // transfers use the page cache from now on.
  void move_direct_fd(int access) {
    const int d = direct_fd_.load(std::memory_order_relaxed);
    if (d < 0) return;
    std::error_code ec;
    int nfd = open_again(fd_, access | O_DIRECT, ec);
    if (nfd < 0) {
      direct_failed_.store(true);
      nfd = ::fcntl(fd_, F_DUPFD_CLOEXEC, 0);
      if (nfd < 0) return;  // keeps the old description: writes fail, EBADF
    }
    while (::dup3(nfd, d, O_CLOEXEC) < 0 && errno == EINTR) {
    }
    ::close(nfd);
  }

  // One direct transfer (`io` returns what pread/pwrite return). Returns
  // the bytes it moved, all or the first part; the caller's page-cache
  // loop does the rest after a short transfer, and all of it where the
  // direct path cannot take the transfer (EINVAL: the file system refuses
  // it, which stops bulk direct I/O on this file; EBADF: the descriptor
  // changed mode in a reopen). Any other error is the transfer's: `ec`.
  template <typename Io>
  size_t direct_transfer(size_t length, std::error_code& ec, Io&& io) {
    ssize_t n;
    while ((n = io()) < 0 && errno == EINTR) {
    }
    if (n >= 0) return std::min(static_cast<size_t>(n), length);
    if (errno == EINVAL) direct_failed_.store(true);
    else if (errno != EBADF) ec = errno_code();
    return 0;
  }

  // An fdatasync or a waited-for sync_file_range failed (errno holds
  // why; sync_mu_ is held): cached writes may be lost, and the kernel
  // reports that to one sync of the descriptor only. Every later flush
  // fails with the same error. Not with O_DIRECT: no write waits in the
  // page cache.
  std::error_code write_back_failed() {
    const int e = errno;
    if (!direct_) write_back_error_ = e;
    return {e, std::generic_category()};
  }

  // [begin, end) of a pwrite went through the page cache.
  void cached(uint64_t begin, uint64_t end) {
    if (!direct_ && begin < end) cached_writes_.add(begin, end);
  }

  void grow_to(uint64_t end) {
    uint64_t cur = size_.load();
    while (end > cur && !size_.compare_exchange_weak(cur, end)) {
    }
  }

  int fd_;  // the I/O descriptor: its number never changes
  int lock_fd_ = -1;  // the first description, once reopen() moved fd_
  std::mutex reopen_mutex_;  // reopen() and opening the direct descriptor
  // The direct-I/O description of bulk transfers: -1 until the first one;
  // once set, the number stays the same until the destructor.
  std::atomic<int> direct_fd_{-1};
  std::atomic<bool> direct_failed_{false};
  uint32_t direct_align_ = 0;  // written before direct_fd_ is published
  std::atomic<bool> writable_;
  bool block_device_;
  bool direct_;
  std::atomic<uint64_t> size_;
  WrittenSpan cached_writes_;  // buffered pwrites, for write_back_in_steps
  // Held by each sync of fd_ (a flush, a step of write_back_in_steps)
  // from its check of write_back_error_ to its record of a failure, so
  // that no sync succeeds past another's error. A leaf lock, held in the
  // normal CPU class (SyncHold).
  std::mutex sync_mu_;
  int write_back_error_ = 0;  // errno of the first failed sync; sync_mu_
  uint64_t flushes_done_ = 0;  // successful fdatasyncs; sync_mu_
  std::atomic<int> flushes_waiting_{0};  // flush() calls waiting for sync_mu_
  std::condition_variable flush_done_;  // with sync_mu_: a flush ended

  // O_DIRECT reads always go to the disk; RWF_NOWAIT cannot help them.
  std::atomic<bool> nowait_supported_;
  OfdLocks locks_;
};

class MemoryFile final : public File {
 public:
  explicit MemoryFile(uint64_t size) : data_(size) {}

  std::error_code pread(std::span<std::byte> buf, uint64_t offset) override {
    std::shared_lock lock(mutex_);
    std::fill(buf.begin(), buf.end(), std::byte{0});
    if (offset < data_.size() && !buf.empty()) {
      size_t n = static_cast<size_t>(
          std::min<uint64_t>(buf.size(), data_.size() - offset));
      std::memcpy(buf.data(), data_.data() + offset, n);
    }
    return {};
  }

  std::error_code pread_nowait(std::span<std::byte> buf,
                               uint64_t offset) override {
    return pread(buf, offset);  // memory never blocks
  }

  std::error_code pwrite(std::span<const std::byte> data,
                         uint64_t offset) override {
    if (!writable_) return read_only();
    std::unique_lock lock(mutex_);
    if (offset + data.size() > data_.size()) data_.resize(offset + data.size());
    if (!data.empty()) std::memcpy(data_.data() + offset, data.data(), data.size());
    return {};
  }

  std::error_code flush() override { return {}; }

  std::error_code truncate(uint64_t size) override {
    if (!writable_) return read_only();
    std::unique_lock lock(mutex_);
    data_.resize(size);
    return {};
  }

  std::error_code punch_hole(uint64_t offset, uint64_t length) override {
    if (!writable_) return read_only();
    return zero_range(offset, length);
  }
  std::error_code write_zeroes(uint64_t offset, uint64_t length) override {
    if (!writable_) return read_only();
    std::unique_lock lock(mutex_);
    if (offset + length > data_.size()) data_.resize(offset + length);
    std::fill_n(data_.begin() + static_cast<ptrdiff_t>(offset), length,
                std::byte{0});
    return {};
  }

  uint64_t size() const override {
    std::shared_lock lock(mutex_);
    return data_.size();
  }

  uint64_t extent_at(uint64_t, uint64_t length, bool* is_data) const override {
    *is_data = true;
    return length;
  }

  bool writable() const override { return writable_; }

  // A memory file "opened" read-only refuses writes like a read-only
  // descriptor (EBADF).
  std::error_code reopen(OpenMode mode) override {
    writable_ = mode == OpenMode::ReadWrite;
    return {};
  }

 private:
  static std::error_code read_only() {
    return std::make_error_code(std::errc::bad_file_descriptor);
  }
  std::atomic<bool> writable_{true};
  std::error_code zero_range(uint64_t offset, uint64_t length) {
    std::unique_lock lock(mutex_);
    if (offset >= data_.size()) return {};
    uint64_t n = std::min<uint64_t>(length, data_.size() - offset);
    std::fill_n(data_.begin() + static_cast<ptrdiff_t>(offset), n, std::byte{0});
    return {};
  }

  mutable std::shared_mutex mutex_;
  std::vector<std::byte> data_;
};

}  // namespace

BulkIoScope::BulkIoScope() { ++bulk_io_scopes; }
BulkIoScope::~BulkIoScope() { --bulk_io_scopes; }
bool BulkIoScope::active() { return bulk_io_scopes > 0; }

int posix_open_flags(const FileOptions& options) {
  int flags = O_CLOEXEC;
  flags |= options.mode == OpenMode::ReadWrite ? O_RDWR : O_RDONLY;
  if (options.direct) flags |= O_DIRECT;
  if (options.create && options.mode == OpenMode::ReadWrite) flags |= O_CREAT;
  return flags;
}

std::unique_ptr<File> adopt_posix_fd(int fd, const FileOptions& options,
                                     std::error_code& ec) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ec = errno_code();
    ::close(fd);
    return nullptr;
  }
  uint64_t size = 0;
  bool block_device = S_ISBLK(st.st_mode);
  if (S_ISDIR(st.st_mode)) {
    ec = std::make_error_code(std::errc::is_a_directory);
    ::close(fd);
    return nullptr;
  }
  if (block_device) {
    if (::ioctl(fd, BLKGETSIZE64, &size) != 0) {
      ec = errno_code();
      ::close(fd);
      return nullptr;
    }
  } else if (S_ISREG(st.st_mode)) {
    size = static_cast<uint64_t>(st.st_size);
  } else {
    ec = std::make_error_code(std::errc::invalid_argument);
    ::close(fd);
    return nullptr;
  }
  ec.clear();
  return std::make_unique<PosixFile>(fd, options.mode == OpenMode::ReadWrite,
                                     block_device, options.direct, size);
}

std::unique_ptr<File> open_posix_file(const std::string& path,
                                      const FileOptions& options,
                                      std::error_code& ec) {
  int fd = ::open(path.c_str(), posix_open_flags(options), 0644);
  if (fd < 0) {
    ec = errno_code();
    return nullptr;
  }
  return adopt_posix_fd(fd, options, ec);
}

int open_beneath(int dir_fd, const std::string& relative, int flags,
                 std::error_code& ec) {
  open_how how{};
  how.flags = static_cast<uint64_t>(flags | O_CLOEXEC);
  how.mode = (flags & O_CREAT) ? 0644 : 0;
  how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
  // EAGAIN: a rename raced with a ".." lookup; the kernel asks for a retry
  // (a bounded number: a rename loop must not keep layerd here).
  long fd;
  int retries = 64;
  do {
    fd = ::syscall(SYS_openat2, dir_fd, relative.c_str(), &how, sizeof how);
  } while (fd < 0 && (errno == EINTR || (errno == EAGAIN && --retries > 0)));
  if (fd < 0) {
    ec = errno_code();
    return -1;
  }
  ec.clear();
  return static_cast<int>(fd);
}

std::error_code File::pread_nowait(std::span<std::byte>, uint64_t) {
  return would_block();
}

void File::start_writeback() {}

std::error_code File::write_back_in_steps() { return {}; }

std::error_code File::discard(uint64_t offset, uint64_t length) {
  return punch_hole(offset, length);
}

std::unique_ptr<File> open_temp_file(const std::string& dir, int* fd_out,
                                     std::error_code& ec) {
  int fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0 && (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL)) {
    std::string name = dir + "/layerd-overlay-XXXXXX";
    fd = ::mkostemp(name.data(), O_CLOEXEC);
    if (fd >= 0) ::unlink(name.c_str());
  }
  if (fd < 0) {
    ec = errno_code();
    return nullptr;
  }
  ec.clear();
  *fd_out = fd;
  return std::make_unique<PosixFile>(fd, true, false, false, 0);
}

std::error_code link_temp_file(int fd, const std::string& path) {
  std::string proc = "/proc/self/fd/" + std::to_string(fd);
  if (::linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, path.c_str(),
               AT_SYMLINK_FOLLOW) != 0)
    return errno_code();
  return {};
}

std::error_code File::lock(const LockSet&, LockConflict*) { return {}; }

std::error_code File::reopen(OpenMode) {
  return std::make_error_code(std::errc::operation_not_supported);
}

std::string permission_name(uint32_t permission) {
  switch (permission) {
    case perm::kConsistentRead: return "consistent read";
    case perm::kWrite: return "write";
    case perm::kWriteUnchanged: return "write unchanged";
    case perm::kResize: return "resize";
  }
  return "unknown";
}

std::string LockConflict::describe() const {
  const std::string name = permission_name(permission);
  return taken_by_other
             ? "another process holds the \"" + name + "\" lock"
             : "another process has it open and does not share the \"" +
                   name + "\" lock";
}

std::string LockConflict::qemu_message() const {
  return std::string(taken_by_other ? "Failed to get shared \"" : "Failed to get \"") +
         permission_name(permission) + "\" lock";
}

bool all_zero(std::span<const std::byte> data) {
  const std::byte* p = data.data();
  size_t n = data.size();
  for (; n >= 8; p += 8, n -= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    if (w) return false;
  }
  for (; n; ++p, --n)
    if (*p != std::byte{0}) return false;
  return true;
}

std::unique_ptr<File> make_memory_file(uint64_t initial_size) {
  return std::make_unique<MemoryFile>(initial_size);
}

}  // namespace layerd
