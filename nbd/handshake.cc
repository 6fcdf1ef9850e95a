// The fixed newstyle handshake, server side (doc/proto.md, "Fixed newstyle
// negotiation" and "Option types").
//
// The machine alternates between reading a 16-byte option header and the
// option's payload. A payload of at most kMaxOptionLength bytes is buffered
// (the buffer is reused); a longer one is read in pieces of kSkipPiece bytes
// and discarded, then answered with NBD_REP_ERR_TOO_BIG. Every length read
// from an option payload is checked against the bytes actually present
// before it is used, so nothing is ever sized by what the client claims.
#include "nbd/handshake.h"

#include <algorithm>
#include <string>
#include <utility>

#include "nbd/codec.h"

namespace layerd::nbd {

namespace {

constexpr size_t kClientFlagsSize = 4;
constexpr size_t kOptionHeaderSize = 16;  // IHAVEOPT, option, length
constexpr size_t kSkipPiece = 64 * 1024;  // oversized payloads, per read
constexpr size_t kReplyHeaderSize = 20;   // magic, option, type, length
constexpr size_t kExportNameZeroes = 124;
constexpr uint32_t kKnownClientFlags =
    kClientFlagFixedNewstyle | kClientFlagNoZeroes;

// Bounds-checked reads from an option payload.
class Reader {
 public:
  explicit Reader(std::span<const std::byte> bytes) : bytes_(bytes) {}

  size_t remaining() const { return bytes_.size() - pos_; }

  bool u16(uint16_t& v) {
    if (remaining() < 2) return false;
    v = get_be16(bytes_.data() + pos_);
    pos_ += 2;
    return true;
  }
  bool u32(uint32_t& v) {
    if (remaining() < 4) return false;
    v = get_be32(bytes_.data() + pos_);
    pos_ += 4;
    return true;
  }
  // A view of the next n bytes as a string (no copy).
  bool string(size_t n, std::string_view& s) {
    if (remaining() < n) return false;
    s = std::string_view(reinterpret_cast<const char*>(bytes_.data() + pos_), n);
    pos_ += n;
    return true;
  }

