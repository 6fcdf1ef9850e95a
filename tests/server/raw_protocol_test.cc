// Hand-crafted protocol bytes on a plain socket: what libnbd would never
// send. A bad request gets an error reply and the connection lives; a
// broken protocol drops that one connection and nothing else.

#include <libnbd.h>
#include <sys/socket.h>

#include <chrono>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "nbd/protocol.h"
#include "tests/server/harness.h"

namespace layerd::test {
namespace {

namespace p = layerd::nbd;

constexpr uint32_t opt(p::Opt o) { return static_cast<uint32_t>(o); }
constexpr uint32_t rep(p::Rep r) { return static_cast<uint32_t>(r); }
constexpr uint16_t cmd(p::Cmd c) { return static_cast<uint16_t>(c); }
constexpr uint32_t err(p::Error e) { return static_cast<uint32_t>(e); }

class RawProtocol : public ServerTest {
 protected:
  // 4 MiB: data at [0, 1M) and [2M, 3M), holes elsewhere.
  void SetUp() override {
    create_sparse_image(image_path(), kImageSize, {{0, 1 << 20}, {2 << 20, 1 << 20}}, kSeed);
  }
  void StartRawServer(std::vector<std::string> extra = {}) {
    extra.insert(extra.begin(), {"-e", "0"});
    StartDefaultServer(std::move(extra));
  }
  // A raw client that has finished the handshake.
  void ConnectRaw(RawClient& c, bool structured = false) {
    ASSERT_TRUE(c.connect_unix(socket_path()));
    auto e = c.handshake(kExportName, structured);
    ASSERT_TRUE(e);
    ASSERT_EQ(e->size, kImageSize);
  }
  // A simple-reply READ that must succeed: the connection lives and is in sync.
  void ExpectRawReadWorks(RawClient& c, uint64_t cookie = 0x1234) {
    ASSERT_TRUE(c.send_request(0, cmd(p::Cmd::Read), cookie, 40960, 4096));
    auto r = c.read_simple_reply();
    ASSERT_TRUE(r) << "no reply to a read: the connection died";
    EXPECT_EQ(r->magic, p::kSimpleReplyMagic);
    EXPECT_EQ(r->error, 0u);
    EXPECT_EQ(r->cookie, cookie);
    std::vector<uint8_t> data(4096);
    ASSERT_TRUE(c.recv_bytes(data));
    EXPECT_EQ(first_difference(data, pattern(40960, 4096, kSeed)), -1);
  }
  void ExpectLibnbdReadWorks() {
    Nbd h = Connect();
    ASSERT_TRUE(h);
    std::vector<uint8_t> buf(4096);
    ASSERT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), 4096, 0), 0) << nbd_error_text();
    EXPECT_EQ(first_difference(buf, pattern(4096, 4096, kSeed)), -1);
  }
};

struct Chunk {
  uint32_t magic = 0;
  uint16_t flags = 0;
  uint16_t type = 0;
  uint64_t cookie = 0;
  std::vector<uint8_t> payload;
};

std::optional<Chunk> read_chunk(RawClient& c) {
  uint8_t h[20];
  if (!c.recv_bytes(h)) return std::nullopt;
  Chunk ch{load_be32(h), load_be16(h + 4), load_be16(h + 6), load_be64(h + 8), {}};
  uint32_t len = load_be32(h + 16);
  if (len > (64u << 20)) return std::nullopt;
  ch.payload.resize(len);
  if (len && !c.recv_bytes(ch.payload)) return std::nullopt;
  return ch;
}

// --- Handshake ------------------------------------------------------------------

TEST_F(RawProtocol, GreetingIsFixedNewstyleWithNoZeroes) {
  ASSERT_NO_FATAL_FAILURE(StartRawServer());
  RawClient c;
  ASSERT_TRUE(c.connect_unix(socket_path()));
  auto g = c.read_greeting();
  ASSERT_TRUE(g);
  EXPECT_EQ(g->magic, p::kNbdMagic);
  EXPECT_EQ(g->option_magic, p::kIHaveOpt);
  EXPECT_EQ(g->flags, p::kFlagFixedNewstyle | p::kFlagNoZeroes);
}

TEST_F(RawProtocol, GarbageInsteadOfHandshakeDropsOnlyThatConnection) {
  ASSERT_NO_FATAL_FAILURE(StartRawServer());
  Nbd other = Connect();  // connected before the garbage arrives
  ASSERT_TRUE(other);
  RawClient c;
  ASSERT_TRUE(c.connect_unix(socket_path()));
  ASSERT_TRUE(c.read_greeting());
  std::vector<uint8_t> garbage = pattern(0, 256, 42);
  garbage[0] = 0xde;  // client flags with unknown bits set
  c.send_bytes(garbage);
  EXPECT_TRUE(c.wait_closed(5s)) << "the server kept a connection that sent garbage";
  std::vector<uint8_t> buf(65536);
  ASSERT_EQ(nbd_pread(other.get(), buf.data(), buf.size(), 0, 0), 0) << nbd_error_text();
  EXPECT_EQ(first_difference(buf, pattern(0, buf.size(), kSeed)), -1);
  ExpectLibnbdReadWorks();
  EXPECT_TRUE(server_.running());
}

