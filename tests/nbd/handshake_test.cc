// The fixed newstyle handshake as a byte-fed state machine: client bytes are
// built by hand, fed in bytes_wanted() pieces, and the server's bytes are
// checked exactly.
#include "nbd/handshake.h"

#include <gtest/gtest.h>

#include <initializer_list>
#include <string>
#include <vector>

#include "nbd/codec.h"

namespace layerd::nbd {
namespace {

using Bytes = std::vector<std::byte>;
using Phase = Handshake::Phase;

constexpr uint16_t kDiskFlags = kTransSendFlush | kTransSendFua |
                                kTransSendTrim | kTransSendWriteZeroes |
                                kTransSendFastZero | kTransCanMultiConn |
                                kTransSendDf;  // DF must be cleared without SR
constexpr uint16_t kRoFlags = kTransReadOnly | kTransSendFlush |
                              kTransSendFastZero;  // no WRITE_ZEROES

// Two exports; the empty name means "disk".
class FakeHost : public HandshakeHost {
 public:
  FakeHost() {
    disk.name = "disk";
    disk.description = "the main disk";
    disk.size = uint64_t{1} << 30;
    disk.transmission_flags = kDiskFlags;
    disk.min_block_size = 1;
    disk.preferred_block_size = 4096;
    disk.max_block_size = 32u << 20;
    ro.name = "ro";
    ro.description = "";
    ro.size = 0x123456789aULL;
    ro.transmission_flags = kRoFlags;
    ro.min_block_size = 512;
    ro.preferred_block_size = 65536;
    ro.max_block_size = 1u << 20;
  }
  std::optional<ExportInfo> find_export(std::string_view name) override {
    if (name.empty() || name == "disk") return disk;
    if (name == "ro") return ro;
    return std::nullopt;
  }
  std::vector<ExportInfo> list_exports() override { return {disk, ro}; }
  std::vector<std::string> meta_contexts(const ExportInfo& e) override {
    if (e.name == "disk") {
      return {"base:allocation", "qemu:allocation-depth",
              "qemu:dirty-bitmap:b0"};
    }
    return {"base:allocation"};
  }
  ExportInfo disk, ro;
};

// --- Building client bytes ---------------------------------------------------

void add16(Bytes& b, uint16_t v) {
  std::byte x[2];
  put_be16(x, v);
  b.insert(b.end(), x, x + 2);
}
void add32(Bytes& b, uint32_t v) {
  std::byte x[4];
  put_be32(x, v);
  b.insert(b.end(), x, x + 4);
}
void add64(Bytes& b, uint64_t v) {
  std::byte x[8];
  put_be64(x, v);
  b.insert(b.end(), x, x + 8);
}
void add_str(Bytes& b, std::string_view s) {
  for (char c : s) b.push_back(std::byte(c));
}
Bytes str(std::string_view s) {
  Bytes b;
  add_str(b, s);
  return b;
}

Bytes option_header(uint32_t opt, uint32_t length) {
  Bytes b;
  add64(b, kIHaveOpt);
  add32(b, opt);
  add32(b, length);
  return b;
}
Bytes option(uint32_t opt, const Bytes& payload = {}) {
  Bytes b = option_header(opt, uint32_t(payload.size()));
  b.insert(b.end(), payload.begin(), payload.end());
  return b;
}
Bytes option(Opt opt, const Bytes& payload = {}) {
  return option(uint32_t(opt), payload);
}

// NBD_OPT_INFO / NBD_OPT_GO data.
Bytes info_data(std::string_view name, std::initializer_list<uint16_t> reqs = {}) {
  Bytes b;
  add32(b, uint32_t(name.size()));
  add_str(b, name);
  add16(b, uint16_t(reqs.size()));
  for (uint16_t r : reqs) add16(b, r);
  return b;
}

// NBD_OPT_{LIST,SET}_META_CONTEXT data.
Bytes meta_data(std::string_view name, std::initializer_list<std::string_view> qs) {
  Bytes b;
  add32(b, uint32_t(name.size()));
  add_str(b, name);
  add32(b, uint32_t(qs.size()));
  for (std::string_view q : qs) {
    add32(b, uint32_t(q.size()));
    add_str(b, q);
  }
  return b;
}

// --- Reading server bytes -----------------------------------------------------

struct Reply {
  uint32_t option;
  uint32_t type;
  Bytes data;
};

// Splits option replies; fails the test on a malformed stream.
std::vector<Reply> replies(const Bytes& out) {
  std::vector<Reply> r;
  size_t pos = 0;
  while (pos < out.size()) {
    EXPECT_GE(out.size() - pos, 20u) << "truncated reply header";
    if (out.size() - pos < 20) break;
    EXPECT_EQ(get_be64(&out[pos]), kOptReplyMagic);
    Reply x{get_be32(&out[pos + 8]), get_be32(&out[pos + 12]), {}};
    const uint32_t len = get_be32(&out[pos + 16]);
    pos += 20;
    EXPECT_LE(len, out.size() - pos) << "reply data truncated";
    if (len > out.size() - pos) break;
    x.data.assign(out.begin() + long(pos), out.begin() + long(pos + len));
    pos += len;
    r.push_back(std::move(x));
  }
  return r;
}

std::string text(const Bytes& b) {
  return std::string(reinterpret_cast<const char*>(b.data()), b.size());
}

Bytes info_export(uint64_t size, uint16_t flags) {
  Bytes b;
  add16(b, uint16_t(Info::Export));
  add64(b, size);
  add16(b, flags);
  return b;
}
Bytes info_block_size(uint32_t min, uint32_t pref, uint32_t max) {
  Bytes b;
  add16(b, uint16_t(Info::BlockSize));
  add32(b, min);
  add32(b, pref);
  add32(b, max);
  return b;
}
Bytes meta_reply(uint32_t id, std::string_view name) {
  Bytes b;
  add32(b, id);
  add_str(b, name);
  return b;
}

// --- The harness ------------------------------------------------------------

template <TlsMode kTls>
class HandshakeFixture : public ::testing::Test {
 protected:
  // Sends the client flags after checking the greeting went out.
  void start(uint32_t client_flags = kClientFlagFixedNewstyle |
                                     kClientFlagNoZeroes) {
    EXPECT_EQ(hs.take_output().size(), 18u);
    Bytes b;
    add32(b, client_flags);
    feed(b);
  }
  // Feeds `in` in bytes_wanted() pieces, checking every piece is at most
  // 64 KiB; returns how many bytes were consumed before the machine stopped
  // wanting input.
  size_t feed(const Bytes& in) {
    size_t pos = 0;
    while (pos < in.size()) {
      const size_t want = hs.bytes_wanted();
      if (want == 0) break;
      EXPECT_LE(want, kMaxOptionLength);
      EXPECT_LE(want, in.size() - pos) << "input ends inside a piece";
      if (want > in.size() - pos) break;
      hs.consume(std::span(in).subspan(pos, want));
      pos += want;
    }
    return pos;
  }
  // Feeds a whole option and returns the replies it produced.
  std::vector<Reply> send(const Bytes& opt) {
    EXPECT_EQ(feed(opt), opt.size());
    return replies(hs.take_output());
  }
  void expect_error(const std::vector<Reply>& r, Opt opt, Rep type) {
    ASSERT_EQ(r.size(), 1u);
    EXPECT_EQ(r[0].option, uint32_t(opt));
    EXPECT_EQ(r[0].type, uint32_t(type));
    EXPECT_FALSE(r[0].data.empty()) << "error replies carry a message";
    EXPECT_EQ(hs.phase(), Phase::Options);
    EXPECT_EQ(hs.bytes_wanted(), 16u);
  }
  void expect_ack(const Reply& r, Opt opt) {
    EXPECT_EQ(r.option, uint32_t(opt));
    EXPECT_EQ(r.type, uint32_t(Rep::Ack));
    EXPECT_TRUE(r.data.empty());
  }
  void negotiate_structured() {
    auto r = send(option(Opt::StructuredReply));
    ASSERT_EQ(r.size(), 1u);
    expect_ack(r[0], Opt::StructuredReply);
  }
  void go(std::string_view name) {
    auto r = send(option(Opt::Go, info_data(name)));
    ASSERT_FALSE(r.empty());
    expect_ack(r.back(), Opt::Go);
    ASSERT_EQ(hs.phase(), Phase::Transmission);
  }