 private:
  std::span<const std::byte> bytes_;
  size_t pos_ = 0;
};

void append_be16(std::vector<std::byte>& out, uint16_t v) {
  std::byte b[2];
  put_be16(b, v);
  out.insert(out.end(), b, b + 2);
}
void append_be32(std::vector<std::byte>& out, uint32_t v) {
  std::byte b[4];
  put_be32(b, v);
  out.insert(out.end(), b, b + 4);
}
void append_be64(std::vector<std::byte>& out, uint64_t v) {
  std::byte b[8];
  put_be64(b, v);
  out.insert(out.end(), b, b + 8);
}
void append_str(std::vector<std::byte>& out, std::string_view s) {
  const auto* p = reinterpret_cast<const std::byte*>(s.data());
  out.insert(out.end(), p, p + s.size());
}

// "[The query] MUST start with a namespace and a colon"; the namespace must
// be non-empty.
bool has_namespace(std::string_view query) {
  const size_t colon = query.find(':');
  return colon != std::string_view::npos && colon > 0;
}

// Does `query` (from NBD_OPT_LIST_META_CONTEXT) match `context`? Either the
// exact name, or "namespace:" with an empty leaf, which the spec recommends
// as a wildcard for listing ("the empty leaf-name makes sense as a wildcard
// for a client query during NBD_OPT_LIST_META_CONTEXT").
bool list_query_matches(std::string_view query, std::string_view context) {
  if (query == context) return true;
  // "qemu:dirty-bitmap:" lists every bitmap, as in qemu.
  return query.ends_with(':') && context.starts_with(query);
}

}  // namespace

Handshake::Handshake(HandshakeHost& host, TlsMode tls) : host_(host), tls_(tls) {
  append_be64(out_, kNbdMagic);
  append_be64(out_, kIHaveOpt);
  append_be16(out_, kFlagFixedNewstyle | kFlagNoZeroes);
}

size_t Handshake::bytes_wanted() const {
  if (phase_ != Phase::Greeting && phase_ != Phase::Options) return 0;
  switch (step_) {
    case Step::ClientFlags:
      return kClientFlagsSize;
    case Step::OptionHeader:
      return kOptionHeaderSize;
    case Step::OptionPayload:
      return option_length_;
    case Step::SkipPayload:
      return size_t(std::min<uint64_t>(skip_remaining_, kSkipPiece));
  }
  return 0;
}

std::vector<std::byte> Handshake::take_output() { return std::exchange(out_, {}); }

void Handshake::consume(std::span<const std::byte> bytes) {
  if (phase_ != Phase::Greeting && phase_ != Phase::Options) return;
  if (bytes.size() != bytes_wanted()) {
    close("internal error: consume() fed " + std::to_string(bytes.size()) +
          " bytes, " + std::to_string(bytes_wanted()) + " wanted");
    return;
  }
  switch (step_) {
    case Step::ClientFlags: {
      const uint32_t flags = get_be32(bytes.data());
      // "the server MUST drop the TCP connection if the client sets an
      // unknown flag, or a flag that does not match something advertised by
      // the server." Both known flags were advertised. A client without
      // NBD_FLAG_C_FIXED_NEWSTYLE is still served fixed newstyle ("Servers
      // MAY choose to honour fixed newstyle from clients that didn't set
      // this bit").
      if (flags & ~kKnownClientFlags) {
        close("unknown client flags");
        return;
      }
      no_zeroes_ = (flags & kClientFlagNoZeroes) != 0;
      // "The server MUST operate in NOTLS mode unless the server set flag
      // NBD_FLAG_FIXED_NEWSTYLE and the client replied with
      // NBD_FLAG_C_FIXED_NEWSTYLE": such a client cannot have TLS.
      if (!(flags & kClientFlagFixedNewstyle)) {
        if (tls_ == TlsMode::Required) {
          close("TLS is required and the client does not use fixed newstyle "
                "negotiation");
          return;
        }
        tls_ = TlsMode::None;
      }
      phase_ = Phase::Options;
      step_ = Step::OptionHeader;
      return;
    }
    case Step::OptionHeader: {
      if (get_be64(bytes.data()) != kIHaveOpt) {
        close("bad option magic");
        return;
      }
      option_ = get_be32(bytes.data() + 8);
      option_length_ = get_be32(bytes.data() + 12);
      if (option_ == uint32_t(Opt::Abort)) {
        // "The server MUST reply with NBD_REP_ACK" and "SHOULD ignore any
        // data sent by the client": the session ends, so any payload is
        // left unread.
        reply(option_, Rep::Ack);
        close("client aborted");
        return;
      }
      if (option_ == uint32_t(Opt::ExportName) && tls_required_first()) {
        // "If the server receives a request to enter transmission mode via
        // NBD_OPT_EXPORT_NAME when TLS has not been initiated, then as this
        // request cannot error, it MUST terminate the session."
        close("NBD_OPT_EXPORT_NAME before STARTTLS, and TLS is required");
        return;
      }
      if (option_ == uint32_t(Opt::ExportName) &&
          option_length_ > kMaxStringLength) {
        // An export name is a string ("MUST be no longer than 4096 bytes")
        // and NBD_OPT_EXPORT_NAME has no error reply.
        close("export name too long");
        return;
      }
      if (option_length_ > kMaxOptionLength) {
        skip_remaining_ = option_length_;
        step_ = Step::SkipPayload;
        return;
      }
      if (option_length_ == 0) {
        payload_.clear();
        handle_option();
        return;
      }
      step_ = Step::OptionPayload;
      return;
    }
    case Step::OptionPayload:
      payload_.assign(bytes.begin(), bytes.end());
      handle_option();
      return;
    case Step::SkipPayload:
      skip_remaining_ -= bytes.size();
      if (skip_remaining_ == 0) {
        step_ = Step::OptionHeader;
        if (tls_required_first())
          reply_error(option_, Rep::ErrTlsReqd, "TLS is required: send NBD_OPT_STARTTLS first");
        else
          reply_error(option_, Rep::ErrTooBig, "option data too large");
      }
      return;
  }
}

bool Handshake::tls_required_first() const {
  return tls_ == TlsMode::Required && !tls_active_;
}

void Handshake::handle_option() {
  step_ = Step::OptionHeader;
  // FORCEDTLS: "If the server receives any other option, it MUST reply
  // with NBD_REP_ERR_TLS_REQD if TLS has not been initiated" (ABORT was
  // answered with its header).
  if (tls_required_first() && Opt(option_) != Opt::StartTls) {
    reply_error(option_, Rep::ErrTlsReqd, "TLS is required: send NBD_OPT_STARTTLS first");
    return;
  }
  switch (Opt(option_)) {
    case Opt::ExportName:
      handle_export_name();
      return;
    case Opt::List:
      // "The client MUST NOT send any additional data with the option, and
      // the server SHOULD reject a request that includes data with
      // NBD_REP_ERR_INVALID."
      if (!payload_.empty()) {
        reply_error(option_, Rep::ErrInvalid, "NBD_OPT_LIST takes no data");
        return;
      }
      for (const ExportInfo& e : host_.list_exports()) {
        // NBD_REP_SERVER: name length, name, then "the rest of the data
        // contains some implementation-specific details about the export
        // ... a string suitable for direct display to a human being".
        std::vector<std::byte> p;
        p.reserve(4 + e.name.size() + e.description.size());
        append_be32(p, uint32_t(e.name.size()));
        append_str(p, e.name);
        append_str(p, e.description);
        reply(option_, Rep::Server, p);
      }
      reply(option_, Rep::Ack);
      return;
    case Opt::StartTls:
      handle_starttls();
      return;
    case Opt::Info:
    case Opt::Go:
      handle_info_or_go(Opt(option_) == Opt::Go);
      return;
    case Opt::StructuredReply:
      if (!payload_.empty()) {
        reply_error(option_, Rep::ErrInvalid,
                    "NBD_OPT_STRUCTURED_REPLY takes no data");
        return;
      }
      structured_ = true;
      reply(option_, Rep::Ack);
      return;
    case Opt::ListMetaContext:
    case Opt::SetMetaContext:
      handle_meta_context(Opt(option_) == Opt::SetMetaContext);
      return;
    case Opt::Abort:  // handled with the header
    case Opt::PeekExport:
    case Opt::ExtendedHeaders:
    default:
      // "Servers that receive messages which they do not implement MUST
      // reply to them with NBD_REP_ERR_UNSUP".
      reply_error(option_, Rep::ErrUnsup, "option not supported");
      return;
  }
}

void Handshake::reply(uint32_t option, Rep type,
                      std::span<const std::byte> payload) {
  out_.reserve(out_.size() + kReplyHeaderSize + payload.size());
  append_be64(out_, kOptReplyMagic);
  append_be32(out_, option);
  append_be32(out_, uint32_t(type));
  append_be32(out_, uint32_t(payload.size()));
  out_.insert(out_.end(), payload.begin(), payload.end());
}

void Handshake::reply_error(uint32_t option, Rep type, std::string_view message) {
  reply(option, type,
        std::span(reinterpret_cast<const std::byte*>(message.data()),
                  message.size()));
}

uint16_t Handshake::flags_to_send(const ExportInfo& e) const {
  uint16_t f = e.transmission_flags | kTransHasFlags;  // "MUST always be 1"
  // NBD_FLAG_SEND_DF: "MUST leave this flag clear if structured replies have
  // not been negotiated."
  if (structured_) {
    f |= kTransSendDf;
  } else {
    f &= uint16_t(~kTransSendDf);
  }
  // NBD_FLAG_SEND_FAST_ZERO: "MUST set this transmission flag to 0 if
  // NBD_FLAG_SEND_WRITE_ZEROES is not set."
  if (!(f & kTransSendWriteZeroes)) f &= uint16_t(~kTransSendFastZero);
  return f;
}

void Handshake::enter_transmission(ExportInfo e) {
  e.transmission_flags = flags_to_send(e);
  // BLOCK_STATUS needs SET_META_CONTEXT to have "referred to the same export
  // name that was ultimately selected for transmission phase": contexts
  // chosen for another export are dropped. Names are compared after lookup,
  // so "" and the default export's own name count as the same export.
  if (e.name != meta_export_) contexts_.clear();
  export_ = std::move(e);
  phase_ = Phase::Transmission;
  payload_ = {};
}

void Handshake::handle_starttls() {
  if (tls_ == TlsMode::None) {
    // NOTLS mode: "it MUST respond with NBD_REP_ERR_POLICY (if it does not
    // support TLS for policy reasons)".
    reply_error(option_, Rep::ErrPolicy, "TLS is not enabled on this server");
    return;
  }
  if (tls_active_) {
    // "If the server receives NBD_OPT_STARTTLS when TLS has already been
    // negotiated, it MUST reply with NBD_REP_ERR_INVALID."
    reply_error(option_, Rep::ErrInvalid, "TLS is already active");
    return;
  }
  if (!payload_.empty()) {
    reply_error(option_, Rep::ErrInvalid, "NBD_OPT_STARTTLS takes no data");
    return;
  }
  reply(option_, Rep::Ack);
  phase_ = Phase::StartTls;
}

void Handshake::tls_started() {
  if (phase_ != Phase::StartTls) return;
  // Nothing negotiated in plain text may survive the upgrade (a man in the
  // middle could have sent it): the client starts over.
  tls_active_ = true;
  structured_ = false;
  contexts_.clear();
  meta_export_.clear();
  export_.reset();
  phase_ = Phase::Options;
  step_ = Step::OptionHeader;
}

void Handshake::handle_export_name() {
  const std::string name(reinterpret_cast<const char*>(payload_.data()),
                         payload_.size());
  std::optional<ExportInfo> e = host_.find_export(name);
  if (!e) {
    // "If the chosen export does not exist ... the server MUST terminate
    // the session."
    close("unknown export in NBD_OPT_EXPORT_NAME");
    return;
  }
  e->min_block_size = 1;  // no way to tell the client of one
  enter_transmission(std::move(*e));
  append_be64(out_, export_->size);
  append_be16(out_, export_->transmission_flags);
  if (!no_zeroes_) out_.insert(out_.end(), kExportNameZeroes, std::byte{0});
}

void Handshake::handle_info_or_go(bool go) {
  // Data: u32 name length ("MUST be no larger than the option data length
  // - 6"), name, u16 number of information requests, u16 each.
  Reader r(payload_);
  uint32_t name_length = 0;
  std::string_view name;
  uint16_t count = 0;
  if (!r.u32(name_length) || name_length > r.remaining() ||
      r.remaining() - name_length < 2) {
    reply_error(option_, Rep::ErrInvalid, "export name length exceeds option data");
    return;
  }
  if (name_length > kMaxStringLength) {
    reply_error(option_, Rep::ErrInvalid, "export name longer than 4096 bytes");
    return;
  }
  r.string(name_length, name);
  r.u16(count);
  if (r.remaining() != size_t{count} * 2) {
    reply_error(option_, Rep::ErrInvalid,
                "information request count does not match option length");
    return;
  }
  std::vector<uint16_t> requests(count);  // count * 2 bytes are present
  for (uint16_t& q : requests) r.u16(q);

  std::optional<ExportInfo> e = host_.find_export(name);
  if (!e) {
    reply_error(option_, Rep::ErrUnknown, "no such export");
    return;
  }
  // A minimum block size above 1 binds only a client that asked for block
  // sizes; one that did not may send any alignment, so GO tells it (and
  // transmission enforces) 1. NBD_OPT_INFO tells the real one, and ends
  // with NBD_REP_ERR_BLOCK_SIZE_REQD ("unwilling to enter transmission
  // phase ... unless the client first acknowledges" the block sizes)
  // instead of the ACK. As qemu-nbd.
  const bool asked = std::find(requests.begin(), requests.end(),
                               uint16_t(Info::BlockSize)) != requests.end();
  if (go && !asked) e->min_block_size = 1;
  send_info_replies(option_, *e, requests);
  if (!go && !asked && e->min_block_size > 1) {
    reply_error(option_, Rep::ErrBlockSizeReqd,
                "request NBD_INFO_BLOCK_SIZE to use this export");
    return;
  }
  reply(option_, Rep::Ack);
  if (go) enter_transmission(std::move(*e));
}

void Handshake::send_info_replies(uint32_t option, const ExportInfo& e,
                                  std::span<const uint16_t> requested) {
  // "The server MUST ignore any information requests it does not
  // understand"; a request repeated by the client is answered once.
  bool want_name = false;
  bool want_description = false;
  for (uint16_t q : requested) {
    if (q == uint16_t(Info::Name)) want_name = true;
    if (q == uint16_t(Info::Description)) want_description = true;
  }
  std::vector<std::byte> p;
  // NBD_INFO_EXPORT, always: "*length* MUST be 12".
  append_be16(p, uint16_t(Info::Export));
  append_be64(p, e.size);
  append_be16(p, flags_to_send(e));
  reply(option, Rep::Info, p);
  if (want_name) {
    p.clear();
    append_be16(p, uint16_t(Info::Name));
    append_str(p, e.name);
    reply(option, Rep::Info, p);
  }
  if (want_description) {
    p.clear();
    append_be16(p, uint16_t(Info::Description));
    append_str(p, e.description);
    reply(option, Rep::Info, p);
  }
  // NBD_INFO_BLOCK_SIZE, always, whether requested or not: the server "MAY
  // send information requests back which are not explicitly requested", and
  // a client that does not understand it ignores it. "*length* MUST be 14".
  p.clear();
  append_be16(p, uint16_t(Info::BlockSize));
  append_be32(p, e.min_block_size);
  append_be32(p, e.preferred_block_size);
  append_be32(p, e.max_block_size);
  reply(option, Rep::Info, p);
}

void Handshake::handle_meta_context(bool set) {
  if (set) {
    // "Issuing this command replaces all previously-set metadata contexts
    // (including when this command fails)".
    contexts_.clear();
    meta_export_.clear();
  }
  // SET "MUST NOT be requested unless structured replies have been
  // negotiated first. If a client attempts to do so, a server SHOULD send
  // NBD_REP_ERR_INVALID"; LIST "SHOULD NOT", and the server "MAY send
  // NBD_REP_ERR_INVALID". Both are refused.
  if (!structured_) {
    reply_error(option_, Rep::ErrInvalid,
                "structured replies must be negotiated first");
    return;
  }
  // Data: u32 export name length, name, u32 number of queries, then each
  // query as u32 length and string. "If the option request is syntactically
  // invalid (such as a query length that would require reading beyond the
  // original length given in the option header), the server MUST fail the
  // request with NBD_REP_ERR_INVALID."
  Reader r(payload_);
  uint32_t name_length = 0;
  std::string_view name;
  uint32_t count = 0;
  if (!r.u32(name_length) || !r.string(name_length, name) || !r.u32(count)) {
    reply_error(option_, Rep::ErrInvalid, "truncated meta context request");
    return;
  }
  if (name_length > kMaxStringLength) {
    reply_error(option_, Rep::ErrInvalid, "export name longer than 4096 bytes");
    return;
  }
  // Each query takes at least 4 bytes, which bounds `count` before anything
  // is sized by it.
  if (count > r.remaining() / 4) {
    reply_error(option_, Rep::ErrInvalid,
                "query count does not match option length");
    return;
  }
  std::vector<std::string_view> queries;
  queries.reserve(count);
  for (uint32_t i = 0; i < count; ++i) {
    uint32_t length = 0;
    std::string_view q;
    if (!r.u32(length) || !r.string(length, q)) {
      reply_error(option_, Rep::ErrInvalid, "query length exceeds option data");
      return;
    }
    // A query is a string, which "MUST be no longer than 4096 bytes".
    if (length > kMaxStringLength) {
      reply_error(option_, Rep::ErrInvalid, "query longer than 4096 bytes");
      return;
    }
    // "For requests that are semantically invalid (such as lacking the
    // required colon that delimits the namespace ...), the server MAY fail
    // the request with NBD_REP_ERR_INVALID."
    if (!has_namespace(q)) {
      reply_error(option_, Rep::ErrInvalid,
                  "query must start with a namespace and a colon");
      return;
    }
    queries.push_back(q);
  }
  if (r.remaining() != 0) {
    reply_error(option_, Rep::ErrInvalid, "trailing data after the queries");
    return;
  }

  std::optional<ExportInfo> e = host_.find_export(name);
  if (!e) {
    reply_error(option_, Rep::ErrUnknown, "no such export");
    return;
  }

  // Contexts are walked in the host's order, so each is answered at most
  // once however many queries match it ("The server MAY send contexts in a
  // different order than in the client's query").
  std::vector<std::byte> p;
  auto send_context = [&](uint32_t id, std::string_view ctx) {
    p.clear();
    append_be32(p, id);
    append_str(p, ctx);
    reply(option_, Rep::MetaContext, p);
  };
  const std::vector<std::string> available = host_.meta_contexts(*e);
  if (!set) {
    // "If zero queries are sent, then the server MUST return all the
    // metadata contexts that are available"; otherwise those matching a
    // query. Queries of unknown namespaces match nothing ("the server MUST
    // ignore query strings belonging to an unknown namespace"). "The
    // metadata context ID in these replies is reserved and SHOULD be set to
    // zero".
    for (const std::string& ctx : available) {
      const bool match =
          queries.empty() ||
          std::any_of(queries.begin(), queries.end(), [&](std::string_view q) {
            return list_query_matches(q, ctx);
          });
      if (match) send_context(0, ctx);
    }
    reply(option_, Rep::Ack);
    return;
  }
  // SET selects exact names only: "If zero queries are sent, the server MUST
  // select no metadata contexts"; "base:" "the server MUST ignore this form
  // during NBD_OPT_SET_META_CONTEXT"; an unknown leaf "the server MUST
  // ignore it rather than report an error". Each selected context gets "a
  // unique metadata context ID": its index.
  for (const std::string& ctx : available) {
    if (std::find(queries.begin(), queries.end(), ctx) == queries.end()) {
      continue;
    }
    const auto id = uint32_t(contexts_.size());
    contexts_.push_back(SelectedContext{id, ctx});
    send_context(id, ctx);
  }
  meta_export_ = e->name;
  reply(option_, Rep::Ack);
}

void Handshake::close(std::string reason) {
  phase_ = Phase::Closed;
  close_reason_ = std::move(reason);
  payload_ = {};
}

}  // namespace layerd::nbd