TEST_F(RawProtocol, BadOptionMagicDropsTheConnection) {
  ASSERT_NO_FATAL_FAILURE(StartRawServer());
  RawClient c;
  ASSERT_TRUE(c.connect_unix(socket_path()));
  ASSERT_TRUE(c.read_greeting());
  ASSERT_TRUE(c.send_client_flags(p::kClientFlagFixedNewstyle | p::kClientFlagNoZeroes));
  std::vector<uint8_t> o;
  append_be64(o, 0x0102030405060708ULL);  // not IHAVEOPT
  append_be32(o, opt(p::Opt::List));
  append_be32(o, 0);
  c.send_bytes(o);
  EXPECT_TRUE(c.wait_closed(5s));
  ExpectLibnbdReadWorks();
}

TEST_F(RawProtocol, UnknownOptionGetsErrUnsupAndHandshakeContinues) {
  ASSERT_NO_FATAL_FAILURE(StartRawServer());
  RawClient c;
  ASSERT_TRUE(c.connect_unix(socket_path()));
  ASSERT_TRUE(c.read_greeting());
  ASSERT_TRUE(c.send_client_flags(p::kClientFlagFixedNewstyle | p::kClientFlagNoZeroes));
  std::vector<uint8_t> payload = {1, 2, 3, 4, 5};
  ASSERT_TRUE(c.send_option(0x4242, payload));
  auto r = c.read_option_reply();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->magic, p::kOptReplyMagic);
  EXPECT_EQ(r->option, 0x4242u);
  EXPECT_EQ(r->type, rep(p::Rep::ErrUnsup));
  auto e = c.opt_go(kExportName);
  ASSERT_TRUE(e) << "GO after an unknown option failed";
  EXPECT_EQ(e->size, kImageSize);
  ExpectRawReadWorks(c);
}

TEST_F(RawProtocol, OversizedOptionIsAnsweredAndConnectionLives) {
  ASSERT_NO_FATAL_FAILURE(StartRawServer());
  RawClient c;
  ASSERT_TRUE(c.connect_unix(socket_path()));
  ASSERT_TRUE(c.read_greeting());
  ASSERT_TRUE(c.send_client_flags(p::kClientFlagFixedNewstyle | p::kClientFlagNoZeroes));
  // An INFO request of 1 MiB: far beyond any sane name (4096 bytes).
  std::vector<uint8_t> payload(1 << 20, 'a');
  const uint32_t name_len = static_cast<uint32_t>(payload.size() - 6);
  payload[0] = static_cast<uint8_t>(name_len >> 24);
  payload[1] = static_cast<uint8_t>(name_len >> 16);
  payload[2] = static_cast<uint8_t>(name_len >> 8);
  payload[3] = static_cast<uint8_t>(name_len);
  payload[payload.size() - 2] = 0;
  payload[payload.size() - 1] = 0;
  // Send from another thread: a server that answers before draining the
  // payload must not deadlock the test.
  std::thread sender([&] { c.send_option(opt(p::Opt::Info), payload); });
  auto r = c.read_option_reply();
  if (!r) ::shutdown(c.fd(), SHUT_RDWR);  // unblock the sender
  sender.join();
  ASSERT_TRUE(r) << "no answer to an oversized option (connection dropped?)";
  EXPECT_EQ(r->option, opt(p::Opt::Info));
  EXPECT_NE(r->type & p::kRepErrBit, 0u) << "reply type " << r->type;
  if (!server_is_qemu_nbd()) {
    EXPECT_EQ(r->type, rep(p::Rep::ErrTooBig));
  }
  auto e = c.opt_go(kExportName);
  ASSERT_TRUE(e) << "GO after an oversized option failed: the payload was not skipped";
  ExpectRawReadWorks(c);
}

