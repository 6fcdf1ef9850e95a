// A File that forwards every call to another File: the base of test files
// that hold up or watch one kind of call and pass the rest on.
#pragma once

#include <memory>
#include <utility>

#include "qcow2/file.h"

namespace layerd::qcow2::test {

class ForwardingFile : public File {
 public:
  explicit ForwardingFile(std::shared_ptr<File> inner) : inner_(std::move(inner)) {}

  std::error_code pread(std::span<std::byte> b, uint64_t o) override { return inner_->pread(b, o); }
  std::error_code pwrite(std::span<const std::byte> d, uint64_t o) override {
    return inner_->pwrite(d, o);
  }
  std::error_code flush() override { return inner_->flush(); }
  void start_writeback() override { inner_->start_writeback(); }
  std::error_code write_back_in_steps() override { return inner_->write_back_in_steps(); }
  std::error_code truncate(uint64_t s) override { return inner_->truncate(s); }
  std::error_code punch_hole(uint64_t o, uint64_t l) override { return inner_->punch_hole(o, l); }
  std::error_code write_zeroes(uint64_t o, uint64_t l) override { return inner_->write_zeroes(o, l); }
  uint64_t size() const override { return inner_->size(); }
  uint64_t extent_at(uint64_t o, uint64_t l, bool* d) const override {
    return inner_->extent_at(o, l, d);
  }
  bool writable() const override { return inner_->writable(); }

 private:
  std::shared_ptr<File> inner_;
};

}  // namespace layerd::qcow2::test
