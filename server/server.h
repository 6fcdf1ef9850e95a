// The serving loop: accepts clients on the listening sockets, runs each
// connection, enforces the connection limit (-e: further clients wait in
// the backlog, as with qemu-nbd), and shuts down cleanly on SIGTERM/SIGINT
// or, without -t, when the last client leaves. SIGHUP runs config.reload.
#pragma once

#include <functional>
#include <vector>

#include "server/export.h"
#include "server/listeners.h"
#include "server/options.h"
#include "server/tls.h"

namespace layerd {

struct ServerConfig {
  uint32_t max_connections = 1;  // 0: unlimited
  bool persistent = false;
  uint32_t handshake_limit_seconds = 10;
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
