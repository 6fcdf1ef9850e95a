// QmpServer in-process, driven by a raw Unix-socket client: the QMP wire
// protocol as qemu-storage-daemon 7.2 speaks it (the expected lines were
// compared byte for byte with its answers), events, limits and the socket
// file's life.
#include "server/qmp.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <iterator>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace layerd {
namespace {

namespace json = boost::json;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

const std::string kGreeting =
    R"({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "layerd )" LAYERD_VERSION
    R"("}, "capabilities": []}})"
    "\r\n";
const std::string kVersion =
    R"({"return": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "layerd )" LAYERD_VERSION
    R"("}})"
    "\r\n";

std::string error_line(std::string_view error_class, std::string_view desc) {
  return R"({"error": {"class": ")" + std::string(error_class) + R"(", "desc": ")" +
         std::string(desc) + "\"}}\r\n";
}

std::string generic(std::string_view desc) { return error_line("GenericError", desc); }

int connect_unix(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  std::strncpy(sun.sun_path, path.c_str(), sizeof sun.sun_path - 1);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&sun), sizeof sun) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// A raw QMP client: bytes out, "\r\n"-terminated lines in.
class RawClient {
 public:
  explicit RawClient(const std::string& path) : fd_(connect_unix(path)) {
    if (fd_ < 0) throw std::runtime_error("cannot connect to " + path);
  }
  ~RawClient() { close(); }
  RawClient(const RawClient&) = delete;
  RawClient& operator=(const RawClient&) = delete;

  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  void send(std::string_view s) {
    while (!s.empty()) {
      ssize_t n = ::send(fd_, s.data(), s.size(), MSG_NOSIGNAL);
      if (n <= 0) throw std::runtime_error("send failed");
      s.remove_prefix(size_t(n));
    }
  }

  // The next line with its "\r\n"; "" on EOF or after `timeout`.
  std::string line(std::chrono::milliseconds timeout = 5s) {
    auto deadline = Clock::now() + timeout;
    for (;;) {
      auto pos = buf_.find("\r\n");
      if (pos != std::string::npos) {
        std::string l = buf_.substr(0, pos + 2);
        buf_.erase(0, pos + 2);
        return l;
      }
      if (!fill(deadline)) return "";
    }
  }

  json::value reply(std::chrono::milliseconds timeout = 5s) {
    std::string l = line(timeout);
    if (l.empty()) return nullptr;
    return json::parse(l);
  }

  // Sends a command and returns the reply line.
  std::string command(std::string_view msg) {
    send(msg);
    return line();
  }

  void negotiate() {
    EXPECT_EQ(line(), kGreeting);
    EXPECT_EQ(command(R"({"execute": "qmp_capabilities"})"), "{\"return\": {}}\r\n");
  }

  // Reads until EOF; false if the connection is still open at `timeout`.
  bool read_to_eof(std::chrono::milliseconds timeout, size_t* bytes = nullptr) {
    auto deadline = Clock::now() + timeout;
    size_t total = buf_.size();
    buf_.clear();
    for (;;) {
      if (!fill(deadline)) {
        if (bytes) *bytes = total + buf_.size();
        return eof_;
      }
      total += buf_.size();
      buf_.clear();
    }
  }

  // True if nothing arrives within `wait`.
  bool quiet(std::chrono::milliseconds wait = 200ms) {
    return buf_.empty() && !fill(Clock::now() + wait);
  }

 private:
  bool fill(Clock::time_point deadline) {
    if (eof_) return false;
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() < 0) left = 0ms;
    pollfd p{fd_, POLLIN, 0};
    if (::poll(&p, 1, int(left.count())) <= 0) return false;
    char tmp[65536];
    ssize_t n = ::recv(fd_, tmp, sizeof tmp, 0);
    if (n <= 0) {
      eof_ = true;
      return false;
    }
    buf_.append(tmp, size_t(n));
    return true;
  }

  int fd_;
  std::string buf_;
  bool eof_ = false;
};

class QmpTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/layerd-qmp-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/qmp.sock";
  }
  void TearDown() override {
    server_.reset();
    fs::remove_all(dir_);
  }

  // A started server with `setup` applied before start().
  QmpServer& start(const std::function<void(QmpServer&)>& setup = {}) {
    server_ = std::make_unique<QmpServer>();
    if (setup) setup(*server_);
    std::string error;
    EXPECT_TRUE(server_->listen(path_, &error)) << error;
    server_->start();
    return *server_;
  }

  std::string dir_, path_;
  std::unique_ptr<QmpServer> server_;
};

TEST_F(QmpTest, GreetingNamesLayerdAndTheQemuReleaseItFollows) {
  start();
  RawClient c(path_);
  EXPECT_EQ(c.line(), kGreeting);
}

TEST_F(QmpTest, CommandsBeforeNegotiationAreRefused) {
  start();
  RawClient c(path_);
  c.line();
  const std::string expecting =
      error_line("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'");
  EXPECT_EQ(c.command(R"({"execute": "query-version"})"), expecting);
  EXPECT_EQ(c.command(R"({"execute": "no-such-command"})"), expecting);
  EXPECT_EQ(c.command(R"({"execute": "qmp_capabilities"})"), "{\"return\": {}}\r\n");
  EXPECT_EQ(c.command(R"({"execute": "query-version"})"), kVersion);
}

TEST_F(QmpTest, SecondQmpCapabilitiesIsIgnoredWithAnError) {
  start();
  RawClient c(path_);
  c.negotiate();
  EXPECT_EQ(c.command(R"({"execute": "qmp_capabilities"})"),
            error_line("CommandNotFound",
                       "Capabilities negotiation is already complete, command ignored"));
  EXPECT_EQ(c.command(R"({"execute": "query-version"})"), kVersion);
}

TEST_F(QmpTest, QmpCapabilitiesChecksWhatItIsAskedToEnable) {
  start();
  RawClient c(path_);
  c.line();
  EXPECT_EQ(c.command(R"({"execute": "qmp_capabilities", "arguments": {"enable": "oob"}})"),
            generic("Invalid parameter type for 'enable', expected: array"));
  EXPECT_EQ(c.command(R"({"execute": "qmp_capabilities", "arguments": {"enable": [1]}})"),
            generic("Invalid parameter type for 'enable[0]', expected: string"));
  EXPECT_EQ(c.command(R"({"execute": "qmp_capabilities", "arguments": {"enable": ["xx"]}})"),
            generic("Parameter 'null' does not accept value 'xx'"));
  EXPECT_EQ(c.command(R"({"execute": "qmp_capabilities", "arguments": {"foo": 1}})"),
            generic("Parameter 'foo' is unexpected"));
  // QEMU knows "oob", but we do not offer it.
  EXPECT_EQ(c.command(R"({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})"),
            generic("Capability oob not available"));
  // Still not negotiated; an empty list is fine.
  EXPECT_EQ(c.command(R"({"execute": "qmp_capabilities", "arguments": {"enable": []}})"),
            "{\"return\": {}}\r\n");
  EXPECT_EQ(c.command(R"({"execute": "query-version"})"), kVersion);
}

TEST_F(QmpTest, IdIsEchoedInEveryReplyInQemusKeyOrder) {
  start();
  RawClient c(path_);
  c.line();
  EXPECT_EQ(c.command(R"({"execute": "query-version", "id": "a"})"),
            R"({"id": "a", "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}})"
            "\r\n");
  EXPECT_EQ(c.command(R"({"id": {"n": [1, null]}, "execute": "qmp_capabilities"})"),
            "{\"return\": {}, \"id\": {\"n\": [1, null]}}\r\n");
  EXPECT_EQ(c.command(R"({"execute": "nope", "id": 7})"),
            R"({"id": 7, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}})"
            "\r\n");
  EXPECT_EQ(c.command(R"({"execute": "query-version", "id": null})"),
            kVersion.substr(0, kVersion.size() - 3) + ", \"id\": null}\r\n");
  EXPECT_EQ(c.command(R"({"x": 1, "id": 5})"),
            R"({"id": 5, "error": {"class": "GenericError", "desc": "QMP input member 'x' is unexpected"}})"
            "\r\n");
}

