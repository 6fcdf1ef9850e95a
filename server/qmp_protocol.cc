// QMP without sockets (see qmp_protocol.h; the protocol is in qmp.h).
//
// A message's bounds are found by the splitter before it is parsed, so that
// bad input costs one error line and never the connection; each complete
// message is dispatched at once, in the order received.
#include "server/qmp_protocol.h"

#include <cmath>
#include <cstdio>
#include <stdexcept>

#include "server/log.h"

namespace layerd {

namespace json = boost::json;

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

}  // namespace

namespace qmp {

std::string to_line(const json::value& v) {
  std::string out;
  append_json(out, v);
  out += "\r\n";
  return out;
}

}  // namespace qmp

namespace {

using qmp::to_line;

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

json::object version_info() {
  return json::object{
      {"qemu", json::object{{"micro", qmp::kQemuMicro},
                            {"minor", qmp::kQemuMinor},
                            {"major", qmp::kQemuMajor}}},
      {"package", "layerd " LAYERD_VERSION}};
}

const char* const kBuiltins[] = {"qmp_capabilities", "query-version", "query-commands"};

// A number too large for a double parses as infinity, which JSON cannot
// write back (an "id" is echoed): such a message is refused as a whole.
bool has_non_finite_number(const json::value& v) {
  switch (v.kind()) {
    case json::kind::double_: return !std::isfinite(v.get_double());
    case json::kind::array:
      for (const auto& e : v.get_array())
        if (has_non_finite_number(e)) return true;
      return false;
    case json::kind::object:
      for (const auto& kv : v.get_object())
        if (has_non_finite_number(kv.value())) return true;
      return false;
    default: return false;
  }
}

bool is_builtin(std::string_view name) {
  for (const char* b : kBuiltins)
    if (name == b) return true;
  return false;
}

// qmp_capabilities {"enable": ["oob", ...]}: the arguments are checked
// first (QMPCapability knows only "oob"), then the state, then whether
// what was asked for is offered (nothing is).
json::value qmp_capabilities(const json::object& args, bool* negotiated) {
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
  if (*negotiated) {
    throw QmpError{"CommandNotFound",
                   "Capabilities negotiation is already complete, command ignored"};
  }
  if (!unavailable.empty()) qmp_fail("Capability " + unavailable + " not available");
  *negotiated = true;
  return json::object{};
}

}  // namespace

namespace qmp {

std::string greeting_line() {
  return to_line(json::object{
      {"QMP", json::object{{"version", version_info()}, {"capabilities", json::array{}}}}});
}

}  // namespace qmp

// ---------------------------------------------------------------------------
// The splitter: finds where each top-level JSON value of the stream ends
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
class QmpSession::Splitter {
 public:
  // on_message(json::value) for a complete value, on_error(desc) for a bad
  // one (at most once per message); each returns false to stop (the rest of
  // `data` is dropped).
  template <typename OnMessage, typename OnError>
  void feed(const char* data, size_t size, OnMessage&& on_message, OnError&& on_error) {
    go_on_ = true;
    for (size_t i = 0; i < size && go_on_; ++i) {
      char c = data[i];
      if (!in_frame_) {
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r') continue;
        begin();
      } else if ((scalar_ && is_scalar_end(c)) ||
                 (after_newline_ && c == '{' && known_bad(on_error))) {
        end(on_message, on_error);
        --i;  // c starts whatever comes next
        continue;
      }
      after_newline_ = c == '\n';
      if (++size_ > qmp::kMaxMessageBytes && !known_bad(on_error)) {
        report(on_error, "JSON token size limit exceeded");
      }
      bool ends = step(c);
      if (chunk_.size() >= 64 * 1024) flush(on_error);
      if (ends) end(on_message, on_error);
    }
    if (go_on_) flush(on_error);
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
    go_on_ = on_error(std::string(desc));
  }

