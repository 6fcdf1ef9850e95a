// GnuTLS credentials and sessions (see tls.h). Everything cryptographic is
// GnuTLS's; this file loads files, checks them with clear messages, and
// connects GnuTLS's transport callbacks to the connection's socket.
#include "server/tls.h"

#include <gnutls/x509.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <cerrno>
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>

namespace layerd {
namespace {

namespace fs = std::filesystem;

// TLS 1.2 and 1.3 only (the NBD spec: older versions "SHOULD NOT" be
// offered by default); PSK needs its key exchanges named.
constexpr const char* kX509Priority = "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2";
constexpr const char* kPskPriority =
    "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2:+ECDHE-PSK:+DHE-PSK:+PSK";

// Reads asked for below this size are served from one recv of this size.
constexpr size_t kReadahead = 16 * 1024;

std::string gnutls_message(int rc) { return gnutls_strerror(rc); }

std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

// "" if `path` is a readable regular file, else why not.
std::string check_readable(const fs::path& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return fmt::format("'{}' does not exist", path.string());
  if (!fs::is_regular_file(path, ec)) return fmt::format("'{}' is not a file", path.string());
  std::ifstream in(path);
  if (!in) return fmt::format("cannot read '{}': {}", path.string(), std::strerror(errno));
  return "";
}

}  // namespace

// --- Credentials ---------------------------------------------------------------

std::unique_ptr<TlsCredentials> TlsCredentials::load(const TlsSettings& s,
                                                     std::string* error) {
  std::unique_ptr<TlsCredentials> c(new TlsCredentials);
  c->mode_ = s.mode;
  c->verify_peer_ = s.verify_peer;
  std::string m = s.psk_file.empty() ? c->load_x509(s) : c->load_psk(s.psk_file);
  if (m.empty()) {
    const std::string priority =
        !s.priority.empty() ? s.priority : s.psk_file.empty() ? kX509Priority : kPskPriority;
    const char* where = nullptr;
    if (int rc = gnutls_priority_init2(&c->priority_, priority.c_str(), &where, 0); rc < 0)
      m = fmt::format("invalid TLS priority string '{}' at '{}': {}", priority,
                      where ? where : "", gnutls_message(rc));
  }
  if (!m.empty()) {
    *error = m;
    return nullptr;
  }
  return c;
}

TlsCredentials::~TlsCredentials() {
  for (PskKey& k : psk_keys_) gnutls_memset(k.key.data(), 0, k.key.size());
  if (priority_) gnutls_priority_deinit(priority_);
  if (x509_) gnutls_certificate_free_credentials(x509_);
  if (psk_) gnutls_psk_free_server_credentials(psk_);
}

std::string TlsCredentials::load_x509(const TlsSettings& s) {
  const fs::path dir = s.x509_dir;
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    return fmt::format("TLS credentials: '{}' is not a directory (it should hold "
                       "ca-cert.pem, server-cert.pem and server-key.pem)",
                       s.x509_dir);
  const fs::path ca = dir / "ca-cert.pem", crl = dir / "ca-crl.pem",
                 cert = dir / "server-cert.pem", key = dir / "server-key.pem";
  for (const fs::path& f : {cert, key})
    if (auto m = check_readable(f); !m.empty()) return "TLS credentials: " + m;
  const bool have_ca = fs::exists(ca, ec);
  if (s.verify_peer && !have_ca)
    return fmt::format("TLS credentials: verifying clients needs the CA certificate "
                       "'{}', which does not exist",
                       ca.string());
  if (int rc = gnutls_certificate_allocate_credentials(&x509_); rc < 0)
    return "TLS credentials: " + gnutls_message(rc);
  if (have_ca) {
    if (auto m = check_readable(ca); !m.empty()) return "TLS credentials: " + m;
    int n = gnutls_certificate_set_x509_trust_file(x509_, ca.c_str(), GNUTLS_X509_FMT_PEM);
    if (n <= 0)
      return fmt::format("TLS credentials: '{}': {}", ca.string(),
                         n < 0 ? gnutls_message(n) : "no certificate in it");
  }
  if (fs::exists(crl, ec)) {
    int n = gnutls_certificate_set_x509_crl_file(x509_, crl.c_str(), GNUTLS_X509_FMT_PEM);
    if (n < 0) return fmt::format("TLS credentials: '{}': {}", crl.string(), gnutls_message(n));
  }
  if (int rc = gnutls_certificate_set_x509_key_file(x509_, cert.c_str(), key.c_str(),
                                                     GNUTLS_X509_FMT_PEM);
      rc < 0)
    return fmt::format("TLS credentials: '{}' with '{}': {}", cert.string(),
                       key.string(), gnutls_message(rc));
  gnutls_certificate_set_known_dh_params(x509_, GNUTLS_SEC_PARAM_MEDIUM);
  return "";
}

// psktool's format: one "username:hexkey" per line.
std::string TlsCredentials::load_psk(const std::string& file) {
  if (auto m = check_readable(file); !m.empty()) return "TLS PSK file: " + m;
  std::ifstream in(file);
  std::string line;
  int number = 0;
  while (std::getline(in, line)) {
    ++number;
    std::string_view l = trim(line);
    if (l.empty()) continue;
    const auto where = fmt::format("TLS PSK file '{}' line {}", file, number);
    const size_t colon = l.find(':');
    if (colon == std::string_view::npos || colon == 0 || colon + 1 == l.size())
      return where + ": expected username:hexkey";
    PskKey k{std::string(l.substr(0, colon)), {}};
    const std::string hex(l.substr(colon + 1));
    gnutls_datum_t in_hex{reinterpret_cast<unsigned char*>(const_cast<char*>(hex.data())),
                          static_cast<unsigned>(hex.size())};
    gnutls_datum_t out{};
    if (gnutls_hex_decode2(&in_hex, &out) < 0)
      return where + ": the key is not hexadecimal";
    k.key.assign(out.data, out.data + out.size);
    gnutls_memset(out.data, 0, out.size);
    gnutls_free(out.data);
    for (const PskKey& other : psk_keys_)
      if (other.username == k.username)
        return fmt::format("{}: user '{}' is listed twice", where, k.username);
    psk_keys_.push_back(std::move(k));
  }
  if (psk_keys_.empty()) return fmt::format("TLS PSK file '{}' holds no keys", file);
  if (int rc = gnutls_psk_allocate_server_credentials(&psk_); rc < 0)
    return "TLS PSK: " + gnutls_message(rc);
  gnutls_psk_set_server_credentials_function2(psk_, &TlsCredentials::find_psk_key);
  gnutls_psk_set_server_known_dh_params(psk_, GNUTLS_SEC_PARAM_MEDIUM);
  return "";
}

int TlsCredentials::find_psk_key(gnutls_session_t session, const gnutls_datum_t* username,
                                 gnutls_datum_t* key) {
  const auto* self = static_cast<const TlsCredentials*>(gnutls_session_get_ptr(session));
  const std::string_view name(reinterpret_cast<const char*>(username->data), username->size);
  for (const PskKey& k : self->psk_keys_) {
    if (k.username != name) continue;
    key->data = static_cast<unsigned char*>(gnutls_malloc(k.key.size()));
    if (!key->data) return -1;
    std::memcpy(key->data, k.key.data(), k.key.size());
    key->size = static_cast<unsigned>(k.key.size());
    return 0;
  }
  return -1;  // unknown user: the handshake fails
}

// --- Sessions ----------------------------------------------------------------------

std::unique_ptr<TlsSession> TlsSession::create(const TlsCredentials& c, int fd,
                                               std::string* error) {
  std::unique_ptr<TlsSession> s(new TlsSession(fd));
  auto fail = [&](const char* what, int rc) {
    *error = fmt::format("TLS {}: {}", what, gnutls_message(rc));
    return nullptr;
  };
  if (int rc = gnutls_init(&s->session_, GNUTLS_SERVER | GNUTLS_NONBLOCK | GNUTLS_NO_SIGNAL);
      rc < 0)
    return fail("session", rc);
  if (int rc = gnutls_priority_set(s->session_, c.priority_); rc < 0)
    return fail("priority", rc);
  if (c.x509_) {
    if (int rc = gnutls_credentials_set(s->session_, GNUTLS_CRD_CERTIFICATE, c.x509_); rc < 0)
      return fail("credentials", rc);
    if (c.verify_peer_) {
      gnutls_certificate_server_set_request(s->session_, GNUTLS_CERT_REQUIRE);
      gnutls_session_set_verify_cert(s->session_, nullptr, 0);
    } else {
      gnutls_certificate_server_set_request(s->session_, GNUTLS_CERT_IGNORE);
    }
  }
  if (c.psk_) {
    if (int rc = gnutls_credentials_set(s->session_, GNUTLS_CRD_PSK, c.psk_); rc < 0)
      return fail("credentials", rc);
  }
  gnutls_session_set_ptr(s->session_, const_cast<TlsCredentials*>(&c));
  gnutls_transport_set_ptr(s->session_, s.get());
  gnutls_transport_set_vec_push_function(s->session_, &TlsSession::push);
  gnutls_transport_set_pull_function(s->session_, &TlsSession::pull);
  gnutls_transport_set_pull_timeout_function(s->session_, &TlsSession::pull_timeout);
  // The connection's handshake limit covers the TLS handshake.
  gnutls_handshake_set_timeout(s->session_, 0);
  return s;
}

TlsSession::~TlsSession() {
  if (session_) gnutls_deinit(session_);
}

TlsSession::Status TlsSession::status_of(int rc, const char* what) {
  if (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED)
    return gnutls_record_get_direction(session_) ? Status::WantWrite : Status::WantRead;
  error_ = fmt::format("TLS {}: {}", what, gnutls_message(rc));
  if (rc == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR) {
    gnutls_datum_t text{};
    if (gnutls_certificate_verification_status_print(
            gnutls_session_get_verify_cert_status(session_), GNUTLS_CRT_X509, &text, 0) == 0) {
      error_ += fmt::format(" ({})", reinterpret_cast<const char*>(text.data));
      gnutls_free(text.data);
    }
  }
  return Status::Failed;
}

TlsSession::Status TlsSession::handshake() {
  int rc;
  do {
    rc = gnutls_handshake(session_);
  } while (rc < 0 && rc != GNUTLS_E_AGAIN && rc != GNUTLS_E_INTERRUPTED &&
           !gnutls_error_is_fatal(rc));
  return rc == 0 ? Status::Done : status_of(rc, "handshake");
}

TlsSession::Result TlsSession::recv(std::span<std::byte> out) {
  for (;;) {
    ssize_t n = gnutls_record_recv(session_, out.data(), out.size());
    if (n >= 0) return {Status::Done, static_cast<size_t>(n)};
    // A client that closes without the TLS close alert has gone all the
    // same; what it sent before is authentic.
    if (n == GNUTLS_E_PREMATURE_TERMINATION) return {Status::Done, 0};
    if (n == GNUTLS_E_REHANDSHAKE) {
      error_ = "TLS: the client asked to renegotiate, which layerd refuses";
      return {Status::Failed};
    }
    if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED) {
      // Input is what the reader waits for; anything GnuTLS still has to
      // send goes out with the next send.
      return {Status::WantRead};
    }
    if (gnutls_error_is_fatal(static_cast<int>(n))) return {status_of(static_cast<int>(n), "receive")};
    // A warning alert: read on.
  }
}

