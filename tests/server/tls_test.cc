// TLS end to end: the real binary with X.509 certificates and pre-shared
// keys made here (certtool and psktool), against libnbd (nbds://,
// nbds+unix://), qemu-img and qemu-io, and a raw client that speaks TLS
// through GnuTLS for what libnbd will not send (a second STARTTLS, options
// before STARTTLS that must not survive it, a broken TLS handshake).

#include <gnutls/gnutls.h>
#include <libnbd.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "nbd/protocol.h"
#include "tests/server/harness.h"

namespace layerd::test {
namespace {

namespace p = layerd::nbd;

uint32_t opt(p::Opt o) { return static_cast<uint32_t>(o); }
uint32_t rep(p::Rep r) { return static_cast<uint32_t>(r); }

// --- Credentials, made once for the whole suite ---------------------------------

void write_text(const fs::path& file, const std::string& text) {
  std::ofstream out(file, std::ios::trunc);
  out << text;
  ASSERT_TRUE(out.good()) << "writing " << file;
}

void certtool(const std::vector<std::string>& args) {
  std::vector<std::string> argv{"certtool"};
  argv.insert(argv.end(), args.begin(), args.end());
  RunResult r = run(argv, 30s);
  ASSERT_EQ(r.exit_code, 0) << r.describe();
}

// A private key (ECDSA: fast to make) at `key`.
void make_key(const fs::path& key) {
  ASSERT_NO_FATAL_FAILURE(
      certtool({"--generate-privkey", "--key-type=ecdsa", "--outfile", key.string()}));
}

// A certificate for `key` signed by the CA (ca_cert, ca_key), from template `info`.
void make_cert(const fs::path& dir, const fs::path& key, const fs::path& cert,
               const fs::path& ca_cert, const fs::path& ca_key, const std::string& info) {
  const fs::path tmpl = dir / (cert.filename().string() + ".info");
  write_text(tmpl, info);
  ASSERT_NO_FATAL_FAILURE(certtool({"--generate-certificate", "--load-privkey", key.string(),
                                    "--load-ca-certificate", ca_cert.string(),
                                    "--load-ca-privkey", ca_key.string(), "--template",
                                    tmpl.string(), "--outfile", cert.string()}));
}

void make_ca(const fs::path& dir, const std::string& name, const fs::path& key,
             const fs::path& cert) {
  ASSERT_NO_FATAL_FAILURE(make_key(key));
  const fs::path tmpl = dir / (name + ".info");
  write_text(tmpl, "cn = " + name + "\nca\ncert_signing_key\nexpiration_days = 3\n");
  ASSERT_NO_FATAL_FAILURE(certtool({"--generate-self-signed", "--load-privkey", key.string(),
                                    "--template", tmpl.string(), "--outfile", cert.string()}));
}

const char* kServerInfo =
    "organization = layerd test\ncn = localhost\ndns_name = localhost\n"
    "ip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\n"
    "expiration_days = 3\n";
const char* kClientInfo =
    "organization = layerd test\ncn = client\ntls_www_client\nencryption_key\n"
    "signing_key\nexpiration_days = 3\n";

// Directories as qemu, nbdkit and libnbd read them:
//   server/       ca-cert.pem server-cert.pem server-key.pem   (CA "good")
//   client/       ca-cert.pem client-cert.pem client-key.pem   (CA "good")
//   anonymous/    ca-cert.pem only: trusts the server, shows no certificate
//   foreign/      ca-cert.pem (good) with a client certificate by CA "other"
//   wrong-ca/     ca-cert.pem of CA "other": the server's certificate fails
//   keys.psk      alice:KEY        wrong.psk  alice:ANOTHER KEY
//   qemu-psk/keys.psk  the same as keys.psk, for qemu's tls-creds-psk
struct Credentials {
  TempDir dir;
  fs::path server() const { return dir / "server"; }
  fs::path client() const { return dir / "client"; }
  fs::path anonymous() const { return dir / "anonymous"; }
  fs::path foreign() const { return dir / "foreign"; }
  fs::path wrong_ca() const { return dir / "wrong-ca"; }
  fs::path psk() const { return dir / "keys.psk"; }
  fs::path wrong_psk() const { return dir / "wrong.psk"; }
  fs::path qemu_psk() const { return dir / "qemu-psk"; }

  void make() {
    for (const fs::path& d : {server(), client(), anonymous(), foreign(), wrong_ca(), qemu_psk()})
      fs::create_directories(d);
    const fs::path ca_key = dir / "ca-key.pem", ca = server() / "ca-cert.pem";
    const fs::path other_key = dir / "other-key.pem", other = wrong_ca() / "ca-cert.pem";
    ASSERT_NO_FATAL_FAILURE(make_ca(dir.path(), "good", ca_key, ca));
    ASSERT_NO_FATAL_FAILURE(make_ca(dir.path(), "other", other_key, other));
    for (const fs::path& d : {client(), anonymous(), foreign()})
      fs::copy_file(ca, d / "ca-cert.pem");
    ASSERT_NO_FATAL_FAILURE(make_key(server() / "server-key.pem"));
    ASSERT_NO_FATAL_FAILURE(make_cert(dir.path(), server() / "server-key.pem",
                                      server() / "server-cert.pem", ca, ca_key, kServerInfo));
    ASSERT_NO_FATAL_FAILURE(make_key(client() / "client-key.pem"));
    ASSERT_NO_FATAL_FAILURE(make_cert(dir.path(), client() / "client-key.pem",
                                      client() / "client-cert.pem", ca, ca_key, kClientInfo));
    fs::copy_file(client() / "client-key.pem", wrong_ca() / "client-key.pem");
    fs::copy_file(client() / "client-cert.pem", wrong_ca() / "client-cert.pem");
    ASSERT_NO_FATAL_FAILURE(make_key(foreign() / "client-key.pem"));
    ASSERT_NO_FATAL_FAILURE(make_cert(dir.path(), foreign() / "client-key.pem",
                                      foreign() / "client-cert.pem", other, other_key,
                                      kClientInfo));
    for (const fs::path& f : {psk(), wrong_psk()}) {
      RunResult r = run({"psktool", "-u", "alice", "-p", f.string()}, 30s);
      ASSERT_EQ(r.exit_code, 0) << r.describe();
    }
    ASSERT_NE(read_text_file(psk()), read_text_file(wrong_psk()));
    fs::copy_file(psk(), qemu_psk() / "keys.psk");
  }
};

// --- A raw NBD client that can start TLS (GnuTLS client side) -------------------

class TlsRawClient {
 public:
  ~TlsRawClient() {
    if (session_) gnutls_deinit(session_);
    if (creds_) gnutls_certificate_free_credentials(creds_);
  }

  RawClient& raw() { return raw_; }

  // Greeting and client flags in plain text.
  bool start(const fs::path& socket) {
    if (!raw_.connect_unix(socket)) return false;
    auto g = raw_.read_greeting();
    return g && g->magic == p::kNbdMagic &&
           raw_.send_client_flags(p::kClientFlagFixedNewstyle | p::kClientFlagNoZeroes);
  }

