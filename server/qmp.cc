// The QMP control socket (see qmp.h for the protocol as clients see it).
//
// Shape: one io_context on one thread. Each client is a read loop that
// cuts its byte stream into messages (MessageSplitter), dispatches every
// complete message right there on the server thread, and queues the reply
// line; a write loop drains the queue. emit() formats the event line on the
// caller's thread and posts it to the server thread, which appends it to
// the queue of every negotiated client, so emit() never waits for a client.
#include "server/qmp.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <optional>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/write.hpp>

#include "server/log.h"

namespace layerd {

namespace asio = boost::asio;
namespace json = boost::json;
using asio::local::stream_protocol;

// ---------------------------------------------------------------------------
// Argument helpers, in the words of QEMU's qapi/qobject-input-visitor.c.

void qmp_fail(std::string desc) { throw QmpError{"GenericError", std::move(desc)}; }

namespace {

[[noreturn]] void fail_missing(std::string_view name) {
  qmp_fail("Parameter '" + std::string(name) + "' is missing");
}

[[noreturn]] void fail_type(std::string_view name, const char* expected) {
  qmp_fail("Invalid parameter type for '" + std::string(name) + "', expected: " + expected);
}

std::string string_of(const json::value& v, std::string_view name) {
  if (!v.is_string()) fail_type(name, "string");
  return std::string(v.get_string());
}

// Integers only: QEMU refuses 1.0 and 1.5 alike, and numbers past int64.
int64_t int_of(const json::value& v, std::string_view name) {
  if (v.is_int64()) return v.get_int64();
  if (v.is_uint64() && v.get_uint64() <= uint64_t(INT64_MAX)) return int64_t(v.get_uint64());
  fail_type(name, "integer");
}

}  // namespace

std::string qmp_required_string(const json::object& args, std::string_view name) {
  const json::value* v = args.if_contains(name);
  if (!v) fail_missing(name);
  return string_of(*v, name);
}

int64_t qmp_required_int(const json::object& args, std::string_view name) {
  const json::value* v = args.if_contains(name);
  if (!v) fail_missing(name);
  return int_of(*v, name);
}

std::string qmp_optional_string(const json::object& args, std::string_view name,
                                std::string fallback) {
  const json::value* v = args.if_contains(name);
  return v ? string_of(*v, name) : std::move(fallback);
}

int64_t qmp_optional_int(const json::object& args, std::string_view name, int64_t fallback) {
  const json::value* v = args.if_contains(name);
  return v ? int_of(*v, name) : fallback;
}

bool qmp_optional_bool(const json::object& args, std::string_view name, bool fallback) {
  const json::value* v = args.if_contains(name);
  if (!v) return fallback;
  if (!v->is_bool()) fail_type(name, "boolean");
  return v->get_bool();
}

void qmp_only_arguments(const json::object& args,
                        std::initializer_list<std::string_view> known) {
  for (const auto& kv : args) {
    bool ok = false;
    for (std::string_view k : known) ok = ok || kv.key() == k;
    if (!ok) qmp_fail("Parameter '" + std::string(kv.key()) + "' is unexpected");
  }
}

namespace {

// ---------------------------------------------------------------------------
// Output in QEMU's format (qobject/qjson.c): ", " and ": " separators, only
// ASCII (everything else \uXXXX with upper-case hex, surrogate pairs past
// U+FFFF, U+FFFD for broken UTF-8), doubles with %.17g.

void append_u(std::string& out, unsigned cp) {
  char b[8];
  std::snprintf(b, sizeof b, "\\u%04X", cp);
  out += b;
}

void append_string(std::string& out, std::string_view s) {
  out += '"';
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const auto* end = p + s.size();
  while (p < end) {
    unsigned c = *p;
    if (c < 0x80) {
      ++p;
      switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\b': out += "\\b"; break;
        case '\f': out += "\\f"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        default:
          if (c < 0x20 || c == 0x7f) append_u(out, c);
          else out += char(c);
      }
      continue;
    }
    // A UTF-8 sequence.
    int len = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc0 ? 2 : 0;
    unsigned cp = len == 4 ? c & 0x07 : len == 3 ? c & 0x0f : c & 0x1f;
    bool ok = len != 0 && end - p >= len;
    for (int i = 1; ok && i < len; ++i) {
      if ((p[i] & 0xc0) != 0x80) ok = false;
      else cp = cp << 6 | (p[i] & 0x3f);
    }
    if (ok) {
      static constexpr unsigned kMin[] = {0, 0, 0x80, 0x800, 0x10000};
      ok = cp >= kMin[len] && cp <= 0x10ffff && !(cp >= 0xd800 && cp <= 0xdfff);
    }
    if (!ok) {
      append_u(out, 0xfffd);
      ++p;
      continue;
    }
    p += len;
    if (cp > 0xffff) {
      cp -= 0x10000;
      append_u(out, 0xd800 + (cp >> 10));
      append_u(out, 0xdc00 + (cp & 0x3ff));
    } else {
      append_u(out, cp);
    }
  }
  out += '"';
}

void append_json(std::string& out, const json::value& v) {
  switch (v.kind()) {
    case json::kind::null: out += "null"; break;
    case json::kind::bool_: out += v.get_bool() ? "true" : "false"; break;
    case json::kind::int64: out += std::to_string(v.get_int64()); break;
    case json::kind::uint64: out += std::to_string(v.get_uint64()); break;
    case json::kind::double_: {
      char b[32];
      std::snprintf(b, sizeof b, "%.17g", v.get_double());
      out += b;
      break;
    }
    case json::kind::string: append_string(out, v.get_string()); break;
    case json::kind::array: {
      out += '[';
      bool first = true;
      for (const auto& e : v.get_array()) {
        if (!first) out += ", ";
        first = false;
        append_json(out, e);
      }
      out += ']';
      break;
    }
    case json::kind::object: {
      out += '{';
      bool first = true;
      for (const auto& kv : v.get_object()) {
        if (!first) out += ", ";
        first = false;
        append_string(out, kv.key());
        out += ": ";
        append_json(out, kv.value());
      }
      out += '}';
      break;
    }
  }
}

std::string to_line(const json::value& v) {
  std::string out;
  append_json(out, v);
  out += "\r\n";
  return out;
}

// {"id": ID, "error": {"class": C, "desc": D}}: QEMU's key order.
std::string error_line(const json::value* id, std::string_view error_class,
                       std::string_view desc) {
  json::object o;
  if (id) o["id"] = *id;
  o["error"] = json::object{{"class", error_class}, {"desc", desc}};
  return to_line(o);
}

std::string return_line(const json::value* id, json::value result) {
  json::object o;
  o["return"] = std::move(result);
  if (id) o["id"] = *id;
  return to_line(o);
}

// ---------------------------------------------------------------------------
// MessageSplitter: finds where each top-level JSON value of the stream ends
// by counting brackets outside strings, and feeds its bytes to a
// json::stream_parser as they arrive. Knowing the bounds of a message
// without parsing it is what lets the connection go on after bad input: a
// parse error, an oversized or a too deep message is reported at once and
// the rest of it, up to where its brackets close, is dropped. On the way
// QEMU's single-quoted strings are rewritten as double-quoted ones.
// Unbalanced bad input must not swallow what follows: a raw newline ends a
// string (JSON forbids it there; the parser reports the error), and in a
// bad message a '{' at the start of a line begins the next message (clients
// write one message a line, or pretty-print with indented inner lines).
class MessageSplitter {
 public:
  // on_message(json::value) for a complete value, on_error(desc) for a bad
  // one (at most once per message).
  template <typename OnMessage, typename OnError>
  void feed(const char* data, size_t size, OnMessage&& on_message, OnError&& on_error) {
    for (size_t i = 0; i < size; ++i) {
      char c = data[i];
      if (!in_frame_) {
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r') continue;
        begin();
      } else if ((scalar_ && is_scalar_end(c)) || (bad_ && after_newline_ && c == '{')) {
        end(on_message, on_error);
        --i;  // c starts whatever comes next
        continue;
      }
      after_newline_ = c == '\n';
      if (++size_ > QmpServer::kMaxMessageBytes && !bad_) {
        report(on_error, "JSON token size limit exceeded");
      }
      bool ends = step(c);
      if (chunk_.size() >= 64 * 1024) flush(on_error);
      if (ends) end(on_message, on_error);
    }
    flush(on_error);
  }