  FakeHost host;
  Handshake hs{host, kTls};
};

using HandshakeTest = HandshakeFixture<TlsMode::None>;
using ForcedTls = HandshakeFixture<TlsMode::Required>;
using SelectiveTls = HandshakeFixture<TlsMode::Offered>;

// --- Greeting and client flags ------------------------------------------------

TEST_F(HandshakeTest, GreetingIsMagicIHaveOptAndFixedNewstyleNoZeroes) {
  EXPECT_EQ(hs.phase(), Phase::Greeting);
  EXPECT_EQ(hs.bytes_wanted(), 4u);
  EXPECT_EQ(hs.take_output(),
            str(std::string_view("NBDMAGICIHAVEOPT\x00\x03", 18)));
  EXPECT_TRUE(hs.take_output().empty()) << "take_output clears";
}

TEST_F(HandshakeTest, KnownClientFlagsEnterOptionHaggling) {
  start();
  EXPECT_EQ(hs.phase(), Phase::Options);
  EXPECT_EQ(hs.bytes_wanted(), 16u);
  EXPECT_TRUE(hs.no_zeroes());
  EXPECT_TRUE(hs.take_output().empty());
}

TEST_F(HandshakeTest, ClientWithoutFixedNewstyleFlagIsStillServed) {
  start(0);
  EXPECT_EQ(hs.phase(), Phase::Options);
  EXPECT_FALSE(hs.no_zeroes());
}

TEST_F(HandshakeTest, UnknownClientFlagClosesTheConnection) {
  for (uint32_t flags : {1u << 2, 1u << 31, 0xffffffffu}) {
    FakeHost h;
    Handshake x(h);
    Bytes b;
    add32(b, flags);
    x.consume(b);
    EXPECT_EQ(x.phase(), Phase::Closed) << flags;
    EXPECT_EQ(x.bytes_wanted(), 0u);
    EXPECT_FALSE(x.close_reason().empty());
  }
}

TEST_F(HandshakeTest, BadOptionMagicClosesTheConnection) {
  start();
  Bytes b;
  add64(b, kIHaveOpt ^ 1);
  add32(b, uint32_t(Opt::Go));
  add32(b, 0);
  EXPECT_EQ(feed(b), 16u);
  EXPECT_EQ(hs.phase(), Phase::Closed);
  EXPECT_EQ(hs.close_reason(), "bad option magic");
  EXPECT_TRUE(hs.take_output().empty());
}

TEST_F(HandshakeTest, WrongSizedFeedClosesInsteadOfMisparsing) {
  start();
  Bytes b(15);
  hs.consume(b);
  EXPECT_EQ(hs.phase(), Phase::Closed);
}

// --- NBD_OPT_EXPORT_NAME ------------------------------------------------------

TEST_F(HandshakeTest, ExportNameSendsSizeFlagsAndZeroesWithoutNoZeroes) {
  start(kClientFlagFixedNewstyle);
  EXPECT_EQ(feed(option(Opt::ExportName, str("disk"))), 20u);
  Bytes want;
  add64(want, uint64_t{1} << 30);
  add16(want, (kDiskFlags | kTransHasFlags) & ~kTransSendDf);
  want.resize(want.size() + 124);
  EXPECT_EQ(hs.take_output(), want);
  EXPECT_EQ(hs.phase(), Phase::Transmission);
  EXPECT_EQ(hs.bytes_wanted(), 0u);
  EXPECT_EQ(hs.chosen_export().name, "disk");
  EXPECT_EQ(hs.chosen_export().transmission_flags,
            (kDiskFlags | kTransHasFlags) & ~kTransSendDf);
  EXPECT_FALSE(hs.structured_replies());
}

TEST_F(HandshakeTest, ExportNameWithNoZeroesSendsOnlySizeAndFlags) {
  start();
  feed(option(Opt::ExportName, str("ro")));
  Bytes want;
  add64(want, 0x123456789aULL);
  // FAST_ZERO is cleared because the export has no WRITE_ZEROES.
  add16(want, kTransHasFlags | kTransReadOnly | kTransSendFlush);
  EXPECT_EQ(hs.take_output(), want);
  EXPECT_EQ(hs.phase(), Phase::Transmission);
}

TEST_F(HandshakeTest, ExportNameEmptyPicksTheDefaultExport) {
  start();
  feed(option(Opt::ExportName));
  EXPECT_EQ(hs.phase(), Phase::Transmission);
  EXPECT_EQ(hs.chosen_export().name, "disk");
}

TEST_F(HandshakeTest, ExportNameAfterStructuredReplyAdvertisesDf) {
  start();
  negotiate_structured();
  feed(option(Opt::ExportName, str("disk")));
  Bytes out = hs.take_output();
  ASSERT_EQ(out.size(), 10u);
  EXPECT_EQ(get_be16(&out[8]), kDiskFlags | kTransHasFlags | kTransSendDf);
  EXPECT_TRUE(hs.structured_replies());
}

TEST_F(HandshakeTest, ExportNameUnknownClosesWithoutReply) {
  start();
  feed(option(Opt::ExportName, str("nope")));
  EXPECT_EQ(hs.phase(), Phase::Closed);
  EXPECT_TRUE(hs.take_output().empty());
}

TEST_F(HandshakeTest, ExportNameLongerThan4096ClosesWithoutReadingIt) {
  start();
  Bytes opt = option(Opt::ExportName, Bytes(4097, std::byte{'a'}));
  EXPECT_EQ(feed(opt), 16u) << "payload must not be read";
  EXPECT_EQ(hs.phase(), Phase::Closed);
  EXPECT_TRUE(hs.take_output().empty());
}

TEST_F(HandshakeTest, InputAfterTransmissionIsIgnored) {
  start();
  feed(option(Opt::ExportName, str("disk")));
  hs.take_output();
  hs.consume(option(Opt::List));
  EXPECT_EQ(hs.phase(), Phase::Transmission);
  EXPECT_TRUE(hs.take_output().empty());
}

// --- NBD_OPT_ABORT ---------------------------------------------------------------

TEST_F(HandshakeTest, AbortRepliesAckAndCloses) {
  start();
  EXPECT_EQ(feed(option(Opt::Abort)), 16u);
  Bytes want;
  add64(want, kOptReplyMagic);
  add32(want, uint32_t(Opt::Abort));
  add32(want, uint32_t(Rep::Ack));
  add32(want, 0);
  EXPECT_EQ(hs.take_output(), want);
  EXPECT_EQ(hs.phase(), Phase::Closed);
  EXPECT_EQ(hs.close_reason(), "client aborted");
}

TEST_F(HandshakeTest, AbortWithDataStillAcksAndCloses) {
  start();
  EXPECT_EQ(feed(option(Opt::Abort, str("junk"))), 16u);
  auto r = replies(hs.take_output());
  ASSERT_EQ(r.size(), 1u);
  expect_ack(r[0], Opt::Abort);
  EXPECT_EQ(hs.phase(), Phase::Closed);
}

// --- NBD_OPT_LIST -----------------------------------------------------------------

TEST_F(HandshakeTest, ListSendsOneServerReplyPerExportThenAck) {
  start();
  auto r = send(option(Opt::List));
  ASSERT_EQ(r.size(), 3u);
  Bytes disk;
  add32(disk, 4);
  add_str(disk, "diskthe main disk");
  Bytes ro;
  add32(ro, 2);
  add_str(ro, "ro");
  EXPECT_EQ(r[0].type, uint32_t(Rep::Server));
  EXPECT_EQ(r[0].option, uint32_t(Opt::List));
  EXPECT_EQ(r[0].data, disk);
  EXPECT_EQ(r[1].type, uint32_t(Rep::Server));
  EXPECT_EQ(r[1].data, ro);
  expect_ack(r[2], Opt::List);
  EXPECT_EQ(hs.phase(), Phase::Options);
}

TEST_F(HandshakeTest, ListWithDataRepliesErrInvalid) {
  start();
  expect_error(send(option(Opt::List, str("x"))), Opt::List, Rep::ErrInvalid);
}

// --- NBD_OPT_INFO and NBD_OPT_GO ---------------------------------------------------

TEST_F(HandshakeTest, InfoRepliesExportAndBlockSizeThenAckAndStaysInOptions) {
  start();
  auto r = send(option(Opt::Info, info_data("disk")));
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].type, uint32_t(Rep::Info));
  EXPECT_EQ(r[0].option, uint32_t(Opt::Info));
  EXPECT_EQ(r[0].data, info_export(uint64_t{1} << 30,
                                   (kDiskFlags | kTransHasFlags) & ~kTransSendDf));
  EXPECT_EQ(r[1].type, uint32_t(Rep::Info));
  EXPECT_EQ(r[1].data, info_block_size(1, 4096, 32u << 20));
  expect_ack(r[2], Opt::Info);
  EXPECT_EQ(hs.phase(), Phase::Options);
  EXPECT_EQ(hs.bytes_wanted(), 16u);
}