TEST_F(RawProtocol, ExportNameOptionEntersTransmissionWithZeroPadding) {
  ASSERT_NO_FATAL_FAILURE(StartRawServer());
  RawClient c;
  ASSERT_TRUE(c.connect_unix(socket_path()));
  ASSERT_TRUE(c.read_greeting());
  ASSERT_TRUE(c.send_client_flags(p::kClientFlagFixedNewstyle));  // no NO_ZEROES
  std::string name = kExportName;
  ASSERT_TRUE(c.send_option(opt(p::Opt::ExportName), {reinterpret_cast<const uint8_t*>(name.data()), name.size()}));
  std::vector<uint8_t> reply(8 + 2 + 124);
  ASSERT_TRUE(c.recv_bytes(reply));
  EXPECT_EQ(load_be64(reply.data()), kImageSize);
  const uint16_t flags = load_be16(reply.data() + 8);
  EXPECT_NE(flags & p::kTransHasFlags, 0);
  EXPECT_NE(flags & p::kTransSendFlush, 0);
  EXPECT_EQ(flags & p::kTransReadOnly, 0);
  EXPECT_TRUE(all_zero(std::span<const uint8_t>(reply).subspan(10)));
  ExpectRawReadWorks(c);
}

TEST_F(RawProtocol, ExportNameOptionWithNoZeroesSendsNoPadding) {
  ASSERT_NO_FATAL_FAILURE(StartRawServer());
  RawClient c;
  ASSERT_TRUE(c.connect_unix(socket_path()));
  ASSERT_TRUE(c.read_greeting());
  ASSERT_TRUE(c.send_client_flags(p::kClientFlagFixedNewstyle | p::kClientFlagNoZeroes));
  std::string name = kExportName;
  ASSERT_TRUE(c.send_option(opt(p::Opt::ExportName), {reinterpret_cast<const uint8_t*>(name.data()), name.size()}));
  std::vector<uint8_t> reply(10);
  ASSERT_TRUE(c.recv_bytes(reply));
  EXPECT_EQ(load_be64(reply.data()), kImageSize);
  // The next bytes must be the reply to our read, not padding.
  ExpectRawReadWorks(c);
}

TEST_F(RawProtocol, MalformedGoPayloadGetsAnErrorAndHandshakeContinues) {
  ASSERT_NO_FATAL_FAILURE(StartRawServer());
  RawClient c;
  ASSERT_TRUE(c.connect_unix(socket_path()));
  ASSERT_TRUE(c.read_greeting());
  ASSERT_TRUE(c.send_client_flags(p::kClientFlagFixedNewstyle | p::kClientFlagNoZeroes));
  // Name length 100 in a 6-byte payload.
  std::vector<uint8_t> bad;
  append_be32(bad, 100);
  append_be16(bad, 0);
  ASSERT_TRUE(c.send_option(opt(p::Opt::Go), bad));
  auto r = c.read_option_reply();
  ASSERT_TRUE(r) << "connection dropped after a malformed GO";
  EXPECT_EQ(r->option, opt(p::Opt::Go));
  EXPECT_EQ(r->type, rep(p::Rep::ErrInvalid));
  auto e = c.opt_go(kExportName);
  ASSERT_TRUE(e);
  ExpectRawReadWorks(c);
}

TEST_F(RawProtocol, ListWithAPayloadGetsErrInvalidAndHandshakeContinues) {
  ASSERT_NO_FATAL_FAILURE(StartRawServer());
  RawClient c;
  ASSERT_TRUE(c.connect_unix(socket_path()));
  ASSERT_TRUE(c.read_greeting());
  ASSERT_TRUE(c.send_client_flags(p::kClientFlagFixedNewstyle | p::kClientFlagNoZeroes));
  std::vector<uint8_t> junk = {1, 2, 3};
  ASSERT_TRUE(c.send_option(opt(p::Opt::List), junk));
  auto r = c.read_option_reply();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->type, rep(p::Rep::ErrInvalid));
  ASSERT_TRUE(c.opt_go(kExportName));
  ExpectRawReadWorks(c);
}

TEST_F(RawProtocol, ListReturnsOneServerReplyThenAck) {
  ASSERT_NO_FATAL_FAILURE(StartRawServer());
  RawClient c;
  ASSERT_TRUE(c.connect_unix(socket_path()));
  ASSERT_TRUE(c.read_greeting());
  ASSERT_TRUE(c.send_client_flags(p::kClientFlagFixedNewstyle | p::kClientFlagNoZeroes));
  ASSERT_TRUE(c.send_option(opt(p::Opt::List), {}));
  auto r = c.read_option_reply();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->magic, p::kOptReplyMagic);
  EXPECT_EQ(r->option, opt(p::Opt::List));
  ASSERT_EQ(r->type, rep(p::Rep::Server));
  ASSERT_GE(r->data.size(), 4u);
  const uint32_t name_len = load_be32(r->data.data());
  ASSERT_LE(4u + name_len, r->data.size());
  EXPECT_EQ(std::string(r->data.begin() + 4, r->data.begin() + 4 + name_len), kExportName);
  auto ack = c.read_option_reply();
  ASSERT_TRUE(ack);
  EXPECT_EQ(ack->type, rep(p::Rep::Ack));
}

