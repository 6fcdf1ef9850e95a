#include "server/access_list.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <charconv>
#include <cstring>

#include <fmt/format.h>

namespace layerd {
namespace {

constexpr unsigned kMappedPrefix = 96;  // ::ffff:0:0/96 holds IPv4

std::array<uint8_t, 16> mapped(const in_addr& a) {
  std::array<uint8_t, 16> out{};
  out[10] = out[11] = 0xff;
  std::memcpy(out.data() + 12, &a, 4);
  return out;
}

bool prefix_matches(const std::array<uint8_t, 16>& a,
                    const std::array<uint8_t, 16>& b, unsigned prefix) {
  const unsigned whole = prefix / 8;
  if (std::memcmp(a.data(), b.data(), whole) != 0) return false;
  if (prefix % 8 == 0) return true;
  const uint8_t mask = static_cast<uint8_t>(0xff << (8 - prefix % 8));
  return (a[whole] & mask) == (b[whole] & mask);
}

}  // namespace

std::optional<AccessRule> parse_access_rule(std::string_view text, bool allow,
                                            std::string* error) {
  const char* option = allow ? "--allow" : "--deny";
  auto bad = [&](std::string_view why) -> std::optional<AccessRule> {
    *error = fmt::format("invalid {} '{}': {}", option, text, why);
    return std::nullopt;
  };
  std::string address(text.substr(0, text.find('/')));
  AccessRule rule;
  rule.allow = allow;
  unsigned max_prefix = 128;
  in_addr v4{};
  in6_addr v6{};
  if (::inet_pton(AF_INET, address.c_str(), &v4) == 1) {
    rule.address = mapped(v4);
    max_prefix = 32;
  } else if (::inet_pton(AF_INET6, address.c_str(), &v6) == 1) {
    std::memcpy(rule.address.data(), &v6, 16);
  } else {
    return bad("not a numeric IPv4 or IPv6 address (ADDRESS or ADDRESS/PREFIX)");
  }
  unsigned prefix = max_prefix;
  if (auto slash = text.find('/'); slash != std::string_view::npos) {
    std::string_view p = text.substr(slash + 1);
    auto [end, ec] = std::from_chars(p.data(), p.data() + p.size(), prefix);
    if (p.empty() || ec != std::errc{} || end != p.data() + p.size() ||
        prefix > max_prefix)
      return bad(fmt::format("the prefix length must be 0 to {}", max_prefix));
  }
  rule.prefix = max_prefix == 32 ? kMappedPrefix + prefix : prefix;
  // Host bits are ignored, as in 10.1.2.3/8 meaning 10.0.0.0/8.
  for (unsigned bit = rule.prefix; bit < 128; ++bit)
    rule.address[bit / 8] &= static_cast<uint8_t>(~(0x80 >> (bit % 8)));
  return rule;
}

bool AccessList::allows(const std::array<uint8_t, 16>& address) const {
  const AccessRule* best = nullptr;
  bool any_allow = false;
  for (const AccessRule& r : rules_) {
    any_allow |= r.allow;
    if (!prefix_matches(r.address, address, r.prefix)) continue;
    if (!best || r.prefix > best->prefix ||
        (r.prefix == best->prefix && !r.allow))
      best = &r;
  }
  return best ? best->allow : !any_allow;
}

bool AccessList::allows(const sockaddr* peer) const {
  if (peer->sa_family == AF_INET)
    return allows(mapped(reinterpret_cast<const sockaddr_in*>(peer)->sin_addr));
  if (peer->sa_family == AF_INET6) {
    std::array<uint8_t, 16> a;
    std::memcpy(a.data(), &reinterpret_cast<const sockaddr_in6*>(peer)->sin6_addr, 16);
    return allows(a);
  }
  return true;
}

}  // namespace layerd