  // NBD_OPT_STARTTLS, its ACK, then a TLS handshake trusting `client_dir`'s
  // ca-cert.pem (and showing its client certificate if there is one).
  bool start_tls(const fs::path& client_dir) {
    if (!send_option(opt(p::Opt::StartTls))) return false;
    auto r = read_option_reply();
    if (!r || r->type != rep(p::Rep::Ack)) return false;
    return handshake(client_dir);
  }

  bool handshake(const fs::path& client_dir) {
    gnutls_certificate_allocate_credentials(&creds_);
    gnutls_certificate_set_x509_trust_file(creds_, (client_dir / "ca-cert.pem").c_str(),
                                           GNUTLS_X509_FMT_PEM);
    if (fs::exists(client_dir / "client-cert.pem"))
      gnutls_certificate_set_x509_key_file(creds_, (client_dir / "client-cert.pem").c_str(),
                                           (client_dir / "client-key.pem").c_str(),
                                           GNUTLS_X509_FMT_PEM);
    gnutls_init(&session_, GNUTLS_CLIENT);
    gnutls_set_default_priority(session_);
    gnutls_credentials_set(session_, GNUTLS_CRD_CERTIFICATE, creds_);
    gnutls_session_set_verify_cert(session_, "localhost", 0);
    gnutls_transport_set_int(session_, raw_.fd());
    gnutls_handshake_set_timeout(session_, 5000);
    gnutls_record_set_timeout(session_, 5000);
    int rc;
    do {
      rc = gnutls_handshake(session_);
    } while (rc < 0 && !gnutls_error_is_fatal(rc));
    if (rc < 0) error_ = gnutls_strerror(rc);
    tls_ = rc == 0;
    return tls_;
  }

  bool send_bytes(std::span<const uint8_t> data) {
    if (!tls_) return raw_.send_bytes(data);
    while (!data.empty()) {
      ssize_t n = gnutls_record_send(session_, data.data(), data.size());
      if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED) continue;
      if (n < 0) return false;
      data = data.subspan(static_cast<size_t>(n));
    }
    return true;
  }

  bool recv_bytes(std::span<uint8_t> out) {
    if (!tls_) return raw_.recv_bytes(out);
    while (!out.empty()) {
      ssize_t n = gnutls_record_recv(session_, out.data(), out.size());
      if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED) continue;
      if (n <= 0) return false;
      out = out.subspan(static_cast<size_t>(n));
    }
    return true;
  }

  bool send_option(uint32_t option, std::span<const uint8_t> payload = {}) {
    std::vector<uint8_t> v;
    append_be64(v, p::kIHaveOpt);
    append_be32(v, option);
    append_be32(v, static_cast<uint32_t>(payload.size()));
    v.insert(v.end(), payload.begin(), payload.end());
    return send_bytes(v);
  }

  std::optional<RawClient::OptionReply> read_option_reply() {
    uint8_t b[20];
    if (!recv_bytes(b)) return std::nullopt;
    RawClient::OptionReply r{load_be64(b), load_be32(b + 8), load_be32(b + 12), {}};
    const uint32_t len = load_be32(b + 16);
    if (len > (1u << 20)) return std::nullopt;
    r.data.resize(len);
    if (len > 0 && !recv_bytes(r.data)) return std::nullopt;
    return r;
  }

  // Every reply to one option, up to its ACK or error.
  std::vector<RawClient::OptionReply> option_replies(uint32_t option,
                                                     std::span<const uint8_t> payload = {}) {
    std::vector<RawClient::OptionReply> replies;
    if (!send_option(option, payload)) return replies;
    for (int i = 0; i < 64; ++i) {
      auto r = read_option_reply();
      if (!r) break;
      replies.push_back(*r);
      if (r->type == rep(p::Rep::Ack) || (r->type & p::kRepErrBit)) break;
    }
    return replies;
  }

  const std::string& error() const { return error_; }

 private:
  RawClient raw_;
  gnutls_certificate_credentials_t creds_ = nullptr;
  gnutls_session_t session_ = nullptr;
  bool tls_ = false;
  std::string error_;
};

std::vector<uint8_t> go_data(std::string_view name) {
  std::vector<uint8_t> v;
  append_be32(v, static_cast<uint32_t>(name.size()));
  v.insert(v.end(), name.begin(), name.end());
  append_be16(v, 0);
  return v;
}

std::vector<uint8_t> meta_data(std::string_view name, std::string_view query) {
  std::vector<uint8_t> v;
  append_be32(v, static_cast<uint32_t>(name.size()));
  v.insert(v.end(), name.begin(), name.end());
  append_be32(v, 1);
  append_be32(v, static_cast<uint32_t>(query.size()));
  v.insert(v.end(), query.begin(), query.end());
  return v;
}

// --- libnbd over URIs -------------------------------------------------------------

// Connects to `uri` (nbds://, nbds+unix://) without blocking longer than
// `timeout`; null with the reason in *error on failure.
Nbd connect_uri(const std::string& uri, std::string* error, Millis timeout = 10s) {
  Nbd h(nbd_create());
  if (!h) {
    *error = nbd_error_text();
    return nullptr;
  }
  nbd_set_uri_allow_local_file(h.get(), true);  // tls-certificates, tls-psk-file
  if (nbd_aio_connect_uri(h.get(), uri.c_str()) == -1) {
    *error = "nbd_aio_connect_uri: " + nbd_error_text();
    return nullptr;
  }
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (nbd_aio_is_connecting(h.get()) || nbd_aio_is_negotiating(h.get())) {
    if (std::chrono::steady_clock::now() > deadline) {
      *error = "handshake did not finish in time";
      return nullptr;
    }
    if (nbd_poll(h.get(), 100) == -1) {
      *error = "nbd_poll: " + nbd_error_text();
      return nullptr;
    }
  }
  if (!nbd_aio_is_ready(h.get())) {
    *error = "connection failed: " + nbd_error_text();
    return nullptr;
  }
  return h;
}

// Reads, writes, reads back and flushes over `h`; the image starts as
// pattern(kSeed).
void expect_data_round_trip(nbd_handle* h, uint64_t offset, uint32_t seed) {
  std::vector<uint8_t> buf(1 << 20);
  ASSERT_EQ(nbd_pread(h, buf.data(), buf.size(), 0, 0), 0) << nbd_error_text();
  EXPECT_EQ(first_difference(buf, pattern(0, buf.size(), 1)), -1);
  auto data = pattern(offset, 300000, seed);
  ASSERT_EQ(nbd_pwrite(h, data.data(), data.size(), offset, 0), 0) << nbd_error_text();
  std::vector<uint8_t> back(data.size());
  ASSERT_EQ(nbd_pread(h, back.data(), back.size(), offset, 0), 0) << nbd_error_text();
  EXPECT_EQ(first_difference(back, data), -1);
  ASSERT_EQ(nbd_flush(h, 0), 0) << nbd_error_text();
}

// --- The fixture --------------------------------------------------------------------

class Tls : public ServerTest {
 protected:
  static void SetUpTestSuite() {
    creds_ = new Credentials;
    creds_->make();
    made_ = !::testing::Test::HasFailure();
  }
  static void TearDownTestSuite() {
    delete creds_;
    creds_ = nullptr;
  }
  void SetUp() override {
    SKIP_UNLESS_LAYERD();
    ASSERT_TRUE(made_) << "making the certificates failed";
  }