 private:
  enum class Quote { kNone, kDouble, kSingle };

  static bool is_scalar_end(char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '{' || c == '}' ||
           c == '[' || c == ']' || c == '"' || c == '\'';
  }

  void begin() {
    in_frame_ = true;
    bad_ = false;
    scalar_ = false;
    depth_ = 0;
    size_ = 0;
    quote_ = Quote::kNone;
    escape_ = false;
    after_newline_ = false;
    chunk_.clear();
    parser_.reset();
  }

  // Appends c (translated) to the chunk; true when c ends the message.
  bool step(char c) {
    if (quote_ != Quote::kNone) {
      if (escape_) {
        escape_ = false;
        if (c == '\'') {
          out(c);  // \' is QEMU's; JSON has no such escape
        } else {
          out('\\');
          out(c);
        }
        return false;
      }
      if (c == '\\') {
        escape_ = true;
      } else if ((c == '"' && quote_ == Quote::kDouble) ||
                 (c == '\'' && quote_ == Quote::kSingle) || c == '\n') {
        quote_ = Quote::kNone;
        out(c == '\n' ? '\n' : '"');
        return depth_ == 0;
      } else if (c == '"') {
        out('\\');
        out('"');
      } else {
        out(c);
      }
      return false;
    }
    if (scalar_) {
      out(c);
      return false;
    }
    switch (c) {
      case '"':
        quote_ = Quote::kDouble;
        out(c);
        return false;
      case '\'':
        quote_ = Quote::kSingle;
        out('"');
        return false;
      case '{':
      case '[':
        ++depth_;
        out(c);
        return false;
      case '}':
      case ']':
        out(c);
        return --depth_ <= 0;  // a stray closer at the top ends at once
      default:
        if (depth_ == 0) scalar_ = true;  // a number, keyword or garbage
        out(c);
        return false;
    }
  }

