// --allow / --deny: which TCP clients may connect, by address.
//
// Every rule is an address block (CIDR). IPv4 and IPv6 live in one space:
// an IPv4 address is kept as its IPv4-mapped IPv6 form (::ffff:a.b.c.d),
// so a rule for 10.0.0.0/8 also matches a client that reached a dual-stack
// IPv6 socket from 10.1.2.3, and a rule written as ::ffff:10.0.0.0/104 is
// the same rule.
//
// The most specific rule that matches a client decides (the longest
// prefix; --deny wins a tie). A client no rule matches is let in only if
// no --allow was given: --deny alone lists who is kept out, --allow lists
// the only ones let in. Pure: no I/O, safe to use from any thread once
// built.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

struct sockaddr;

namespace layerd {

struct AccessRule {
  std::array<uint8_t, 16> address{};  // IPv6, IPv4 mapped; bits past prefix 0
  unsigned prefix = 128;              // significant leading bits
  bool allow = true;
  bool operator==(const AccessRule&) const = default;
};

// Parses "ADDRESS[/PREFIX]" (IPv4 or IPv6, numeric; without a prefix, the
// one address). Returns nullopt and sets `error` if it is not one.
std::optional<AccessRule> parse_access_rule(std::string_view text, bool allow,
                                            std::string* error);

class AccessList {
 public:
  AccessList() = default;
  explicit AccessList(std::vector<AccessRule> rules) : rules_(std::move(rules)) {}

  bool empty() const { return rules_.empty(); }
  // Whether a client at `address` (16 bytes, IPv4 mapped) may connect.
  bool allows(const std::array<uint8_t, 16>& address) const;
  // The same for a socket address; families other than AF_INET and
  // AF_INET6 (Unix sockets) are not subject to the list.
  bool allows(const sockaddr* peer) const;

 private:
  std::vector<AccessRule> rules_;
};

}  // namespace layerd
