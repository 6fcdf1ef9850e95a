#include "server/list_client.h"

#include <netdb.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <vector>

#include <fmt/format.h>

#include "nbd/codec.h"
#include "nbd/protocol.h"

namespace layerd {
namespace {

struct ListError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Client {
 public:
  explicit Client(int fd) : fd_(fd) {}
  ~Client() { ::close(fd_); }

  void read_exact(void* p, size_t n) {
    auto* b = static_cast<char*>(p);
    while (n > 0) {
      ssize_t r = ::recv(fd_, b, n, 0);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) throw ListError("server closed the connection");
      b += r;
      n -= static_cast<size_t>(r);
    }
  }
  void write_all(const std::vector<std::byte>& v) {
    const std::byte* p = v.data();
    size_t n = v.size();
    while (n > 0) {
      ssize_t w = ::send(fd_, p, n, MSG_NOSIGNAL);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) throw ListError("cannot send to server");
      p += w;
      n -= static_cast<size_t>(w);
    }
  }
  uint16_t read16() {
    std::byte b[2];
    read_exact(b, 2);
    return nbd::get_be16(b);
  }
  uint32_t read32() {
    std::byte b[4];
    read_exact(b, 4);
    return nbd::get_be32(b);
  }
  uint64_t read64() {
    std::byte b[8];
    read_exact(b, 8);
    return nbd::get_be64(b);
  }

  void send_option(nbd::Opt opt, const std::vector<std::byte>& payload) {
    std::vector<std::byte> m(16);
    nbd::put_be64(m.data(), nbd::kIHaveOpt);
    nbd::put_be32(m.data() + 8, static_cast<uint32_t>(opt));
    nbd::put_be32(m.data() + 12, static_cast<uint32_t>(payload.size()));
    m.insert(m.end(), payload.begin(), payload.end());
    write_all(m);
  }

  struct Reply {
    uint32_t type;
    std::vector<std::byte> data;
  };
  Reply read_reply(nbd::Opt expected) {
    if (read64() != nbd::kOptReplyMagic) throw ListError("bad option reply magic");
    if (read32() != static_cast<uint32_t>(expected))
      throw ListError("option reply for the wrong option");
    Reply r;
    r.type = read32();
    uint32_t len = read32();
    if (len > 16u << 20) throw ListError("option reply too large");
    r.data.resize(len);
    read_exact(r.data.data(), len);
    return r;
  }

 private:
  int fd_;
};

int connect_to(const ServerOptions& o) {
  if (!o.socket_path.empty()) {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (o.socket_path.size() >= sizeof(addr.sun_path))
      throw ListError(fmt::format("socket path '{}' is too long", o.socket_path));
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) throw ListError(fmt::format("socket: {}", std::strerror(errno)));
    std::memcpy(addr.sun_path, o.socket_path.c_str(), o.socket_path.size() + 1);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      std::string e = std::strerror(errno);
      ::close(fd);
      throw ListError(fmt::format("cannot connect to '{}': {}", o.socket_path, e));
    }
    return fd;
  }
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  std::string port = std::to_string(o.port);
  if (int rc = ::getaddrinfo(o.bind_address.c_str(), port.c_str(), &hints, &res))
    throw ListError(fmt::format("cannot resolve '{}': {}", o.bind_address,
                                ::gai_strerror(rc)));
  std::string last = "no address";
  for (addrinfo* ai = res; ai; ai = ai->ai_next) {
    int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      last = std::strerror(errno);
      continue;
    }
    if (::connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
      ::freeaddrinfo(res);
      return fd;
    }
    last = std::strerror(errno);
    ::close(fd);
  }
  ::freeaddrinfo(res);
  throw ListError(fmt::format("cannot connect to {}:{}: {}", o.bind_address, o.port, last));
}

std::vector<std::byte> name_payload(const std::string& name) {
  std::vector<std::byte> p(4 + name.size());
  nbd::put_be32(p.data(), static_cast<uint32_t>(name.size()));
  std::memcpy(p.data() + 4, name.data(), name.size());
  return p;
}

std::string flag_names(uint16_t flags) {
  static const char* const kNames[] = {"readonly", "flush", "fua", "rotational",
                                       "trim", "zeroes", "df", "multi",
                                       "resize", "cache", "fast-zero"};
  std::string s;
  for (int bit = 1; bit <= 11; ++bit)
    if (flags & (1u << bit)) s += fmt::format("{} ", kNames[bit - 1]);
  return s;
}

struct ExportDetails {
  std::string name, description;
  uint64_t size = 0;
  uint16_t flags = 0;
  uint32_t min_block = 0, opt_block = 0, max_block = 0;
  std::vector<std::string> contexts;
};

