// libFuzzer target: the transmission-phase codec, request headers through
// decode_request() and validate_request(), and the reply encoders.
//
// Input: 16 bytes of negotiated state (export size, transmission flags,
// structured replies, meta context count, minimum block size, maximum
// payload), then 28-byte request headers, the magic included. Besides the
// sanitizers the target checks the contract a server relies on: decoding
// and encoding are inverse; a request validate_request() lets through lies
// inside the export, is aligned, advertised and writable; exactly a WRITE's
// length is to be skipped; only a refused WRITE drops the connection. The
// reply encoders get the requests' fields and are checked for framing.
#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <system_error>
#include <vector>

#include "nbd/codec.h"

namespace layerd::nbd {
namespace {

void require(bool ok) {
  if (!ok) std::abort();
}

constexpr size_t kStateSize = 16;

TransmissionState decode_state(const std::byte* p) {
  TransmissionState s;
  // Small sizes and block sizes are the interesting ones: shift a byte.
  const unsigned size_bits = unsigned(p[0]) % 64;
  s.export_size = get_be32(p + 1) | (size_bits ? uint64_t{1} << size_bits : 0);
  s.transmission_flags = get_be16(p + 5) | kTransHasFlags;
  s.structured_replies = unsigned(p[7]) & 1;
  s.meta_context_count = unsigned(p[8]) % 4;
  s.min_block_size = uint32_t{1} << (unsigned(p[9]) % 17);
  s.max_payload = std::max<uint32_t>(get_be32(p + 10), 1);
  return s;
}

void check_verdict(const RequestHeader& r, const TransmissionState& s,
                   const Validation& v) {
  const auto type = Cmd(r.type);
  require(v.payload_to_skip == (type == Cmd::Write ? r.length : 0));
  require(!v.drop_connection || (type == Cmd::Write && v.error != Error::Ok));
  if (v.error != Error::Ok || type == Cmd::Disc) return;
  const uint16_t tf = s.transmission_flags;
  switch (type) {
    case Cmd::Flush:
      require(tf & kTransSendFlush);
      require(r.offset == 0 && r.length == 0);
      return;
    case Cmd::Read:
    case Cmd::Write:
      require(r.length <= s.max_payload);
      break;
    case Cmd::Trim:
      require(tf & kTransSendTrim);
      break;
    case Cmd::Cache:
      require(tf & kTransSendCache);
      break;
    case Cmd::WriteZeroes:
      require(tf & kTransSendWriteZeroes);
      break;
    case Cmd::BlockStatus:
      require(s.structured_replies && s.meta_context_count > 0);
      require(r.length > 0);
      break;
    default:
      require(false);  // unknown commands are never served
  }
  require(r.length <= s.export_size && r.offset <= s.export_size - r.length);
  require(r.offset % s.min_block_size == 0 && r.length % s.min_block_size == 0);
  const bool writes =
      type == Cmd::Write || type == Cmd::Trim || type == Cmd::WriteZeroes;
  require(!writes || !(tf & kTransReadOnly));
  require(!(r.flags & kCmdFlagFua) || (tf & kTransSendFua));
  require(!(r.flags & kCmdFlagDf) ||
          (type == Cmd::Read && s.structured_replies && (tf & kTransSendDf)));
}

void check_replies(const RequestHeader& r) {
  const auto simple = encode_simple_reply(r.cookie, Error(r.length));
  require(get_be32(simple.data()) == kSimpleReplyMagic);
  require(get_be64(simple.data() + 8) == r.cookie);
  const auto data = encode_offset_data_header(r.cookie, r.flags, r.offset,
                                              std::min(r.length, UINT32_MAX - 8));
  require(get_be64(data.data() + kStructuredChunkHeaderSize) == r.offset);
  const auto hole = encode_offset_hole(r.cookie, r.flags, r.offset, r.length);
  require(get_be32(hole.data() + 16) == 12);

  // Block status: one descriptor per byte of the cookie, bounded.
  std::vector<BlockStatusDescriptor> descriptors(r.cookie % 64);
  for (size_t i = 0; i < descriptors.size(); ++i)
    descriptors[i] = {uint32_t(r.offset >> (i % 32)), r.length};
  std::vector<std::byte> out(block_status_chunk_size(descriptors.size()));
  require(encode_block_status_chunk(r.cookie, r.flags, r.length, descriptors,
                                    out) == out.size());
  require(get_be32(out.data() + 16) == out.size() - kStructuredChunkHeaderSize);
  std::span<std::byte> too_small(out.data(), out.size() - 1);
  require(encode_block_status_chunk(r.cookie, r.flags, r.length, descriptors,
                                    too_small) == 0);

  // Every errno maps to some wire error; only success maps to Ok.
  const int errno_value = int(r.length % 256);
  const Error e = to_wire_error(std::error_code(errno_value, std::generic_category()));
  require((e == Error::Ok) == (errno_value == 0));
}

}  // namespace
}  // namespace layerd::nbd

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace layerd::nbd;
  if (size < kStateSize) return 0;
  const auto* bytes = reinterpret_cast<const std::byte*>(data);
  const TransmissionState state = decode_state(bytes);
  for (size_t pos = kStateSize; size - pos >= kRequestHeaderSize;
       pos += kRequestHeaderSize) {
    std::span<const std::byte, kRequestHeaderSize> header(bytes + pos,
                                                          kRequestHeaderSize);
    const std::optional<RequestHeader> r = decode_request(header);
    if (!r) {
      require(get_be32(header.data()) != kRequestMagic);
      continue;
    }
    const auto again = encode_request(*r);
    require(std::memcmp(again.data(), header.data(), kRequestHeaderSize) == 0);
    check_verdict(*r, state, validate_request(*r, state));
    check_replies(*r);
  }
  return 0;
}
