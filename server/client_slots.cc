#include "server/client_slots.h"

#include <algorithm>

namespace layerd {

ClientSlots::ClientSlots(uint32_t max_served, uint32_t max_negotiating)
    : max_served_(max_served), max_negotiating_(std::max(1u, max_negotiating)) {}

uint64_t ClientSlots::start_negotiating(Callback drop) {
  Callback dropped;
  uint64_t id;
  {
    std::lock_guard lock(mutex_);
    id = next_id_++;
    if (negotiating_.size() >= max_negotiating_) {
      auto victim = std::find_if(negotiating_.begin(), negotiating_.end(),
                                 [](const auto& e) { return !e.second.granted; });
      if (victim == negotiating_.end()) victim = negotiating_.begin();
      dropped = std::move(victim->second.drop);
      negotiating_.erase(victim);
    }
    negotiating_.emplace(id, Negotiating{std::move(drop), {}});
  }
  if (dropped) dropped();
  return id;
}

bool ClientSlots::request_slot(uint64_t id, Callback granted) {
  std::lock_guard lock(mutex_);
  auto it = negotiating_.find(id);
  if (it == negotiating_.end()) return false;  // dropped meanwhile
  const bool waiting_before = std::any_of(
      negotiating_.begin(), negotiating_.end(),
      [](const auto& e) { return static_cast<bool>(e.second.granted); });
  if (!waiting_before && (max_served_ == 0 || served_.size() < max_served_)) {
    negotiating_.erase(it);
    served_.insert(id);
    return true;
  }
  it->second.granted = std::move(granted);
  return false;
}

ClientSlots::Callback ClientSlots::grant_next_locked() {
  if (max_served_ != 0 && served_.size() >= max_served_) return {};
  auto next = std::find_if(negotiating_.begin(), negotiating_.end(),
                           [](const auto& e) { return static_cast<bool>(e.second.granted); });
  if (next == negotiating_.end()) return {};
  Callback granted = std::move(next->second.granted);
  served_.insert(next->first);
  negotiating_.erase(next);
  return granted;
}

void ClientSlots::leave(uint64_t id) {
  Callback granted;
  {
    std::lock_guard lock(mutex_);
    if (served_.erase(id))
      granted = grant_next_locked();
    else
      negotiating_.erase(id);
  }
  if (granted) granted();
}

uint32_t ClientSlots::served() const {
  std::lock_guard lock(mutex_);
  return static_cast<uint32_t>(served_.size());
}

uint32_t ClientSlots::negotiating() const {
  std::lock_guard lock(mutex_);
  return static_cast<uint32_t>(negotiating_.size());
}

}  // namespace layerd
