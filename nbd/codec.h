// Encoding and decoding of transmission-phase messages, and the one place
// where requests are checked before they are served.
//
// No I/O and no allocation: decoders read from caller-provided bytes and
// encoders write into caller-provided fixed-size arrays, so the server's hot
// path can keep one reusable buffer per request.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <system_error>

#include "nbd/protocol.h"

namespace layerd::nbd {

// Big-endian helpers shared by the codec and the handshake.
void put_be16(std::byte* p, uint16_t v);
void put_be32(std::byte* p, uint32_t v);
void put_be64(std::byte* p, uint64_t v);
uint16_t get_be16(const std::byte* p);
uint32_t get_be32(const std::byte* p);
uint64_t get_be64(const std::byte* p);

struct RequestHeader {
  uint16_t flags = 0;
  uint16_t type = 0;  // raw value: may be a command this server does not know
  uint64_t cookie = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
};

// Decodes a 28-byte request header. Returns nullopt if the magic is wrong,
// which is a protocol error: the connection must be dropped.
std::optional<RequestHeader> decode_request(
    std::span<const std::byte, kRequestHeaderSize> bytes);

// Encodes a request header (used by tests and by the -L client side).
std::array<std::byte, kRequestHeaderSize> encode_request(const RequestHeader& r);

// What was negotiated for one connection, as far as validation needs it.
struct TransmissionState {
  uint64_t export_size = 0;
  uint16_t transmission_flags = 0;  // as sent to the client (kTrans*)
  bool structured_replies = false;
  size_t meta_context_count = 0;    // contexts selected by SET_META_CONTEXT
  uint32_t min_block_size = 1;
  uint32_t max_payload = kDefaultMaxPayload;  // WRITE payload and READ length
};

// The verdict on one request header.
struct Validation {
  Error error = Error::Ok;  // Ok: serve it; otherwise reply with this error
  // Set to `length` for every WRITE, served or refused: that many payload
  // bytes follow the header. When the request is refused they must be read
  // and discarded to stay in sync. Zero for other commands. If
  // `drop_connection` is set (a refused WRITE longer than
  // max(4 * max_payload, 32 MiB)), the payload is too large to skip safely
  // and the connection must be closed after the error reply instead.
  uint32_t payload_to_skip = 0;
  bool drop_connection = false;
};

// Checks a request against the negotiated state, in this order, returning
// the first failure:
//   1. EINVAL: unknown command (RESIZE included) or one not advertised
//      (FLUSH, TRIM, WRITE_ZEROES, CACHE without their kTransSend* flag;
//      BLOCK_STATUS without structured replies or selected meta contexts);
//   2. EINVAL: unknown flag bits, or a flag not valid for the command or not
//      advertised (FUA on any command needs kTransSendFua; NO_HOLE and
//      FAST_ZERO only on WRITE_ZEROES, FAST_ZERO needs kTransSendFastZero;
//      DF only on READ with structured replies and kTransSendDf; REQ_ONE
//      only on BLOCK_STATUS);
//   3. EINVAL: FLUSH with nonzero offset/length; BLOCK_STATUS of length 0;
//      READ/WRITE longer than max_payload; offset or length not a multiple
//      of min_block_size; READ, TRIM, CACHE or BLOCK_STATUS past the end;
//   4. EPERM: WRITE, TRIM or WRITE_ZEROES on a read-only export;
//   5. ENOSPC: WRITE or WRITE_ZEROES past the end of the export.
// Zero-length READ/WRITE/TRIM/WRITE_ZEROES/CACHE pass (serve as no-ops).
// NBD_CMD_DISC is always Ok: it has no reply that could carry an error.
Validation validate_request(const RequestHeader& r, const TransmissionState& s);

// Maps a POSIX error to the NBD error sent on the wire (EIO for anything the
// spec has no number for).
Error to_wire_error(std::error_code ec);

// --- Replies -------------------------------------------------------------

// Simple reply: magic, error, cookie. For READ the data follows.
std::array<std::byte, kSimpleReplySize> encode_simple_reply(uint64_t cookie,
                                                            Error error);

// Structured reply chunk header; `payload_length` bytes follow it.
std::array<std::byte, kStructuredChunkHeaderSize> encode_chunk_header(
    uint64_t cookie, uint16_t flags, ChunkType type, uint32_t payload_length);

// NBD_REPLY_TYPE_OFFSET_DATA: chunk header plus the 8-byte offset, so the
// data can be sent right after these 28 bytes in the same gathered write.
std::array<std::byte, kStructuredChunkHeaderSize + 8> encode_offset_data_header(
    uint64_t cookie, uint16_t flags, uint64_t offset, uint32_t data_length);

// NBD_REPLY_TYPE_OFFSET_HOLE: the whole chunk (header, offset, length).
std::array<std::byte, kStructuredChunkHeaderSize + 12> encode_offset_hole(
    uint64_t cookie, uint16_t flags, uint64_t offset, uint32_t hole_length);

// NBD_REPLY_TYPE_ERROR with an empty message: the whole chunk.
std::array<std::byte, kStructuredChunkHeaderSize + 6> encode_error_chunk(
    uint64_t cookie, uint16_t flags, Error error);

// One (length, flags) descriptor of a block status reply.
struct BlockStatusDescriptor {
  uint32_t length;
  uint32_t flags;
};

// NBD_REPLY_TYPE_BLOCK_STATUS: writes the chunk header, the context id and
// the descriptors into `out`, which must hold
// block_status_chunk_size(descriptors.size()) bytes. Returns bytes written.
size_t encode_block_status_chunk(uint64_t cookie, uint16_t flags,
                                 uint32_t context_id,
                                 std::span<const BlockStatusDescriptor> descriptors,
                                 std::span<std::byte> out);
constexpr size_t block_status_chunk_size(size_t descriptor_count) {
  return kStructuredChunkHeaderSize + 4 + 8 * descriptor_count;
}

}  // namespace layerd::nbd