TEST_F(RawProtocol, StartTlsIsRefusedAndHandshakeContinues) {
  ASSERT_NO_FATAL_FAILURE(StartRawServer());
  RawClient c;
  ASSERT_TRUE(c.connect_unix(socket_path()));
  ASSERT_TRUE(c.read_greeting());
  ASSERT_TRUE(c.send_client_flags(p::kClientFlagFixedNewstyle | p::kClientFlagNoZeroes));
  ASSERT_TRUE(c.send_option(opt(p::Opt::StartTls), {}));
  auto r = c.read_option_reply();
  ASSERT_TRUE(r);
  EXPECT_NE(r->type & p::kRepErrBit, 0u) << "STARTTLS accepted without TLS";
  ASSERT_TRUE(c.opt_go(kExportName));
  ExpectRawReadWorks(c);
}

TEST_F(RawProtocol, AbortOptionClosesTheConnection) {
  ASSERT_NO_FATAL_FAILURE(StartRawServer());
  RawClient c;
  ASSERT_TRUE(c.connect_unix(socket_path()));
  ASSERT_TRUE(c.read_greeting());
  ASSERT_TRUE(c.send_client_flags(p::kClientFlagFixedNewstyle | p::kClientFlagNoZeroes));
  ASSERT_TRUE(c.send_option(opt(p::Opt::Abort), {}));
  EXPECT_TRUE(c.wait_closed(5s));
  ExpectLibnbdReadWorks();
}

// With -e 1 a client that leaves in the middle of the handshake must free
// the only slot at once, not when the handshake limit expires.
class HandshakeDisconnect : public RawProtocol {
 protected:
  void ExpectSlotFreedAfter(const std::function<void(RawClient&)>& partial_handshake) {
    ASSERT_NO_FATAL_FAILURE(StartDefaultServer({"-e", "1"}));
    {
      RawClient c;
      ASSERT_TRUE(c.connect_unix(socket_path()));
      ASSERT_NO_FATAL_FAILURE(partial_handshake(c));
    }  // closed here
    Nbd h = nbd_connect_to_unix(socket_path(), [](nbd_handle* hh) {
      nbd_set_export_name(hh, kExportName);
    }, 3s);
    ASSERT_TRUE(h) << "the next client was not served within 3 s: the server did not notice "
                      "that the previous one closed its socket. Server log:\n"
                   << server_.log();
  }
};

TEST_F(HandshakeDisconnect, ClientClosingAfterTheGreetingFreesItsSlot) {
  ExpectSlotFreedAfter([](RawClient& c) { ASSERT_TRUE(c.read_greeting()); });
}

TEST_F(HandshakeDisconnect, ClientClosingAfterAnOptionReplyFreesItsSlot) {
  ExpectSlotFreedAfter([](RawClient& c) {
    ASSERT_TRUE(c.read_greeting());
    ASSERT_TRUE(c.send_client_flags(p::kClientFlagFixedNewstyle | p::kClientFlagNoZeroes));
    ASSERT_TRUE(c.send_option(opt(p::Opt::StructuredReply), {}));
    auto r = c.read_option_reply();
    ASSERT_TRUE(r);
    EXPECT_EQ(r->type, rep(p::Rep::Ack));
  });
}

TEST_F(HandshakeDisconnect, ClientClosingAfterAFailedGoFreesItsSlot) {
  ExpectSlotFreedAfter([](RawClient& c) {
    ASSERT_TRUE(c.read_greeting());
    ASSERT_TRUE(c.send_client_flags(p::kClientFlagFixedNewstyle | p::kClientFlagNoZeroes));
    EXPECT_FALSE(c.opt_go("no-such-export"));
  });
}

TEST_F(HandshakeDisconnect, ClientSendingAbortAndClosingFreesItsSlot) {
  // What libnbd does after a failed GO: ABORT, then close without waiting.
  ExpectSlotFreedAfter([](RawClient& c) {
    ASSERT_TRUE(c.read_greeting());
    ASSERT_TRUE(c.send_client_flags(p::kClientFlagFixedNewstyle | p::kClientFlagNoZeroes));
    ASSERT_TRUE(c.send_option(opt(p::Opt::Abort), {}));
  });
}

TEST_F(HandshakeDisconnect, ClientClosingInTransmissionWithoutDiscFreesItsSlot) {
  ExpectSlotFreedAfter([](RawClient& c) { ASSERT_TRUE(c.handshake(kExportName)); });
}

TEST_F(HandshakeDisconnect, ClientClosingWithAReadInFlightFreesItsSlot) {
  ExpectSlotFreedAfter([](RawClient& c) {
    ASSERT_TRUE(c.handshake(kExportName));
    ASSERT_TRUE(c.send_request(0, cmd(p::Cmd::Read), 1, 0, 4 << 20));
  });
}