TEST_F(QmpTest, BadInputGetsQemusErrorAndTheConnectionGoesOn) {
  start();
  RawClient c(path_);
  c.negotiate();
  struct Case {
    const char* input;
    std::string reply;
  };
  const Case cases[] = {
      {R"([1])", generic("QMP input must be a JSON object")},
      {R"("str")", generic("QMP input must be a JSON object")},
      {R"({"x": 1})", generic("QMP input member 'x' is unexpected")},
      {R"({"exec-oob": "query-version"})", generic("QMP input member 'exec-oob' is unexpected")},
      {R"({"id": 1})", R"({"id": 1, "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}})"
                       "\r\n"},
      {R"({"execute": 1})", generic("QMP input member 'execute' must be a string")},
      {R"({"execute": "query-version", "arguments": []})",
       generic("QMP input member 'arguments' must be an object")},
      {R"({"execute": "query-version", "arguments": null})",
       generic("QMP input member 'arguments' must be an object")},
      {R"({"execute": "query-version", "arguments": {"a": 1}})",
       generic("Parameter 'a' is unexpected")},
      {R"({"execute": "no-such"})", error_line("CommandNotFound", "The command no-such has not been found")},
  };
  for (const Case& k : cases) {
    EXPECT_EQ(c.command(k.input), k.reply) << k.input;
    EXPECT_EQ(c.command(R"({"execute": "query-version"})"), kVersion) << "after " << k.input;
  }
  // Malformed JSON: one error, and the next message is read normally.
  for (const char* bad : {"{bad}", "{\"a\": 1,}", "}", "]", "tru\n", "{\"a\" 1}", "{\"s\": \"\x01\"}",
                          "{\"s\": \"\xff\"}", "{\"unterminated\n"}) {
    std::string l = c.command(bad);
    EXPECT_EQ(l.rfind(R"({"error": {"class": "GenericError", "desc": "JSON parse error, )", 0), 0u)
        << bad << " -> " << l;
    // The newline ends a pending bare word ("tru"); a '{' at the start of
    // a line starts a new message even after an unbalanced bad one.
    EXPECT_EQ(c.command("\n{\"execute\": \"query-version\"}"), kVersion) << "after " << bad;
  }
}

TEST_F(QmpTest, MessagesNeedNoNewlinesAndMaySpanReads) {
  start();
  RawClient c(path_);
  c.negotiate();
  c.send(R"({"execute": "query-version", "id": 1}{"execute": "query-version", "id": 2})");
  EXPECT_EQ(json::parse(c.line()).at("id"), 1);
  EXPECT_EQ(json::parse(c.line()).at("id"), 2);
  std::string msg = R"({"execute": "query-version", "arguments": {}, "id": "split"})";
  for (char ch : msg) {
    c.send(std::string_view(&ch, 1));
    std::this_thread::sleep_for(1ms);
  }
  EXPECT_EQ(json::parse(c.line()).at("id"), "split");
  // Pretty-printed across lines.
  EXPECT_EQ(c.command("{\n  \"execute\":\n \"query-version\"\n}\n"), kVersion);
}

TEST_F(QmpTest, SingleQuotedStringsAreAcceptedAsQemuDoes) {
  start();
  RawClient c(path_);
  c.line();
  EXPECT_EQ(c.command(R"({'execute': 'qmp_capabilities', 'id': 'it\'s "q"'})"),
            "{\"return\": {}, \"id\": \"it's \\\"q\\\"\"}\r\n");
}

QmpServer::Handler set_speed_handler() {
  return [](const json::object& args) -> json::value {
    qmp_only_arguments(args, {"device", "speed", "verbose", "label"});
    std::string device = qmp_required_string(args, "device");
    int64_t speed = qmp_optional_int(args, "speed", -1);
    bool verbose = qmp_optional_bool(args, "verbose", false);
    std::string label = qmp_optional_string(args, "label", "none");
    if (device == "missing") throw QmpError{"DeviceNotFound", "Device 'missing' not found"};
    return json::object{{"device", device}, {"speed", speed}, {"verbose", verbose}, {"label", label}};
  };
}