  const Credentials& creds() const { return *creds_; }

  // -f raw -t -e 0 -x disk plus `extra`, on the Unix socket.
  void StartTlsServer(std::vector<std::string> extra) {
    std::vector<std::string> args{"-f", "raw", "-t", "-e", "0", "-x", kExportName,
                                  "--log=info"};
    args.insert(args.end(), extra.begin(), extra.end());
    StartServer(std::move(args));
  }

  // The same on TCP 127.0.0.1:port_.
  void StartTcpServer(std::vector<std::string> extra) {
    if (!fs::exists(image_path())) create_pattern_image(image_path(), kImageSize, kSeed);
    port_ = pick_free_port("127.0.0.1");
    ServerOptions o;
    o.args = {"-f", "raw", "-t", "-e", "0", "-x", kExportName, "--log=info",
              "-b", "127.0.0.1", "-p", std::to_string(port_)};
    o.args.insert(o.args.end(), extra.begin(), extra.end());
    o.args.push_back(image_path().string());
    o.tcp_port = port_;
    o.log_file = dir_ / "server.log";
    ASSERT_TRUE(server_.start(std::move(o))) << server_.error();
  }

  // libnbd's URIs; a PSK user name is the URI's user.
  std::string unix_uri(const std::string& query, const std::string& user = "") const {
    return "nbds+unix://" + user + "/disk?socket=" + socket_path().string() + "&" + query;
  }
  std::string tcp_uri(const std::string& query, const std::string& user = "") const {
    return "nbds://" + user + "127.0.0.1:" + std::to_string(port_) + "/disk?" + query;
  }
  std::string certs(const fs::path& dir) const { return "tls-certificates=" + dir.string(); }
  std::string psk(const fs::path& file) const { return "tls-psk-file=" + file.string(); }

  // A good X.509 client still gets served (after a bad one was dropped).
  void ExpectGoodClientServed() {
    std::string error;
    Nbd h = connect_uri(unix_uri(certs(creds().client())), &error);
    ASSERT_TRUE(h) << error << "\n" << server_.log();
    std::vector<uint8_t> buf(4096);
    ASSERT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), 8192, 0), 0) << nbd_error_text();
    EXPECT_EQ(first_difference(buf, pattern(8192, buf.size(), kSeed)), -1);
  }

  static Credentials* creds_;
  static bool made_;
  uint16_t port_ = 0;
};

Credentials* Tls::creds_ = nullptr;
bool Tls::made_ = false;

// --- libnbd clients -------------------------------------------------------------------

TEST_F(Tls, X509OverUnixSocketServesReadsAndWrites) {
  ASSERT_NO_FATAL_FAILURE(StartTlsServer({"--tls-creds", creds().server().string()}));
  std::string error;
  Nbd h = connect_uri(unix_uri(certs(creds().client())), &error);
  ASSERT_TRUE(h) << error << "\n" << server_.log();
  EXPECT_EQ(nbd_get_tls_negotiated(h.get()), 1);
  ASSERT_NO_FATAL_FAILURE(expect_data_round_trip(h.get(), 1000001, 7));
  h.reset();
  EXPECT_EQ(server_.stop(), 0);
  EXPECT_EQ(first_difference(read_file_range(image_path(), 1000001, 300000),
                             pattern(1000001, 300000, 7)),
            -1);
  EXPECT_NE(server_.log().find("TLS"), std::string::npos);
}

TEST_F(Tls, X509OverTcpServesReadsAndWrites) {
  ASSERT_NO_FATAL_FAILURE(StartTcpServer({"--tls-creds", creds().server().string()}));
  std::string error;
  Nbd h = connect_uri(tcp_uri(certs(creds().client())), &error);
  ASSERT_TRUE(h) << error;
  EXPECT_EQ(nbd_get_tls_negotiated(h.get()), 1);
  ASSERT_NO_FATAL_FAILURE(expect_data_round_trip(h.get(), 65536, 8));
}

TEST_F(Tls, PskOverTcpServesReadsAndWrites) {
  ASSERT_NO_FATAL_FAILURE(StartTcpServer({"--tls-psk", creds().psk().string()}));
  std::string error;
  Nbd h = connect_uri(tcp_uri(psk(creds().psk()), "alice@"), &error);
  ASSERT_TRUE(h) << error;
  EXPECT_EQ(nbd_get_tls_negotiated(h.get()), 1);
  ASSERT_NO_FATAL_FAILURE(expect_data_round_trip(h.get(), 12345, 9));
  EXPECT_NE(server_.log().find("PSK user 'alice'"), std::string::npos) << server_.log();
}

TEST_F(Tls, PskOverUnixSocketServesReadsAndWrites) {
  ASSERT_NO_FATAL_FAILURE(StartTlsServer({"--tls-psk", creds().psk().string()}));
  std::string error;
  Nbd h = connect_uri(unix_uri(psk(creds().psk()), "alice@"), &error);
  ASSERT_TRUE(h) << error;
  ASSERT_NO_FATAL_FAILURE(expect_data_round_trip(h.get(), 2000000, 10));
}

TEST_F(Tls, WrongPskKeyOrUserIsRefusedAndOthersAreServed) {
  ASSERT_NO_FATAL_FAILURE(StartTlsServer({"--tls-psk", creds().psk().string()}));
  std::string error;
  EXPECT_FALSE(connect_uri(unix_uri(psk(creds().wrong_psk()), "alice@"), &error))
      << "a wrong key was accepted";
  EXPECT_FALSE(connect_uri(unix_uri(psk(creds().psk()), "mallory@"), &error))
      << "an unknown user was accepted";
  Nbd h = connect_uri(unix_uri(psk(creds().psk()), "alice@"), &error);
  ASSERT_TRUE(h) << error;
  EXPECT_EQ(nbd_get_tls_negotiated(h.get()), 1);
}

// (libnbd checks the server's certificate only over TCP, where it has a
// host name; the raw client checks it over the Unix socket.)
TEST_F(Tls, ClientThatTrustsAnotherCaRefusesTheServer) {
  ASSERT_NO_FATAL_FAILURE(StartTcpServer({"--tls-creds", creds().server().string()}));
  std::string error;
  EXPECT_FALSE(connect_uri(tcp_uri(certs(creds().wrong_ca())), &error));
  EXPECT_NE(error.find("certificate"), std::string::npos) << error;
  Nbd h = connect_uri(tcp_uri(certs(creds().client())), &error);
  ASSERT_TRUE(h) << error;
}

TEST_F(Tls, RawClientThatTrustsAnotherCaRefusesTheServerOnAUnixSocket) {
  ASSERT_NO_FATAL_FAILURE(StartTlsServer({"--tls-creds", creds().server().string()}));
  TlsRawClient c;
  ASSERT_TRUE(c.start(socket_path()));
  EXPECT_FALSE(c.start_tls(creds().wrong_ca()));
  TlsRawClient good;
  ASSERT_TRUE(good.start(socket_path()));
  EXPECT_TRUE(good.start_tls(creds().client())) << good.error();
}