TEST_F(RawProtocol, IdleClientIsDroppedAfterHandshakeLimit) {
  SKIP_UNLESS_LAYERD();
  ASSERT_NO_FATAL_FAILURE(StartRawServer({"--handshake-limit=1"}));
  RawClient c;
  ASSERT_TRUE(c.connect_unix(socket_path()));
  ASSERT_TRUE(c.read_greeting());
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE(c.wait_closed(5s)) << "an idle client was not dropped within 5 s";
  const auto elapsed = std::chrono::steady_clock::now() - t0;
  EXPECT_GE(elapsed, 500ms) << "dropped too early";
  ExpectLibnbdReadWorks();
}

TEST_F(RawProtocol, HandshakeLimitDoesNotDropAClientInTransmission) {
  SKIP_UNLESS_LAYERD();
  ASSERT_NO_FATAL_FAILURE(StartRawServer({"--handshake-limit=1"}));
  RawClient c;
  ASSERT_NO_FATAL_FAILURE(ConnectRaw(c));
  std::this_thread::sleep_for(1500ms);
  ExpectRawReadWorks(c);
}

// --- Transmission ------------------------------------------------------------------

TEST_F(RawProtocol, UnknownCommandGetsEinvalAndConnectionLives) {
  ASSERT_NO_FATAL_FAILURE(StartRawServer());
  RawClient c;
  ASSERT_NO_FATAL_FAILURE(ConnectRaw(c));
  ASSERT_TRUE(c.send_request(0, 0x42, 0xabcdef, 0, 4096));
  auto r = c.read_simple_reply();
  ASSERT_TRUE(r) << "no reply to an unknown command";
  EXPECT_EQ(r->magic, p::kSimpleReplyMagic);
  EXPECT_EQ(r->cookie, 0xabcdefu);
  EXPECT_EQ(r->error, err(p::Error::Inval));
  ExpectRawReadWorks(c);
}

TEST_F(RawProtocol, UnknownCommandWithStructuredRepliesGetsEinvalAndConnectionLives) {
  ASSERT_NO_FATAL_FAILURE(StartRawServer());
  RawClient c;
  ASSERT_NO_FATAL_FAILURE(ConnectRaw(c, /*structured=*/true));
  ASSERT_TRUE(c.send_request(0, 0x42, 77, 0, 4096));
  // Either reply form is allowed for a command other than READ.
  uint8_t magic_bytes[4];
  ASSERT_TRUE(c.recv_bytes(magic_bytes)) << "no reply to an unknown command";
  const uint32_t magic = load_be32(magic_bytes);
  if (magic == p::kSimpleReplyMagic) {
    uint8_t rest[12];
    ASSERT_TRUE(c.recv_bytes(rest));
    EXPECT_EQ(load_be32(rest), err(p::Error::Inval));
    EXPECT_EQ(load_be64(rest + 4), 77u);
  } else {
    ASSERT_EQ(magic, p::kStructuredReplyMagic);
    uint8_t rest[16];
    ASSERT_TRUE(c.recv_bytes(rest));
    const uint16_t flags = load_be16(rest), type = load_be16(rest + 2);
    EXPECT_EQ(load_be64(rest + 4), 77u);
    EXPECT_EQ(type, static_cast<uint16_t>(p::ChunkType::Error));
    EXPECT_NE(flags & p::kReplyFlagDone, 0);
    std::vector<uint8_t> payload(load_be32(rest + 12));
    ASSERT_GE(payload.size(), 6u);
    ASSERT_TRUE(c.recv_bytes(payload));
    EXPECT_EQ(load_be32(payload.data()), err(p::Error::Inval));
  }
  // The connection lives: a structured read of data.
  ASSERT_TRUE(c.send_request(0, cmd(p::Cmd::Read), 78, 4096, 4096));
  auto d = read_chunk(c);
  ASSERT_TRUE(d);
  EXPECT_EQ(d->magic, p::kStructuredReplyMagic);
  EXPECT_EQ(d->cookie, 78u);
  EXPECT_EQ(d->type, static_cast<uint16_t>(p::ChunkType::OffsetData));
}

TEST_F(RawProtocol, UnknownCommandFlagGetsEinvalAndConnectionLives) {
  ASSERT_NO_FATAL_FAILURE(StartRawServer());
  RawClient c;
  ASSERT_NO_FATAL_FAILURE(ConnectRaw(c));
  ASSERT_TRUE(c.send_request(0x8000, cmd(p::Cmd::Read), 31, 0, 4096));
  auto r = c.read_simple_reply();
  ASSERT_TRUE(r) << "no reply to a read with an unknown flag";
  EXPECT_EQ(r->cookie, 31u);
  EXPECT_EQ(r->error, err(p::Error::Inval));
  ExpectRawReadWorks(c);
}

