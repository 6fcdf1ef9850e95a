// TLS for NBD connections, with GnuTLS (layerd has no crypto of its own).
//
// TlsCredentials is what every session shares: X.509 certificates (a
// directory laid out as qemu-nbd's and nbdkit's: ca-cert.pem,
// server-cert.pem, server-key.pem, optionally ca-crl.pem) or pre-shared
// keys (a file of "username:hexkey" lines, as psktool writes them). It is
// loaded once at start, so a bad file is refused before layerd listens and
// no handshake reads a file, and it is read-only afterwards (GnuTLS
// credentials may be shared by every thread then).
//
// TlsSession is one connection's TLS, started in place on the
// connection's socket after NBD_OPT_STARTTLS. It never blocks and never
// waits itself: every call returns WantRead or WantWrite when the socket
// is not ready, and the caller waits its own way (the connection's
// coroutine with Asio, ReplySender with poll). Output goes one of two
// ways:
//   - buffered (from the start): records are appended to an internal
//     buffer that the connection's coroutine writes with Asio
//     (take_output()); for the TLS handshake and the options after it, so
//     the event loop never blocks on a client that does not read;
//   - direct (use_direct_output(), for the transmission phase): records
//     go straight to the socket with one sendmsg each, for ReplySender.
// Input is read from the socket with recv (MSG_DONTWAIT). GnuTLS asks for
// a record's 5-byte header, then for its body; small asks are served from
// a read-ahead buffer filled by one recv, so a burst of small records (the
// requests of a pipelining client) costs one system call, not two each;
// large bodies are read straight into GnuTLS's buffer. (pull() says
// "would block" only when that buffer and the socket are both empty, so
// WantRead always means the caller may wait for the socket.)
//
// Threading (GnuTLS allows one thread receiving while another sends on a
// session, if neither renegotiates or closes): handshake() and recv() are
// called by the connection's reader only; send(), cork(), uncork() and
// bye() by one sender at a time (ReplySender's lock in the transmission
// phase, the reader before it). A TLS 1.3 key update the client asks for
// is answered by GnuTLS on the next send, so under the same lock; layerd
// refuses renegotiation (it is an error for recv()).
#pragma once

#include <gnutls/gnutls.h>

#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "server/tls_settings.h"

namespace layerd {

class TlsCredentials {
 public:
  // Loads and checks the settings' files; null, with a message naming the
  // file and what is wrong with it, on failure.
  static std::unique_ptr<TlsCredentials> load(const TlsSettings& settings,
                                              std::string* error);
  ~TlsCredentials();
  TlsCredentials(const TlsCredentials&) = delete;
  TlsCredentials& operator=(const TlsCredentials&) = delete;

  TlsMode mode() const { return mode_; }
  bool uses_psk() const { return psk_ != nullptr; }

 private:
  friend class TlsSession;
  TlsCredentials() = default;
  std::string load_x509(const TlsSettings& s);
  std::string load_psk(const std::string& file);
  // gnutls_psk_set_server_credentials_function2's callback.
  static int find_psk_key(gnutls_session_t session, const gnutls_datum_t* username,
                          gnutls_datum_t* key);

  TlsMode mode_ = TlsMode::Off;
  bool verify_peer_ = false;
  gnutls_certificate_credentials_t x509_ = nullptr;
  gnutls_psk_server_credentials_t psk_ = nullptr;
  struct PskKey {
    std::string username;
    std::vector<unsigned char> key;
  };
  std::vector<PskKey> psk_keys_;
  gnutls_priority_t priority_ = nullptr;
};

class TlsSession {
 public:
  enum class Status { Done, WantRead, WantWrite, Failed };
  struct Result {
    Status status;
    size_t bytes = 0;  // Done: bytes received or sent (recv: 0 = clean close)
  };

  // A server session over `fd` (not owned); null with a message on
  // failure (out of memory, bad priority string).
  static std::unique_ptr<TlsSession> create(const TlsCredentials& credentials,
                                            int fd, std::string* error);
  ~TlsSession();
  TlsSession(const TlsSession&) = delete;
  TlsSession& operator=(const TlsSession&) = delete;

  // One step of the TLS handshake. Done once it is complete; Failed if the
  // client's certificate or key is refused or it speaks no TLS.
  Status handshake();

  // Decrypted bytes into `out` (some, not necessarily all of it).
  // Done with bytes == 0 when the client closed the connection.
  Result recv(std::span<std::byte> out);

  // Encrypts and sends at most one record of `data`: Done with the bytes
  // taken; on WantWrite, call again with the same data once the socket is
  // writable. While corked, every byte is taken into GnuTLS's buffer and
  // nothing is sent until uncork(), which sends it as few, full records
  // (call it again after WantWrite).
  Result send(std::span<const std::byte> data);
  void cork();
  Status uncork();

  // Sends the TLS close alert if the socket takes it now (best effort).
  void bye();

  // Output: buffered until this is called, then straight to the socket.
  void use_direct_output() { direct_output_ = true; }
  // Buffered output waiting to be written (and cleared by the caller).
  std::vector<std::byte>& output() { return output_; }

  // The largest plaintext one record carries.
  size_t record_size() const;
  // What the last Failed was about, for the log.
  const std::string& error() const { return error_; }
  // "TLS1.3, ECDHE-SECP256R1 ..., X.509 client 'CN=...'" or "... PSK user 'alice'".
  std::string describe() const;

 private:
  explicit TlsSession(int fd) : fd_(fd) {}
  Status status_of(int rc, const char* what);
  static ssize_t push(gnutls_transport_ptr_t self, const giovec_t* iov, int count);
  static ssize_t pull(gnutls_transport_ptr_t self, void* data, size_t size);
  static int pull_timeout(gnutls_transport_ptr_t self, unsigned int ms);

  int fd_;
  gnutls_session_t session_ = nullptr;
  std::unique_ptr<std::byte[]> readahead_;
  size_t readahead_begin_ = 0;
  size_t readahead_end_ = 0;
  bool direct_output_ = false;
  std::vector<std::byte> output_;
  std::string error_;
};

}  // namespace layerd