TEST_F(Tls, VerifyPeerRefusesClientsWithoutACertificateOfTheCa) {
  ASSERT_NO_FATAL_FAILURE(
      StartTlsServer({"--tls-creds", creds().server().string(), "--tls-verify-peer"}));
  std::string error;
  EXPECT_FALSE(connect_uri(unix_uri(certs(creds().foreign())), &error))
      << "a client certificate from another CA was accepted";
  EXPECT_FALSE(connect_uri(unix_uri(certs(creds().anonymous())), &error))
      << "a client without a certificate was accepted";
  ASSERT_NO_FATAL_FAILURE(ExpectGoodClientServed());
  EXPECT_NE(server_.log().find("TLS handshake"), std::string::npos) << server_.log();
}

TEST_F(Tls, WithoutVerifyPeerClientsNeedNoCertificate) {
  ASSERT_NO_FATAL_FAILURE(StartTlsServer({"--tls-creds", creds().server().string()}));
  std::string error;
  Nbd h = connect_uri(unix_uri(certs(creds().anonymous())), &error);
  ASSERT_TRUE(h) << error;
  EXPECT_EQ(nbd_get_tls_negotiated(h.get()), 1);
}

TEST_F(Tls, StructuredRepliesAndBlockStatusWorkOverTls) {
  constexpr uint64_t kMiB = 1 << 20;
  create_sparse_image(image_path(), kImageSize, {{0, kMiB}, {3 * kMiB, kMiB}}, kSeed);
  ASSERT_NO_FATAL_FAILURE(StartTlsServer({"--tls-creds", creds().server().string()}));
  Nbd h(nbd_create());
  ASSERT_TRUE(h);
  nbd_add_meta_context(h.get(), LIBNBD_CONTEXT_BASE_ALLOCATION);
  nbd_set_uri_allow_local_file(h.get(), true);
  ASSERT_EQ(nbd_connect_uri(h.get(), unix_uri(certs(creds().client())).c_str()), 0)
      << nbd_error_text();
  EXPECT_EQ(nbd_get_tls_negotiated(h.get()), 1);
  EXPECT_EQ(nbd_get_structured_replies_negotiated(h.get()), 1);
  ASSERT_EQ(nbd_can_meta_context(h.get(), LIBNBD_CONTEXT_BASE_ALLOCATION), 1);
  auto map = block_status_map(h.get(), 0, kImageSize);
  ASSERT_TRUE(map);
  const uint32_t hole = LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO;
  EXPECT_EQ(*map, (std::vector<Extent>{{0, kMiB, 0},
                                       {kMiB, 2 * kMiB, hole},
                                       {3 * kMiB, kMiB, 0}}))
      << to_string(*map);
  std::vector<uint8_t> buf(2 * kMiB);
  ASSERT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), kMiB / 2, 0), 0) << nbd_error_text();
  std::vector<uint8_t> want(buf.size(), 0);
  auto head = pattern(kMiB / 2, kMiB / 2, kSeed);
  std::copy(head.begin(), head.end(), want.begin());
  EXPECT_EQ(first_difference(buf, want), -1);
}

TEST_F(Tls, ManyPipelinedRequestsOfEverySizeArriveIntact) {
  ASSERT_NO_FATAL_FAILURE(StartTlsServer({"--tls-creds", creds().server().string()}));
  std::string error;
  Nbd h = connect_uri(unix_uri(certs(creds().client())), &error);
  ASSERT_TRUE(h) << error;
  // Sizes around one TLS record (16 KiB) and far beyond it, in flight at
  // once: replies from the loop and from workers share the session.
  const std::vector<uint32_t> sizes{1, 512, 4096, 16368, 16384, 16400, 65536, 300000, 2 << 20};
  std::vector<std::vector<uint8_t>> bufs;
  std::vector<uint64_t> offsets;
  for (int round = 0; round < 8; ++round)
    for (uint32_t size : sizes) {
      bufs.emplace_back(size);
      offsets.push_back((static_cast<uint64_t>(round) * 777777 + size) % (kImageSize - size));
    }
  std::vector<int64_t> cookies;
  for (size_t i = 0; i < bufs.size(); ++i) {
    int64_t c = nbd_aio_pread(h.get(), bufs[i].data(), bufs[i].size(), offsets[i],
                              NBD_NULL_COMPLETION, 0);
    ASSERT_GE(c, 0) << nbd_error_text();
    cookies.push_back(c);
  }
  while (nbd_aio_in_flight(h.get()) > 0) ASSERT_GE(nbd_poll(h.get(), 5000), 0) << nbd_error_text();
  for (size_t i = 0; i < bufs.size(); ++i) {
    ASSERT_EQ(nbd_aio_command_completed(h.get(), static_cast<uint64_t>(cookies[i])), 1)
        << nbd_error_text();
    EXPECT_EQ(first_difference(bufs[i], pattern(offsets[i], bufs[i].size(), kSeed)), -1)
        << "read " << i << " of " << bufs[i].size() << " bytes";
  }
}

TEST_F(Tls, ManyPipelinedWritesOfEverySizeLandIntact) {
  ASSERT_NO_FATAL_FAILURE(StartTlsServer({"--tls-creds", creds().server().string()}));
  std::string error;
  Nbd h = connect_uri(unix_uri(certs(creds().client())), &error);
  ASSERT_TRUE(h) << error;
  // Payloads read by the loop across record boundaries, several per read.
  const std::vector<uint32_t> sizes{1, 512, 4096, 16368, 16384, 16400, 65536, 300000};
  std::vector<std::vector<uint8_t>> bufs;
  std::vector<uint64_t> offsets;
  uint64_t offset = 0;
  for (int round = 0; round < 4; ++round)
    for (uint32_t size : sizes) {
      offsets.push_back(offset);
      bufs.push_back(pattern(offset, size, 40 + round));
      offset += size;
    }
  ASSERT_LE(offset, kImageSize);
  for (size_t i = 0; i < bufs.size(); ++i)
    ASSERT_GE(nbd_aio_pwrite(h.get(), bufs[i].data(), bufs[i].size(), offsets[i],
                             NBD_NULL_COMPLETION, 0),
              0)
        << nbd_error_text();
  while (nbd_aio_in_flight(h.get()) > 0) ASSERT_GE(nbd_poll(h.get(), 5000), 0) << nbd_error_text();
  ASSERT_EQ(nbd_flush(h.get(), 0), 0) << nbd_error_text();
  for (size_t i = 0; i < bufs.size(); ++i) {
    std::vector<uint8_t> back(bufs[i].size());
    ASSERT_EQ(nbd_pread(h.get(), back.data(), back.size(), offsets[i], 0), 0) << nbd_error_text();
    EXPECT_EQ(first_difference(back, bufs[i]), -1) << "write " << i;
    EXPECT_EQ(first_difference(read_file_range(image_path(), offsets[i], bufs[i].size()), bufs[i]),
              -1)
        << "write " << i << " in the file";
  }
}

// --- Modes ------------------------------------------------------------------------------