TEST_F(HandshakeTest, InfoSendsNameAndDescriptionOnlyWhenRequestedOnce) {
  start();
  auto r = send(option(Opt::Info, info_data("", {uint16_t(Info::Name), 0x1234,
                                                 uint16_t(Info::Description),
                                                 uint16_t(Info::Name)})));
  ASSERT_EQ(r.size(), 5u);
  Bytes name;
  add16(name, uint16_t(Info::Name));
  add_str(name, "disk");
  Bytes desc;
  add16(desc, uint16_t(Info::Description));
  add_str(desc, "the main disk");
  EXPECT_EQ(r[0].data, info_export(uint64_t{1} << 30,
                                   (kDiskFlags | kTransHasFlags) & ~kTransSendDf));
  EXPECT_EQ(r[1].data, name);
  EXPECT_EQ(r[2].data, desc);
  EXPECT_EQ(r[3].data, info_block_size(1, 4096, 32u << 20));
  expect_ack(r[4], Opt::Info);
}

TEST_F(HandshakeTest, GoRepliesInfoThenAckAndEntersTransmission) {
  start();
  auto r = send(option(Opt::Go, info_data("ro", {uint16_t(Info::BlockSize)})));
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].option, uint32_t(Opt::Go));
  EXPECT_EQ(r[0].data, info_export(0x123456789aULL, kTransHasFlags |
                                                        kTransReadOnly |
                                                        kTransSendFlush));
  EXPECT_EQ(r[1].data, info_block_size(512, 65536, 1u << 20));
  expect_ack(r[2], Opt::Go);
  EXPECT_EQ(hs.phase(), Phase::Transmission);
  EXPECT_EQ(hs.chosen_export().name, "ro");
  EXPECT_EQ(hs.chosen_export().min_block_size, 512u);
  EXPECT_EQ(hs.chosen_export().transmission_flags,
            kTransHasFlags | kTransReadOnly | kTransSendFlush);
}

