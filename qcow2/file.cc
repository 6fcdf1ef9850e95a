// POSIX and in-memory implementations of the File seam.
#include "qcow2/file.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <shared_mutex>
#include <vector>

namespace layerd {
namespace {

std::error_code errno_code() { return {errno, std::generic_category()}; }

std::error_code would_block() {
  return std::make_error_code(std::errc::resource_unavailable_try_again);
}

class PosixFile final : public File {
 public:
  PosixFile(int fd, bool writable, bool block_device, bool direct, uint64_t size)
      : fd_(fd),
        writable_(writable),
        block_device_(block_device),
        size_(size),
        nowait_supported_(!direct) {}
  ~PosixFile() override { ::close(fd_); }

  std::error_code pread(std::span<std::byte> buf, uint64_t offset) override {
    size_t done = 0;
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
    while (done < data.size()) {
      ssize_t n = ::pwrite(fd_, data.data() + done, data.size() - done,
                           static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno_code();
      }
      done += static_cast<size_t>(n);
    }
    grow_to(offset + data.size());
    return {};
  }

  std::error_code flush() override {
    if (::fdatasync(fd_) != 0) return errno_code();
    return {};
  }

  std::error_code truncate(uint64_t size) override {
    if (::ftruncate(fd_, static_cast<off_t>(size)) != 0) return errno_code();
    size_.store(size);
    return {};
  }

  std::error_code punch_hole(uint64_t offset, uint64_t length) override {
    if (block_device_) {
      uint64_t range[2] = {offset, length};
      if (::ioctl(fd_, BLKDISCARD, range) != 0) return errno_code();
      return {};
    }
    if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    static_cast<off_t>(offset), static_cast<off_t>(length)) != 0)
      return errno_code();
    return {};
  }

  std::error_code write_zeroes(uint64_t offset, uint64_t length) override {
    if (!block_device_ &&
        ::fallocate(fd_, FALLOC_FL_ZERO_RANGE, static_cast<off_t>(offset),
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

  bool writable() const override { return writable_; }

 private:
  void grow_to(uint64_t end) {
    uint64_t cur = size_.load();
    while (end > cur && !size_.compare_exchange_weak(cur, end)) {
    }
  }

  int fd_;
  bool writable_;
  bool block_device_;
  std::atomic<uint64_t> size_;
  // O_DIRECT reads always go to the disk; RWF_NOWAIT cannot help them.
  std::atomic<bool> nowait_supported_;
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
    std::unique_lock lock(mutex_);
    if (offset + data.size() > data_.size()) data_.resize(offset + data.size());
    if (!data.empty()) std::memcpy(data_.data() + offset, data.data(), data.size());
    return {};
  }

  std::error_code flush() override { return {}; }

  std::error_code truncate(uint64_t size) override {
    std::unique_lock lock(mutex_);
    data_.resize(size);
    return {};
  }

  std::error_code punch_hole(uint64_t offset, uint64_t length) override {
    return zero_range(offset, length);
  }
  std::error_code write_zeroes(uint64_t offset, uint64_t length) override {
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

  bool writable() const override { return true; }

 private:
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

std::unique_ptr<File> open_posix_file(const std::string& path,
                                      const FileOptions& options,
                                      std::error_code& ec) {
  int flags = O_CLOEXEC;
  flags |= options.mode == OpenMode::ReadWrite ? O_RDWR : O_RDONLY;
  if (options.direct) flags |= O_DIRECT;
  if (options.create && options.mode == OpenMode::ReadWrite) flags |= O_CREAT;
  int fd = ::open(path.c_str(), flags, 0644);
  if (fd < 0) {
    ec = errno_code();
    return nullptr;
  }
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

std::error_code File::pread_nowait(std::span<std::byte>, uint64_t) {
  return would_block();
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

std::unique_ptr<File> make_memory_file(uint64_t initial_size) {
  return std::make_unique<MemoryFile>(initial_size);
}

}  // namespace layerd