TEST_F(RawProtocol, ZeroLengthRequestsGetRepliesAndConnectionLives) {
  ASSERT_NO_FATAL_FAILURE(StartRawServer());
  RawClient c;
  ASSERT_NO_FATAL_FAILURE(ConnectRaw(c));
  // The spec leaves zero-length requests unspecified, except that the
  // server SHOULD NOT disconnect. A successful zero-length read carries no data.
  uint64_t cookie = 40;
  for (auto type : {p::Cmd::Read, p::Cmd::Write, p::Cmd::Trim, p::Cmd::WriteZeroes,
                    p::Cmd::Cache, p::Cmd::Flush}) {
    ASSERT_TRUE(c.send_request(0, cmd(type), cookie, 4096, 0));
    auto r = c.read_simple_reply();
    ASSERT_TRUE(r) << "no reply to a zero-length command " << cmd(type);
    EXPECT_EQ(r->magic, p::kSimpleReplyMagic);
    EXPECT_EQ(r->cookie, cookie);
    ++cookie;
  }
  ExpectRawReadWorks(c);
}

TEST_F(RawProtocol, BadRequestMagicDropsTheConnection) {
  ASSERT_NO_FATAL_FAILURE(StartRawServer());
  RawClient c;
  ASSERT_NO_FATAL_FAILURE(ConnectRaw(c));
  std::vector<uint8_t> req;
  append_be32(req, 0x12345678);  // not the request magic
  append_be16(req, 0);
  append_be16(req, cmd(p::Cmd::Read));
  append_be64(req, 1);
  append_be64(req, 0);
  append_be32(req, 4096);
  ASSERT_TRUE(c.send_bytes(req));
  EXPECT_TRUE(c.wait_closed(5s)) << "the server kept a connection with a bad request magic";
  ExpectLibnbdReadWorks();
}

TEST_F(RawProtocol, DisconnectCommandClosesTheConnection) {
  ASSERT_NO_FATAL_FAILURE(StartRawServer());
  RawClient c;
  ASSERT_NO_FATAL_FAILURE(ConnectRaw(c));
  ASSERT_TRUE(c.send_request(0, cmd(p::Cmd::Disc), 5, 0, 0));
  EXPECT_TRUE(c.wait_closed(5s));
  ExpectLibnbdReadWorks();
}

TEST_F(RawProtocol, DisconnectAfterPipelinedReadsAnswersThemFirst) {
  ASSERT_NO_FATAL_FAILURE(StartRawServer());
  RawClient c;
  ASSERT_NO_FATAL_FAILURE(ConnectRaw(c));
  // The spec: on NBD_CMD_DISC the server handles all outstanding requests
  // before it closes the connection.
  constexpr int kReads = 16;
  std::vector<uint8_t> batch;
  for (int i = 0; i < kReads; ++i) {
    append_be32(batch, p::kRequestMagic);
    append_be16(batch, 0);
    append_be16(batch, cmd(p::Cmd::Read));
    append_be64(batch, 500 + i);
    append_be64(batch, uint64_t(i) * 65536);
    append_be32(batch, 65536);
  }
  append_be32(batch, p::kRequestMagic);
  append_be16(batch, 0);
  append_be16(batch, cmd(p::Cmd::Disc));
  append_be64(batch, 999);
  append_be64(batch, 0);
  append_be32(batch, 0);
  ASSERT_TRUE(c.send_bytes(batch));
  std::vector<bool> seen(kReads, false);
  for (int i = 0; i < kReads; ++i) {
    auto r = c.read_simple_reply();
    ASSERT_TRUE(r) << "only " << i << " of " << kReads << " replies before the close";
    ASSERT_GE(r->cookie, 500u);
    ASSERT_LT(r->cookie, 500u + kReads);
    EXPECT_EQ(r->error, 0u);
    const size_t k = r->cookie - 500;
    EXPECT_FALSE(seen[k]);
    seen[k] = true;
    std::vector<uint8_t> data(65536);
    ASSERT_TRUE(c.recv_bytes(data));
    EXPECT_EQ(first_difference(data, pattern(k * 65536, 65536, kSeed)), -1);
  }
  EXPECT_TRUE(c.wait_closed(5s));
}