TEST_F(QmpTest, RegisteredCommandGetsItsArgumentsAndQemusArgumentErrors) {
  start([](QmpServer& s) {
    s.add_command("x-set-speed", set_speed_handler());
    s.add_command("x-nothing", [](const json::object&) { return json::value(); });
  });
  RawClient c(path_);
  c.negotiate();
  EXPECT_EQ(c.command(R"({"execute": "x-set-speed", "arguments": {"device": "d0", "speed": 5}, "id": 3})"),
            "{\"return\": {\"device\": \"d0\", \"speed\": 5, \"verbose\": false, \"label\": \"none\"}, "
            "\"id\": 3}\r\n");
  EXPECT_EQ(c.command(R"({"execute": "x-set-speed", "arguments": {"device": "d0", "verbose": true, "label": "l"}})"),
            "{\"return\": {\"device\": \"d0\", \"speed\": -1, \"verbose\": true, \"label\": \"l\"}}\r\n");
  EXPECT_EQ(c.command(R"({"execute": "x-set-speed"})"), generic("Parameter 'device' is missing"));
  EXPECT_EQ(c.command(R"({"execute": "x-set-speed", "arguments": {"device": 1}})"),
            generic("Invalid parameter type for 'device', expected: string"));
  for (const char* bad : {"\"a\"", "1.5", "1.0", "true", "null", "9223372036854775808"}) {
    EXPECT_EQ(c.command(std::string(R"({"execute": "x-set-speed", "arguments": {"device": "d", "speed": )") +
                        bad + "}}"),
              generic("Invalid parameter type for 'speed', expected: integer"))
        << bad;
  }
  EXPECT_EQ(c.command(R"({"execute": "x-set-speed", "arguments": {"device": "d", "verbose": 1}})"),
            generic("Invalid parameter type for 'verbose', expected: boolean"));
  EXPECT_EQ(c.command(R"({"execute": "x-set-speed", "arguments": {"device": "d", "zz": 1}})"),
            generic("Parameter 'zz' is unexpected"));
  EXPECT_EQ(c.command(R"({"execute": "x-set-speed", "arguments": {"device": "missing"}})"),
            error_line("DeviceNotFound", "Device 'missing' not found"));
  // A handler returning nothing answers {}.
  EXPECT_EQ(c.command(R"({"execute": "x-nothing"})"), "{\"return\": {}}\r\n");
}

TEST_F(QmpTest, QueryCommandsListsRegisteredAndBuiltInCommands) {
  start([](QmpServer& s) {
    s.add_command("a-first", [](const json::object&) { return json::object{}; });
    s.add_command("b-second", [](const json::object&) { return json::object{}; });
    EXPECT_THROW(s.add_command("query-version", [](const json::object&) { return json::object{}; }),
                 std::invalid_argument);
  });
  RawClient c(path_);
  c.negotiate();
  EXPECT_EQ(c.command(R"({"execute": "query-commands"})"),
            R"({"return": [{"name": "b-second"}, {"name": "a-first"}, {"name": "query-commands"}, )"
            R"({"name": "query-version"}, {"name": "qmp_capabilities"}]})"
            "\r\n");
}

TEST_F(QmpTest, ThrowingHandlerAnswersGenericErrorAndTheServerGoesOn) {
  start([](QmpServer& s) {
    s.add_command("x-boom", [](const json::object&) -> json::value {
      throw std::runtime_error("boom: it broke");
    });
    s.add_command("x-fail", [](const json::object&) -> json::value { qmp_fail("plain failure"); });
  });
  RawClient c(path_);
  c.negotiate();
  EXPECT_EQ(c.command(R"({"execute": "x-boom", "id": 1})"),
            R"({"id": 1, "error": {"class": "GenericError", "desc": "boom: it broke"}})"
            "\r\n");
  EXPECT_EQ(c.command(R"({"execute": "x-fail"})"), generic("plain failure"));
  EXPECT_EQ(c.command(R"({"execute": "query-version"})"), kVersion);
}

TEST_F(QmpTest, OutputIsAsciiJsonInQemusFormat) {
  start([](QmpServer& s) {
    s.add_command("x-echo", [](const json::object& args) { return args.at("v"); });
  });
  RawClient c(path_);
  c.negotiate();
  // Compared with qemu-storage-daemon's echo of the same values in "id".
  EXPECT_EQ(c.command("{\"execute\": \"x-echo\", \"arguments\": {\"v\": "
                      "[1.5, 0.1, 1e300, 1.0, -5, 12345678901234567890, true, false, null, {}, [], "
                      "\"\xc3\xa9\xf0\x9f\x98\x80\\u0001\\u007f/\\\"\\\\\\t\"]}}"),
            "{\"return\": [1.5, 0.10000000000000001, 1.0000000000000001e+300, 1, -5, "
            "12345678901234567890, true, false, null, {}, [], "
            "\"\\u00E9\\uD83D\\uDE00\\u0001\\u007F/\\\"\\\\\\t\"]}\r\n");
}

