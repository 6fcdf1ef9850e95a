#include "overlay/cpu_contention.h"

#include <cstdio>

namespace layerd {

bool CpuContention::read_this_thread(Sample* s) {
  std::FILE* f = std::fopen("/proc/thread-self/schedstat", "re");
  if (!f) return false;
  unsigned long long run = 0, wait = 0;
  const bool ok = std::fscanf(f, "%llu %llu", &run, &wait) == 2;
  std::fclose(f);
  if (ok) *s = Sample{run, wait};
  return ok;
}

CpuContention::CpuContention(Reader read) : read_(std::move(read)) {}

bool CpuContention::contended() {
  Sample now;
  if (!read_(&now)) {  // the kernel cannot tell: free (judged so if it never could)
    if (!have_start_) judged_ = true;
    return contended_ = false;
  }
  if (!have_start_) {
    start_ = now;
    have_start_ = true;
    return contended_;
  }
  const uint64_t ran = now.run_ns - start_.run_ns;
  const uint64_t waited = now.wait_ns - start_.wait_ns;
  const uint64_t wanted = ran + waited;
  if (wanted < static_cast<uint64_t>(std::chrono::nanoseconds(kWanted).count())) return contended_;
  contended_ = waited * 3 >= wanted;
  judged_ = true;
  start_ = now;
  return contended_;
}

}  // namespace layerd
