// Small helpers shared by the qcow2 end-to-end tests (the qemu matrix, the
// crash-safety test and the overlay chain test): a seeded PRNG whose
// sequence is the same on every platform, and thin wrappers around qemu-img
// and qemu-io, which are the oracle for what a qcow2 file contains.
//
// Header-only on top of tests/server/harness.h.
#pragma once

#include <cstdint>
#include <fstream>
#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

#include "tests/server/harness.h"

namespace layerd::test::qcow2e2e {

// splitmix64: tiny, fast and fully specified, so a seed printed in a failure
// message reproduces the same run anywhere (std:: distributions do not).
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed) {}
  uint64_t next() {
    uint64_t z = (s_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n); n > 0.
  uint64_t below(uint64_t n) { return next() % n; }
  // Uniform in [lo, hi].
  uint64_t between(uint64_t lo, uint64_t hi) { return lo + below(hi - lo + 1); }
  // True with probability num/den.
  bool chance(uint64_t num, uint64_t den) { return below(den) < num; }

 private:
  uint64_t s_;
};

// FNV-1a: a stable seed from a test name.
inline uint64_t stable_hash(std::string_view s) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (char c : s) {
    h ^= static_cast<uint8_t>(c);
    h *= 0x100000001b3ULL;
  }
  return h;
}

inline void write_whole_file(const fs::path& file, const std::vector<uint8_t>& data) {
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data.data()),
            static_cast<std::streamsize>(data.size()));
}

inline std::string unix_uri(const fs::path& socket) {
  return "nbd+unix:///?socket=" + socket.string();
}

// Runs a tool and adds a failure unless it exits with one of `ok_codes`.
// Returns the result for further checks.
inline RunResult run_expect(const std::vector<std::string>& argv,
                            std::initializer_list<int> ok_codes = {0},
                            Millis timeout = 60s) {
  RunResult r = run(argv, timeout);
  bool ok = false;
  for (int c : ok_codes) ok |= r.exit_code == c;
  if (!ok) {
    std::string cmd;
    for (const auto& a : argv) {
      if (cmd.size() > 2000) {
        cmd += " ...";
        break;
      }
      cmd += (cmd.empty() ? "" : " ") + a;
    }
    ADD_FAILURE() << "command failed: " << cmd << "\n" << r.describe();
  }
  return r;
}

// qemu-io on `file` with a batch of commands ("write -P 5 0 4k", ...).
inline RunResult qemu_io(const fs::path& file, const std::string& format,
                         const std::vector<std::string>& commands) {
  std::vector<std::string> argv{"qemu-io", "-f", format, "-d", "unmap"};
  for (const auto& c : commands) {
    argv.push_back("-c");
    argv.push_back(c);
  }
  argv.push_back(file.string());
  return run_expect(argv);
}

// `qemu-img check` exit codes.
enum CheckExit { kCheckClean = 0, kCheckError = 1, kCheckCorrupt = 2, kCheckLeaks = 3 };

}  // namespace layerd::test::qcow2e2e
