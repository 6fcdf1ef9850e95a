// A small synchronous QMP client (QEMU's monitor protocol) over a Unix
// socket, for layerctl's live commands against layerd or
// qemu-storage-daemon.
//
// The constructor connects, reads the greeting and leaves capability
// negotiation mode (qmp_capabilities). execute() sends one command and
// waits for its reply; events that arrive meanwhile are queued, and
// next_event() hands them out in order, waiting up to a timeout for more.
// Messages are parsed with Boost.JSON's stream parser, so they need not
// arrive one per line or one per read.
//
// Errors: a command the server refuses throws QmpError (its "class" and
// "desc"); a connection that cannot be made, breaks, or speaks something
// that is not QMP throws QmpConnectionError.
//
// Not thread safe: one thread drives a client.
#pragma once

#include <chrono>
#include <deque>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>

#include <boost/json.hpp>

namespace layerd::ctl {

struct QmpError : std::runtime_error {
  QmpError(std::string klass, std::string description)
      : std::runtime_error(description),
        error_class(std::move(klass)),
        desc(std::move(description)) {}
  std::string error_class;  // "GenericError", "DeviceNotActive", ...
  std::string desc;
};

struct QmpConnectionError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class QmpClient {
 public:
  // Connects to the monitor socket at `path` and negotiates capabilities.
  // `timeout` bounds each wait for the server (greeting, replies).
  explicit QmpClient(const std::string& path,
                     std::chrono::milliseconds timeout = std::chrono::seconds(30));
  ~QmpClient();
  QmpClient(const QmpClient&) = delete;
  QmpClient& operator=(const QmpClient&) = delete;

  // The server's greeting: {"QMP": {"version": ..., "capabilities": [...]}}.
  const boost::json::object& greeting() const { return greeting_; }

  // Runs `command` with `arguments` (omitted when empty) and returns its
  // "return" value.
  boost::json::value execute(std::string_view command,
                             const boost::json::object& arguments = {});

  // The next event ({"event", "data", "timestamp"}), waiting up to
  // `timeout` for one; nullopt if none came.
  std::optional<boost::json::object> next_event(std::chrono::milliseconds timeout);

 private:
  // Reads until one whole message is parsed or `timeout` passes (nullopt).
  std::optional<boost::json::object> read_message(std::chrono::milliseconds timeout);

  int fd_ = -1;
  std::chrono::milliseconds timeout_;
  boost::json::stream_parser parser_;
  std::string pending_;  // bytes read but not yet fed to the parser
  std::deque<boost::json::object> events_;
  boost::json::object greeting_;
  uint64_t next_id_ = 1;
};

}  // namespace layerd::ctl