  template <typename OnError>
  void report(OnError& on_error, const boost::system::error_code& ec) {
    if (ec == json::error::too_deep) {
      report(on_error, "JSON nesting depth limit exceeded");
    } else if (ec == json::error::expected_hex_digit ||
               ec == json::error::illegal_leading_surrogate ||
               ec == json::error::illegal_trailing_surrogate) {
      // Boost.JSON's stream parser names a bad \u escape differently
      // depending on where the reads cut it: one message for all of them.
      report(on_error, "JSON parse error, invalid \\u escape");
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

  // Whether the message so far is bad, the parser having seen all of it:
  // decisions taken on it must not depend on where the stream's reads
  // happened to end (the parser is otherwise fed in 64 KiB chunks and at
  // the end of each read).
  template <typename OnError>
  bool known_bad(OnError& on_error) {
    flush(on_error);
    return bad_;
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
    go_on_ = on_message(std::move(v));
  }

  static json::parse_options options() {
    json::parse_options o;
    o.max_depth = qmp::kMaxDepth;
    return o;
  }

  json::stream_parser parser_{json::storage_ptr(), options()};
  std::string chunk_;
  bool in_frame_ = false;
  bool bad_ = false;
  bool scalar_ = false;
  bool escape_ = false;
  bool after_newline_ = false;
  bool go_on_ = true;
  Quote quote_ = Quote::kNone;
  int depth_ = 0;
  size_t size_ = 0;
};


// ---------------------------------------------------------------------------
// The command table (QEMU's monitor/qmp.c and qapi/qmp-dispatch.c decide the
// errors and their order).

void QmpCommands::add(std::string name, Handler handler) {
  if (is_builtin(name)) throw std::invalid_argument("QMP command " + name + " is built in");
  for (auto& [n, h] : commands_) {
    if (n == name) {
      h = std::move(handler);
      return;
    }
  }
  commands_.emplace_back(std::move(name), std::move(handler));
}

std::string QmpCommands::dispatch(const json::value& msg, bool* negotiated) const {
  if (!msg.is_object()) return error_line(nullptr, "GenericError", "QMP input must be a JSON object");
  if (has_non_finite_number(msg))
    return error_line(nullptr, "GenericError", "JSON parse error, number out of range");
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
  if (!*negotiated && name != "qmp_capabilities") {
    return error_line(id, "CommandNotFound",
                      "Expecting capabilities negotiation with 'qmp_capabilities'");
  }
  try {
    return return_line(id, run(name, *args, negotiated));
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

json::value QmpCommands::run(const std::string& name, const json::object& args,
                             bool* negotiated) const {
  if (name == "qmp_capabilities") return qmp_capabilities(args, negotiated);
  if (name == "query-version") {
    qmp_only_arguments(args, {});
    return version_info();
  }
  if (name == "query-commands") {
    qmp_only_arguments(args, {});
    // Newest first, as QEMU lists them; the built-ins last.
    json::array list;
    for (auto it = commands_.rbegin(); it != commands_.rend(); ++it)
      list.push_back(json::object{{"name", it->first}});
    for (int i = int(std::size(kBuiltins)) - 1; i >= 0; --i)
      list.push_back(json::object{{"name", kBuiltins[i]}});
    return list;
  }
  for (auto& [n, handler] : commands_) {
    if (n == name) {
      json::value result = handler(args);
      if (result.is_null()) result = json::object{};
      return result;
    }
  }
  throw QmpError{"CommandNotFound", "The command " + name + " has not been found"};
}

// ---------------------------------------------------------------------------

QmpSession::QmpSession(const QmpCommands& commands)
    : commands_(commands), splitter_(std::make_unique<Splitter>()) {}

QmpSession::~QmpSession() = default;

void QmpSession::feed(const char* data, size_t size, const Send& send) {
  splitter_->feed(
      data, size,
      [&](json::value msg) { return send(commands_.dispatch(msg, &negotiated_)); },
      [&](std::string desc) { return send(error_line(nullptr, "GenericError", desc)); });
}

}  // namespace layerd