// As qemu-nbd: a minimum block size above 1 is told (and binds) only a
// client that asks for block sizes; INFO always tells the real one, and
// refuses a client that did not ask.
TEST_F(HandshakeTest, GoWithoutBlockSizeRequestTellsAndKeepsMinimumOne) {
  start();
  auto r = send(option(Opt::Go, info_data("ro")));
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[1].data, info_block_size(1, 65536, 1u << 20));
  expect_ack(r[2], Opt::Go);
  EXPECT_EQ(hs.chosen_export().min_block_size, 1u);
}

TEST_F(HandshakeTest, InfoUnaskedTellsTheRealMinimumBlockSizeThenRefuses) {
  start();
  auto r = send(option(Opt::Info, info_data("ro")));
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[1].data, info_block_size(512, 65536, 1u << 20));
  EXPECT_EQ(r[2].option, uint32_t(Opt::Info));
  EXPECT_EQ(r[2].type, uint32_t(Rep::ErrBlockSizeReqd));
  EXPECT_EQ(hs.phase(), Phase::Options);
  // Asked, the same INFO is acknowledged.
  r = send(option(Opt::Info, info_data("ro", {uint16_t(Info::BlockSize)})));
  ASSERT_EQ(r.size(), 3u);
  expect_ack(r[2], Opt::Info);
}

TEST_F(HandshakeTest, ExportNameKeepsMinimumBlockSizeOne) {
  start();
  feed(option(Opt::ExportName, str("ro")));
  ASSERT_EQ(hs.phase(), Phase::Transmission);
  EXPECT_EQ(hs.chosen_export().min_block_size, 1u);
}

TEST_F(HandshakeTest, GoWithoutNoZeroesSendsNoPaddingAfterAck) {
  start(kClientFlagFixedNewstyle);
  Bytes out;
  feed(option(Opt::Go, info_data("disk")));
  out = hs.take_output();
  // INFO export (20 + 12), INFO block size (20 + 14), ACK (20).
  EXPECT_EQ(out.size(), 32u + 34u + 20u);
  EXPECT_EQ(hs.phase(), Phase::Transmission);
}

TEST_F(HandshakeTest, GoAfterStructuredReplyAdvertisesDf) {
  start();
  negotiate_structured();
  auto r = send(option(Opt::Go, info_data("disk")));
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].data, info_export(uint64_t{1} << 30,
                                   kDiskFlags | kTransHasFlags | kTransSendDf));
  EXPECT_TRUE(hs.structured_replies());
  EXPECT_EQ(hs.chosen_export().transmission_flags,
            kDiskFlags | kTransHasFlags | kTransSendDf);
}

TEST_F(HandshakeTest, GoWithUnknownExportRepliesErrUnknownAndStaysInOptions) {
  start();
  auto r = send(option(Opt::Go, info_data("nope")));
  expect_error(r, Opt::Go, Rep::ErrUnknown);
  go("disk");  // the connection lives
}

TEST_F(HandshakeTest, InfoWithUnknownExportRepliesErrUnknown) {
  start();
  expect_error(send(option(Opt::Info, info_data("nope"))), Opt::Info,
               Rep::ErrUnknown);
}

TEST_F(HandshakeTest, InfoAndGoWithMalformedDataReplyErrInvalid) {
  start();
  auto with_name_length = [](uint32_t n, size_t actual, uint16_t count) {
    Bytes b;
    add32(b, n);
    b.resize(b.size() + actual, std::byte{'a'});
    add16(b, count);
    return b;
  };
  Bytes trailing = info_data("disk", {1});
  trailing.push_back(std::byte{0});
  Bytes short_request = info_data("disk", {1});
  short_request.pop_back();
  const std::vector<std::pair<const char*, Bytes>> cases = {
      {"empty", {}},
      {"three bytes", Bytes(3)},
      {"no count", [] { Bytes b; add32(b, 0); return b; }()},
      {"name past the end", with_name_length(10, 4, 0)},
      {"name leaves one byte", [] {
         Bytes b;
         add32(b, 4);
         add_str(b, "disk");
         b.push_back(std::byte{0});
         return b;
       }()},
      {"name length 0xffffffff", with_name_length(0xffffffff, 4, 0)},
      {"count larger than requests", with_name_length(4, 4, 3)},
      {"request cut short", short_request},
      {"trailing byte", trailing},
      {"name of 4097 bytes", with_name_length(4097, 4097, 0)},
  };
  for (Opt opt : {Opt::Info, Opt::Go}) {
    for (const auto& [what, data] : cases) {
      SCOPED_TRACE(what);
      expect_error(send(option(opt, data)), opt, Rep::ErrInvalid);
    }
  }
}