  void out(char c) {
    if (!bad_) chunk_ += c;
  }

  template <typename OnError>
  void report(OnError& on_error, const char* desc) {
    bad_ = true;
    chunk_.clear();
    parser_.reset();  // frees what the parser holds of a huge message
    on_error(std::string(desc));
  }

  template <typename OnError>
  void report(OnError& on_error, const boost::system::error_code& ec) {
    if (ec == json::error::too_deep) {
      report(on_error, "JSON nesting depth limit exceeded");
    } else {
      std::string desc = "JSON parse error, " + ec.message();
      report(on_error, desc.c_str());
    }
  }

  template <typename OnError>
  void flush(OnError& on_error) {
    if (bad_ || chunk_.empty()) return;
    boost::system::error_code ec;
    parser_.write(chunk_.data(), chunk_.size(), ec);
    chunk_.clear();
    if (ec) report(on_error, ec);
  }

  template <typename OnMessage, typename OnError>
  void end(OnMessage& on_message, OnError& on_error) {
    flush(on_error);
    in_frame_ = false;
    if (bad_) return;
    boost::system::error_code ec;
    parser_.finish(ec);
    if (ec) {
      report(on_error, ec);
      return;
    }
    json::value v = parser_.release();
    on_message(std::move(v));
  }

  static json::parse_options options() {
    json::parse_options o;
    o.max_depth = QmpServer::kMaxDepth;
    return o;
  }

  json::stream_parser parser_{json::storage_ptr(), options()};
  std::string chunk_;
  bool in_frame_ = false;
  bool bad_ = false;
  bool scalar_ = false;
  bool escape_ = false;
  bool after_newline_ = false;
  Quote quote_ = Quote::kNone;
  int depth_ = 0;
  size_t size_ = 0;
};

json::object version_info() {
  return json::object{
      {"qemu", json::object{{"micro", QmpServer::kQemuMicro},
                            {"minor", QmpServer::kQemuMinor},
                            {"major", QmpServer::kQemuMajor}}},
      {"package", "layerd " LAYERD_VERSION}};
}

const char* const kBuiltins[] = {"qmp_capabilities", "query-version", "query-commands"};

bool is_builtin(std::string_view name) {
  for (const char* b : kBuiltins)
    if (name == b) return true;
  return false;
}

}  // namespace

// ---------------------------------------------------------------------------

struct QmpServer::Impl {
  struct Client;

  struct Listener {
    stream_protocol::acceptor acceptor;
    std::string path;  // empty for adopted sockets
    dev_t dev = 0;
    ino_t ino = 0;
  };

  asio::io_context io;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> guard;
  std::thread thread;
  std::atomic<bool> running{false};
  std::atomic<bool> stopped{false};
  bool files_removed = false;
  std::vector<std::pair<std::string, Handler>> commands;  // registration order
  std::vector<std::unique_ptr<Listener>> listeners;
  std::vector<std::shared_ptr<Client>> clients;  // server thread only

  struct Client : std::enable_shared_from_this<Client> {
    Client(Impl& impl_, stream_protocol::socket s) : impl(impl_), socket(std::move(s)) {}