TEST_F(Tls, RequireRefusesPlainClientsWithTlsReqdAndHidesTheExportList) {
  ASSERT_NO_FATAL_FAILURE(StartTlsServer({"--tls-creds", creds().server().string()}));
  TlsRawClient c;
  ASSERT_TRUE(c.start(socket_path()));
  for (uint32_t option : {opt(p::Opt::List), opt(p::Opt::StructuredReply)}) {
    auto replies = c.option_replies(option);
    ASSERT_EQ(replies.size(), 1u) << "option " << option;
    EXPECT_EQ(replies[0].type, rep(p::Rep::ErrTlsReqd)) << "option " << option;
  }
  auto go = c.option_replies(opt(p::Opt::Go), go_data("disk"));
  ASSERT_EQ(go.size(), 1u) << "no export information before TLS";
  EXPECT_EQ(go[0].type, rep(p::Rep::ErrTlsReqd));
  // ...and libnbd without TLS is not served.
  std::string error;
  EXPECT_FALSE(connect_uri(uri("disk"), &error));
  // STARTTLS is still accepted on the same connection.
  ASSERT_TRUE(c.start_tls(creds().client())) << c.error();
  auto list = c.option_replies(opt(p::Opt::List));
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[0].type, rep(p::Rep::Server));
}

TEST_F(Tls, ExportNameBeforeStartTlsClosesTheConnection) {
  ASSERT_NO_FATAL_FAILURE(StartTlsServer({"--tls-creds", creds().server().string()}));
  TlsRawClient c;
  ASSERT_TRUE(c.start(socket_path()));
  const std::string name = "disk";
  ASSERT_TRUE(c.send_option(opt(p::Opt::ExportName),
                            std::span(reinterpret_cast<const uint8_t*>(name.data()), name.size())));
  EXPECT_TRUE(c.raw().wait_closed(5s));
}

TEST_F(Tls, OnServesPlainAndTlsClients) {
  ASSERT_NO_FATAL_FAILURE(
      StartTlsServer({"--tls-creds", creds().server().string(), "--tls=on"}));
  std::string error;
  Nbd plain = connect_uri(uri("disk"), &error);
  ASSERT_TRUE(plain) << error;
  EXPECT_EQ(nbd_get_tls_negotiated(plain.get()), 0);
  ASSERT_NO_FATAL_FAILURE(expect_data_round_trip(plain.get(), 4096, 11));
  Nbd tls = connect_uri(unix_uri(certs(creds().client())), &error);
  ASSERT_TRUE(tls) << error;
  EXPECT_EQ(nbd_get_tls_negotiated(tls.get()), 1);
  std::vector<uint8_t> buf(300000);
  ASSERT_EQ(nbd_pread(tls.get(), buf.data(), buf.size(), 4096, 0), 0) << nbd_error_text();
  EXPECT_EQ(first_difference(buf, pattern(4096, buf.size(), 11)), -1);
}

TEST_F(Tls, OffServesPlainClientsOnlyAndRefusesStartTls) {
  ASSERT_NO_FATAL_FAILURE(
      StartTlsServer({"--tls-creds", creds().server().string(), "--tls=off"}));
  TlsRawClient c;
  ASSERT_TRUE(c.start(socket_path()));
  auto r = c.option_replies(opt(p::Opt::StartTls));
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, rep(p::Rep::ErrPolicy));
}

TEST_F(Tls, SecondStartTlsIsRefusedWithErrInvalid) {
  ASSERT_NO_FATAL_FAILURE(StartTlsServer({"--tls-creds", creds().server().string()}));
  TlsRawClient c;
  ASSERT_TRUE(c.start(socket_path()));
  ASSERT_TRUE(c.start_tls(creds().client())) << c.error();
  auto again = c.option_replies(opt(p::Opt::StartTls));
  ASSERT_EQ(again.size(), 1u);
  EXPECT_EQ(again[0].type, rep(p::Rep::ErrInvalid));
  // The session goes on, over TLS.
  auto go = c.option_replies(opt(p::Opt::Go), go_data("disk"));
  ASSERT_FALSE(go.empty());
  EXPECT_EQ(go.back().type, rep(p::Rep::Ack));
}

TEST_F(Tls, OptionsNegotiatedBeforeStartTlsDoNotSurviveIt) {
  ASSERT_NO_FATAL_FAILURE(
      StartTlsServer({"--tls-creds", creds().server().string(), "--tls=on"}));
  TlsRawClient c;
  ASSERT_TRUE(c.start(socket_path()));
  // In plain text: structured replies and a meta context, both accepted.
  auto sr = c.option_replies(opt(p::Opt::StructuredReply));
  ASSERT_EQ(sr.size(), 1u);
  ASSERT_EQ(sr[0].type, rep(p::Rep::Ack));
  auto meta = c.option_replies(opt(p::Opt::SetMetaContext), meta_data("disk", "base:allocation"));
  ASSERT_EQ(meta.size(), 2u);
  ASSERT_EQ(meta[0].type, rep(p::Rep::MetaContext));
  ASSERT_TRUE(c.start_tls(creds().client())) << c.error();
  auto go = c.option_replies(opt(p::Opt::Go), go_data("disk"));
  ASSERT_FALSE(go.empty());
  ASSERT_EQ(go.back().type, rep(p::Rep::Ack));
  // A READ gets a simple reply: structured replies were forgotten.
  std::vector<uint8_t> req;
  append_be32(req, p::kRequestMagic);
  append_be16(req, 0);
  append_be16(req, static_cast<uint16_t>(p::Cmd::Read));
  append_be64(req, 0x1111);
  append_be64(req, 0);
  append_be32(req, 512);
  ASSERT_TRUE(c.send_bytes(req));
  std::vector<uint8_t> reply(16 + 512);
  ASSERT_TRUE(c.recv_bytes(reply));
  EXPECT_EQ(load_be32(reply.data()), p::kSimpleReplyMagic);
  EXPECT_EQ(load_be32(reply.data() + 4), 0u);
  EXPECT_EQ(first_difference(std::span(reply).subspan(16), pattern(0, 512, kSeed)), -1);
  // BLOCK_STATUS is refused: no meta context is selected any more.
  std::vector<uint8_t> bs;
  append_be32(bs, p::kRequestMagic);
  append_be16(bs, 0);
  append_be16(bs, static_cast<uint16_t>(p::Cmd::BlockStatus));
  append_be64(bs, 0x2222);
  append_be64(bs, 0);
  append_be32(bs, 4096);
  ASSERT_TRUE(c.send_bytes(bs));
  std::vector<uint8_t> error_reply(16);
  ASSERT_TRUE(c.recv_bytes(error_reply));
  EXPECT_EQ(load_be32(error_reply.data()), p::kSimpleReplyMagic);
  EXPECT_EQ(load_be32(error_reply.data() + 4), static_cast<uint32_t>(p::Error::Inval));
  EXPECT_EQ(load_be64(error_reply.data() + 8), 0x2222u);
}

// --- Bad clients ------------------------------------------------------------------------