TEST_F(HandshakeTest, InfoWithNameOf4096BytesIsParsed) {
  start();
  // A valid but unknown name: the length check passes, the lookup fails.
  expect_error(send(option(Opt::Info, info_data(std::string(4096, 'a')))),
               Opt::Info, Rep::ErrUnknown);
}

// --- NBD_OPT_STRUCTURED_REPLY --------------------------------------------------

TEST_F(HandshakeTest, StructuredReplyAcksAndIsRemembered) {
  start();
  negotiate_structured();
  EXPECT_TRUE(hs.structured_replies());
  EXPECT_EQ(hs.phase(), Phase::Options);
}

TEST_F(HandshakeTest, StructuredReplyWithDataRepliesErrInvalidAndIsNotEnabled) {
  start();
  expect_error(send(option(Opt::StructuredReply, str("x"))),
               Opt::StructuredReply, Rep::ErrInvalid);
  go("disk");
  EXPECT_FALSE(hs.structured_replies());
  EXPECT_FALSE(hs.chosen_export().transmission_flags & kTransSendDf);
}

// --- Unsupported options ---------------------------------------------------------

TEST_F(HandshakeTest, StartTlsRepliesErrPolicy) {
  start();
  auto r = send(option(Opt::StartTls));
  expect_error(r, Opt::StartTls, Rep::ErrPolicy);
  EXPECT_EQ(text(r[0].data), "TLS is not enabled on this server");
}

TEST_F(HandshakeTest, UnknownOptionsReplyErrUnsupAndTheConnectionLives) {
  start();
  for (uint32_t opt : {uint32_t(Opt::PeekExport), uint32_t(Opt::ExtendedHeaders),
                       0u, 12u, 0x12345678u, 0xffffffffu}) {
    SCOPED_TRACE(opt);
    auto r = send(option(opt, str("some data")));
    ASSERT_EQ(r.size(), 1u);
    EXPECT_EQ(r[0].option, opt);
    EXPECT_EQ(r[0].type, uint32_t(Rep::ErrUnsup));
    EXPECT_FALSE(r[0].data.empty());
    EXPECT_EQ(hs.phase(), Phase::Options);
  }
  go("disk");
}

TEST_F(HandshakeTest, OptionOfExactlyMaxLengthIsReadInOnePiece) {
  start();
  feed(option_header(0x4242, kMaxOptionLength));
  EXPECT_EQ(hs.bytes_wanted(), kMaxOptionLength);
  hs.consume(Bytes(kMaxOptionLength));
  auto r = replies(hs.take_output());
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, uint32_t(Rep::ErrUnsup));
}

TEST_F(HandshakeTest, OversizedOptionIsSkippedInPiecesThenErrTooBig) {
  start();
  const uint32_t length = kMaxOptionLength * 2 + 1;
  feed(option_header(uint32_t(Opt::Go), length));
  const Bytes piece(64 * 1024);
  uint64_t skipped = 0;
  while (hs.bytes_wanted() > 0 && skipped < length) {
    const size_t want = hs.bytes_wanted();
    ASSERT_LE(want, 64u * 1024);
    EXPECT_TRUE(hs.take_output().empty()) << "no reply before the skip ends";
    hs.consume(std::span(piece).first(want));
    skipped += want;
    if (hs.bytes_wanted() == 16) break;
  }
  EXPECT_EQ(skipped, length);
  expect_error(replies(hs.take_output()), Opt::Go, Rep::ErrTooBig);
  go("disk");
}

TEST_F(HandshakeTest, FourGigabyteOptionIsSkippedWithoutBuffering) {
  start();
  feed(option_header(uint32_t(Opt::SetMetaContext), 0xffffffff));
  const Bytes piece(64 * 1024);
  uint64_t skipped = 0;
  size_t pieces = 0;
  while (hs.bytes_wanted() != 16) {
    const size_t want = hs.bytes_wanted();
    ASSERT_GT(want, 0u);
    ASSERT_LE(want, piece.size());
    hs.consume(std::span(piece).first(want));
    skipped += want;
    ++pieces;
  }
  EXPECT_EQ(skipped, 0xffffffffu);
  EXPECT_EQ(pieces, 65536u);
  expect_error(replies(hs.take_output()), Opt::SetMetaContext, Rep::ErrTooBig);
}

// --- Meta contexts ------------------------------------------------------------

TEST_F(HandshakeTest, MetaContextWithoutStructuredRepliesIsErrInvalid) {
  start();
  expect_error(send(option(Opt::ListMetaContext, meta_data("disk", {}))),
               Opt::ListMetaContext, Rep::ErrInvalid);
  expect_error(
      send(option(Opt::SetMetaContext, meta_data("disk", {"base:allocation"}))),
      Opt::SetMetaContext, Rep::ErrInvalid);
  go("disk");
  EXPECT_TRUE(hs.selected_contexts().empty());
}

TEST_F(HandshakeTest, ListMetaContextWithNoQueriesListsAllWithIdZero) {
  start();
  negotiate_structured();
  auto r = send(option(Opt::ListMetaContext, meta_data("disk", {})));
  ASSERT_EQ(r.size(), 4u);
  EXPECT_EQ(r[0].type, uint32_t(Rep::MetaContext));
  EXPECT_EQ(r[0].option, uint32_t(Opt::ListMetaContext));
  EXPECT_EQ(r[0].data, meta_reply(0, "base:allocation"));
  EXPECT_EQ(r[1].data, meta_reply(0, "qemu:allocation-depth"));
  EXPECT_EQ(r[2].data, meta_reply(0, "qemu:dirty-bitmap:b0"));
  expect_ack(r[3], Opt::ListMetaContext);
}

