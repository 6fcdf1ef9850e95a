// Admission without a server process: AccessList (--allow/--deny) matching
// and ClientSlots (-e and --max-handshakes).

#include <arpa/inet.h>
#include <netinet/in.h>

#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "server/access_list.h"
#include "server/client_slots.h"

namespace layerd {
namespace {

AccessList list_of(const std::vector<std::pair<std::string, bool>>& rules) {
  std::vector<AccessRule> out;
  for (const auto& [text, allow] : rules) {
    std::string error;
    auto r = parse_access_rule(text, allow, &error);
    EXPECT_TRUE(r) << text << ": " << error;
    if (r) out.push_back(*r);
  }
  return AccessList(std::move(out));
}

bool allows(const AccessList& l, const std::string& address) {
  sockaddr_in in{};
  sockaddr_in6 in6{};
  if (::inet_pton(AF_INET, address.c_str(), &in.sin_addr) == 1) {
    in.sin_family = AF_INET;
    return l.allows(reinterpret_cast<sockaddr*>(&in));
  }
  EXPECT_EQ(::inet_pton(AF_INET6, address.c_str(), &in6.sin6_addr), 1) << address;
  in6.sin6_family = AF_INET6;
  return l.allows(reinterpret_cast<sockaddr*>(&in6));
}

TEST(AccessList, WithoutRulesEveryoneIsAllowed) {
  EXPECT_TRUE(allows(AccessList(), "192.0.2.1"));
  EXPECT_TRUE(allows(AccessList(), "2001:db8::1"));
}

TEST(AccessList, DenyAloneKeepsOutOnlyWhatItNames) {
  auto l = list_of({{"192.0.2.0/24", false}});
  EXPECT_FALSE(allows(l, "192.0.2.200"));
  EXPECT_TRUE(allows(l, "192.0.3.1"));
  EXPECT_TRUE(allows(l, "2001:db8::1"));
}

TEST(AccessList, AllowLetsInOnlyWhatItNames) {
  auto l = list_of({{"10.0.0.0/8", true}, {"2001:db8::/32", true}});
  EXPECT_TRUE(allows(l, "10.255.0.1"));
  EXPECT_FALSE(allows(l, "11.0.0.1"));
  EXPECT_TRUE(allows(l, "2001:db8:1::5"));
  EXPECT_FALSE(allows(l, "2001:db9::1"));
}

TEST(AccessList, TheLongestPrefixDecidesAndDenyWinsATie) {
  auto l = list_of({{"10.0.0.0/8", true}, {"10.1.0.0/16", false}, {"10.1.2.3", true},
                    {"10.9.0.0/16", true}, {"10.9.0.0/16", false}});
  EXPECT_TRUE(allows(l, "10.2.0.1"));
  EXPECT_FALSE(allows(l, "10.1.2.4"));
  EXPECT_TRUE(allows(l, "10.1.2.3"));
  EXPECT_FALSE(allows(l, "10.9.1.1"));
}

TEST(AccessList, Ipv4MappedAddressesMatchIpv4Rules) {
  auto l = list_of({{"127.0.0.0/8", true}});
  EXPECT_TRUE(allows(l, "::ffff:127.0.0.1"));
  EXPECT_FALSE(allows(l, "::ffff:128.0.0.1"));
  EXPECT_FALSE(allows(l, "::1"));
  auto mapped_rule = list_of({{"::ffff:192.0.2.0/120", false}});
  EXPECT_FALSE(allows(mapped_rule, "192.0.2.9"));
  EXPECT_TRUE(allows(mapped_rule, "192.0.3.9"));
}

TEST(AccessList, ZeroPrefixesMatchTheirWholeFamily) {
  auto v4 = list_of({{"0.0.0.0/0", false}});
  EXPECT_FALSE(allows(v4, "203.0.113.7"));
  EXPECT_TRUE(allows(v4, "2001:db8::1"));
  auto all = list_of({{"::/0", false}});
  EXPECT_FALSE(allows(all, "203.0.113.7"));
  EXPECT_FALSE(allows(all, "2001:db8::1"));
}

TEST(AccessList, HostBitsOfARuleAreIgnored) {
  auto l = list_of({{"10.1.2.3/8", false}});
  EXPECT_FALSE(allows(l, "10.200.0.1"));
}

TEST(AccessList, UnixSocketClientsAreNotSubjectToTheList) {
  auto l = list_of({{"::/0", false}});
  sockaddr un{};
  un.sa_family = AF_UNIX;
  EXPECT_TRUE(l.allows(&un));
}

TEST(AccessList, MalformedRulesAreRefusedWithAMessage) {
  for (const char* text : {"", "example.com", "10.0.0.0/33", "10.0.0.0/", "10.0.0.0/-1",
                           "::1/129", "10.0.0.0/8x", "1.2.3.4.5", "[::1]"}) {
    std::string error;
    EXPECT_FALSE(parse_access_rule(text, true, &error)) << text;
    EXPECT_NE(error.find("--allow"), std::string::npos) << error;
  }
}

TEST(ClientSlots, FinishedHandshakesTakeSlotsUpToTheLimitThenWaitInOrder) {
  ClientSlots slots(1, 10);
  std::vector<int> granted;
  auto a = slots.start_negotiating([] {});
  auto b = slots.start_negotiating([] {});
  auto c = slots.start_negotiating([] {});
  EXPECT_TRUE(slots.request_slot(b, [] {}));
  EXPECT_FALSE(slots.request_slot(c, [&] { granted.push_back(3); }));
  EXPECT_FALSE(slots.request_slot(a, [&] { granted.push_back(1); }));
  slots.leave(b);
  EXPECT_EQ(granted, std::vector<int>{3}) << "the first to finish its handshake goes first";
  slots.leave(c);
  EXPECT_EQ(granted, (std::vector<int>{3, 1}));
  EXPECT_EQ(slots.served(), 1u);
  EXPECT_EQ(slots.negotiating(), 0u);
}

TEST(ClientSlots, NegotiatingConnectionsHoldNoSlot) {
  ClientSlots slots(1, 100);
  for (int i = 0; i < 50; ++i) slots.start_negotiating([] {});
  auto good = slots.start_negotiating([] {});
  EXPECT_TRUE(slots.request_slot(good, [] {}));
}

TEST(ClientSlots, BeyondTheBoundTheOldestStillNegotiatingIsDropped) {
  ClientSlots slots(1, 3);
  std::vector<int> dropped;
  auto served = slots.start_negotiating([&] { dropped.push_back(0); });
  ASSERT_TRUE(slots.request_slot(served, [] {}));
  auto waiting = slots.start_negotiating([&] { dropped.push_back(1); });
  EXPECT_FALSE(slots.request_slot(waiting, [] {}));
  slots.start_negotiating([&] { dropped.push_back(2); });
  slots.start_negotiating([&] { dropped.push_back(3); });
  EXPECT_TRUE(dropped.empty());
  slots.start_negotiating([&] { dropped.push_back(4); });
  EXPECT_EQ(dropped, std::vector<int>{2}) << "not the one waiting for a slot";
  slots.start_negotiating([&] { dropped.push_back(5); });
  slots.start_negotiating([&] { dropped.push_back(6); });
  EXPECT_EQ(dropped, (std::vector<int>{2, 3, 4}));
  EXPECT_EQ(slots.negotiating(), 3u);
}

TEST(ClientSlots, WhenAllWaitForASlotTheOldestWaitingIsDropped) {
  ClientSlots slots(1, 2);
  std::vector<int> dropped;
  auto served = slots.start_negotiating([] {});
  ASSERT_TRUE(slots.request_slot(served, [] {}));
  auto w1 = slots.start_negotiating([&] { dropped.push_back(1); });
  auto w2 = slots.start_negotiating([&] { dropped.push_back(2); });
  EXPECT_FALSE(slots.request_slot(w1, [] {}));
  EXPECT_FALSE(slots.request_slot(w2, [] {}));
  slots.start_negotiating([&] { dropped.push_back(3); });
  EXPECT_EQ(dropped, std::vector<int>{1});
  EXPECT_FALSE(slots.request_slot(w1, [] {})) << "a dropped connection gets no slot";
}

TEST(ClientSlots, ZeroMeansUnlimitedServedClients) {
  ClientSlots slots(0, 4);
  for (int i = 0; i < 100; ++i) {
    auto id = slots.start_negotiating([] {});
    EXPECT_TRUE(slots.request_slot(id, [] {}));
  }
  EXPECT_EQ(slots.served(), 100u);
}

TEST(ClientSlots, ALeavingNegotiatorFreesItsPlace) {
  ClientSlots slots(1, 2);
  int dropped = 0;
  auto a = slots.start_negotiating([&] { ++dropped; });
  slots.start_negotiating([&] { ++dropped; });
  slots.leave(a);
  slots.start_negotiating([&] { ++dropped; });
  EXPECT_EQ(dropped, 0);
}

}  // namespace
}  // namespace layerd
