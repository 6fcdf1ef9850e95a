// The serving loop: accepts clients on the listening sockets as they come
// (refusing TCP clients --allow/--deny keep out before any NBD bytes),
// runs each connection, and shuts down cleanly on SIGTERM/SIGINT or,
// without -t, when the last client leaves. SIGHUP runs config.reload.
// Every accept loop accepts at once; the limits on clients served (-e) and
// negotiating (--max-handshakes) are ClientSlots', shared by all of them.
#pragma once

#include <functional>
#include <vector>

#include "server/access_list.h"
#include "server/connection.h"
#include "server/export.h"
#include "server/listeners.h"
#include "server/options.h"
#include "server/tls.h"

namespace layerd {

struct ServerConfig {
  uint32_t max_connections = 1;  // clients served at once; 0: unlimited
  uint32_t max_handshakes = 256;  // connections negotiating at once
  bool persistent = false;
  ConnectionLimits limits;
  AccessList access;  // TCP clients only
  uint32_t worker_threads = 4;
  const TlsCredentials* tls = nullptr;  // STARTTLS offered when set
  // Run on a worker on SIGHUP (re-reading --config), if set.
  std::function<void()> reload;
};

// Serves until shutdown; flushes every export before returning. Takes
// ownership of the listening sockets. Returns the process exit status.
int serve(const ServerConfig& config, ExportRegistry& exports,
          std::vector<ListeningSocket> listeners);

}  // namespace layerd