TEST_F(Tls, GarbageInsteadOfATlsHandshakeDropsOnlyThatClient) {
  ASSERT_NO_FATAL_FAILURE(StartTlsServer({"--tls-creds", creds().server().string()}));
  std::string error;
  Nbd good = connect_uri(unix_uri(certs(creds().client())), &error);
  ASSERT_TRUE(good) << error;
  TlsRawClient bad;
  ASSERT_TRUE(bad.start(socket_path()));
  ASSERT_TRUE(bad.send_option(opt(p::Opt::StartTls)));
  auto ack = bad.read_option_reply();
  ASSERT_TRUE(ack);
  ASSERT_EQ(ack->type, rep(p::Rep::Ack));
  // Plain NBD options where a ClientHello belongs.
  std::vector<uint8_t> junk;
  for (int i = 0; i < 50; ++i) {
    append_be64(junk, p::kIHaveOpt);
    append_be32(junk, opt(p::Opt::List));
    append_be32(junk, 0);
  }
  ASSERT_TRUE(bad.raw().send_bytes(junk));
  EXPECT_TRUE(bad.raw().wait_closed(5s)) << "the server kept a client that speaks no TLS";
  std::vector<uint8_t> buf(1 << 20);
  ASSERT_EQ(nbd_pread(good.get(), buf.data(), buf.size(), 0, 0), 0) << nbd_error_text();
  EXPECT_EQ(first_difference(buf, pattern(0, buf.size(), kSeed)), -1);
  ASSERT_NO_FATAL_FAILURE(ExpectGoodClientServed());
}

TEST_F(Tls, HandshakeLimitCoversTheTlsHandshake) {
  ASSERT_NO_FATAL_FAILURE(StartTlsServer(
      {"--tls-creds", creds().server().string(), "--handshake-limit=1"}));
  TlsRawClient idle;
  ASSERT_TRUE(idle.start(socket_path()));
  ASSERT_TRUE(idle.send_option(opt(p::Opt::StartTls)));
  auto ack = idle.read_option_reply();
  ASSERT_TRUE(ack);
  ASSERT_EQ(ack->type, rep(p::Rep::Ack));
  // Half a ClientHello, then nothing.
  const uint8_t partial[] = {0x16, 0x03, 0x01, 0x02, 0x00, 0x01};
  ASSERT_TRUE(idle.raw().send_bytes(partial));
  const auto start = std::chrono::steady_clock::now();
  EXPECT_TRUE(idle.raw().wait_closed(5s));
  EXPECT_LT(std::chrono::steady_clock::now() - start, 3s);
  ASSERT_NO_FATAL_FAILURE(ExpectGoodClientServed());
}

// --- Limits after STARTTLS ---------------------------------------------------------

std::vector<uint8_t> request(uint16_t type, uint64_t offset, uint32_t length) {
  std::vector<uint8_t> v;
  append_be32(v, p::kRequestMagic);
  append_be16(v, 0);
  append_be16(v, type);
  append_be64(v, 1);
  append_be64(v, offset);
  append_be32(v, length);
  return v;
}

// Over TLS, a client fills the socket with read replies it never reads,
// then pipelines 32 MiB writes until the server stops taking them. Returns
// the growth of the server's VmHWM in KiB.
long tls_growth_from_a_client_that_never_reads(Server& server, const fs::path& socket,
                                               const fs::path& client_dir) {
  TlsRawClient c;
  if (!c.start(socket) || !c.start_tls(client_dir)) {
    ADD_FAILURE() << "STARTTLS failed: " << c.error() << "\n" << server.log();
    return -1;
  }
  auto go = c.option_replies(opt(p::Opt::Go), go_data("disk"));
  if (go.empty() || go.back().type != rep(p::Rep::Ack)) {
    ADD_FAILURE() << "GO failed: " << server.log();
    return -1;
  }
  const long base = proc_status_kib(server.pid(), "VmHWM");
  std::atomic<uint64_t> sent{0};
  std::thread sender([&] {
    for (int r = 0; r < 8; ++r)
      if (!c.send_bytes(request(static_cast<uint16_t>(p::Cmd::Read), 0, 4 << 20))) return;
    std::vector<uint8_t> payload(32 << 20, 0x5a);
    for (int w = 0; w < 32; ++w) {
      if (!c.send_bytes(request(static_cast<uint16_t>(p::Cmd::Write),
                                (16ull << 20) * (1 + w % 2), 32 << 20)) ||
          !c.send_bytes(payload))
        return;
      sent += payload.size();
    }
  });
  // Until the sending has stalled for a second, or all is sent.
  uint64_t last = 0;
  for (int unchanged = 0; unchanged < 4 && last < (32ull << 25);) {
    std::this_thread::sleep_for(250ms);
    const uint64_t now = sent.load();
    unchanged = now == last ? unchanged + 1 : 0;
    last = now;
  }
  const long peak = proc_status_kib(server.pid(), "VmHWM");
  ::shutdown(c.raw().fd(), SHUT_RDWR);
  sender.join();
  std::printf("[ FIGURES  ] TLS client that never reads: %llu MiB of writes taken, VmHWM "
              "%ld -> %ld KiB\n",
              static_cast<unsigned long long>(last >> 20), base, peak);
  return peak - base;
}

TEST_F(Tls, MaxBufferAndMaxInFlightBoundAClientAfterStartTls) {
  create_pattern_image(image_path(), 64 << 20, kSeed);
  ASSERT_NO_FATAL_FAILURE(StartTlsServer({"--tls-creds", creds().server().string()}));
  const long bounded =
      tls_growth_from_a_client_that_never_reads(server_, socket_path(), creds().client());
  // --max-buffer (64M by default), the readers' 4 MiB buffers, TLS records.
  // (Under a sanitizer its quarantine keeps freed memory: bounds unchecked.)
  const bool sanitized = runs_sanitized(server_.pid());
  if (!sanitized) {
    EXPECT_LT(bounded, 160 * 1024) << "KiB grown with the default --max-buffer";
  }
  ASSERT_NO_FATAL_FAILURE(ExpectGoodClientServed());
  server_.stop();
  // Lifted, the payloads pile up: the bound above is the limits' doing.
  auto start = [&](Server& s, const fs::path& socket, std::vector<std::string> limits) {
    ServerOptions o;
    o.args = {"-f", "raw", "-t", "-e", "0", "-x", kExportName, "--tls-creds",
              creds().server().string()};
    o.args.insert(o.args.end(), limits.begin(), limits.end());
    o.args.insert(o.args.end(), {"-k", socket.string(), image_path().string()});
    o.unix_socket = socket;
    o.log_file = dir_ / (socket.stem().string() + ".log");
    ASSERT_TRUE(s.start(std::move(o))) << s.error();
  };
  {
    Server lifted;
    ASSERT_NO_FATAL_FAILURE(start(lifted, dir_ / "lifted.sock",
                                  {"--max-buffer", "512M", "--max-in-flight", "1024"}));
    EXPECT_GT(tls_growth_from_a_client_that_never_reads(lifted, dir_ / "lifted.sock",
                                                        creds().client()),
              320 * 1024)
        << "KiB grown with --max-buffer=512M";
  }
  Server few;
  ASSERT_NO_FATAL_FAILURE(
      start(few, dir_ / "few.sock", {"--max-buffer", "512M", "--max-in-flight", "4"}));
  const long few_grown =
      tls_growth_from_a_client_that_never_reads(few, dir_ / "few.sock", creds().client());
  if (!sanitized) {
    EXPECT_LT(few_grown, 96 * 1024) << "KiB grown with --max-in-flight=4";
  }
}