    Impl& impl;
    stream_protocol::socket socket;
    bool negotiated = false;
    bool closed = false;
    bool writing = false;
    std::deque<std::shared_ptr<const std::string>> queue;
    size_t queued_bytes = 0;
    MessageSplitter splitter;
    std::array<char, 64 * 1024> buffer;

    void start() {
      send(std::make_shared<const std::string>(
          to_line(json::object{{"QMP", json::object{{"version", version_info()},
                                                    {"capabilities", json::array{}}}}})));
      read();
    }

    void read() {
      socket.async_read_some(asio::buffer(buffer),
                             [self = shared_from_this()](boost::system::error_code ec, size_t n) {
                               if (self->closed) return;
                               if (ec) {
                                 self->close();
                                 return;
                               }
                               self->received(n);
                               if (!self->closed) self->read();
                             });
    }

    void received(size_t n) {
      splitter.feed(
          buffer.data(), n,
          [this](json::value msg) {
            if (!closed) send(std::make_shared<const std::string>(impl.dispatch(*this, msg)));
          },
          [this](std::string desc) {
            if (!closed) send(std::make_shared<const std::string>(
                error_line(nullptr, "GenericError", desc)));
          });
    }

    void send(std::shared_ptr<const std::string> line) {
      if (closed) return;
      queued_bytes += line->size();
      queue.push_back(std::move(line));
      if (queued_bytes > kMaxQueuedBytes) {
        log_error("qmp: a client does not read its replies and events ({} bytes queued); "
                  "disconnecting it",
                  queued_bytes);
        close();
        return;
      }
      if (!writing) write();
    }

    void write() {
      writing = true;
      auto line = queue.front();
      asio::async_write(socket, asio::buffer(*line),
                        [self = shared_from_this(), line](boost::system::error_code ec, size_t) {
                          self->writing = false;
                          if (self->closed) return;
                          if (ec) {
                            self->close();
                            return;
                          }
                          self->queued_bytes -= line->size();
                          self->queue.pop_front();
                          if (!self->queue.empty()) self->write();
                        });
    }

    void close() {
      if (closed) return;
      closed = true;
      boost::system::error_code ignored;
      socket.close(ignored);
      queue.clear();
      queued_bytes = 0;
      auto& list = impl.clients;
      for (size_t i = 0; i < list.size(); ++i) {
        if (list[i].get() == this) {
          list.erase(list.begin() + i);  // may drop the last owner but one
          break;
        }
      }
    }
  };

  void accept(Listener& l) {
    l.acceptor.async_accept([this, &l](boost::system::error_code ec, stream_protocol::socket s) {
      if (!running.load()) return;
      if (ec == asio::error::operation_aborted) return;
      if (!ec) {
        auto c = std::make_shared<Client>(*this, std::move(s));
        clients.push_back(c);
        c->start();
      } else {
        log_error("qmp: accept: {}", ec.message());
      }
      accept(l);
    });
  }

  // One message in, one reply line out (QEMU's monitor/qmp.c and
  // qapi/qmp-dispatch.c decide the errors and their order).
  std::string dispatch(Client& c, const json::value& msg) {
    if (!msg.is_object()) return error_line(nullptr, "GenericError", "QMP input must be a JSON object");
    const json::object& o = msg.get_object();
    const json::value* id = o.if_contains("id");
    const json::value* execute = nullptr;
    static const json::object kNoArguments;
    const json::object* args = &kNoArguments;
    for (const auto& kv : o) {
      if (kv.key() == "execute") {
        if (!kv.value().is_string())
          return error_line(id, "GenericError", "QMP input member 'execute' must be a string");
        execute = &kv.value();
      } else if (kv.key() == "arguments") {
        if (!kv.value().is_object())
          return error_line(id, "GenericError", "QMP input member 'arguments' must be an object");
        args = &kv.value().get_object();
      } else if (kv.key() != "id") {
        return error_line(id, "GenericError",
                          "QMP input member '" + std::string(kv.key()) + "' is unexpected");
      }
    }
    if (!execute) return error_line(id, "GenericError", "QMP input lacks member 'execute'");
    std::string name(execute->get_string());
    if (!c.negotiated && name != "qmp_capabilities") {
      return error_line(id, "CommandNotFound",
                        "Expecting capabilities negotiation with 'qmp_capabilities'");
    }
    try {
      return return_line(id, run(c, name, *args));
    } catch (const QmpError& e) {
      return error_line(id, e.error_class, e.desc);
    } catch (const std::exception& e) {
      log_error("qmp: command {} failed: {}", name, e.what());
      return error_line(id, "GenericError", e.what());
    } catch (...) {
      log_error("qmp: command {} failed with an unknown exception", name);
      return error_line(id, "GenericError", "Internal error in command " + name);
    }
  }