TlsSession::Result TlsSession::send(std::span<const std::byte> data) {
  ssize_t n = gnutls_record_send(session_, data.data(), data.size());
  if (n >= 0) return {Status::Done, static_cast<size_t>(n)};
  return {status_of(static_cast<int>(n), "send")};
}

void TlsSession::cork() { gnutls_record_cork(session_); }

TlsSession::Status TlsSession::uncork() {
  ssize_t n = gnutls_record_uncork(session_, 0);
  return n >= 0 ? Status::Done : status_of(static_cast<int>(n), "send");
}

void TlsSession::bye() { gnutls_bye(session_, GNUTLS_SHUT_WR); }

size_t TlsSession::record_size() const { return gnutls_record_get_max_size(session_); }

std::string TlsSession::describe() const {
  std::string d;
  if (char* desc = gnutls_session_get_desc(session_)) {
    d = desc;
    gnutls_free(desc);
  }
  if (const char* user = gnutls_psk_server_get_username(session_); user && *user)
    return fmt::format("{}, PSK user '{}'", d, user);
  unsigned count = 0;
  const gnutls_datum_t* peers = gnutls_certificate_get_peers(session_, &count);
  if (!peers || count == 0) return d;
  gnutls_x509_crt_t crt;
  if (gnutls_x509_crt_init(&crt) < 0) return d;
  gnutls_datum_t dn{};
  if (gnutls_x509_crt_import(crt, &peers[0], GNUTLS_X509_FMT_DER) == 0 &&
      gnutls_x509_crt_get_dn3(crt, &dn, 0) == 0) {
    d += fmt::format(", client certificate '{}'", reinterpret_cast<const char*>(dn.data));
    gnutls_free(dn.data);
  }
  gnutls_x509_crt_deinit(crt);
  return d;
}