TEST_F(HandshakeTest, ListMetaContextNamespaceQueryListsThatNamespace) {
  start();
  negotiate_structured();
  auto r = send(option(Opt::ListMetaContext, meta_data("disk", {"qemu:"})));
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].data, meta_reply(0, "qemu:allocation-depth"));
  EXPECT_EQ(r[1].data, meta_reply(0, "qemu:dirty-bitmap:b0"));
  expect_ack(r[2], Opt::ListMetaContext);

  r = send(option(Opt::ListMetaContext, meta_data("disk", {"base:"})));
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0].data, meta_reply(0, "base:allocation"));
}

TEST_F(HandshakeTest, ListMetaContextExactUnknownAndOverlappingQueries) {
  start();
  negotiate_structured();
  auto r = send(option(Opt::ListMetaContext,
                       meta_data("", {"qemu:allocation-depth", "x-foo:bar",
                                      "base:nothing", "base:",
                                      "base:allocation"})));
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].data, meta_reply(0, "base:allocation"));
  EXPECT_EQ(r[1].data, meta_reply(0, "qemu:allocation-depth"));
  expect_ack(r[2], Opt::ListMetaContext);

  r = send(option(Opt::ListMetaContext, meta_data("disk", {"x-unknown:"})));
  ASSERT_EQ(r.size(), 1u);
  expect_ack(r[0], Opt::ListMetaContext);
}

TEST_F(HandshakeTest, ListMetaContextListsWhatTheNamedExportOffers) {
  start();
  negotiate_structured();
  auto r = send(option(Opt::ListMetaContext, meta_data("ro", {})));
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0].data, meta_reply(0, "base:allocation"));
}

TEST_F(HandshakeTest, MetaContextWithUnknownExportIsErrUnknown) {
  start();
  negotiate_structured();
  expect_error(send(option(Opt::ListMetaContext, meta_data("nope", {}))),
               Opt::ListMetaContext, Rep::ErrUnknown);
  expect_error(send(option(Opt::SetMetaContext,
                           meta_data("nope", {"base:allocation"}))),
               Opt::SetMetaContext, Rep::ErrUnknown);
}

TEST_F(HandshakeTest, MetaContextQueryWithoutNamespaceIsErrInvalid) {
  start();
  negotiate_structured();
  for (Opt opt : {Opt::ListMetaContext, Opt::SetMetaContext}) {
    for (std::string_view q : {"allocation", ":allocation", ""}) {
      SCOPED_TRACE(q);
      expect_error(send(option(opt, meta_data("disk", {q}))), opt,
                   Rep::ErrInvalid);
    }
  }
}

TEST_F(HandshakeTest, MetaContextWithMalformedDataIsErrInvalid) {
  start();
  negotiate_structured();
  Bytes two_claimed = meta_data("disk", {"base:allocation"});
  put_be32(&two_claimed[8], 2);  // count field after "disk"
  Bytes query_past_end = meta_data("disk", {"base:allocation"});
  put_be32(&query_past_end[12], 16);
  Bytes trailing = meta_data("disk", {"base:allocation"});
  trailing.push_back(std::byte{0});
  Bytes huge_count = meta_data("disk", {"base:allocation"});
  put_be32(&huge_count[8], 0xffffffff);
  Bytes huge_name;
  add32(huge_name, 0xffffffff);
  add_str(huge_name, "disk");
  Bytes long_name = meta_data(std::string(4097, 'a'), {});
  Bytes long_query = meta_data("disk", {"base:" + std::string(4092, 'a')});
  const std::vector<std::pair<const char*, Bytes>> cases = {
      {"empty", {}},
      {"name length only", [] { Bytes b; add32(b, 0); return b; }()},
      {"name past the end", huge_name},
      {"no count", [] { Bytes b; add32(b, 4); add_str(b, "disk"); return b; }()},
      {"count larger than queries", two_claimed},
      {"query past the end", query_past_end},
      {"trailing byte", trailing},
      {"count 0xffffffff", huge_count},
      {"name of 4097 bytes", long_name},
      {"query of 4097 bytes", long_query},
  };
  for (Opt opt : {Opt::ListMetaContext, Opt::SetMetaContext}) {
    for (const auto& [what, data] : cases) {
      SCOPED_TRACE(what);
      expect_error(send(option(opt, data)), opt, Rep::ErrInvalid);
    }
  }
}

TEST_F(HandshakeTest, MetaContextQueryOf4096BytesIsAccepted) {
  start();
  negotiate_structured();
  auto r = send(option(Opt::ListMetaContext,
                       meta_data("disk", {"base:" + std::string(4091, 'a')})));
  ASSERT_EQ(r.size(), 1u);
  expect_ack(r[0], Opt::ListMetaContext);
}

TEST_F(HandshakeTest, SetMetaContextSelectsExactNamesWithIndexIds) {
  start();
  negotiate_structured();
  auto r = send(option(Opt::SetMetaContext,
                       meta_data("disk", {"qemu:allocation-depth", "base:",
                                          "qemu:", "base:unknown", "x-foo:bar",
                                          "base:allocation",
                                          "base:allocation"})));
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].type, uint32_t(Rep::MetaContext));
  EXPECT_EQ(r[0].option, uint32_t(Opt::SetMetaContext));
  EXPECT_EQ(r[0].data, meta_reply(0, "base:allocation"));
  EXPECT_EQ(r[1].data, meta_reply(1, "qemu:allocation-depth"));
  expect_ack(r[2], Opt::SetMetaContext);
  go("disk");
  const auto& c = hs.selected_contexts();
  ASSERT_EQ(c.size(), 2u);
  EXPECT_EQ(c[0].id, 0u);
  EXPECT_EQ(c[0].name, "base:allocation");
  EXPECT_EQ(c[1].id, 1u);
  EXPECT_EQ(c[1].name, "qemu:allocation-depth");
}