void query_export(Client& c, ExportDetails& d) {
  // NBD_OPT_INFO with NAME, DESCRIPTION and BLOCK_SIZE requested.
  auto p = name_payload(d.name);
  const uint16_t wanted[] = {static_cast<uint16_t>(nbd::Info::Name),
                             static_cast<uint16_t>(nbd::Info::Description),
                             static_cast<uint16_t>(nbd::Info::BlockSize)};
  p.resize(p.size() + 2 + 2 * std::size(wanted));
  std::byte* q = p.data() + 4 + d.name.size();
  nbd::put_be16(q, std::size(wanted));
  for (size_t i = 0; i < std::size(wanted); ++i) nbd::put_be16(q + 2 + 2 * i, wanted[i]);
  c.send_option(nbd::Opt::Info, p);
  for (;;) {
    auto r = c.read_reply(nbd::Opt::Info);
    if (r.type == static_cast<uint32_t>(nbd::Rep::Ack)) break;
    if (r.type & nbd::kRepErrBit)
      throw ListError(fmt::format("server refused NBD_OPT_INFO for '{}'", d.name));
    if (r.type != static_cast<uint32_t>(nbd::Rep::Info) || r.data.size() < 2) continue;
    auto kind = static_cast<nbd::Info>(nbd::get_be16(r.data.data()));
    const std::byte* b = r.data.data() + 2;
    size_t n = r.data.size() - 2;
    if (kind == nbd::Info::Export && n == 10) {
      d.size = nbd::get_be64(b);
      d.flags = nbd::get_be16(b + 8);
    } else if (kind == nbd::Info::Description) {
      d.description.assign(reinterpret_cast<const char*>(b), n);
    } else if (kind == nbd::Info::BlockSize && n == 12) {
      d.min_block = nbd::get_be32(b);
      d.opt_block = nbd::get_be32(b + 4);
      d.max_block = nbd::get_be32(b + 8);
    }
  }
  // NBD_OPT_LIST_META_CONTEXT with no queries: every context.
  p = name_payload(d.name);
  p.resize(p.size() + 4);  // zero queries
  c.send_option(nbd::Opt::ListMetaContext, p);
  for (;;) {
    auto r = c.read_reply(nbd::Opt::ListMetaContext);
    if (r.type != static_cast<uint32_t>(nbd::Rep::MetaContext)) break;
    if (r.data.size() >= 4)
      d.contexts.emplace_back(reinterpret_cast<const char*>(r.data.data() + 4),
                              r.data.size() - 4);
  }
}

}  // namespace

int list_exports_of_server(const ServerOptions& o) {
  try {
    Client c(connect_to(o));
    if (c.read64() != nbd::kNbdMagic || c.read64() != nbd::kIHaveOpt)
      throw ListError("not an NBD newstyle server");
    uint16_t server_flags = c.read16();
    if (!(server_flags & nbd::kFlagFixedNewstyle))
      throw ListError("server does not support fixed newstyle");
    std::vector<std::byte> flags(4);
    nbd::put_be32(flags.data(), nbd::kClientFlagFixedNewstyle |
                                    (server_flags & nbd::kFlagNoZeroes
                                         ? nbd::kClientFlagNoZeroes : 0));
    c.write_all(flags);

    c.send_option(nbd::Opt::StructuredReply, {});
    c.read_reply(nbd::Opt::StructuredReply);

    std::vector<ExportDetails> exports;
    c.send_option(nbd::Opt::List, {});
    for (;;) {
      auto r = c.read_reply(nbd::Opt::List);
      if (r.type == static_cast<uint32_t>(nbd::Rep::Ack)) break;
      if (r.type != static_cast<uint32_t>(nbd::Rep::Server))
        throw ListError("server refused to list its exports");
      if (r.data.size() < 4) throw ListError("malformed NBD_REP_SERVER");
      uint32_t len = nbd::get_be32(r.data.data());
      if (len > r.data.size() - 4) throw ListError("malformed NBD_REP_SERVER");
      ExportDetails d;
      d.name.assign(reinterpret_cast<const char*>(r.data.data() + 4), len);
      exports.push_back(std::move(d));
    }
    for (auto& d : exports) query_export(c, d);
    c.send_option(nbd::Opt::Abort, {});

    fmt::print("exports available: {}\n", exports.size());
    for (const auto& d : exports) {
      fmt::print(" export: '{}'\n", d.name);
      if (!d.description.empty()) fmt::print("  description: {}\n", d.description);
      fmt::print("  size:  {}\n", d.size);
      fmt::print("  flags: {:#x} ( {})\n", d.flags, flag_names(d.flags));
      if (d.min_block) {
        fmt::print("  min block: {}\n", d.min_block);
        fmt::print("  opt block: {}\n", d.opt_block);
        fmt::print("  max block: {}\n", d.max_block);
      }
      fmt::print("  available meta contexts: {}\n", d.contexts.size());
      for (const auto& c2 : d.contexts) fmt::print("   {}\n", c2);
    }
    return 0;
  } catch (const ListError& e) {
    fmt::print(stderr, "layerd: {}\n", e.what());
    return 1;
  }
}

}  // namespace layerd
