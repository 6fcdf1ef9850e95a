#include "server/layerctl/qmp_client.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <fmt/format.h>

namespace layerd::ctl {

namespace json = boost::json;
using Clock = std::chrono::steady_clock;

namespace {

std::string errno_text() { return std::strerror(errno); }

}  // namespace

QmpClient::QmpClient(const std::string& path, std::chrono::milliseconds timeout)
    : timeout_(timeout) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path))
    throw QmpConnectionError(fmt::format("QMP socket path too long: {}", path));
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd_ < 0) throw QmpConnectionError(fmt::format("socket: {}", errno_text()));
  if (::connect(fd_, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    std::string why = errno_text();
    ::close(fd_);
    fd_ = -1;
    throw QmpConnectionError(
        fmt::format("Failed to connect to QMP socket {}: {}", path, why));
  }
  // QEMU's monitors serve one client at a time and leave the others
  // waiting, connected but unanswered: do not wait long for a greeting.
  auto greeting = read_message(std::min(timeout_, std::chrono::milliseconds(5000)));
  if (!greeting)
    throw QmpConnectionError(fmt::format(
        "No QMP greeting on {} within 5 s (is another client using the monitor?)", path));
  if (!greeting->contains("QMP"))
    throw QmpConnectionError(
        fmt::format("Not a QMP greeting: {}", json::serialize(*greeting)));
  greeting_ = std::move(*greeting);
  execute("qmp_capabilities");
}

QmpClient::~QmpClient() {
  if (fd_ >= 0) ::close(fd_);
}

json::value QmpClient::execute(std::string_view command,
                               const json::object& arguments) {
  uint64_t id = next_id_++;
  json::object msg;
  msg["execute"] = command;
  if (!arguments.empty()) msg["arguments"] = arguments;
  msg["id"] = id;
  std::string text = json::serialize(msg) + "\r\n";
  for (size_t done = 0; done < text.size();) {
    ssize_t n = ::send(fd_, text.data() + done, text.size() - done, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0)
      throw QmpConnectionError(fmt::format("QMP connection broken: {}", errno_text()));
    done += static_cast<size_t>(n);
  }
  for (;;) {
    auto reply = read_message(timeout_);
    if (!reply)
      throw QmpConnectionError(fmt::format("No reply to {} from the server", command));
    if (reply->contains("event")) {
      events_.push_back(std::move(*reply));
      continue;
    }
    const json::value* rid = reply->if_contains("id");
    // A reply without our id (a server that does not echo ids, or an
    // error about a message it could not parse) is taken as ours: QMP
    // answers commands in order and we have one in flight.
    if (rid && !(rid->is_uint64() && rid->get_uint64() == id) &&
        !(rid->is_int64() && rid->get_int64() == static_cast<int64_t>(id)))
      continue;
    if (const json::value* ret = reply->if_contains("return")) return *ret;
    if (const json::value* err = reply->if_contains("error"); err && err->is_object()) {
      const json::object& e = err->get_object();
      auto str = [&](const char* key) -> std::string {
        const json::value* v = e.if_contains(key);
        return v && v->is_string() ? std::string(v->get_string()) : std::string();
      };
      throw QmpError(str("class"), str("desc"));
    }
    throw QmpConnectionError(
        fmt::format("Unexpected QMP message: {}", json::serialize(*reply)));
  }
}

std::optional<json::object> QmpClient::next_event(std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  for (;;) {
    if (!events_.empty()) {
      json::object e = std::move(events_.front());
      events_.pop_front();
      return e;
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - Clock::now());
    if (left.count() < 0) left = std::chrono::milliseconds(0);
    auto msg = read_message(left);
    if (!msg) return std::nullopt;
    if (msg->contains("event")) return msg;
    // A stray reply (nothing is in flight): ignore it.
  }
}

std::optional<json::object> QmpClient::read_message(std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  for (;;) {
    // Feed what we have; the stream parser stops at the end of one value.
    while (!pending_.empty()) {
      boost::system::error_code ec;
      size_t used = parser_.write_some(pending_.data(), pending_.size(), ec);
      if (ec)
        throw QmpConnectionError(fmt::format("Bad JSON from the QMP server: {}",
                                             ec.message()));
      pending_.erase(0, used);
      if (parser_.done()) {
        json::value v = parser_.release();
        parser_.reset();
        if (!v.is_object())
          throw QmpConnectionError(
              fmt::format("Unexpected QMP message: {}", json::serialize(v)));
        return std::move(v.get_object());
      }
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - Clock::now());
    if (left.count() < 0) left = std::chrono::milliseconds(0);
    pollfd p{fd_, POLLIN, 0};
    int r = ::poll(&p, 1, static_cast<int>(left.count()));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw QmpConnectionError(fmt::format("poll: {}", errno_text()));
    if (r == 0) return std::nullopt;
    char buf[65536];
    ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0)
      throw QmpConnectionError(fmt::format("QMP connection broken: {}", errno_text()));
    if (n == 0) throw QmpConnectionError("QMP connection closed by the server");
    pending_.append(buf, static_cast<size_t>(n));
  }
}

}  // namespace layerd::ctl
