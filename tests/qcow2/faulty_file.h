// A File that forwards to another File and fails chosen operations, for
// tests of error paths (EIO mid-write, failed flush, ...).
#pragma once

#include <atomic>
#include <memory>

#include "qcow2/file.h"

namespace layerd::qcow2 {

class FaultyFile : public File {
 public:
  explicit FaultyFile(std::shared_ptr<File> inner) : inner_(std::move(inner)) {}

  // The n-th (0-based) pwrite from now on fails with EIO; -1 disables.
  // With `sticky`, every later pwrite, flush, truncate, punch_hole and
  // write_zeroes fails too: the file stays as it was at that moment, as if
  // the machine had crashed (with writes reaching the disk in order).
  void fail_pwrite_after(int n, bool sticky = false) {
    sticky_ = sticky;
    crashed_ = false;
    pwrites_left_ = n;
  }
  bool crashed() const { return crashed_; }
  void fail_pread_after(int n) { preads_left_ = n; }
  void fail_flush(bool on) { fail_flush_ = on; }
  int pwrites() const { return pwrites_; }
  int preads() const { return preads_; }
  int flushes() const { return flushes_; }

  std::error_code pread(std::span<std::byte> buf, uint64_t offset) override;
  std::error_code pwrite(std::span<const std::byte> data,
                         uint64_t offset) override;
  std::error_code flush() override;
  std::error_code truncate(uint64_t size) override;
  std::error_code punch_hole(uint64_t offset, uint64_t length) override;
  std::error_code write_zeroes(uint64_t offset, uint64_t length) override;
  uint64_t size() const override { return inner_->size(); }
  uint64_t extent_at(uint64_t offset, uint64_t length,
                     bool* is_data) const override {
    return inner_->extent_at(offset, length, is_data);
  }
  bool writable() const override { return inner_->writable(); }
  std::error_code lock(const LockSet& wanted, LockConflict* conflict) override {
    return inner_->lock(wanted, conflict);
  }
  std::error_code reopen(OpenMode mode) override { return inner_->reopen(mode); }

 private:
  static bool tick(std::atomic<int>& left);
  std::shared_ptr<File> inner_;
  std::atomic<int> pwrites_left_{-1}, preads_left_{-1};
  std::atomic<bool> fail_flush_{false};
  std::atomic<bool> sticky_{false}, crashed_{false};
  std::atomic<int> pwrites_{0}, flushes_{0}, preads_{0};
};

}  // namespace layerd::qcow2
