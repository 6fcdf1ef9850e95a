// Listening sockets, opened with plain POSIX calls before the server forks
// (--fork) and before any thread starts: TCP (every address -b resolves
// to), a Unix socket (-k), or the sockets systemd passed (LISTEN_FDS).
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

#include "server/options.h"

namespace layerd {

struct ListeningSocket {
  int fd = -1;
  int family = 0;         // AF_INET, AF_INET6 or AF_UNIX
  std::string unix_path;  // removed at exit when layerd created it
  // The socket file layerd created: exit removes `unix_path` only while it
  // is still this file, not one a new server made at the same path after
  // this one was deleted (as scripts restarting a server do).
  dev_t unix_dev = 0;
  ino_t unix_ino = 0;
  // Socket activation: its name in LISTEN_FDNAMES (systemd's
  // FileDescriptorName=, by default the unit's name); "" if none was given.
  std::string activation_name;
};

// Removes the socket file `l` created, if it is still there.
void remove_socket_file(const ListeningSocket& l);

// Opens the sockets the options ask for. On failure returns an empty vector
// and sets `error` to a message for the user.
std::vector<ListeningSocket> open_listeners(const ServerOptions& o,
                                            std::string& error);

// Sockets passed by systemd socket activation, or an empty vector if this
// process was not socket-activated. Sets `error` on a malformed environment.
std::vector<ListeningSocket> activated_listeners(std::string& error);

}  // namespace layerd
