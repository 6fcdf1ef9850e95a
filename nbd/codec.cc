// Transmission-phase encoding and decoding, and request validation.
//
// Every rule in validate_request() cites the sentence of doc/proto.md
// (NetworkBlockDevice/nbd) it implements, so the spec can be checked against
// the code line by line.
#include "nbd/codec.h"

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace layerd::nbd {

// --- Big-endian helpers ----------------------------------------------------

void put_be16(std::byte* p, uint16_t v) {
  p[0] = std::byte(v >> 8);
  p[1] = std::byte(v);
}

void put_be32(std::byte* p, uint32_t v) {
  p[0] = std::byte(v >> 24);
  p[1] = std::byte(v >> 16);
  p[2] = std::byte(v >> 8);
  p[3] = std::byte(v);
}

void put_be64(std::byte* p, uint64_t v) {
  put_be32(p, uint32_t(v >> 32));
  put_be32(p + 4, uint32_t(v));
}

uint16_t get_be16(const std::byte* p) {
  return uint16_t((unsigned(p[0]) << 8) | unsigned(p[1]));
}

uint32_t get_be32(const std::byte* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) |
         (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}

uint64_t get_be64(const std::byte* p) {
  return (uint64_t(get_be32(p)) << 32) | get_be32(p + 4);
}

// --- Requests --------------------------------------------------------------

// Request header layout: magic(4) flags(2) type(2) cookie(8) offset(8)
// length(4).
std::optional<RequestHeader> decode_request(
    std::span<const std::byte, kRequestHeaderSize> bytes) {
  const std::byte* p = bytes.data();
  if (get_be32(p) != kRequestMagic) return std::nullopt;
  RequestHeader r;
  r.flags = get_be16(p + 4);
  r.type = get_be16(p + 6);
  r.cookie = get_be64(p + 8);
  r.offset = get_be64(p + 16);
  r.length = get_be32(p + 24);
  return r;
}

std::array<std::byte, kRequestHeaderSize> encode_request(const RequestHeader& r) {
  std::array<std::byte, kRequestHeaderSize> out{};
  std::byte* p = out.data();
  put_be32(p, kRequestMagic);
  put_be16(p + 4, r.flags);
  put_be16(p + 6, r.type);
  put_be64(p + 8, r.cookie);
  put_be64(p + 16, r.offset);
  put_be32(p + 24, r.length);
  return out;
}

// --- Validation --------------------------------------------------------------

namespace {

constexpr uint16_t kKnownCmdFlags = kCmdFlagFua | kCmdFlagNoHole | kCmdFlagDf |
                                    kCmdFlagReqOne | kCmdFlagFastZero;

// "any *length* less than 2^25 (33,554,432) bytes SHOULD NOT be considered a
// denial of service attack (even if the advertised maximum block size is
// smaller)": a refused WRITE is skipped, never dropped, below this.
constexpr uint64_t kNeverDosLength = uint64_t{1} << 25;

// A refused WRITE is skipped (read and discarded) up to this many times
// max_payload; beyond that the connection is dropped instead.
constexpr uint64_t kSkippableWriteFactor = 4;

uint64_t max_skippable_write(uint32_t max_payload) {
  return std::max<uint64_t>(kSkippableWriteFactor * max_payload,
                            kNeverDosLength);
}

bool has(uint16_t flags, uint16_t bit) { return (flags & bit) != 0; }

// offset + length <= size, without wrapping.
bool in_range(uint64_t offset, uint32_t length, uint64_t size) {
  return length <= size && offset <= size - length;
}

}  // namespace

Validation validate_request(const RequestHeader& r, const TransmissionState& s) {
  Validation v;
  const uint16_t tf = s.transmission_flags;

  // "The client MUST follow the request header with *length* number of bytes
  // to be written": a WRITE's payload is on the wire whatever we think of it.
  if (r.type == uint16_t(Cmd::Write)) {
    v.payload_to_skip = r.length;
  }
  auto fail = [&](Error e) {
    v.error = e;
    if (r.type == uint16_t(Cmd::Write) &&
        uint64_t{r.length} > max_skippable_write(s.max_payload)) {
      // "either the server or the client MAY initiate a hard disconnect if
      // the payload of an NBD_CMD_WRITE request ... would be large enough to
      // be deemed a denial of service attack".
      v.drop_connection = true;
    }
    return v;
  };

  // 1. The command must be known and advertised.
  bool touches_range = true;  // offset/length describe bytes of the export
  switch (Cmd(r.type)) {
    case Cmd::Read:
    case Cmd::Write:
      break;
    case Cmd::Disc:
      // "There is no reply to an NBD_CMD_DISC": an error could not be sent,
      // so the server simply closes whatever the header says.
      return v;
    case Cmd::Flush:
      // "A client MUST NOT send a flush request unless NBD_FLAG_SEND_FLUSH
      // was set in the transmission flags field."
      if (!has(tf, kTransSendFlush)) return fail(Error::Inval);
      touches_range = false;
      break;
    case Cmd::Trim:
      // A read-only export advertises no TRIM; the client still learns the
      // real reason: "SHOULD return NBD_EPERM if it receives a write or
      // trim request on a read-only export".
      if (!has(tf, kTransSendTrim))
        return fail(has(tf, kTransReadOnly) ? Error::Perm : Error::Inval);
      break;
    case Cmd::Cache:
      // "A server MAY advertise NBD_FLAG_SEND_CACHE even if the command ...
      // always fails with NBD_EINVAL"; unadvertised, it is an unknown command.
      if (!has(tf, kTransSendCache)) return fail(Error::Inval);
      break;
    case Cmd::WriteZeroes:
      if (!has(tf, kTransSendWriteZeroes))
        return fail(has(tf, kTransReadOnly) ? Error::Perm : Error::Inval);
      break;
    case Cmd::BlockStatus:
      // "Servers SHOULD reply with NBD_EINVAL to clients sending
      // NBD_CMD_BLOCK_STATUS without selecting at least one metadata
      // context"; the reply "MUST be sent as a structured reply".
      if (!s.structured_replies || s.meta_context_count == 0) {
        return fail(Error::Inval);
      }
      break;
    case Cmd::Resize:  // experimental extension, not supported
    default:
      // "The server SHOULD return NBD_EINVAL if it receives an unknown
      // command."
      return fail(Error::Inval);
  }

  // 2. Flags: "SHOULD return NBD_EINVAL if it receives an unknown command
  // flag. It also SHOULD return NBD_EINVAL if it receives a request with a
  // flag not explicitly documented as applicable to the given request."
  if (r.flags & ~kKnownCmdFlags) return fail(Error::Inval);
  // FUA "is valid for all commands, provided NBD_FLAG_SEND_FUA has been
  // negotiated, in which case the server MUST accept all commands with this
  // bit set (even by ignoring the bit)".
  if (has(r.flags, kCmdFlagFua) && !has(tf, kTransSendFua)) {
    return fail(Error::Inval);
  }
  const bool zeroes = r.type == uint16_t(Cmd::WriteZeroes);
  if (has(r.flags, kCmdFlagNoHole) && !zeroes) return fail(Error::Inval);
  // "If the server did not advertise NBD_FLAG_SEND_FAST_ZERO, then it ...
  // SHOULD fail with NBD_EINVAL if the NBD_CMD_FLAG_FAST_ZERO flag was set."
  if (has(r.flags, kCmdFlagFastZero) &&
      (!zeroes || !has(tf, kTransSendFastZero))) {
    return fail(Error::Inval);
  }
  // DF "MUST NOT be set unless the transmission flags include
  // NBD_FLAG_SEND_DF", which "MUST [be left] clear if structured replies
  // have not been negotiated".
  if (has(r.flags, kCmdFlagDf) &&
      (r.type != uint16_t(Cmd::Read) || !has(tf, kTransSendDf) ||
       !s.structured_replies)) {
    return fail(Error::Inval);
  }
  if (has(r.flags, kCmdFlagReqOne) && r.type != uint16_t(Cmd::BlockStatus)) {
    return fail(Error::Inval);
  }

  // 3. Offset and length.
  if (!touches_range) {
    // FLUSH: "*length* and *offset* are reserved, and MUST be set to
    // all-zero."
    if (r.offset != 0 || r.length != 0) return fail(Error::Inval);
    return v;
  }
  // A length of 0 is "unspecified although the server SHOULD NOT disconnect"
  // for every command; READ, WRITE, TRIM, WRITE_ZEROES and CACHE accept it
  // as a no-op (still subject to the checks below), BLOCK_STATUS refuses it
  // because a successful reply needs at least one extent of nonzero length.
  if (r.length == 0 && r.type == uint16_t(Cmd::BlockStatus)) {
    return fail(Error::Inval);
  }
  // "The server SHOULD report an NBD_EINVAL error if the client's request is
  // ... larger than the advertised maximum block size." EINVAL, not
  // EOVERFLOW: "The server SHOULD NOT return NBD_EOVERFLOW except as
  // documented in response to NBD_CMD_READ when NBD_CMD_FLAG_DF is
  // supported." Only READ and WRITE are limited: for the others the length
  // is not a payload, and serving a larger TRIM or WRITE_ZEROES is harmless.
  if ((r.type == uint16_t(Cmd::Read) || r.type == uint16_t(Cmd::Write)) &&
      r.length > s.max_payload) {
    return fail(Error::Inval);
  }
  // "The server SHOULD report an NBD_EINVAL error if the client's request is
  // not aligned to advertised minimum block size boundaries".
  const uint32_t align = std::max<uint32_t>(s.min_block_size, 1);
  if (r.offset % align != 0 || r.length % align != 0) {
    return fail(Error::Inval);
  }
  const bool writes =
      r.type == uint16_t(Cmd::Write) || zeroes || r.type == uint16_t(Cmd::Trim);
  const bool fits = in_range(r.offset, r.length, s.export_size);
  // "It SHOULD return NBD_EINVAL if it receives a read or trim request
  // including one or more sectors beyond the size of the device"; likewise
  // BLOCK_STATUS ("SHOULD return NBD_EINVAL ... beyond the size of the
  // device") and CACHE (which behaves like a read).
  if (!fits && r.type != uint16_t(Cmd::Write) && !zeroes) {
    return fail(Error::Inval);
  }
  // "it SHOULD return NBD_EPERM if it receives a write or trim request on a
  // read-only export" (and a write zeroes request). Checked before ENOSPC:
  // on a read-only export no write can succeed, wherever it points.
  if (writes && has(tf, kTransReadOnly)) return fail(Error::Perm);
  // "The server SHOULD return NBD_ENOSPC if it receives a write request
  // including one or more sectors beyond the size of the device", and the
  // same for write zeroes.
  if (!fits) return fail(Error::NoSpc);
  return v;
}

Error to_wire_error(std::error_code ec) {
  if (!ec) return Error::Ok;
  // On POSIX both categories hold errno values. (system_category's
  // default_error_condition() does not map every errno, e.g. not EDQUOT, so
  // the value is used directly.) Other categories may still have an errno
  // equivalent.
  int value = ec.value();
  if (ec.category() != std::generic_category() &&
      ec.category() != std::system_category()) {
    const std::error_condition cond = ec.default_error_condition();
    if (cond.category() != std::generic_category()) return Error::Io;
    value = cond.value();
  }
  switch (value) {
    case EPERM:
    case EROFS:
      return Error::Perm;
    case EIO:
      return Error::Io;
    case ENOMEM:
      return Error::NoMem;
    case EINVAL:
      return Error::Inval;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
      // "It also SHOULD map the EDQUOT and EFBIG errors to NBD_ENOSPC."
      return Error::NoSpc;
    case EOVERFLOW:
      return Error::Overflow;
    case ENOTSUP:
#if EOPNOTSUPP != ENOTSUP
    case EOPNOTSUPP:
#endif
      return Error::NotSup;
    case ESHUTDOWN:
      return Error::Shutdown;
    default:
      return Error::Io;
  }
}

// --- Replies -------------------------------------------------------------

std::array<std::byte, kSimpleReplySize> encode_simple_reply(uint64_t cookie,
                                                            Error error) {
  std::array<std::byte, kSimpleReplySize> out{};
  put_be32(out.data(), kSimpleReplyMagic);
  put_be32(out.data() + 4, uint32_t(error));
  put_be64(out.data() + 8, cookie);
  return out;
}

namespace {

void put_chunk_header(std::byte* p, uint64_t cookie, uint16_t flags,
                      ChunkType type, uint32_t payload_length) {
  put_be32(p, kStructuredReplyMagic);
  put_be16(p + 4, flags);
  put_be16(p + 6, uint16_t(type));
  put_be64(p + 8, cookie);
  put_be32(p + 16, payload_length);
}

}  // namespace

std::array<std::byte, kStructuredChunkHeaderSize> encode_chunk_header(
    uint64_t cookie, uint16_t flags, ChunkType type, uint32_t payload_length) {
  std::array<std::byte, kStructuredChunkHeaderSize> out{};
  put_chunk_header(out.data(), cookie, flags, type, payload_length);
  return out;
}

std::array<std::byte, kStructuredChunkHeaderSize + 8> encode_offset_data_header(
    uint64_t cookie, uint16_t flags, uint64_t offset, uint32_t data_length) {
  std::array<std::byte, kStructuredChunkHeaderSize + 8> out{};
  // The chunk length counts the offset too; the caller keeps data_length
  // within 2^32 - 9 ("a request for more than 2^32 - 8 bytes ... MUST be
  // split into at least two chunks").
  put_chunk_header(out.data(), cookie, flags, ChunkType::OffsetData,
                   data_length + 8);
  put_be64(out.data() + kStructuredChunkHeaderSize, offset);
  return out;
}

std::array<std::byte, kStructuredChunkHeaderSize + 12> encode_offset_hole(
    uint64_t cookie, uint16_t flags, uint64_t offset, uint32_t hole_length) {
  std::array<std::byte, kStructuredChunkHeaderSize + 12> out{};
  put_chunk_header(out.data(), cookie, flags, ChunkType::OffsetHole, 12);
  put_be64(out.data() + kStructuredChunkHeaderSize, offset);
  put_be32(out.data() + kStructuredChunkHeaderSize + 8, hole_length);
  return out;
}

std::array<std::byte, kStructuredChunkHeaderSize + 6> encode_error_chunk(
    uint64_t cookie, uint16_t flags, Error error) {
  std::array<std::byte, kStructuredChunkHeaderSize + 6> out{};
  put_chunk_header(out.data(), cookie, flags, ChunkType::Error, 6);
  put_be32(out.data() + kStructuredChunkHeaderSize, uint32_t(error));
  put_be16(out.data() + kStructuredChunkHeaderSize + 4, 0);  // no message
  return out;
}

size_t encode_block_status_chunk(uint64_t cookie, uint16_t flags,
                                 uint32_t context_id,
                                 std::span<const BlockStatusDescriptor> descriptors,
                                 std::span<std::byte> out) {
  const size_t total = block_status_chunk_size(descriptors.size());
  const size_t payload = total - kStructuredChunkHeaderSize;
  if (out.size() < total || payload > UINT32_MAX) return 0;
  std::byte* p = out.data();
  put_chunk_header(p, cookie, flags, ChunkType::BlockStatus, uint32_t(payload));
  p += kStructuredChunkHeaderSize;
  put_be32(p, context_id);
  p += 4;
  for (const BlockStatusDescriptor& d : descriptors) {
    put_be32(p, d.length);
    put_be32(p + 4, d.flags);
    p += 8;
  }
  return total;
}

}  // namespace layerd::nbd
