#include "tests/qcow2/faulty_file.h"

#include <algorithm>

namespace layerd::qcow2 {

namespace {
std::error_code eio() { return std::make_error_code(std::errc::io_error); }
std::error_code enospc() { return std::make_error_code(std::errc::no_space_on_device); }
constexpr size_t kSector = 512;
constexpr uint64_t kBlock = 4096;  // the file system's allocation unit
}  // namespace

const char* io_kind_name(IoKind k) {
  switch (k) {
    case IoKind::Read: return "read";
    case IoKind::Write: return "write";
    case IoKind::Flush: return "flush";
    case IoKind::Truncate: return "truncate";
    case IoKind::PunchHole: return "punch_hole";
    case IoKind::WriteZeroes: return "write_zeroes";
  }
  return "?";
}

const char* fault_kind_name(FaultKind k) {
  switch (k) {
    case FaultKind::Eio: return "EIO";
    case FaultKind::Enospc: return "ENOSPC";
    case FaultKind::TornWrite: return "torn write";
    case FaultKind::NotSupported: return "EOPNOTSUPP";
    case FaultKind::DiskFull: return "disk full";
  }
  return "?";
}

std::vector<FaultKind> fault_kinds_for(IoKind io) {
  switch (io) {
    case IoKind::Read:
    case IoKind::Flush:
      return {FaultKind::Eio};
    case IoKind::Write:
      return {FaultKind::Eio, FaultKind::Enospc, FaultKind::TornWrite};
    case IoKind::Truncate:
    case IoKind::WriteZeroes:
      return {FaultKind::Eio, FaultKind::Enospc};
    case IoKind::PunchHole:
      return {FaultKind::Eio, FaultKind::NotSupported};
  }
  return {};
}

void FaultPlan::arm(uint64_t index, FaultKind kind) {
  std::lock_guard lock(mu_);
  count_ = 0;
  armed_ = true;
  index_ = index;
  kind_ = kind;
  fired_ = false;
}

void FaultPlan::disarm() {
  std::lock_guard lock(mu_);
  armed_ = false;
}

uint64_t FaultPlan::count() const {
  std::lock_guard lock(mu_);
  return count_;
}

bool FaultPlan::fired() const {
  std::lock_guard lock(mu_);
  return fired_;
}

void FaultPlan::record(bool on) {
  std::lock_guard lock(mu_);
  recording_ = on;
  recorded_.clear();
}

std::vector<IoKind> FaultPlan::recorded() const {
  std::lock_guard lock(mu_);
  return recorded_;
}

std::error_code FaultPlan::next(IoKind io, bool needs_space, bool* torn) {
  std::lock_guard lock(mu_);
  const uint64_t i = count_++;
  if (recording_) recorded_.push_back(io);
  if (!armed_) return {};
  if (kind_ == FaultKind::DiskFull) {
    if (i < index_ || !needs_space) return {};
    fired_ = true;
    return enospc();
  }
  if (i != index_) return {};
  fired_ = true;
  switch (kind_) {
    case FaultKind::Eio: return eio();
    case FaultKind::Enospc: return enospc();
    case FaultKind::TornWrite:
      if (torn) *torn = true;
      return enospc();
    case FaultKind::NotSupported:
      return std::make_error_code(std::errc::operation_not_supported);
    case FaultKind::DiskFull: break;
  }
  return eio();
}

FaultyFile::FaultyFile(std::shared_ptr<File> inner, std::shared_ptr<FaultPlan> plan)
    : inner_(std::move(inner)), plan_(std::move(plan)) {
  if (!plan_) return;
  const uint64_t size = inner_->size();
  has_data_.assign((size + kBlock - 1) / kBlock, false);
  for (uint64_t off = 0; off < size;) {
    bool is_data;
    uint64_t n = inner_->extent_at(off, size - off, &is_data);
    if (n == 0) break;
    if (is_data) took_space(off, n);
    off += n;
  }
}

std::error_code FaultyFile::planned(IoKind io, bool needs_space, bool* torn) {
  return plan_ ? plan_->next(io, needs_space, torn) : std::error_code();
}

bool FaultyFile::needs_space(uint64_t offset, uint64_t length) {
  if (!plan_ || length == 0) return false;
  std::lock_guard lock(space_mu_);
  for (uint64_t b = offset / kBlock; b <= (offset + length - 1) / kBlock; ++b)
    if (b >= has_data_.size() || !has_data_[b]) return true;
  return false;
}

void FaultyFile::took_space(uint64_t offset, uint64_t length) {
  if (!plan_ || length == 0) return;
  std::lock_guard lock(space_mu_);
  const uint64_t last = (offset + length - 1) / kBlock;
  if (last >= has_data_.size()) has_data_.resize(last + 1, false);
  for (uint64_t b = offset / kBlock; b <= last; ++b) has_data_[b] = true;
}

void FaultyFile::freed_space(uint64_t offset, uint64_t length) {
  if (!plan_) return;
  std::lock_guard lock(space_mu_);
  const uint64_t end = std::min<uint64_t>((offset + length) / kBlock, has_data_.size());
  for (uint64_t b = (offset + kBlock - 1) / kBlock; b < end; ++b) has_data_[b] = false;
}

void FaultyFile::resized(uint64_t size) {
  if (!plan_) return;
  std::lock_guard lock(space_mu_);
  has_data_.resize((size + kBlock - 1) / kBlock, false);
}

bool FaultyFile::tick(std::atomic<int>& left) {
  int v = left.load();
  while (v >= 0) {
    if (left.compare_exchange_weak(v, v - 1)) return v == 0;
  }
  return false;
}

std::error_code FaultyFile::pread(std::span<std::byte> buf, uint64_t offset) {
  ++preads_;
  if (auto ec = planned(IoKind::Read, false)) return ec;
  if (tick(preads_left_)) return eio();
  return inner_->pread(buf, offset);
}

std::error_code FaultyFile::pwrite(std::span<const std::byte> data,
                                   uint64_t offset) {
  ++pwrites_;
  bool torn = false;
  if (auto ec = planned(IoKind::Write, needs_space(offset, data.size()), &torn)) {
    // Disks write whole sectors: the tear is at a sector boundary.
    if (torn) {
      auto part = data.first(data.size() / 2 / kSector * kSector);
      if (!inner_->pwrite(part, offset)) took_space(offset, part.size());
    }
    return ec;
  }
  if (crashed_) return eio();
  if (tick(pwrites_left_)) {
    if (sticky_) crashed_ = true;
    return eio();
  }
  auto ec = inner_->pwrite(data, offset);
  if (!ec) took_space(offset, data.size());
  return ec;
}

std::error_code FaultyFile::flush() {
  ++flushes_;
  if (auto ec = planned(IoKind::Flush, false)) return ec;
  if (fail_flush_ || crashed_) return eio();
  return inner_->flush();
}

std::error_code FaultyFile::write_back_in_steps() {
  if (fail_flush_ || crashed_) return eio();
  return inner_->write_back_in_steps();
}

std::error_code FaultyFile::truncate(uint64_t size) {
  if (auto ec = planned(IoKind::Truncate, size > inner_->size())) return ec;
  if (crashed_) return eio();
  auto ec = inner_->truncate(size);
  if (!ec) resized(size);
  return ec;
}

std::error_code FaultyFile::punch_hole(uint64_t offset, uint64_t length) {
  if (auto ec = planned(IoKind::PunchHole, false)) return ec;
  if (crashed_) return eio();
  auto ec = inner_->punch_hole(offset, length);
  if (!ec) freed_space(offset, length);
  return ec;
}

std::error_code FaultyFile::write_zeroes(uint64_t offset, uint64_t length) {
  // As FALLOC_FL_ZERO_RANGE or its fallback, writing zeros: it allocates.
  if (auto ec = planned(IoKind::WriteZeroes, needs_space(offset, length))) return ec;
  if (crashed_) return eio();
  auto ec = inner_->write_zeroes(offset, length);
  if (!ec) took_space(offset, length);
  return ec;
}

}  // namespace layerd::qcow2