TEST_F(Tls, IdleTimeoutDisconnectsAnIdleTlsClient) {
  ASSERT_NO_FATAL_FAILURE(
      StartTlsServer({"--tls-creds", creds().server().string(), "--idle-timeout", "1"}));
  TlsRawClient c;
  ASSERT_TRUE(c.start(socket_path()));
  ASSERT_TRUE(c.start_tls(creds().client())) << c.error();
  auto go = c.option_replies(opt(p::Opt::Go), go_data("disk"));
  ASSERT_FALSE(go.empty());
  ASSERT_EQ(go.back().type, rep(p::Rep::Ack));
  const auto start = std::chrono::steady_clock::now();
  std::vector<uint8_t> byte(1);
  EXPECT_FALSE(c.recv_bytes(byte)) << "the server sent data to an idle client";
  const auto waited = std::chrono::steady_clock::now() - start;
  EXPECT_GE(waited, 900ms);
  EXPECT_LT(waited, 3s) << "not disconnected by --idle-timeout=1";
  ASSERT_NO_FATAL_FAILURE(ExpectGoodClientServed());
}

// --- The systemd units (docs/systemd/) ----------------------------------------------

const fs::path kUnitDir = fs::path(LAYERD_SOURCE_DIR) / "docs" / "systemd";

// The words of the unit's ExecStart= (continuation lines joined).
std::vector<std::string> exec_start(const fs::path& service) {
  std::string text = read_text_file(service), joined;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '\\' && i + 1 < text.size() && text[i + 1] == '\n') {
      ++i;
      continue;
    }
    joined += text[i];
  }
  std::istringstream lines(joined);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.rfind("ExecStart=", 0) != 0) continue;
    std::istringstream words(line.substr(10));
    std::vector<std::string> argv;
    for (std::string w; words >> w;) argv.push_back(w);
    return argv;
  }
  return {};
}

// A listening TCP socket on 127.0.0.1:port, as systemd would hand it over.
int listening_tcp_socket(uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::listen(fd, 16) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

TEST_F(Tls, SystemdUnitsPassSystemdAnalyzeVerify) {
  if (run({"systemd-analyze", "--version"}, 10s).exit_code != 0)
    GTEST_SKIP() << "systemd-analyze is not installed";
  // Copies whose ExecStart names the binary under test (verify checks
  // that it exists).
  for (const char* unit : {"layerd.socket", "layerd.service"}) {
    std::string text = read_text_file(kUnitDir / unit);
    const std::string installed = "/usr/local/bin/layerd";
    if (auto at = text.find(installed); at != std::string::npos)
      text.replace(at, installed.size(), server_binary());
    write_text(dir_ / unit, text);
  }
  RunResult r = run({"systemd-analyze", "verify", (dir_ / "layerd.socket").string(),
                     (dir_ / "layerd.service").string()},
                    30s);
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(r.err, "") << "systemd-analyze has remarks";
}

// layerd started as layerd.service would start it: its ExecStart, the
// credentials directory (%d) holding what LoadCredential= names, the image
// in the state directory and the socket of layerd.socket as fd 3.
TEST_F(Tls, SystemdServiceServesTheSocketItIsHanded) {
  std::vector<std::string> argv = exec_start(kUnitDir / "layerd.service");
  ASSERT_FALSE(argv.empty()) << "no ExecStart in layerd.service";
  ASSERT_EQ(argv[0], "/usr/local/bin/layerd");
  const std::string service = read_text_file(kUnitDir / "layerd.service");
  for (const char* file : {"ca-cert.pem", "server-cert.pem", "server-key.pem"})
    EXPECT_NE(service.find(std::string("LoadCredential=") + file + ":"), std::string::npos)
        << file;
  EXPECT_NE(read_text_file(kUnitDir / "layerd.socket").find("ListenStream="),
            std::string::npos);
  const fs::path state = dir_ / "state";
  fs::create_directories(state);
  const fs::path raw = dir_ / "pattern.raw";
  create_pattern_image(raw, kImageSize, kSeed);
  for (auto& word : argv) {
    if (word == "/usr/local/bin/layerd") word = server_binary();
    if (auto at = word.find("%d"); at != std::string::npos)
      word.replace(at, 2, creds().server().string());
    if (word.rfind("/var/lib/layerd/", 0) == 0)
      word = (state / word.substr(16)).string();
  }
  const fs::path image = state / "disk.qcow2";
  ASSERT_NE(std::find(argv.begin(), argv.end(), image.string()), argv.end())
      << "the unit no longer serves /var/lib/layerd/disk.qcow2";
  RunResult convert = run({"qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw.string(),
                           image.string()});
  ASSERT_EQ(convert.exit_code, 0) << convert.describe();

  port_ = pick_free_port("127.0.0.1");
  const int listener = listening_tcp_socket(port_);
  ASSERT_GE(listener, 0);
  ServerOptions o;
  o.binary = argv[0];
  o.args.assign(argv.begin() + 1, argv.end());
  o.activation_fd = listener;
  o.tcp_port = port_;
  o.log_file = dir_ / "server.log";
  const bool started = server_.start(std::move(o));
  ::close(listener);
  ASSERT_TRUE(started) << server_.error();

  std::string error;
  Nbd h = connect_uri(tcp_uri(certs(creds().client())), &error);
  ASSERT_TRUE(h) << error << "\n" << server_.log();
  std::vector<uint8_t> buf(1 << 20);
  ASSERT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), 0, 0), 0) << nbd_error_text();
  EXPECT_EQ(first_difference(buf, pattern(0, buf.size(), kSeed)), -1);
  // --tls-verify-peer: a client without a certificate is refused, and one
  // in plain text learns nothing.
  EXPECT_FALSE(connect_uri(tcp_uri(certs(creds().anonymous())), &error));
  Nbd plain(nbd_create());
  nbd_set_export_name(plain.get(), "disk");
  EXPECT_EQ(nbd_connect_tcp(plain.get(), "127.0.0.1", std::to_string(port_).c_str()), -1);
  // SIGTERM (the unit's KillSignal) ends it cleanly.
  h.reset();
  EXPECT_EQ(server_.stop(), 0) << server_.log();
}

// --- qemu's clients and qemu-nbd's command line -------------------------------------------

TEST_F(Tls, QemuImgAndQemuIoAreTlsClientsOfQemuNbdsForm) {
  // qemu-nbd's own options: the object verifies clients (qemu's default).
  ASSERT_NO_FATAL_FAILURE(StartTcpServer(
      {"--object",
       "tls-creds-x509,id=tls0,endpoint=server,dir=" + creds().server().string(),
       "--tls-creds", "tls0"}));
  const std::string object =
      "tls-creds-x509,id=tls0,endpoint=client,dir=" + creds().client().string();
  const std::string image = "driver=nbd,host=127.0.0.1,port=" + std::to_string(port_) +
                            ",export=disk,tls-creds=tls0";
  RunResult io = run({"qemu-io", "--object", object, "--image-opts", image, "-c",
                      "write -P 0xa5 65536 131072", "-c", "read -P 0xa5 65536 131072", "-c",
                      "read -P 0 0 0"},
                     30s);
  EXPECT_EQ(io.exit_code, 0) << io.describe();
  EXPECT_EQ(io.out.find("Pattern verification failed"), std::string::npos) << io.out;
  EXPECT_EQ(io.err.find("failed"), std::string::npos) << io.describe();
  RunResult info = run({"qemu-img", "info", "--object", object, "--image-opts", image}, 30s);
  EXPECT_EQ(info.exit_code, 0) << info.describe();
  EXPECT_NE(info.out.find("virtual size: 4 MiB"), std::string::npos) << info.out;
  const fs::path copy = dir_ / "copy.raw";
  RunResult convert = run({"qemu-img", "convert", "--object", object, "--image-opts", image,
                           "-O", "raw", copy.string()},
                          30s);
  ASSERT_EQ(convert.exit_code, 0) << convert.describe();
  auto got = read_file_range(copy, 0, kImageSize);
  auto want = pattern(0, kImageSize, kSeed);
  std::fill(want.begin() + 65536, want.begin() + 65536 + 131072, 0xa5);
  EXPECT_EQ(first_difference(got, want), -1);
  // Without a client certificate qemu's default verify-peer=on refuses it.
  RunResult refused = run({"qemu-img", "info", "--object",
                           "tls-creds-x509,id=tls0,endpoint=client,dir=" +
                               creds().anonymous().string(),
                           "--image-opts", image},
                          30s);
  EXPECT_NE(refused.exit_code, 0) << refused.describe();
}