TEST_F(RawProtocol, RefusedWriteOnReadOnlyExportSkipsItsPayload) {
  ASSERT_NO_FATAL_FAILURE(StartRawServer({"-r"}));
  RawClient c;
  ASSERT_NO_FATAL_FAILURE(ConnectRaw(c));
  // The payload looks like a request header: if the server failed to skip
  // it, it would parse it as a read of cookie 0x666.
  std::vector<uint8_t> payload;
  for (int i = 0; i < 4096 / 28; ++i) {
    append_be32(payload, p::kRequestMagic);
    append_be16(payload, 0);
    append_be16(payload, cmd(p::Cmd::Read));
    append_be64(payload, 0x666);
    append_be64(payload, 0);
    append_be32(payload, 512);
  }
  payload.resize(4096, 0);
  ASSERT_TRUE(c.send_request(0, cmd(p::Cmd::Write), 1, 0, 4096, payload));
  auto r = c.read_simple_reply();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->cookie, 1u);
  EXPECT_EQ(r->error, err(p::Error::Perm));
  ExpectRawReadWorks(c, 2);
}

// Sends a WRITE of `length` bytes (payload included) from a helper thread
// and expects an error reply for it, then a working READ.
void ExpectOversizedWriteRefused(RawClient& c, uint32_t length) {
  std::vector<uint8_t> payload(length, 0x5a);
  std::thread sender([&] { c.send_request(0, cmd(p::Cmd::Write), 0x77, 0, length, payload); });
  auto r = c.read_simple_reply(10s);
  if (!r) ::shutdown(c.fd(), SHUT_RDWR);  // unblock the sender
  sender.join();
  ASSERT_TRUE(r) << "no reply to an oversized write (connection dropped?)";
  EXPECT_EQ(r->magic, p::kSimpleReplyMagic);
  EXPECT_EQ(r->cookie, 0x77u) << "reply for another cookie: the payload was parsed as requests?";
  EXPECT_NE(r->error, 0u);
  EXPECT_TRUE(r->error == err(p::Error::Inval) || r->error == err(p::Error::Overflow) ||
              r->error == err(p::Error::NoMem))
      << "error " << r->error;
  // Nothing else may arrive before the reply to the next request.
  ASSERT_TRUE(c.send_request(0, cmd(p::Cmd::Read), 0x78, 40960, 4096));
  auto next = c.read_simple_reply();
  ASSERT_TRUE(next) << "connection died after the oversized write";
  EXPECT_EQ(next->magic, p::kSimpleReplyMagic);
  EXPECT_EQ(next->cookie, 0x78u);
  EXPECT_EQ(next->error, 0u);
  std::vector<uint8_t> data(4096);
  ASSERT_TRUE(c.recv_bytes(data));
  EXPECT_EQ(first_difference(data, pattern(40960, 4096, 1)), -1);
}

TEST_F(RawProtocol, WriteLargerThan32MiBIsRefusedAndItsPayloadSkipped) {
  create_sparse_image(image_path(), 64 << 20, {{0, 1 << 20}}, kSeed);
  ASSERT_NO_FATAL_FAILURE(StartRawServer());
  RawClient c;
  ASSERT_TRUE(c.connect_unix(socket_path()));
  ASSERT_TRUE(c.handshake(kExportName));
  ExpectOversizedWriteRefused(c, (32 << 20) + 4096);
  EXPECT_TRUE(all_zero(read_file_range(image_path(), 0 + (1 << 20), 4096)));
}

TEST_F(RawProtocol, WriteLargerThanMaxRequestSizeIsRefusedAndItsPayloadSkipped) {
  SKIP_UNLESS_LAYERD();
  ASSERT_NO_FATAL_FAILURE(StartRawServer({"--max-request-size=1048576"}));
  RawClient c;
  ASSERT_NO_FATAL_FAILURE(ConnectRaw(c));
  ExpectOversizedWriteRefused(c, 2 << 20);
  EXPECT_EQ(first_difference(read_file_range(image_path(), 0, 4096), pattern(0, 4096, kSeed)), -1);
}

