// Listening sockets, opened with plain POSIX calls before the server forks
// (--fork) and before any thread starts: TCP (every address -b resolves
// to), a Unix socket (-k), or the sockets systemd passed (LISTEN_FDS).
#pragma once

#include <string>
#include <vector>

#include "server/options.h"

namespace layerd {

struct ListeningSocket {
  int fd = -1;
  int family = 0;         // AF_INET, AF_INET6 or AF_UNIX
  std::string unix_path;  // removed at exit when layerd created it
};

// Opens the sockets the options ask for. On failure returns an empty vector
// and sets `error` to a message for the user.
std::vector<ListeningSocket> open_listeners(const ServerOptions& o,
                                            std::string& error);

// Sockets passed by systemd socket activation, or an empty vector if this
// process was not socket-activated. Sets `error` on a malformed environment.
std::vector<ListeningSocket> activated_listeners(std::string& error);

}  // namespace layerd
