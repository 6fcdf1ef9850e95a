#include "server/export.h"

#include "nbd/protocol.h"

namespace layerd {

nbd::ExportInfo Export::info() const {
  nbd::ExportInfo i;
  i.name = name;
  i.description = description;
  i.size = layer->size();
  uint16_t f = nbd::kTransHasFlags | nbd::kTransSendFlush |
               nbd::kTransSendFua | nbd::kTransSendCache | nbd::kTransSendDf;
  bool writable = !policy.read_only && layer->capabilities().writable;
  if (writable) {
    f |= nbd::kTransSendTrim | nbd::kTransSendWriteZeroes |
         nbd::kTransSendFastZero;
  } else {
    f |= nbd::kTransReadOnly;
  }
  if (policy.multi_conn && layer->capabilities().multi_conn_safe)
    f |= nbd::kTransCanMultiConn;
  i.transmission_flags = f;
  i.min_block_size = 1;
  i.preferred_block_size = 4096;
  i.max_block_size = policy.max_request_size;
  return i;
}

void ExportRegistry::add(std::shared_ptr<const Export> e) {
  std::lock_guard lock(mutex_);
  exports_[e->name] = std::move(e);
}

std::shared_ptr<const Export> ExportRegistry::find(std::string_view name) const {
  std::lock_guard lock(mutex_);
  auto it = exports_.find(name);
  return it == exports_.end() ? nullptr : it->second;
}

std::vector<std::shared_ptr<const Export>> ExportRegistry::all() const {
  std::lock_guard lock(mutex_);
  std::vector<std::shared_ptr<const Export>> v;
  for (auto& [_, e] : exports_) v.push_back(e);
  return v;
}

}  // namespace layerd