TEST_F(RawProtocol, StructuredReadOfHolesAndDataCoversTheRangeExactly) {
  ASSERT_NO_FATAL_FAILURE(StartRawServer());
  RawClient c;
  ASSERT_NO_FATAL_FAILURE(ConnectRaw(c, /*structured=*/true));
  // [512K, 2.5M): data, hole, data.
  const uint64_t off = 512 << 10, len = 2 << 20;
  ASSERT_TRUE(c.send_request(0, cmd(p::Cmd::Read), 9, off, len));
  std::vector<uint8_t> got(len, 0xee);
  std::vector<bool> covered(len / 512, false);
  bool done = false;
  uint64_t bytes = 0;
  for (int i = 0; i < 10000 && !done; ++i) {
    auto ch = read_chunk(c);
    ASSERT_TRUE(ch) << "connection died in the middle of a structured read";
    ASSERT_EQ(ch->magic, p::kStructuredReplyMagic);
    ASSERT_EQ(ch->cookie, 9u);
    done = ch->flags & p::kReplyFlagDone;
    if (ch->type == static_cast<uint16_t>(p::ChunkType::None)) {
      EXPECT_TRUE(done);
      EXPECT_TRUE(ch->payload.empty());
      continue;
    }
    uint64_t o = 0, n = 0;
    if (ch->type == static_cast<uint16_t>(p::ChunkType::OffsetData)) {
      ASSERT_GT(ch->payload.size(), 8u) << "OFFSET_DATA without data";
      o = load_be64(ch->payload.data());
      n = ch->payload.size() - 8;
      ASSERT_GE(o, off);
      ASSERT_LE(o + n, off + len);
      std::copy(ch->payload.begin() + 8, ch->payload.end(), got.begin() + (o - off));
    } else if (ch->type == static_cast<uint16_t>(p::ChunkType::OffsetHole)) {
      ASSERT_EQ(ch->payload.size(), 12u);
      o = load_be64(ch->payload.data());
      n = load_be32(ch->payload.data() + 8);
      ASSERT_GT(n, 0u);
      ASSERT_GE(o, off);
      ASSERT_LE(o + n, off + len);
      std::fill(got.begin() + (o - off), got.begin() + (o - off + n), 0);
    } else {
      FAIL() << "unexpected chunk type " << ch->type;
    }
    bytes += n;
  }
  EXPECT_TRUE(done);
  EXPECT_EQ(bytes, len) << "chunks overlap or leave gaps";
  std::vector<uint8_t> want(len, 0);
  auto d1 = pattern(off, (1 << 20) - off, kSeed);
  std::copy(d1.begin(), d1.end(), want.begin());
  auto d2 = pattern(2 << 20, 512 << 10, kSeed);
  std::copy(d2.begin(), d2.end(), want.begin() + ((2 << 20) - off));
  EXPECT_EQ(first_difference(got, want), -1);
}

TEST_F(RawProtocol, StructuredReadPastTheEndGetsAnErrorChunkWithDone) {
  ASSERT_NO_FATAL_FAILURE(StartRawServer());
  RawClient c;
  ASSERT_NO_FATAL_FAILURE(ConnectRaw(c, /*structured=*/true));
  ASSERT_TRUE(c.send_request(0, cmd(p::Cmd::Read), 10, kImageSize, 4096));
  auto ch = read_chunk(c);
  ASSERT_TRUE(ch);
  EXPECT_EQ(ch->magic, p::kStructuredReplyMagic);
  EXPECT_EQ(ch->cookie, 10u);
  EXPECT_EQ(ch->type, static_cast<uint16_t>(p::ChunkType::Error));
  EXPECT_NE(ch->flags & p::kReplyFlagDone, 0);
  ASSERT_GE(ch->payload.size(), 6u);
  EXPECT_EQ(load_be32(ch->payload.data()), err(p::Error::Inval));
  EXPECT_EQ(ch->payload.size(), 6u + load_be16(ch->payload.data() + 4))
      << "error message length does not match the chunk length";
}

TEST_F(RawProtocol, PipelinedRequestsAllGetRepliesWithTheirCookies) {
  ASSERT_NO_FATAL_FAILURE(StartRawServer());
  RawClient c;
  ASSERT_NO_FATAL_FAILURE(ConnectRaw(c));
  // 100 reads sent back to back before reading any reply.
  std::map<uint64_t, std::pair<uint64_t, uint32_t>> pending;
  std::vector<uint8_t> batch;
  for (uint64_t i = 0; i < 100; ++i) {
    const uint64_t cookie = 1000 + i;
    const uint64_t offset = (i * 37 % 64) * 16384;  // inside [0, 1M): data
    const uint32_t length = 512 + static_cast<uint32_t>(i % 8) * 1024;
    append_be32(batch, p::kRequestMagic);
    append_be16(batch, 0);
    append_be16(batch, cmd(p::Cmd::Read));
    append_be64(batch, cookie);
    append_be64(batch, offset);
    append_be32(batch, length);
    pending[cookie] = {offset, length};
  }
  ASSERT_TRUE(c.send_bytes(batch));
  while (!pending.empty()) {
    auto r = c.read_simple_reply();
    ASSERT_TRUE(r) << pending.size() << " replies missing";
    ASSERT_EQ(r->magic, p::kSimpleReplyMagic);
    auto it = pending.find(r->cookie);
    ASSERT_NE(it, pending.end()) << "unknown or duplicate cookie " << r->cookie;
    ASSERT_EQ(r->error, 0u);
    std::vector<uint8_t> data(it->second.second);
    ASSERT_TRUE(c.recv_bytes(data));
    EXPECT_EQ(first_difference(data, pattern(it->second.first, data.size(), kSeed)), -1)
        << "cookie " << r->cookie;
    pending.erase(it);
  }
}

}  // namespace
}  // namespace layerd::test
