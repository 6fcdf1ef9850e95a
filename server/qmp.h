// The QMP control socket: QEMU's monitor protocol on Unix sockets, so that
// tools written for qemu-storage-daemon (qemu's Python QMP client, virsh's
// QMP layer, scripts) talk to layerd unchanged.
//
// Wire protocol (QEMU's docs/interop/qmp-spec.txt), as qemu-storage-daemon
// 7.2 speaks it, byte for byte where we could compare: on connect the
// server sends {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2,
// "major": 7}, "package": "layerd 0.1.0"}, "capabilities": []}}. The "qemu"
// triple is the QEMU release whose QMP behaviour layerd follows (7.2.0), not
// layerd's version (that is in "package", from LAYERD_VERSION): clients that
// gate features on the QEMU version then treat us as that release. No
// capabilities are offered (no "oob"). The client must
// first send {"execute": "qmp_capabilities"}; until then every other
// command gets a CommandNotFound error. A command is
// {"execute": NAME, "arguments": {...}, "id": ANY} and is answered by
// {"return": VALUE, "id": ANY} or
// {"id": ANY, "error": {"class": CLASS, "desc": TEXT}} (the id, any JSON
// value, is echoed when given; key order as QEMU prints it). Events, sent
// to every negotiated client, are {"timestamp": {"seconds": S,
// "microseconds": US}, "event": NAME, "data": {...}} (wall clock; "data"
// left out when empty, as QEMU does for events without members). Every
// reply and event is one line: JSON in QEMU's spacing (", " and ": "),
// ASCII only (other characters as \uXXXX), then "\r\n".
//
// Input: JSON values one after another (newlines between them optional),
// each at most kMaxMessageBytes and nested at most 1024 deep (QEMU's
// limits for depth; its words "JSON token size limit exceeded" and "JSON
// nesting depth limit exceeded"). QEMU's single-quoted strings are
// accepted. Malformed JSON, a message that is not an object, an oversized
// or too deep message, an unknown command or bad arguments get an error
// reply and the connection goes on: the rest of a bad message (up to where
// its brackets close) is dropped and the next message is read normally.
//
// Threading: the server runs one thread of its own (start() to stop()),
// apart from the NBD event loops. Command handlers run on that thread, one
// at a time for all clients (as QEMU's monitor runs them), so a handler
// may block briefly (a graph change waits for in-flight requests) but long
// work belongs to a job thread. emit() may be called from any thread.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include <boost/json.hpp>

#include "server/qmp_protocol.h"

namespace layerd {

class QmpServer {
 public:
  static constexpr size_t kMaxMessageBytes = qmp::kMaxMessageBytes;
  static constexpr size_t kMaxQueuedBytes = kMaxMessageBytes * 16;
  static constexpr int kMaxDepth = qmp::kMaxDepth;

  // Runs on the server thread. Returns the "return" value ({} for none);
  // throws QmpError.
  using Handler = QmpCommands::Handler;

  QmpServer();
  ~QmpServer();  // stop()s
  QmpServer(const QmpServer&) = delete;
  QmpServer& operator=(const QmpServer&) = delete;

  // Registers a command (before start()); a second add_command of a name
  // replaces the first. qmp_capabilities, query-version and query-commands
  // are built in and cannot be replaced (std::invalid_argument). A handler
  // that throws something other than QmpError is answered with a
  // GenericError carrying what() and the server goes on. A client that
  // disconnects while its command runs loses only the reply.
  void add_command(std::string name, Handler handler);
  // The commands added, for a QmpSession fed without a socket (fuzzing).
  const QmpCommands& commands() const;

  // Listens on a Unix socket at `path` (a stale socket file there, one no
  // one accepts on, is replaced; a socket someone listens on is refused as
  // "in use"; any other file is an error and left alone), or on an already
  // listening socket `fd` (socket activation; the server owns it then).
  // Before start(); may be called more than once. false with `error` set
  // on failure.
  bool listen(const std::string& path, std::string* error);
  bool adopt(int fd, std::string* error);

  void start();
  // Closes every connection and the listening sockets (removing the socket
  // files it created) and joins the thread. Idempotent; any thread. From a
  // handler (a "quit" command) it closes everything but cannot join its
  // own thread: the reply is lost, and a later stop() or the destructor
  // joins and removes the files. A quit that should answer first had
  // better tell the main thread, which then calls stop().
  void stop();

  // Sends an event to every client past qmp_capabilities, timestamped now.
  // Called from a handler, the event goes before that command's reply (as
  // QEMU orders them); from other threads it is queued for the server
  // thread. Thread-safe; never blocks on a slow client (a client that does not
  // read its events is disconnected once kMaxQueuedBytes are queued; the
  // same limit holds for replies it does not read). Before start() and
  // after stop() the event goes nowhere.
  void emit(std::string_view event, boost::json::object data);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace layerd
