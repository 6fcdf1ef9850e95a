// `layerd -L`: the client side of qemu-nbd's --list. Connects to a server,
// lists its exports with NBD_OPT_LIST, asks NBD_OPT_INFO and
// NBD_OPT_LIST_META_CONTEXT for each, and prints them in qemu-nbd's format.
#pragma once

#include <string>

#include "server/options.h"

namespace layerd {

// Prints the listing to stdout. Returns the exit status (1 with a message
// on stderr if the server cannot be reached or misbehaves).
int list_exports_of_server(const ServerOptions& o);

}  // namespace layerd
