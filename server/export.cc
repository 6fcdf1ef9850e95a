#include "server/export.h"

#include <algorithm>

#include "nbd/protocol.h"
#include "overlay/chain.h"
#include "overlay/offset_layer.h"

namespace layerd {

Session::~Session() { layer.reset(); }

nbd::ExportInfo Export::info(const std::string& session) const {
  nbd::ExportInfo i;
  i.name = session.empty() ? name : name + "@" + session;
  i.description = description;
  i.size = layer->size();
  uint16_t f = nbd::kTransHasFlags | nbd::kTransSendFlush |
               nbd::kTransSendFua | nbd::kTransSendCache | nbd::kTransSendDf;
  bool writable = per_client ? !policy.read_only
                             : !policy.read_only && layer->capabilities().writable;
  if (writable) {
    f |= nbd::kTransSendTrim | nbd::kTransSendWriteZeroes |
         nbd::kTransSendFastZero;
  } else {
    f |= nbd::kTransReadOnly;
  }
  // Connections see each other's writes only where they share a layer: a
  // client with an overlay of its own shares it with nobody.
  bool shared = !per_client || !session.empty();
  if (policy.multi_conn && shared && layer->capabilities().multi_conn_safe)
    f |= nbd::kTransCanMultiConn;
  i.transmission_flags = f;
  i.min_block_size = policy.min_block_size;
  i.preferred_block_size = std::max<uint32_t>(4096, policy.min_block_size);
  i.max_block_size = policy.max_request_size;
  return i;
}

std::shared_ptr<Session> Export::open_session(const std::string& id,
                                              std::string* error) const {
  std::unique_lock lock(per_client->mutex, std::defer_lock);
  if (!id.empty()) {
    lock.lock();
    if (auto s = per_client->sessions[id].lock()) return s;
  }
  auto s = std::make_shared<Session>();
  s->overlay = TempOverlay::create(per_client->base, per_client->overlay, error);
  if (!s->overlay) return nullptr;
  std::vector<std::shared_ptr<BlockNode>> nodes{s->overlay->node()};
  nodes.insert(nodes.end(), per_client->base.begin(), per_client->base.end());
  s->layer = serve_nodes(std::move(nodes), !policy.read_only,
                         per_client->copy_on_read, 0);
  const auto& w = per_client->window;
  if (w.offset != 0 || w.length)  // fits: the base's window does
    s->layer = make_offset_layer(std::move(s->layer), w.offset, w.length);
  if (!id.empty()) {
    // Forget sessions that ended, so the table does not grow forever.
    std::erase_if(per_client->sessions,
                  [](const auto& kv) { return kv.second.expired(); });
    per_client->sessions[id] = s;
  }
  return s;
}

void ExportRegistry::add(std::shared_ptr<const Export> e) {
  std::lock_guard lock(mutex_);
  exports_[e->name] = std::move(e);
}

void ExportRegistry::replace(const std::vector<std::string>& names,
                             const std::vector<std::shared_ptr<const Export>>& exports) {
  std::lock_guard lock(mutex_);
  for (const auto& name : names)
    if (auto it = exports_.find(name); it != exports_.end()) exports_.erase(it);
  for (const auto& e : exports) exports_[e->name] = e;
}

std::shared_ptr<const Export> ExportRegistry::find(std::string_view name) const {
  std::lock_guard lock(mutex_);
  auto it = exports_.find(name);
  return it == exports_.end() ? nullptr : it->second;
}

std::shared_ptr<const Export> ExportRegistry::resolve(std::string_view name,
                                                      std::string* session) const {
  session->clear();
  if (auto e = find(name)) return e;
  size_t at = name.rfind('@');
  if (at == std::string_view::npos || at + 1 == name.size()) return nullptr;
  auto e = find(name.substr(0, at));
  if (!e || !e->per_client) return nullptr;
  *session = std::string(name.substr(at + 1));
  return e;
}

std::vector<std::shared_ptr<const Export>> ExportRegistry::all() const {
  std::lock_guard lock(mutex_);
  std::vector<std::shared_ptr<const Export>> v;
  for (auto& [_, e] : exports_) v.push_back(e);
  return v;
}

}  // namespace layerd