TEST_F(QmpTest, OversizedMessageIsRefusedAndTheRestOfItSkipped) {
  start();
  RawClient c(path_);
  c.negotiate();
  // Strings with brackets inside, so the skipping must know strings too.
  std::string big = R"({"execute": "query-version", "id": [)";
  while (big.size() <= QmpServer::kMaxMessageBytes + 1000) big += R"("}}]]{{[[", )";
  big += R"("end"]})";
  c.send(big + R"({"execute": "query-version", "id": "after"})");
  EXPECT_EQ(c.line(), generic("JSON token size limit exceeded"));
  EXPECT_EQ(json::parse(c.line()).at("id"), "after");
  // Just under the limit is fine.
  std::string fits = R"({"execute": "query-version", "id": ")";
  fits += std::string(QmpServer::kMaxMessageBytes - fits.size() - 2, 'x') + "\"}";
  ASSERT_EQ(fits.size(), QmpServer::kMaxMessageBytes);
  c.send(fits);
  EXPECT_EQ(json::parse(c.line()).at("id").as_string().size(), QmpServer::kMaxMessageBytes - 38);
}

TEST_F(QmpTest, TooDeepMessageIsRefusedAndTheRestOfItSkipped) {
  start();
  RawClient c(path_);
  c.negotiate();
  c.send(std::string(2000, '[') + std::string(2000, ']') + R"({"execute": "query-version"})");
  EXPECT_EQ(c.line(), generic("JSON nesting depth limit exceeded"));
  EXPECT_EQ(c.line(), kVersion);
  // QEMU's depth: 1024 is still fine (the id is an array of that depth - 1).
  std::string ok = R"({"execute": "query-version", "id": )" + std::string(1023, '[') +
                   std::string(1023, ']') + "}";
  c.send(ok);
  EXPECT_EQ(c.line().rfind("{\"return\": ", 0), 0u);
}

TEST_F(QmpTest, ManyClientsAtOnce) {
  std::atomic<int> calls{0};
  start([&](QmpServer& s) {
    s.add_command("x-count", [&](const json::object& args) {
      ++calls;
      return args.at("n");
    });
  });
  constexpr int kClients = 16, kCommands = 50;
  std::vector<std::thread> threads;
  std::atomic<int> good{0};
  for (int t = 0; t < kClients; ++t) {
    threads.emplace_back([&, t] {
      RawClient c(path_);
      c.negotiate();
      for (int i = 0; i < kCommands; ++i) {
        std::string n = std::to_string(t * 1000 + i);
        std::string l = c.command(R"({"execute": "x-count", "arguments": {"n": )" + n +
                                  R"(}, "id": )" + n + "}");
        if (l == "{\"return\": " + n + ", \"id\": " + n + "}\r\n") ++good;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(good.load(), kClients * kCommands);
  EXPECT_EQ(calls.load(), kClients * kCommands);
}

TEST_F(QmpTest, EventsReachOnlyNegotiatedClientsWithTimestamps) {
  QmpServer& s = start();
  RawClient ready(path_), fresh(path_);
  ready.negotiate();
  EXPECT_EQ(fresh.line(), kGreeting);
  auto before = std::chrono::system_clock::now();
  s.emit("BLOCK_JOB_READY", json::object{{"device", "job0"}, {"len", 10}});
  s.emit("RESUME", {});
  std::string l = ready.line();
  auto after = std::chrono::system_clock::now();
  json::value ev = json::parse(l);
  int64_t seconds = ev.at("timestamp").at("seconds").as_int64();
  int64_t us = ev.at("timestamp").at("microseconds").as_int64();
  auto stamp = std::chrono::system_clock::time_point(std::chrono::seconds(seconds) +
                                                     std::chrono::microseconds(us));
  EXPECT_GE(stamp, std::chrono::time_point_cast<std::chrono::microseconds>(before));
  EXPECT_LE(stamp, after);
  EXPECT_GE(us, 0);
  EXPECT_LT(us, 1000000);
  EXPECT_EQ(l, R"({"timestamp": {"seconds": )" + std::to_string(seconds) + R"(, "microseconds": )" +
                   std::to_string(us) +
                   R"(}, "event": "BLOCK_JOB_READY", "data": {"device": "job0", "len": 10}})"
                   "\r\n");
  // An event without data has no "data" member.
  json::value resume = json::parse(ready.line());
  EXPECT_EQ(resume.at("event"), "RESUME");
  EXPECT_FALSE(resume.as_object().contains("data"));
  // The client that did not negotiate got nothing.
  EXPECT_TRUE(fresh.quiet());
  // After negotiating it gets the next ones.
  EXPECT_EQ(fresh.command(R"({"execute": "qmp_capabilities"})"), "{\"return\": {}}\r\n");
  s.emit("X", json::object{{"a", 1}});
  EXPECT_EQ(json::parse(fresh.line()).at("event"), "X");
  EXPECT_EQ(json::parse(ready.line()).at("event"), "X");
}

TEST_F(QmpTest, EventEmittedByAHandlerGoesBeforeItsReply) {
  QmpServer* server = nullptr;
  start([&](QmpServer& s) {
    server = &s;
    s.add_command("x-del", [&](const json::object&) {
      server->emit("BLOCK_EXPORT_DELETED", json::object{{"id", "e0"}});
      return json::object{};
    });
  });
  RawClient c(path_);
  c.negotiate();
  c.send(R"({"execute": "x-del"})");
  EXPECT_EQ(json::parse(c.line()).at("event"), "BLOCK_EXPORT_DELETED");
  EXPECT_EQ(c.line(), "{\"return\": {}}\r\n");
}

TEST_F(QmpTest, EmitFromOtherThreadsKeepsEachThreadsOrder) {
  QmpServer& s = start();
  RawClient c(path_);
  c.negotiate();
  constexpr int kThreads = 4, kEvents = 200;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&s, t] {
      for (int i = 0; i < kEvents; ++i) s.emit("TICK", json::object{{"thread", t}, {"i", i}});
    });
  }
  for (auto& th : threads) th.join();
  std::vector<int> next(kThreads, 0);
  for (int n = 0; n < kThreads * kEvents; ++n) {
    std::string l = c.line();
    ASSERT_FALSE(l.empty()) << "after " << n << " events";
    json::value ev = json::parse(l);
    int t = int(ev.at("data").at("thread").as_int64());
    EXPECT_EQ(ev.at("data").at("i").as_int64(), next[t]++);
  }
  EXPECT_TRUE(c.quiet());
}

TEST_F(QmpTest, ClientThatDoesNotReadIsCutOffWithoutBlockingEmit) {
  QmpServer& s = start();
  RawClient slow(path_), reader(path_);
  slow.negotiate();
  EXPECT_EQ(reader.line(), kGreeting);  // not negotiated: gets no events
  const std::string payload(100 * 1024, 'e');
  constexpr int kEvents = 250;  // 25 MiB, past the 16 MiB queue limit
  // An emit that waited on the socket would wait for a reader that never
  // comes (`slow` reads only afterwards): the bound only has to tell that
  // from formatting 25 MiB of JSON on a loaded machine under ASan, which
  // took up to 6 s of the old 40 MiB.
  auto emitting = std::async(std::launch::async, [&] {
    for (int i = 0; i < kEvents; ++i) s.emit("BIG", json::object{{"payload", payload}});
  });
  EXPECT_EQ(emitting.wait_for(120s), std::future_status::ready) << "emit blocked on the socket";
  size_t got = 0;
  EXPECT_TRUE(slow.read_to_eof(30s, &got));
  EXPECT_LT(got, size_t(kEvents) * payload.size());
  EXPECT_EQ(reader.command(R"({"execute": "qmp_capabilities"})"), "{\"return\": {}}\r\n");
  EXPECT_EQ(reader.command(R"({"execute": "query-version"})"), kVersion);
}

TEST_F(QmpTest, ClientLeavingDuringItsCommandLosesOnlyTheReply) {
  std::atomic<bool> finished{false};
  start([&](QmpServer& s) {
    s.add_command("x-slow", [&](const json::object&) {
      std::this_thread::sleep_for(200ms);
      finished = true;
      return json::object{{"big", std::string(1 << 16, 'x')}};
    });
  });
  {
    RawClient c(path_);
    c.negotiate();
    c.send(R"({"execute": "x-slow"})");
    std::this_thread::sleep_for(50ms);
  }
  RawClient other(path_);
  other.negotiate();
  EXPECT_EQ(other.command(R"({"execute": "query-version"})"), kVersion);
  EXPECT_TRUE(finished.load());
}

TEST_F(QmpTest, StopClosesClientsAndRemovesTheSocketFile) {
  QmpServer& s = start();
  RawClient c(path_);
  c.negotiate();
  ASSERT_TRUE(fs::exists(path_));
  s.stop();
  EXPECT_FALSE(fs::exists(path_));
  EXPECT_TRUE(c.read_to_eof(5s));
  s.stop();  // idempotent
  s.emit("AFTER", {});  // goes nowhere
}

TEST_F(QmpTest, StopFromAHandlerClosesEverythingAndALaterStopJoins) {
  QmpServer* server = nullptr;
  start([&](QmpServer& s) {
    server = &s;
    s.add_command("quit", [&](const json::object&) {
      server->stop();
      return json::object{};
    });
  });
  RawClient c(path_), other(path_);
  c.negotiate();
  c.send(R"({"execute": "quit"})");
  EXPECT_TRUE(c.read_to_eof(5s));
  EXPECT_TRUE(other.read_to_eof(5s));
  server_->stop();
  EXPECT_FALSE(fs::exists(path_));
}

TEST_F(QmpTest, StaleSocketFileIsReplaced) {
  // A socket file nobody listens on, as a killed server leaves it.
  int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  std::strncpy(sun.sun_path, path_.c_str(), sizeof sun.sun_path - 1);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&sun), sizeof sun), 0);
  ::close(fd);
  ASSERT_TRUE(fs::is_socket(path_));
  start();
  RawClient c(path_);
  EXPECT_EQ(c.line(), kGreeting);
}