TEST_F(HandshakeTest, SetMetaContextWithNoQueriesSelectsNothing) {
  start();
  negotiate_structured();
  auto r = send(option(Opt::SetMetaContext, meta_data("disk", {})));
  ASSERT_EQ(r.size(), 1u);
  expect_ack(r[0], Opt::SetMetaContext);
  go("disk");
  EXPECT_TRUE(hs.selected_contexts().empty());
}

TEST_F(HandshakeTest, SetMetaContextReplacesThePreviousSelection) {
  start();
  negotiate_structured();
  send(option(Opt::SetMetaContext,
              meta_data("disk", {"base:allocation", "qemu:allocation-depth"})));
  auto r = send(option(Opt::SetMetaContext,
                       meta_data("disk", {"qemu:dirty-bitmap:b0"})));
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0].data, meta_reply(0, "qemu:dirty-bitmap:b0"));
  go("disk");
  ASSERT_EQ(hs.selected_contexts().size(), 1u);
  EXPECT_EQ(hs.selected_contexts()[0].id, 0u);
  EXPECT_EQ(hs.selected_contexts()[0].name, "qemu:dirty-bitmap:b0");
}

TEST_F(HandshakeTest, FailedSetMetaContextStillClearsTheSelection) {
  start();
  negotiate_structured();
  send(option(Opt::SetMetaContext, meta_data("disk", {"base:allocation"})));
  expect_error(send(option(Opt::SetMetaContext, Bytes(3))),
               Opt::SetMetaContext, Rep::ErrInvalid);
  go("disk");
  EXPECT_TRUE(hs.selected_contexts().empty());
}

TEST_F(HandshakeTest, ListMetaContextDoesNotChangeTheSelection) {
  start();
  negotiate_structured();
  send(option(Opt::SetMetaContext, meta_data("disk", {"base:allocation"})));
  send(option(Opt::ListMetaContext, meta_data("ro", {})));
  send(option(Opt::Info, info_data("ro")));
  go("disk");
  ASSERT_EQ(hs.selected_contexts().size(), 1u);
}

TEST_F(HandshakeTest, SelectionForAnotherExportIsDroppedOnGo) {
  start();
  negotiate_structured();
  send(option(Opt::SetMetaContext, meta_data("disk", {"base:allocation"})));
  go("ro");
  EXPECT_TRUE(hs.selected_contexts().empty());
}

TEST_F(HandshakeTest, SelectionForTheDefaultNameSurvivesGoByCanonicalName) {
  start();
  negotiate_structured();
  send(option(Opt::SetMetaContext, meta_data("", {"base:allocation"})));
  go("disk");
  ASSERT_EQ(hs.selected_contexts().size(), 1u);
  EXPECT_EQ(hs.selected_contexts()[0].name, "base:allocation");
}

TEST_F(HandshakeTest, SelectionIsKeptOrDroppedOnExportName) {
  {
    start();
    negotiate_structured();
    send(option(Opt::SetMetaContext, meta_data("ro", {"base:allocation"})));
    feed(option(Opt::ExportName, str("ro")));
    ASSERT_EQ(hs.phase(), Phase::Transmission);
    EXPECT_EQ(hs.selected_contexts().size(), 1u);
  }
  FakeHost h;
  Handshake x(h);
  Bytes in;
  add32(in, kClientFlagNoZeroes);
  in = [&] {
    Bytes all = in;
    for (const Bytes& o :
         {option(Opt::StructuredReply),
          option(Opt::SetMetaContext, meta_data("ro", {"base:allocation"})),
          option(Opt::ExportName, str("disk"))}) {
      all.insert(all.end(), o.begin(), o.end());
    }
    return all;
  }();
  size_t pos = 0;
  while (x.bytes_wanted() > 0 && pos < in.size()) {
    const size_t n = x.bytes_wanted();
    x.consume(std::span(in).subspan(pos, n));
    pos += n;
  }
  EXPECT_EQ(pos, in.size());
  ASSERT_EQ(x.phase(), Phase::Transmission);
  EXPECT_TRUE(x.selected_contexts().empty());
}

// --- A whole conversation --------------------------------------------------------

TEST_F(HandshakeTest, ManyOptionsInOneStreamThenGo) {
  start();
  Bytes in;
  for (const Bytes& o :
       {option(Opt::List), option(Opt::StartTls), option(99, str("?")),
        option(Opt::StructuredReply),
        option(Opt::ListMetaContext, meta_data("disk", {"base:"})),
        option(Opt::SetMetaContext, meta_data("disk", {"base:allocation"})),
        option(Opt::Info, info_data("ro", {uint16_t(Info::BlockSize)})),
        option(Opt::Go, info_data("disk", {uint16_t(Info::Name)}))}) {
    in.insert(in.end(), o.begin(), o.end());
  }
  EXPECT_EQ(feed(in), in.size());
  auto r = replies(hs.take_output());
  std::vector<uint32_t> types;
  for (const Reply& x : r) types.push_back(x.type);
  const uint32_t A = uint32_t(Rep::Ack), S = uint32_t(Rep::Server),
                 I = uint32_t(Rep::Info), M = uint32_t(Rep::MetaContext);
  EXPECT_EQ(types, (std::vector<uint32_t>{
                       S, S, A,                             // LIST
                       uint32_t(Rep::ErrPolicy),            // STARTTLS
                       uint32_t(Rep::ErrUnsup),             // 99
                       A,                                   // STRUCTURED_REPLY
                       M, A,                                // LIST_META_CONTEXT
                       M, A,                                // SET_META_CONTEXT
                       I, I, A,                             // INFO
                       I, I, I, A}));                       // GO
  EXPECT_EQ(hs.phase(), Phase::Transmission);
  EXPECT_TRUE(hs.structured_replies());
  EXPECT_EQ(hs.selected_contexts().size(), 1u);
}

