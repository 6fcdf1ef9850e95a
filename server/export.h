// Exports: a named Layer with the policy it is served under, and the
// registry the handshake looks exports up in. Later issues add exports at
// run time (the control socket), so the registry is thread-safe.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "nbd/handshake.h"
#include "overlay/layer.h"
#include "server/options.h"

namespace layerd {

struct ExportPolicy {
  bool read_only = false;
  bool discard_unmap = false;      // TRIM and zero writes may deallocate
  DetectZeroes detect_zeroes = DetectZeroes::Off;
  bool flush_every_write = false;  // writethrough / directsync
  bool ignore_flush = false;       // cache=unsafe
  bool multi_conn = false;         // more than one client may connect
  uint32_t max_request_size = 32u << 20;
};

struct Export {
  std::string name;
  std::string description;
  std::shared_ptr<Layer> layer;
  ExportPolicy policy;

  // What the handshake advertises for this export.
  nbd::ExportInfo info() const;
};

class ExportRegistry {
 public:
  void add(std::shared_ptr<const Export> e);
  std::shared_ptr<const Export> find(std::string_view name) const;
  std::vector<std::shared_ptr<const Export>> all() const;

 private:
  mutable std::mutex mutex_;
  std::map<std::string, std::shared_ptr<const Export>, std::less<>> exports_;
};

}  // namespace layerd
