#include "tests/qcow2/faulty_file.h"

namespace layerd::qcow2 {

namespace {
std::error_code eio() { return std::make_error_code(std::errc::io_error); }
}  // namespace

bool FaultyFile::tick(std::atomic<int>& left) {
  int v = left.load();
  while (v >= 0) {
    if (left.compare_exchange_weak(v, v - 1)) return v == 0;
  }
  return false;
}

std::error_code FaultyFile::pread(std::span<std::byte> buf, uint64_t offset) {
  ++preads_;
  if (tick(preads_left_)) return eio();
  return inner_->pread(buf, offset);
}

std::error_code FaultyFile::pwrite(std::span<const std::byte> data,
                                   uint64_t offset) {
  ++pwrites_;
  if (crashed_) return eio();
  if (tick(pwrites_left_)) {
    if (sticky_) crashed_ = true;
    return eio();
  }
  return inner_->pwrite(data, offset);
}

std::error_code FaultyFile::flush() {
  ++flushes_;
  if (fail_flush_ || crashed_) return eio();
  return inner_->flush();
}

std::error_code FaultyFile::truncate(uint64_t size) {
  if (crashed_) return eio();
  return inner_->truncate(size);
}

std::error_code FaultyFile::punch_hole(uint64_t offset, uint64_t length) {
  if (crashed_) return eio();
  return inner_->punch_hole(offset, length);
}

std::error_code FaultyFile::write_zeroes(uint64_t offset, uint64_t length) {
  if (crashed_) return eio();
  return inner_->write_zeroes(offset, length);
}

}  // namespace layerd::qcow2