// --- TLS (the spec's "TLS support") ----------------------------------------------

TEST_F(ForcedTls, EveryOptionButStartTlsAndAbortGetsTlsReqdAndNothingIsTold) {
  start();
  for (const Bytes& opt :
       {option(Opt::List), option(Opt::Info, info_data("disk")),
        option(Opt::Go, info_data("disk")), option(Opt::StructuredReply),
        option(Opt::ListMetaContext, meta_data("disk", {"base:"})),
        option(Opt::SetMetaContext, meta_data("disk", {"base:allocation"})),
        option(Opt::PeekExport), option(12345, str("x"))}) {
    auto r = send(opt);
    ASSERT_EQ(r.size(), 1u) << "only the error, no export list or info";
    EXPECT_EQ(r[0].type, uint32_t(Rep::ErrTlsReqd));
    EXPECT_EQ(hs.phase(), Phase::Options);
  }
  EXPECT_FALSE(hs.structured_replies()) << "refused options change nothing";
}

TEST_F(ForcedTls, OversizedOptionBeforeTlsGetsTlsReqd) {
  start();
  auto r = send(option(Opt::Info, Bytes(kMaxOptionLength + 1)));
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, uint32_t(Rep::ErrTlsReqd));
}

TEST_F(ForcedTls, ExportNameBeforeTlsClosesTheSession) {
  start();
  Bytes name = option(Opt::ExportName, str("disk"));
  feed(Bytes(name.begin(), name.begin() + 16));
  EXPECT_EQ(hs.phase(), Phase::Closed);
  EXPECT_TRUE(hs.take_output().empty()) << "EXPORT_NAME has no error reply";
}

TEST_F(ForcedTls, AbortIsAcknowledged) {
  start();
  auto r = send(option(Opt::Abort));
  ASSERT_EQ(r.size(), 1u);
  expect_ack(r[0], Opt::Abort);
  EXPECT_EQ(hs.phase(), Phase::Closed);
}

TEST_F(ForcedTls, ClientWithoutFixedNewstyleIsDropped) {
  start(kClientFlagNoZeroes);
  EXPECT_EQ(hs.phase(), Phase::Closed);
}

TEST_F(ForcedTls, StartTlsIsAcknowledgedThenOptionsWorkOverTls) {
  start();
  auto r = send(option(Opt::StartTls));
  ASSERT_EQ(r.size(), 1u);
  expect_ack(r[0], Opt::StartTls);
  EXPECT_EQ(hs.phase(), Phase::StartTls);
  EXPECT_EQ(hs.bytes_wanted(), 0u) << "nothing more is read in plain text";
  hs.tls_started();
  EXPECT_TRUE(hs.tls_active());
  EXPECT_EQ(hs.phase(), Phase::Options);
  auto list = send(option(Opt::List));
  ASSERT_EQ(list.size(), 3u);
  EXPECT_EQ(list[0].type, uint32_t(Rep::Server));
  negotiate_structured();
  go("disk");
  EXPECT_TRUE(hs.structured_replies());
}

TEST_F(ForcedTls, SecondStartTlsIsRefusedWithErrInvalid) {
  start();
  send(option(Opt::StartTls));
  hs.tls_started();
  expect_error(send(option(Opt::StartTls)), Opt::StartTls, Rep::ErrInvalid);
  EXPECT_EQ(hs.phase(), Phase::Options);
}

TEST_F(ForcedTls, StartTlsWithDataIsRefusedWithErrInvalid) {
  start();
  expect_error(send(option(Opt::StartTls, str("x"))), Opt::StartTls, Rep::ErrInvalid);
  EXPECT_FALSE(hs.tls_active());
}

TEST_F(SelectiveTls, PlainClientsAreServedWithoutTls) {
  start();
  auto list = send(option(Opt::List));
  ASSERT_EQ(list.size(), 3u);
  negotiate_structured();
  go("disk");
  EXPECT_FALSE(hs.tls_active());
}

TEST_F(SelectiveTls, NothingNegotiatedBeforeStartTlsSurvivesIt) {
  start();
  negotiate_structured();
  auto m = send(option(Opt::SetMetaContext, meta_data("disk", {"base:allocation"})));
  ASSERT_EQ(m.size(), 2u);
  ASSERT_EQ(hs.selected_contexts().size(), 1u);
  auto r = send(option(Opt::StartTls));
  ASSERT_EQ(r.size(), 1u);
  expect_ack(r[0], Opt::StartTls);
  hs.tls_started();
  // Structured replies are gone: SET_META_CONTEXT now needs them again...
  expect_error(send(option(Opt::SetMetaContext, meta_data("disk", {"base:allocation"}))),
               Opt::SetMetaContext, Rep::ErrInvalid);
  // ...and GO enters transmission with neither.
  go("disk");
  EXPECT_FALSE(hs.structured_replies());
  EXPECT_TRUE(hs.selected_contexts().empty());
  EXPECT_FALSE(hs.chosen_export().transmission_flags & kTransSendDf);
}

TEST_F(SelectiveTls, ClientWithoutFixedNewstyleGetsNoTls) {
  start(kClientFlagNoZeroes);
  ASSERT_EQ(hs.phase(), Phase::Options);
  expect_error(send(option(Opt::StartTls)), Opt::StartTls, Rep::ErrPolicy);
}

TEST_F(HandshakeTest, TlsStartedOutsideStartTlsChangesNothing) {
  start();
  hs.tls_started();
  EXPECT_FALSE(hs.tls_active());
  EXPECT_EQ(hs.phase(), Phase::Options);
}

}  // namespace
}  // namespace layerd::nbd
