// QMP without sockets: the byte stream of one client in, reply lines out.
// The wire protocol is described in qmp.h; QmpServer feeds each client's
// bytes to a QmpSession and sends what comes back. Kept apart from the
// sockets so that it can be tested and fuzzed byte for byte
// (tests/fuzz/qmp_fuzz.cc).
//
// Thread safety: none of its own. A QmpCommands table is filled before use
// and then only read; a QmpSession belongs to one client and is fed from one
// thread at a time (QmpServer's thread), as are the handlers it calls.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <boost/json.hpp>

namespace layerd {

// Thrown by a command handler to answer with an error. Classes are QEMU's:
// "GenericError" (the default), "CommandNotFound", "DeviceNotFound",
// "DeviceNotActive", "KVMMissingCap".
struct QmpError {
  std::string error_class = "GenericError";
  std::string desc;
};

// Throws a GenericError with `desc`.
[[noreturn]] void qmp_fail(std::string desc);

// Argument access for handlers: each throws a GenericError in QEMU's words
// ("Parameter 'device' is missing", "Invalid parameter type for 'speed',
// expected: integer") when the argument is absent (the required forms) or
// of the wrong type.
std::string qmp_required_string(const boost::json::object& args,
                                std::string_view name);
int64_t qmp_required_int(const boost::json::object& args, std::string_view name);
std::string qmp_optional_string(const boost::json::object& args,
                                std::string_view name, std::string fallback = {});
int64_t qmp_optional_int(const boost::json::object& args,
                         std::string_view name, int64_t fallback);
bool qmp_optional_bool(const boost::json::object& args, std::string_view name,
                       bool fallback);
// Refuses arguments other than `known` ("Parameter 'X' is unexpected").
void qmp_only_arguments(const boost::json::object& args,
                        std::initializer_list<std::string_view> known);

namespace qmp {

inline constexpr size_t kMaxMessageBytes = 1 << 20;
inline constexpr int kMaxDepth = 1024;
// The "qemu" triple of the greeting and query-version.
inline constexpr int kQemuMajor = 7, kQemuMinor = 2, kQemuMicro = 0;

// `v` as one line in QEMU's format: ", " and ": " separators, ASCII only,
// then "\r\n".
std::string to_line(const boost::json::value& v);

// The greeting line a client gets on connect.
std::string greeting_line();

}  // namespace qmp

// The command table: the built-ins (qmp_capabilities, query-version,
// query-commands) and the registered commands.
class QmpCommands {
 public:
  // Returns the "return" value ({} for none); throws QmpError.
  using Handler = std::function<boost::json::value(const boost::json::object& arguments)>;

  // Registers a command; a second add of a name replaces the first. The
  // built-ins cannot be replaced (std::invalid_argument).
  void add(std::string name, Handler handler);

  // One message in, one reply line out. `negotiated` is the client's state
  // (false until its qmp_capabilities succeeds, which sets it). A handler
  // that throws something other than QmpError is answered with a
  // GenericError carrying what().
  std::string dispatch(const boost::json::value& message, bool* negotiated) const;

 private:
  boost::json::value run(const std::string& name, const boost::json::object& args,
                         bool* negotiated) const;

  std::vector<std::pair<std::string, Handler>> commands_;  // registration order
};

// One client's byte stream: cut into messages, each answered through the
// table (malformed, oversized or too deep input gets an error line and the
// stream goes on, as qmp.h describes).
class QmpSession {
 public:
  // Gets each reply line in order; returns false when the client is gone,
  // and then the rest of what was fed is dropped unanswered (no command
  // runs for a client that left).
  using Send = std::function<bool(std::string line)>;

  explicit QmpSession(const QmpCommands& commands);
  ~QmpSession();
  QmpSession(const QmpSession&) = delete;
  QmpSession& operator=(const QmpSession&) = delete;

  void feed(const char* data, size_t size, const Send& send);
  bool negotiated() const { return negotiated_; }

 private:
  class Splitter;

  const QmpCommands& commands_;
  std::unique_ptr<Splitter> splitter_;
  bool negotiated_ = false;
};

}  // namespace layerd