// --- Transport ---------------------------------------------------------------------

static_assert(sizeof(giovec_t) == sizeof(iovec) &&
              offsetof(giovec_t, iov_len) == offsetof(iovec, iov_len));

ssize_t TlsSession::push(gnutls_transport_ptr_t p, const giovec_t* iov, int count) {
  auto* self = static_cast<TlsSession*>(p);
  if (!self->direct_output_) {
    size_t n = 0;
    for (int i = 0; i < count; ++i) {
      const auto* b = static_cast<const std::byte*>(iov[i].iov_base);
      self->output_.insert(self->output_.end(), b, b + iov[i].iov_len);
      n += iov[i].iov_len;
    }
    return static_cast<ssize_t>(n);
  }
  msghdr msg{};
  msg.msg_iov = const_cast<iovec*>(reinterpret_cast<const iovec*>(iov));
  msg.msg_iovlen = static_cast<size_t>(count);
  for (;;) {
    ssize_t n = ::sendmsg(self->fd_, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n >= 0) return n;
    if (errno == EINTR) continue;
    gnutls_transport_set_errno(self->session_, errno);
    return -1;
  }
}

ssize_t TlsSession::pull(gnutls_transport_ptr_t p, void* data, size_t size) {
  auto* self = static_cast<TlsSession*>(p);
  if (self->readahead_begin_ == self->readahead_end_) {
    const bool direct = size >= kReadahead;
    if (!direct && !self->readahead_) self->readahead_.reset(new std::byte[kReadahead]);
    for (;;) {
      ssize_t n = ::recv(self->fd_, direct ? data : self->readahead_.get(),
                         direct ? size : kReadahead, MSG_DONTWAIT);
      if (n >= 0 && direct) return n;
      if (n >= 0) {
        self->readahead_begin_ = 0;
        self->readahead_end_ = static_cast<size_t>(n);
        break;
      }
      if (errno == EINTR) continue;
      gnutls_transport_set_errno(self->session_, errno);
      return -1;
    }
  }
  const size_t n = std::min(size, self->readahead_end_ - self->readahead_begin_);
  std::memcpy(data, self->readahead_.get() + self->readahead_begin_, n);
  self->readahead_begin_ += n;
  return static_cast<ssize_t>(n);
}

// Never waits: the caller waits for the socket its own way.
int TlsSession::pull_timeout(gnutls_transport_ptr_t p, unsigned int) {
  auto* self = static_cast<TlsSession*>(p);
  if (self->readahead_begin_ != self->readahead_end_) return 1;
  pollfd fd{self->fd_, POLLIN, 0};
  return ::poll(&fd, 1, 0);
}

}  // namespace layerd