  json::value run(Client& c, const std::string& name, const json::object& args) {
    if (name == "qmp_capabilities") return qmp_capabilities(c, args);
    if (name == "query-version") {
      qmp_only_arguments(args, {});
      return version_info();
    }
    if (name == "query-commands") {
      qmp_only_arguments(args, {});
      // Newest first, as QEMU lists them; the built-ins last.
      json::array list;
      for (auto it = commands.rbegin(); it != commands.rend(); ++it)
        list.push_back(json::object{{"name", it->first}});
      for (int i = int(std::size(kBuiltins)) - 1; i >= 0; --i)
        list.push_back(json::object{{"name", kBuiltins[i]}});
      return list;
    }
    for (auto& [n, handler] : commands) {
      if (n == name) {
        json::value result = handler(args);
        if (result.is_null()) result = json::object{};
        return result;
      }
    }
    throw QmpError{"CommandNotFound", "The command " + name + " has not been found"};
  }

  // qmp_capabilities {"enable": ["oob", ...]}: the arguments are checked
  // first (QMPCapability knows only "oob"), then the state, then whether
  // what was asked for is offered (nothing is).
  json::value qmp_capabilities(Client& c, const json::object& args) {
    qmp_only_arguments(args, {"enable"});
    std::string unavailable;
    if (const json::value* enable = args.if_contains("enable")) {
      if (!enable->is_array()) fail_type("enable", "array");
      const json::array& list = enable->get_array();
      for (size_t i = 0; i < list.size(); ++i) {
        if (!list[i].is_string()) fail_type("enable[" + std::to_string(i) + "]", "string");
        std::string cap(list[i].get_string());
        // QEMU names the list element 'null' here; we say what it says.
        if (cap != "oob") qmp_fail("Parameter 'null' does not accept value '" + cap + "'");
        unavailable += (unavailable.empty() ? "" : ", ") + cap;
      }
    }
    if (c.negotiated) {
      throw QmpError{"CommandNotFound",
                     "Capabilities negotiation is already complete, command ignored"};
    }
    if (!unavailable.empty()) qmp_fail("Capability " + unavailable + " not available");
    c.negotiated = true;
    return json::object{};
  }

  void close_all() {
    for (auto& l : listeners) {
      boost::system::error_code ignored;
      l->acceptor.close(ignored);
    }
    auto list = clients;  // close() edits clients
    for (auto& c : list) c->close();
    clients.clear();
  }

  void remove_socket_files() {
    for (auto& l : listeners) {
      if (l->path.empty()) continue;
      struct stat st;
      // Only our own socket: someone may have replaced it meanwhile.
      if (::lstat(l->path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode) && st.st_dev == l->dev &&
          st.st_ino == l->ino) {
        ::unlink(l->path.c_str());
      }
    }
  }
};

QmpServer::QmpServer() : impl_(std::make_unique<Impl>()) {}

QmpServer::~QmpServer() { stop(); }

void QmpServer::add_command(std::string name, Handler handler) {
  if (is_builtin(name)) throw std::invalid_argument("QMP command " + name + " is built in");
  for (auto& [n, h] : impl_->commands) {
    if (n == name) {
      h = std::move(handler);
      return;
    }
  }
  impl_->commands.emplace_back(std::move(name), std::move(handler));
}

