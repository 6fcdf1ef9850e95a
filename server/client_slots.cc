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
      forget_locked(victim);
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
  // Nobody waits while a slot is free (leave() hands it on at once).
  if (waiting_.empty() && (max_served_ == 0 || served_.size() < max_served_)) {
    negotiating_.erase(it);
    served_.insert(id);
    return true;
  }
  it->second.granted = std::move(granted);
  waiting_.push_back(id);
  return false;
}

void ClientSlots::forget_locked(std::map<uint64_t, Negotiating>::iterator it) {
  if (it->second.granted)
    waiting_.erase(std::find(waiting_.begin(), waiting_.end(), it->first));
  negotiating_.erase(it);
}

void ClientSlots::leave(uint64_t id) {
  Callback granted;
  {
    std::lock_guard lock(mutex_);
    if (auto it = negotiating_.find(id); it != negotiating_.end()) {
      forget_locked(it);
    } else if (served_.erase(id) && !waiting_.empty()) {
      const uint64_t next = waiting_.front();
      waiting_.pop_front();
      auto n = negotiating_.find(next);
      granted = std::move(n->second.granted);
      negotiating_.erase(n);
      served_.insert(next);
    }
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
