// What the command line says about TLS (filled by server/options.cc,
// loaded by TlsCredentials in server/tls.h). No GnuTLS here, so the
// command line stays testable on its own.
#pragma once

#include <string>

namespace layerd {

// --tls: Off (STARTTLS refused), On (plain and TLS clients alike), Require
// (nothing but STARTTLS and ABORT before TLS), as nbdkit's --tls.
enum class TlsMode { Off, On, Require };

struct TlsSettings {
  TlsMode mode = TlsMode::Off;
  std::string x509_dir;       // ca-cert.pem, server-cert.pem, server-key.pem
  bool verify_peer = false;   // X.509: clients must show a certificate the CA signed
  std::string psk_file;       // PSK: username:hexkey lines
  std::string priority;       // GnuTLS priority string; empty: layerd's default
  bool operator==(const TlsSettings&) const = default;
};

}  // namespace layerd