TEST_F(QmpTest, SocketALiveServerListensOnIsRefused) {
  start();
  QmpServer second;
  std::string error;
  EXPECT_FALSE(second.listen(path_, &error));
  EXPECT_NE(error.find("in use"), std::string::npos) << error;
  second.stop();
  // The first server's socket is untouched.
  RawClient c(path_);
  EXPECT_EQ(c.line(), kGreeting);
}

TEST_F(QmpTest, NonSocketFileIsRefusedAndLeftAlone) {
  { std::ofstream(path_) << "keep me"; }
  QmpServer s;
  std::string error;
  EXPECT_FALSE(s.listen(path_, &error));
  EXPECT_NE(error.find("not a socket"), std::string::npos) << error;
  s.stop();
  std::ifstream in(path_);
  std::string content;
  std::getline(in, content);
  EXPECT_EQ(content, "keep me");
}

TEST_F(QmpTest, AdoptedListeningSocketIsServed) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un sun{};
  sun.sun_family = AF_UNIX;
  std::strncpy(sun.sun_path, path_.c_str(), sizeof sun.sun_path - 1);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&sun), sizeof sun), 0);
  std::string error;
  QmpServer s;
  EXPECT_FALSE(s.adopt(fd, &error));  // not listening yet
  ASSERT_EQ(::listen(fd, 4), 0);
  ASSERT_TRUE(s.adopt(fd, &error)) << error;
  s.start();
  {
    RawClient c(path_);
    EXPECT_EQ(c.line(), kGreeting);
  }
  s.stop();
  EXPECT_TRUE(fs::exists(path_));  // not ours to remove
}