TEST_F(Tls, QemuObjectWithVerifyPeerOffAdmitsClientsWithoutACertificate) {
  ASSERT_NO_FATAL_FAILURE(StartTlsServer(
      {"--object",
       "tls-creds-x509,id=t,endpoint=server,verify-peer=off,dir=" + creds().server().string(),
       "--tls-creds", "t"}));
  std::string error;
  Nbd h = connect_uri(unix_uri(certs(creds().anonymous())), &error);
  ASSERT_TRUE(h) << error;
  EXPECT_EQ(nbd_get_tls_negotiated(h.get()), 1);
}

TEST_F(Tls, QemuObjectVerifiesPeersByDefault) {
  ASSERT_NO_FATAL_FAILURE(StartTlsServer(
      {"--object", "tls-creds-x509,id=t,endpoint=server,dir=" + creds().server().string(),
       "--tls-creds", "t"}));
  std::string error;
  EXPECT_FALSE(connect_uri(unix_uri(certs(creds().anonymous())), &error));
  EXPECT_FALSE(connect_uri(unix_uri(certs(creds().foreign())), &error));
  Nbd h = connect_uri(unix_uri(certs(creds().client())), &error);
  ASSERT_TRUE(h) << error;
}

TEST_F(Tls, QemuIoIsAPskClientOfQemuNbdsForm) {
  ASSERT_NO_FATAL_FAILURE(StartTcpServer(
      {"--object", "tls-creds-psk,id=k,endpoint=server,dir=" + creds().qemu_psk().string(),
       "--tls-creds", "k"}));
  RunResult io = run(
      {"qemu-io", "--object",
       "tls-creds-psk,id=k,endpoint=client,username=alice,dir=" + creds().qemu_psk().string(),
       "--image-opts",
       "driver=nbd,host=127.0.0.1,port=" + std::to_string(port_) + ",export=disk,tls-creds=k",
       "-c", "write -P 0x3c 0 65536", "-c", "read -P 0x3c 0 65536"},
      30s);
  EXPECT_EQ(io.exit_code, 0) << io.describe();
  EXPECT_EQ(io.out.find("Pattern verification failed"), std::string::npos) << io.out;
  EXPECT_NE(io.out.find("read 65536/65536"), std::string::npos) << io.out;
}

// --- The command line ---------------------------------------------------------------------

struct BadTls {
  std::vector<std::string> args;
  std::string message;  // part of the error
};

void PrintTo(const BadTls& b, std::ostream* os) {
  for (const auto& a : b.args) *os << a << " ";
}

class TlsCommandLine : public Tls, public ::testing::WithParamInterface<BadTls> {};

TEST_P(TlsCommandLine, IsRefusedNamingWhatIsWrong) {
  if (!fs::exists(image_path())) create_pattern_image(image_path(), kImageSize, kSeed);
  write_text(dir_ / "bad.psk", "alice-without-a-key\n");
  std::vector<std::string> args;
  for (const std::string& a : GetParam().args) {
    std::string s = a;
    for (auto [key, value] : {std::pair{"@SERVER", creds().server().string()},
                              std::pair{"@CLIENT", creds().client().string()},
                              std::pair{"@DIR", dir_.path().string()},
                              std::pair{"@PSK", creds().psk().string()}})
      if (auto at = s.find(key); at != std::string::npos) s.replace(at, std::strlen(key), value);
    args.push_back(s);
  }
  args.insert(args.end(), {"-f", "raw", "-k", socket_path().string(), image_path().string()});
  RunResult r = run_server_binary(args);
  EXPECT_EQ(r.exit_code, 1) << r.describe();
  EXPECT_NE(r.err.find(GetParam().message), std::string::npos) << r.describe();
  EXPECT_FALSE(unix_socket_listening(socket_path()));
}

INSTANTIATE_TEST_SUITE_P(
    Options, TlsCommandLine,
    ::testing::Values(
        BadTls{{"--object", "tls-creds-x509,id=t,endpoint=server,dir=@SERVER,colour=blue",
                "--tls-creds", "t"},
               "unknown key 'colour'"},
        BadTls{{"--object", "tls-creds-x509,id=t,dir=@SERVER", "--tls-creds", "t"},
               "server endpoint"},
        BadTls{{"--object", "tls-creds-x509,id=t,endpoint=server,dir=@SERVER,verify-peer=maybe",
                "--tls-creds", "t"},
               "'verify-peer'"},
        BadTls{{"--object", "tls-creds-x509,endpoint=server,dir=@SERVER"}, "'id' is missing"},
        BadTls{{"--object", "secret,id=s0,data=x"}, "type 'secret' is not supported"},
        BadTls{{"--object", "tls-creds-x509,id=t,endpoint=server,dir=@SERVER",
                "--tls-creds", "u"},
               "no --object has id 'u'"},
        BadTls{{"--tls-creds", "@DIR/nowhere"}, "is not a directory"},
        BadTls{{"--tls-creds", "@CLIENT"}, "server-cert.pem' does not exist"},
        BadTls{{"--tls-creds", "@DIR", "--tls-verify-peer"}, "server-cert.pem"},
        BadTls{{"--tls-psk", "@DIR/none.psk"}, "none.psk' does not exist"},
        BadTls{{"--tls-psk", "@DIR/bad.psk"}, "line 1: expected username:hexkey"},
        BadTls{{"--tls-psk", "@PSK", "--tls-creds", "@SERVER"}, "not both"},
        BadTls{{"--tls-psk", "@PSK", "--tls-verify-peer"}, "--tls-verify-peer is for X.509"},
        BadTls{{"--tls=on"}, "need --tls-creds"},
        BadTls{{"--tls=sometimes", "--tls-creds", "@SERVER"}, "invalid --tls 'sometimes'"},
        BadTls{{"--tls-creds", "@SERVER", "--tls-authz", "a0"}, "--tls-authz is not supported"},
        BadTls{{"--object", "tls-creds-x509,id=t,endpoint=server,dir=@SERVER,priority=BOGUS",
                "--tls-creds", "t"},
               "priority string"}),
    [](const ::testing::TestParamInfo<BadTls>& p) {
      return "Case" + std::to_string(p.index);
    });

}  // namespace
}  // namespace layerd::test