bool QmpServer::listen(const std::string& path, std::string* error) {
  auto fail = [&](std::string msg) {
    if (error) *error = std::move(msg);
    return false;
  };
  if (impl_->running || impl_->stopped) return fail("QMP: listen() after start()");
  sockaddr_un sun{};
  if (path.empty() || path.size() >= sizeof sun.sun_path)
    return fail("QMP socket path '" + path + "' is empty or too long");
  struct stat st;
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode))
      return fail("QMP socket path '" + path + "' exists and is not a socket");
    // A socket file: in use if someone accepts on it, stale otherwise.
    int probe = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (probe < 0) return fail(std::string("socket: ") + std::strerror(errno));
    sun.sun_family = AF_UNIX;
    std::memcpy(sun.sun_path, path.data(), path.size());
    int r = ::connect(probe, reinterpret_cast<sockaddr*>(&sun), sizeof sun);
    int err = errno;
    ::close(probe);
    if (r == 0) return fail("QMP socket '" + path + "' is in use by another server");
    if (err != ECONNREFUSED && err != ENOENT)
      return fail("QMP socket '" + path + "': cannot tell whether it is in use: " +
                  std::strerror(err));
    if (::unlink(path.c_str()) != 0 && errno != ENOENT)
      return fail("QMP socket '" + path + "' is stale but cannot be removed: " +
                  std::strerror(errno));
  }
  auto l = std::make_unique<Impl::Listener>(
      Impl::Listener{stream_protocol::acceptor(impl_->io), path});
  boost::system::error_code ec;
  l->acceptor.open(stream_protocol(), ec);
  if (!ec) l->acceptor.bind(stream_protocol::endpoint(path), ec);
  if (ec) return fail("QMP socket '" + path + "': " + ec.message());
  if (::lstat(path.c_str(), &st) == 0) {
    l->dev = st.st_dev;
    l->ino = st.st_ino;
  }
  l->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    ::unlink(path.c_str());
    return fail("QMP socket '" + path + "': listen: " + ec.message());
  }
  impl_->listeners.push_back(std::move(l));
  return true;
}

bool QmpServer::adopt(int fd, std::string* error) {
  auto fail = [&](std::string msg) {
    if (error) *error = std::move(msg);
    return false;
  };
  if (impl_->running || impl_->stopped) return fail("QMP: adopt() after start()");
  int domain = 0, listening = 0;
  socklen_t len = sizeof domain;
  if (::getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0)
    return fail("QMP socket fd " + std::to_string(fd) + ": " + std::strerror(errno));
  len = sizeof listening;
  ::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len);
  if (domain != AF_UNIX || !listening)
    return fail("QMP socket fd " + std::to_string(fd) + " is not a listening Unix socket");
  auto l = std::make_unique<Impl::Listener>(
      Impl::Listener{stream_protocol::acceptor(impl_->io), std::string()});
  boost::system::error_code ec;
  l->acceptor.assign(stream_protocol(), fd, ec);
  if (ec) return fail("QMP socket fd " + std::to_string(fd) + ": " + ec.message());
  impl_->listeners.push_back(std::move(l));
  return true;
}

void QmpServer::start() {
  Impl& m = *impl_;
  if (m.thread.joinable() || m.stopped) return;
  m.running = true;
  for (auto& l : m.listeners) m.accept(*l);
  m.guard.emplace(m.io.get_executor());
  m.thread = std::thread([&m] { m.io.run(); });
}

void QmpServer::stop() {
  Impl& m = *impl_;
  bool on_server_thread = m.io.get_executor().running_in_this_thread();
  if (!m.stopped.exchange(true)) {
    m.running = false;
    if (m.thread.joinable()) {
      // Closing cancels every pending operation; their handlers see the
      // client closed and stop, and run() returns when nothing is left.
      asio::post(m.io, [&m] {
        m.close_all();
        m.guard.reset();
      });
    } else {
      m.close_all();
    }
  }
  // From a handler the server thread cannot join itself: the next stop()
  // (the destructor's at the latest) joins and removes the files.
  if (on_server_thread) return;
  if (m.thread.joinable()) m.thread.join();
  if (!m.files_removed) {
    m.files_removed = true;
    m.remove_socket_files();
  }
}

void QmpServer::emit(std::string_view event, json::object data) {
  Impl& m = *impl_;
  if (!m.running.load()) return;
  auto now = std::chrono::system_clock::now().time_since_epoch();
  auto us = std::chrono::duration_cast<std::chrono::microseconds>(now).count();
  json::object o;
  o["timestamp"] = json::object{{"seconds", us / 1000000}, {"microseconds", us % 1000000}};
  o["event"] = event;
  if (!data.empty()) o["data"] = std::move(data);
  auto line = std::make_shared<const std::string>(to_line(o));
  auto deliver = [&m, line] {
    auto list = m.clients;  // send() may close and unlist a client
    for (auto& c : list)
      if (c->negotiated) c->send(line);
  };
  // From a handler: at once, so that the event goes before the command's
  // reply as in QEMU (block-export-del's BLOCK_EXPORT_DELETED, say).
  if (m.io.get_executor().running_in_this_thread()) {
    deliver();
  } else {
    asio::post(m.io, std::move(deliver));
  }
}

}  // namespace layerd