// Where qemu's Python QMP package (qemu.qmp) is: "PYTHONPATH=DIR " for
// the qemu source that scripts/qemu-iotests unpacks (into
// $LAYERD_IOTESTS_CACHE or /var/cache/layerd-iotests), "" for an installed
// package, nullopt (and *where says where it looked) if neither. ctest runs
// these tests once more as server_qmp_python_test, after
// `scripts/qemu-iotests --fetch-only` filled the cache (tests/CMakeLists.txt).
std::optional<std::string> qemu_python_env(std::string* where) {
  const char* cache_env = std::getenv("LAYERD_IOTESTS_CACHE");
  std::string cache = cache_env && *cache_env ? cache_env : "/var/cache/layerd-iotests";
  std::string pythonpath = cache + "/qemu/python";
  *where = pythonpath;
  if (fs::exists(pythonpath + "/qemu/qmp/legacy.py")) return "PYTHONPATH=" + pythonpath + " ";
  if (std::system("python3 -c 'import qemu.qmp.legacy' >/dev/null 2>&1") == 0) return "";
  return std::nullopt;
}

// qemu's own Python QMP client (qemu.qmp), from the qemu source that
// scripts/qemu-iotests unpacks or from an installed package.
TEST_F(QmpTest, QemusPythonClientTalksToUs) {
  std::string where;
  std::optional<std::string> env = qemu_python_env(&where);
  if (!env) GTEST_SKIP() << "qemu.qmp not found (neither in " << where << " nor installed)";
  QmpServer& s = start([](QmpServer& srv) {
    srv.add_command("x-set-speed", set_speed_handler());
  });
  std::string script = dir_ + "/client.py";
  {
    std::ofstream out(script);
    out << R"(import sys
from qemu.qmp.legacy import QEMUMonitorProtocol
q = QEMUMonitorProtocol(sys.argv[1])
greeting = q.connect(negotiate=True)
assert greeting['QMP']['version']['package'].startswith('layerd '), greeting
v = q.cmd('query-version')
assert v['return']['qemu']['major'] == 7, v
r = q.cmd('x-set-speed', {'device': 'd0', 'speed': 9})
assert r['return']['speed'] == 9, r
e = q.cmd('x-set-speed', {})
assert e['error']['desc'] == "Parameter 'device' is missing", e
names = [c['name'] for c in q.cmd('query-commands')['return']]
assert 'x-set-speed' in names, names
open(sys.argv[2], 'w').write('ready')
ev = q.pull_event(wait=10.0)
assert ev['event'] == 'JOB_DONE' and ev['data']['id'] == 'j', ev
assert 'seconds' in ev['timestamp'], ev
q.close()
print('ok')
)";
  }
  std::string ready = dir_ + "/ready";
  std::thread emitter([&] {
    auto deadline = Clock::now() + 20s;
    while (!fs::exists(ready) && Clock::now() < deadline) std::this_thread::sleep_for(10ms);
    s.emit("JOB_DONE", json::object{{"id", "j"}});
  });
  int rc = std::system((*env + "python3 " + script + " " + path_ + " " + ready).c_str());
  emitter.join();
  EXPECT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 0) << "python client failed: " << rc;
}

