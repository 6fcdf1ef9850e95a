// The server side of the fixed newstyle handshake, as a state machine fed
// with bytes. No sockets: the server reads exactly `bytes_wanted()` bytes,
// hands them to `consume()`, sends whatever `take_output()` returns, and
// repeats until `phase()` is Transmission or Closed (StartTls in between:
// see tls_started()).
//
// Supported options: EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY,
// LIST_META_CONTEXT, SET_META_CONTEXT, and STARTTLS when the server offers
// TLS (TlsMode). Every other option is answered with NBD_REP_ERR_UNSUP.
// STARTTLS is only an event here: once it is acknowledged the phase is
// StartTls, the server sends the acknowledgement, upgrades its socket and
// calls tls_started(), which forgets everything negotiated before. Option
// payloads
// are bounded: a length above kMaxOptionLength is answered with
// NBD_REP_ERR_TOO_BIG and its payload skipped in small pieces, never
// buffered, so a client cannot make the server allocate by lying. Two
// options cannot take that path: NBD_OPT_EXPORT_NAME has no error reply, so
// a name over 4096 bytes (or an unknown one) closes the connection; and
// NBD_OPT_ABORT is acknowledged and closes at once, its data left unread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "nbd/protocol.h"

namespace layerd::nbd {

// Largest option payload the server buffers. Meta-context requests carry
// several names of up to 4096 bytes each; 64 KiB is plenty.
inline constexpr uint32_t kMaxOptionLength = 64 * 1024;

// The spec's TLS modes ("TLS support"): None is NOTLS (STARTTLS refused
// with ERR_POLICY); Offered is SELECTIVETLS with no TLS-only export (plain
// and TLS clients alike); Required is FORCEDTLS (until TLS is up, every
// option but STARTTLS and ABORT gets ERR_TLS_REQD, so nothing, not even
// the export list, is told in plain text; EXPORT_NAME closes).
enum class TlsMode { None, Offered, Required };

// What the server knows about one export, as the handshake needs it.
struct ExportInfo {
  std::string name;
  std::string description;
  uint64_t size = 0;
  uint16_t transmission_flags = 0;  // kTrans* bits; kTransHasFlags is added
  uint32_t min_block_size = 1;
  uint32_t preferred_block_size = 4096;
  uint32_t max_block_size = kDefaultMaxPayload;
};

// The server's answers to the handshake's questions. Implemented in
// server/; must be safe to call from the connection's thread.
class HandshakeHost {
 public:
  virtual ~HandshakeHost() = default;
  // The export called `name` (the empty name means the default export), or
  // nullopt if there is none.
  virtual std::optional<ExportInfo> find_export(std::string_view name) = 0;
  // Every export, for NBD_OPT_LIST.
  virtual std::vector<ExportInfo> list_exports() = 0;
  // The meta contexts this export offers, full names ("base:allocation").
  virtual std::vector<std::string> meta_contexts(const ExportInfo& e) = 0;
};

// A meta context selected by SET_META_CONTEXT: its id on the wire is its
// index in Handshake::selected_contexts().
struct SelectedContext {
  uint32_t id;
  std::string name;
};

class Handshake {
 public:
  enum class Phase {
    Greeting,      // initial output pending; waiting for client flags
    Options,       // option haggling
    StartTls,      // STARTTLS acknowledged: send the output, upgrade the
                   // socket to TLS, then tls_started() (or drop it)
    Transmission,  // handshake done: export() and friends are valid
    Closed,        // client aborted or protocol error: drop the connection
  };

  explicit Handshake(HandshakeHost& host, TlsMode tls = TlsMode::None);

  Phase phase() const { return phase_; }

  // Number of bytes the state machine needs next (always > 0 in the
  // Greeting and Options phases, 0 in the others).
  size_t bytes_wanted() const;

  // Feeds exactly bytes_wanted() bytes.
  void consume(std::span<const std::byte> bytes);

  // The socket now speaks TLS (phase StartTls only): back to Options, with
  // every negotiated state reset, as if no option had been sent before
  // (structured replies, meta contexts); a further STARTTLS is refused.
  void tls_started();
  bool tls_active() const { return tls_active_; }

  // Output produced so far (the greeting right after construction, then
  // option replies). Clears the internal buffer.
  std::vector<std::byte> take_output();

  // Why the handshake ended in Closed (for the log): "client aborted",
  // "bad magic", ...
  const std::string& close_reason() const { return close_reason_; }

  // Valid in the Transmission phase. chosen_export().transmission_flags
  // holds the flags as sent to the client (kTransHasFlags set, kTransSendDf
  // only with structured replies), ready for TransmissionState.
  const ExportInfo& chosen_export() const { return *export_; }
  bool structured_replies() const { return structured_; }
  bool no_zeroes() const { return no_zeroes_; }
  const std::vector<SelectedContext>& selected_contexts() const {
    return contexts_;
  }

 private:
  enum class Step {
    ClientFlags,     // 4 bytes
    OptionHeader,    // 16 bytes: IHAVEOPT, option, length
    OptionPayload,   // length bytes (<= kMaxOptionLength)
    SkipPayload,     // discard an oversized payload in pieces
  };

  void handle_option();
  void reply(uint32_t option, Rep type, std::span<const std::byte> payload = {});
  void reply_error(uint32_t option, Rep type, std::string_view message);
  void send_info_replies(uint32_t option, const ExportInfo& e,
                         std::span<const uint16_t> requested);
  // Whether the option just read must be refused with ERR_TLS_REQD.
  bool tls_required_first() const;
  void handle_starttls();
  void handle_export_name();
  void handle_info_or_go(bool go);
  void handle_meta_context(bool set);
  void enter_transmission(ExportInfo e);
  uint16_t flags_to_send(const ExportInfo& e) const;
  void close(std::string reason);

  HandshakeHost& host_;
  TlsMode tls_;
  bool tls_active_ = false;
  Phase phase_ = Phase::Greeting;
  Step step_ = Step::ClientFlags;
  std::vector<std::byte> out_;
  uint32_t option_ = 0;
  uint32_t option_length_ = 0;
  uint64_t skip_remaining_ = 0;
  std::vector<std::byte> payload_;
  bool no_zeroes_ = false;
  bool structured_ = false;
  std::optional<ExportInfo> export_;
  std::vector<SelectedContext> contexts_;
  std::string meta_export_;  // canonical name of the export contexts_ is for
  std::string close_reason_;
};

}  // namespace layerd::nbd
