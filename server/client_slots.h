// Admission of clients: how many are served at once (-e) and how many may
// be negotiating at once (--max-handshakes), counted apart so that clients
// stuck in the handshake never keep a good client from being served.
//
// A connection negotiates from the moment it is accepted. Negotiation
// holds no serving slot: only a finished handshake (NBD_OPT_GO or
// EXPORT_NAME accepted) asks for one, and while every slot is taken the
// client waits for its final reply, in the order the handshakes finished
// (qemu-nbd's clients wait in the listen backlog instead; from the
// client's side both are a handshake that takes longer). A waiting client
// still counts as negotiating. When a newly accepted connection makes more
// than max_negotiating, the oldest one still in its handshake is dropped,
// or, if every one has finished it, the oldest waiting for a slot: a flood
// of idle connections then costs a good client nothing but a place in a
// line that moves as fast as the flood arrives.
//
// Thread safe. The callbacks are called without the lock held, on the
// thread of the call that triggers them; they should only post work.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <unordered_set>

namespace layerd {

class ClientSlots {
 public:
  using Callback = std::function<void()>;

  // max_served 0: unlimited. max_negotiating >= 1.
  ClientSlots(uint32_t max_served, uint32_t max_negotiating);

  // A connection starts negotiating; returns its id. `drop` is called if
  // it must go to make room for newer ones (it is then no longer counted).
  uint64_t start_negotiating(Callback drop);

  // Connection `id` finished its handshake. Returns true if it holds a
  // serving slot now; otherwise `granted` is called once it does (unless
  // it is dropped first, or leaves).
  bool request_slot(uint64_t id, Callback granted);

  // Connection `id` is gone: frees its slot (handing it to the next one
  // waiting) or its place among the negotiating ones.
  void leave(uint64_t id);

  uint32_t served() const;
  uint32_t negotiating() const;

 private:
  struct Negotiating {
    Callback drop;
    Callback granted;  // set while waiting for a slot
  };
  // Removes a negotiating connection (and its place in line).
  void forget_locked(std::map<uint64_t, Negotiating>::iterator it);

  const uint32_t max_served_;
  const uint32_t max_negotiating_;
  mutable std::mutex mutex_;
  uint64_t next_id_ = 1;
  std::map<uint64_t, Negotiating> negotiating_;  // by id: oldest first
  // Ids waiting for a slot, in the order they asked; each is in
  // negotiating_ with `granted` set.
  std::deque<uint64_t> waiting_;
  std::unordered_set<uint64_t> served_;
};

}  // namespace layerd