// qemu's Python QMP clients, the synchronous one and the asyncio one, run
// a snapshot, a stream and an active commit with its pivot on a layerd
// process ($LAYERD_BIN, which ctest sets), following the jobs by their
// events (tests/server/qmp_python_live.py says what it checks).
TEST_F(QmpTest, QemusPythonClientRunsLiveJobsOnLayerd) {
  const char* layerd = std::getenv("LAYERD_BIN");
  if (!layerd || !*layerd) GTEST_SKIP() << "LAYERD_BIN is not set";
  if (fs::path(layerd).filename() == "qemu-nbd") GTEST_SKIP() << "layerd's control socket";
  std::string where;
  std::optional<std::string> env = qemu_python_env(&where);
  if (!env) GTEST_SKIP() << "qemu.qmp not found (neither in " << where << " nor installed)";
  const fs::path script = fs::path(__FILE__).parent_path() / "qmp_python_live.py";
  ASSERT_TRUE(fs::exists(script)) << script;
  const std::string out = dir_ + "/python.out";
  const std::string command = *env + "timeout 120 python3 " + script.string() + " " + layerd +
                              " " + dir_ + " >" + out + " 2>&1";
  int rc = std::system(command.c_str());
  std::ifstream in(out);
  std::string output((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 0) << "python client failed (" << rc << "):\n"
                                                     << output;
  EXPECT_EQ(output, "ok\n");
}

}  // namespace
}  // namespace layerd
