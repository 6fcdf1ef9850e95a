// Transmission-phase codec: exact wire bytes of every encoder, request
// decoding, errno mapping, and the rules of validate_request.
#include "nbd/codec.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <future>
#include <string>
#include <vector>

namespace layerd::nbd {
namespace {

// "25 60 95 13" -> bytes.
std::vector<std::byte> hex(std::string_view s) {
  std::vector<std::byte> out;
  int nibble = -1;
  for (char c : s) {
    int v;
    if (c >= '0' && c <= '9') v = c - '0';
    else if (c >= 'a' && c <= 'f') v = c - 'a' + 10;
    else if (c >= 'A' && c <= 'F') v = c - 'A' + 10;
    else continue;
    if (nibble < 0) {
      nibble = v;
    } else {
      out.push_back(std::byte(nibble << 4 | v));
      nibble = -1;
    }
  }
  return out;
}

template <size_t N>
std::vector<std::byte> vec(const std::array<std::byte, N>& a) {
  return {a.begin(), a.end()};
}

TEST(BigEndian, PutAndGetAreMostSignificantByteFirst) {
  std::byte b[8];
  put_be16(b, 0x1234);
  EXPECT_EQ(std::vector<std::byte>(b, b + 2), hex("12 34"));
  EXPECT_EQ(get_be16(b), 0x1234);
  put_be32(b, 0x89abcdef);
  EXPECT_EQ(std::vector<std::byte>(b, b + 4), hex("89 ab cd ef"));
  EXPECT_EQ(get_be32(b), 0x89abcdefu);
  put_be64(b, 0xfedcba9876543210ULL);
  EXPECT_EQ(std::vector<std::byte>(b, b + 8), hex("fe dc ba 98 76 54 32 10"));
  EXPECT_EQ(get_be64(b), 0xfedcba9876543210ULL);
}

TEST(Request, EncodeWritesExactHeaderBytes) {
  RequestHeader r{.flags = 0x0011,
                  .type = uint16_t(Cmd::WriteZeroes),
                  .cookie = 0x0102030405060708ULL,
                  .offset = 0x1000000000ULL,
                  .length = 0x00200000};
  EXPECT_EQ(vec(encode_request(r)),
            hex("25609513 0011 0006 0102030405060708 0000001000000000 00200000"));
}

TEST(Request, DecodeReadsEveryField) {
  auto bytes = hex("25609513 0004 0000 ffeeddccbbaa9988 0123456789abcdef 80000001");
  auto r = decode_request(std::span<const std::byte, kRequestHeaderSize>(
      bytes.data(), kRequestHeaderSize));
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->flags, kCmdFlagDf);
  EXPECT_EQ(r->type, uint16_t(Cmd::Read));
  EXPECT_EQ(r->cookie, 0xffeeddccbbaa9988ULL);
  EXPECT_EQ(r->offset, 0x0123456789abcdefULL);
  EXPECT_EQ(r->length, 0x80000001u);
}

TEST(Request, DecodeKeepsUnknownCommandTypes) {
  auto bytes = hex("25609513 0000 beef 0000000000000001 0000000000000000 00000000");
  auto r = decode_request(std::span<const std::byte, kRequestHeaderSize>(
      bytes.data(), kRequestHeaderSize));
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->type, 0xbeef);
}

TEST(Request, DecodeRoundTripsEncode) {
  RequestHeader in{.flags = 0xffff, .type = 0xfffe, .cookie = ~0ULL,
                   .offset = ~0ULL - 1, .length = ~0u};
  auto bytes = encode_request(in);
  auto out = decode_request(bytes);
  ASSERT_TRUE(out.has_value());
  EXPECT_EQ(out->flags, in.flags);
  EXPECT_EQ(out->type, in.type);
  EXPECT_EQ(out->cookie, in.cookie);
  EXPECT_EQ(out->offset, in.offset);
  EXPECT_EQ(out->length, in.length);
}

TEST(Request, DecodeWithWrongMagicReturnsNullopt) {
  for (const char* magic : {"25609514", "12560953", "00000000", "67446698"}) {
    auto bytes = hex(std::string(magic) +
                     "0000 0000 0000000000000001 0000000000000000 00000200");
    EXPECT_FALSE(decode_request(std::span<const std::byte, kRequestHeaderSize>(
                                    bytes.data(), kRequestHeaderSize))
                     .has_value())
        << magic;
  }
}

TEST(Reply, SimpleReplyBytes) {
  EXPECT_EQ(vec(encode_simple_reply(0x1122334455667788ULL, Error::NoSpc)),
            hex("67446698 0000001c 1122334455667788"));
  EXPECT_EQ(vec(encode_simple_reply(7, Error::Ok)),
            hex("67446698 00000000 0000000000000007"));
}

TEST(Reply, ChunkHeaderBytes) {
  EXPECT_EQ(vec(encode_chunk_header(0xaabbccddeeff0011ULL, kReplyFlagDone,
                                    ChunkType::None, 0)),
            hex("668e33ef 0001 0000 aabbccddeeff0011 00000000"));
  EXPECT_EQ(vec(encode_chunk_header(1, 0, ChunkType::ErrorOffset, 0x12345678)),
            hex("668e33ef 0000 8002 0000000000000001 12345678"));
}

TEST(Reply, OffsetDataHeaderCountsTheOffsetInTheLength) {
  EXPECT_EQ(vec(encode_offset_data_header(5, kReplyFlagDone, 0x10000, 4096)),
            hex("668e33ef 0001 0001 0000000000000005 00001008"
                "0000000000010000"));
}

TEST(Reply, OffsetHoleBytes) {
  EXPECT_EQ(vec(encode_offset_hole(9, 0, 0x200000000ULL, 0x10000)),
            hex("668e33ef 0000 0002 0000000000000009 0000000c"
                "0000000200000000 00010000"));
}

TEST(Reply, ErrorChunkHasEmptyMessage) {
  EXPECT_EQ(vec(encode_error_chunk(3, kReplyFlagDone, Error::Inval)),
            hex("668e33ef 0001 8001 0000000000000003 00000006"
                "00000016 0000"));
}

TEST(Reply, BlockStatusChunkBytes) {
  const BlockStatusDescriptor d[] = {{0x10000, kStateHole | kStateZero},
                                     {0x200, 0}};
  std::vector<std::byte> out(block_status_chunk_size(2));
  EXPECT_EQ(out.size(), 20u + 4 + 16);
  EXPECT_EQ(encode_block_status_chunk(0x42, kReplyFlagDone, 1, d, out),
            out.size());
  EXPECT_EQ(out, hex("668e33ef 0001 0005 0000000000000042 00000014"
                     "00000001 00010000 00000003 00000200 00000000"));
}

TEST(Reply, BlockStatusChunkRefusesTooSmallBuffer) {
  const BlockStatusDescriptor d[] = {{512, 0}};
  std::vector<std::byte> out(block_status_chunk_size(1) - 1);
  EXPECT_EQ(encode_block_status_chunk(1, 0, 0, d, out), 0u);
}

TEST(WireError, MapsErrnoValuesOfEitherCategory) {
  struct Case {
    int err;
    Error want;
  } cases[] = {
      {EPERM, Error::Perm},       {EROFS, Error::Perm},
      {EIO, Error::Io},           {ENOMEM, Error::NoMem},
      {EINVAL, Error::Inval},     {ENOSPC, Error::NoSpc},
      {EDQUOT, Error::NoSpc},     {EFBIG, Error::NoSpc},
      {EOVERFLOW, Error::Overflow}, {ENOTSUP, Error::NotSup},
      {EOPNOTSUPP, Error::NotSup}, {ESHUTDOWN, Error::Shutdown},
      {ENOENT, Error::Io},        {EBADF, Error::Io},
      {EAGAIN, Error::Io},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(to_wire_error(std::error_code(c.err, std::generic_category())),
              c.want)
        << "generic " << c.err;
    EXPECT_EQ(to_wire_error(std::error_code(c.err, std::system_category())),
              c.want)
        << "system " << c.err;
  }
  EXPECT_EQ(to_wire_error(std::make_error_code(std::errc::no_space_on_device)),
            Error::NoSpc);
}

TEST(WireError, NoErrorIsOkAndForeignCategoriesAreEio) {
  EXPECT_EQ(to_wire_error(std::error_code()), Error::Ok);
  EXPECT_EQ(to_wire_error(std::make_error_code(std::future_errc::no_state)),
            Error::Io);
}

// --- validate_request --------------------------------------------------------

constexpr uint64_t kMiB = 1 << 20;

constexpr uint16_t kAllSendFlags = kTransHasFlags | kTransSendFlush |
                                   kTransSendFua | kTransSendTrim |
                                   kTransSendWriteZeroes | kTransSendDf |
                                   kTransSendCache | kTransSendFastZero;

// Everything advertised, 1 MiB export, byte granularity.
TransmissionState full() {
  TransmissionState s;
  s.export_size = kMiB;
  s.transmission_flags = kAllSendFlags;
  s.structured_replies = true;
  s.meta_context_count = 1;
  s.min_block_size = 1;
  s.max_payload = kDefaultMaxPayload;
  return s;
}
TransmissionState without(uint16_t flag) {
  TransmissionState s = full();
  s.transmission_flags &= uint16_t(~flag);
  return s;
}
TransmissionState read_only() {
  TransmissionState s = full();
  s.transmission_flags |= kTransReadOnly;
  return s;
}
TransmissionState simple_replies() {
  TransmissionState s = full();
  s.structured_replies = false;
  s.meta_context_count = 0;
  return s;
}
TransmissionState no_contexts() {
  TransmissionState s = full();
  s.meta_context_count = 0;
  return s;
}
TransmissionState aligned(uint32_t min_block) {
  TransmissionState s = full();
  s.min_block_size = min_block;
  return s;
}
TransmissionState big_export() {
  TransmissionState s = full();
  s.export_size = uint64_t{1} << 40;
  return s;
}
TransmissionState max_payload(uint32_t max) {
  TransmissionState s = big_export();
  s.max_payload = max;
  return s;
}

RequestHeader req(uint16_t type, uint16_t flags, uint64_t offset,
                  uint32_t length) {
  return RequestHeader{.flags = flags, .type = type, .cookie = 0x99,
                       .offset = offset, .length = length};
}
RequestHeader req(Cmd c, uint16_t flags, uint64_t offset, uint32_t length) {
  return req(uint16_t(c), flags, offset, length);
}

struct ValidateCase {
  const char* name;
  RequestHeader r;
  TransmissionState s;
  Error want;
  uint32_t skip = 0;
  bool drop = false;
};

void check(const std::vector<ValidateCase>& cases) {
  for (const ValidateCase& c : cases) {
    Validation v = validate_request(c.r, c.s);
    EXPECT_EQ(v.error, c.want) << c.name;
    EXPECT_EQ(v.payload_to_skip, c.skip) << c.name;
    EXPECT_EQ(v.drop_connection, c.drop) << c.name;
  }
}

using C = Cmd;
constexpr Error kOk = Error::Ok;
constexpr Error kInval = Error::Inval;

TEST(Validate, AdvertisedCommandsInRangeAreAccepted) {
  check({
      {"read", req(C::Read, 0, 0, 4096), full(), kOk},
      {"write skips payload", req(C::Write, 0, 4096, 512), full(), kOk, 512},
      {"trim", req(C::Trim, 0, 0, kMiB), full(), kOk},
      {"write zeroes", req(C::WriteZeroes, 0, 1, 2), full(), kOk},
      {"cache", req(C::Cache, 0, 0, 4096), full(), kOk},
      {"block status", req(C::BlockStatus, 0, 0, 4096), full(), kOk},
      {"flush", req(C::Flush, 0, 0, 0), full(), kOk},
      {"read to the last byte", req(C::Read, 0, kMiB - 1, 1), full(), kOk},
      {"write to the last byte", req(C::Write, 0, kMiB - 4, 4), full(), kOk, 4},
  });
}

TEST(Validate, DisconnectIsAlwaysAccepted) {
  check({
      {"disc", req(C::Disc, 0, 0, 0), full(), kOk},
      {"disc with junk fields", req(C::Disc, 0xffff, 123, 456), simple_replies(),
       kOk},
  });
}

TEST(Validate, UnknownCommandsAreEinval) {
  check({
      {"resize", req(C::Resize, 0, 0, 0), full(), kInval},
      {"type 9", req(uint16_t{9}, 0, 0, 512), full(), kInval},
      {"type 0xffff", req(uint16_t{0xffff}, 0, 0, 512), full(), kInval},
  });
}

TEST(Validate, CommandsNotAdvertisedAreEinval) {
  check({
      {"flush", req(C::Flush, 0, 0, 0), without(kTransSendFlush), kInval},
      {"trim", req(C::Trim, 0, 0, 512), without(kTransSendTrim), kInval},
      {"write zeroes", req(C::WriteZeroes, 0, 0, 512),
       without(kTransSendWriteZeroes), kInval},
      {"cache", req(C::Cache, 0, 0, 512), without(kTransSendCache), kInval},
      {"block status without structured replies",
       req(C::BlockStatus, 0, 0, 512), simple_replies(), kInval},
      {"block status without contexts", req(C::BlockStatus, 0, 0, 512),
       no_contexts(), kInval},
  });
}

TEST(Validate, UnknownFlagBitsAreEinval) {
  check({
      {"bit 5 on read", req(C::Read, 1 << 5, 0, 512), full(), kInval},
      {"bit 15 on flush", req(C::Flush, 1 << 15, 0, 0), full(), kInval},
      {"bit 7 on write still skips", req(C::Write, 1 << 7, 0, 512), full(),
       kInval, 512},
  });
}

TEST(Validate, FuaIsValidOnAnyCommandOnlyWhenAdvertised) {
  const uint16_t F = kCmdFlagFua;
  check({
      {"write", req(C::Write, F, 0, 512), full(), kOk, 512},
      {"trim", req(C::Trim, F, 0, 512), full(), kOk},
      {"write zeroes", req(C::WriteZeroes, F, 0, 512), full(), kOk},
      {"read", req(C::Read, F, 0, 512), full(), kOk},
      {"flush", req(C::Flush, F, 0, 0), full(), kOk},
      {"cache", req(C::Cache, F, 0, 512), full(), kOk},
      {"block status", req(C::BlockStatus, F, 0, 512), full(), kOk},
      {"write unadvertised", req(C::Write, F, 0, 512), without(kTransSendFua),
       kInval, 512},
      {"read unadvertised", req(C::Read, F, 0, 512), without(kTransSendFua),
       kInval},
  });
}

TEST(Validate, NoHoleAndFastZeroOnlyOnWriteZeroes) {
  check({
      {"no hole", req(C::WriteZeroes, kCmdFlagNoHole, 0, 512), full(), kOk},
      {"no hole without trim advertised",
       req(C::WriteZeroes, kCmdFlagNoHole, 0, 512), without(kTransSendTrim),
       kOk},
      {"no hole on write", req(C::Write, kCmdFlagNoHole, 0, 512), full(),
       kInval, 512},
      {"no hole on trim", req(C::Trim, kCmdFlagNoHole, 0, 512), full(), kInval},
      {"fast zero", req(C::WriteZeroes, kCmdFlagFastZero, 0, 512), full(), kOk},
      {"fast zero with no hole",
       req(C::WriteZeroes, kCmdFlagFastZero | kCmdFlagNoHole, 0, 512), full(),
       kOk},
      {"fast zero unadvertised", req(C::WriteZeroes, kCmdFlagFastZero, 0, 512),
       without(kTransSendFastZero), kInval},
      {"fast zero on trim", req(C::Trim, kCmdFlagFastZero, 0, 512), full(),
       kInval},
  });
}

TEST(Validate, DfOnlyOnReadWithStructuredRepliesAndSendDf) {
  TransmissionState df_without_structured = simple_replies();  // flag kept
  check({
      {"read", req(C::Read, kCmdFlagDf, 0, 512), full(), kOk},
      {"read without send df", req(C::Read, kCmdFlagDf, 0, 512),
       without(kTransSendDf), kInval},
      {"read without structured", req(C::Read, kCmdFlagDf, 0, 512),
       df_without_structured, kInval},
      {"write", req(C::Write, kCmdFlagDf, 0, 512), full(), kInval, 512},
      {"block status", req(C::BlockStatus, kCmdFlagDf, 0, 512), full(), kInval},
  });
}

TEST(Validate, ReqOneOnlyOnBlockStatus) {
  check({
      {"block status", req(C::BlockStatus, kCmdFlagReqOne, 0, 512), full(), kOk},
      {"read", req(C::Read, kCmdFlagReqOne, 0, 512), full(), kInval},
      {"cache", req(C::Cache, kCmdFlagReqOne, 0, 512), full(), kInval},
  });
}

TEST(Validate, FlushNeedsZeroOffsetAndLength) {
  check({
      {"offset", req(C::Flush, 0, 1, 0), full(), kInval},
      {"length", req(C::Flush, 0, 0, 1), full(), kInval},
      {"read-only flush", req(C::Flush, 0, 0, 0), read_only(), kOk},
  });
}

TEST(Validate, ZeroLengthIsANoOpExceptBlockStatus) {
  check({
      {"read", req(C::Read, 0, 4096, 0), full(), kOk},
      {"write", req(C::Write, 0, 4096, 0), full(), kOk, 0},
      {"trim", req(C::Trim, 0, 4096, 0), full(), kOk},
      {"write zeroes", req(C::WriteZeroes, 0, 4096, 0), full(), kOk},
      {"cache", req(C::Cache, 0, 4096, 0), full(), kOk},
      {"read at the end", req(C::Read, 0, kMiB, 0), full(), kOk},
      {"read past the end", req(C::Read, 0, kMiB + 1, 0), full(), kInval},
      {"write past the end", req(C::Write, 0, kMiB + 1, 0), full(),
       Error::NoSpc},
      {"write on read-only", req(C::Write, 0, 0, 0), read_only(), Error::Perm},
      {"block status", req(C::BlockStatus, 0, 0, 0), full(), kInval},
  });
}

TEST(Validate, ReadAndWriteLongerThanMaxPayloadAreEinval) {
  const uint32_t max = kDefaultMaxPayload;
  check({
      {"read at max", req(C::Read, 0, 0, max), big_export(), kOk},
      {"read over max", req(C::Read, 0, 0, max + 1), big_export(), kInval},
      {"write at max", req(C::Write, 0, 0, max), big_export(), kOk, max},
      {"write over max", req(C::Write, 0, 0, max + 1), big_export(), kInval,
       max + 1},
      {"trim is not limited", req(C::Trim, 0, 0, 0xffffffff), big_export(), kOk},
      {"write zeroes is not limited", req(C::WriteZeroes, 0, 0, 0xffffffff),
       big_export(), kOk},
      {"cache is not limited", req(C::Cache, 0, 0, 0xffffffff), big_export(),
       kOk},
      {"block status is not limited", req(C::BlockStatus, 0, 0, 0xffffffff),
       big_export(), kOk},
      {"small max", req(C::Read, 0, 0, 4097), max_payload(4096), kInval},
  });
}

TEST(Validate, HugeRefusedWriteDropsTheConnection) {
  const uint32_t max = kDefaultMaxPayload;  // limit is 4 * max = 128 MiB
  check({
      {"4x max is skipped", req(C::Write, 0, 0, 4 * max), big_export(), kInval,
       4 * max, false},
      {"over 4x max is dropped", req(C::Write, 0, 0, 4 * max + 1), big_export(),
       kInval, 4 * max + 1, true},
      {"4 GiB is dropped", req(C::Write, 0, 0, 0xffffffff), big_export(), kInval,
       0xffffffff, true},
      // Below 2^25 a write "SHOULD NOT be considered a denial of service
      // attack", even when the maximum is much smaller.
      {"32 MiB with a 4 KiB max is skipped",
       req(C::Write, 0, 0, 32 * kMiB), max_payload(4096), kInval, 32 * kMiB,
       false},
      {"32 MiB + 1 with a 4 KiB max is dropped",
       req(C::Write, 0, 0, 32 * kMiB + 1), max_payload(4096), kInval,
       32 * kMiB + 1, true},
      {"refused for EPERM, small", req(C::Write, 0, 0, 4096), read_only(),
       Error::Perm, 4096, false},
  });
}

TEST(Validate, MisalignedRequestsAreEinval) {
  check({
      {"aligned read", req(C::Read, 0, 512, 1024), aligned(512), kOk},
      {"offset", req(C::Read, 0, 1, 512), aligned(512), kInval},
      {"length", req(C::Read, 0, 0, 100), aligned(512), kInval},
      {"write", req(C::Write, 0, 256, 512), aligned(512), kInval, 512},
      {"trim", req(C::Trim, 0, 0, 4095), aligned(4096), kInval},
      {"write zeroes", req(C::WriteZeroes, 0, 2048, 4096), aligned(4096),
       kInval},
      {"block status", req(C::BlockStatus, 0, 0, 1), aligned(512), kInval},
      {"min block 0 counts as 1", req(C::Read, 0, 3, 5), aligned(0), kOk},
  });
}

TEST(Validate, PastTheEndIsEinvalExceptWritesWhichAreEnospc) {
  check({
      {"read", req(C::Read, 0, kMiB - 512, 1024), full(), kInval},
      {"read starting past the end", req(C::Read, 0, 2 * kMiB, 512), full(),
       kInval},
      {"trim", req(C::Trim, 0, kMiB - 512, 1024), full(), kInval},
      {"cache", req(C::Cache, 0, kMiB, 1), full(), kInval},
      {"block status", req(C::BlockStatus, 0, kMiB, 1), full(), kInval},
      {"write", req(C::Write, 0, kMiB - 512, 1024), full(), Error::NoSpc, 1024},
      {"write zeroes", req(C::WriteZeroes, 0, kMiB, 1), full(), Error::NoSpc},
  });
}

TEST(Validate, OffsetPlusLengthWrapAroundIsOutOfRange) {
  const uint64_t near_max = ~uint64_t{0} - 255;  // + 512 wraps to 256
  check({
      {"read", req(C::Read, 0, near_max, 512), full(), kInval},
      {"trim", req(C::Trim, 0, near_max, 512), full(), kInval},
      {"block status", req(C::BlockStatus, 0, near_max, 512), full(), kInval},
      {"write", req(C::Write, 0, near_max, 512), full(), Error::NoSpc, 512},
      {"write zeroes", req(C::WriteZeroes, 0, near_max, 512), full(),
       Error::NoSpc},
      {"max offset, length 1", req(C::Read, 0, ~uint64_t{0}, 1), full(), kInval},
  });
}

TEST(Validate, WritesOnReadOnlyExportAreEperm) {
  check({
      {"write", req(C::Write, 0, 0, 512), read_only(), Error::Perm, 512},
      {"trim", req(C::Trim, 0, 0, 512), read_only(), Error::Perm},
      {"write zeroes", req(C::WriteZeroes, 0, 0, 512), read_only(), Error::Perm},
      {"read", req(C::Read, 0, 0, 512), read_only(), kOk},
      {"cache", req(C::Cache, 0, 0, 512), read_only(), kOk},
      {"block status", req(C::BlockStatus, 0, 0, 512), read_only(), kOk},
  });
}

TEST(Validate, EinvalBeforeEpermBeforeEnospc) {
  TransmissionState ro_aligned = read_only();
  ro_aligned.min_block_size = 512;
  check({
      {"read-only write past the end", req(C::Write, 0, kMiB, 512), read_only(),
       Error::Perm, 512},
      {"read-only write zeroes past the end", req(C::WriteZeroes, 0, kMiB, 512),
       read_only(), Error::Perm},
      {"read-only trim past the end", req(C::Trim, 0, kMiB, 512), read_only(),
       kInval},
      {"read-only write with bad flag", req(C::Write, kCmdFlagDf, 0, 512),
       read_only(), kInval, 512},
      {"read-only misaligned write", req(C::Write, 0, 1, 512), ro_aligned,
       kInval, 512},
      {"read-only oversized write", req(C::Write, 0, 0, kDefaultMaxPayload + 1),
       read_only(), kInval, kDefaultMaxPayload + 1},
      // A read-only export advertises neither; the client still learns
      // the real reason.
      {"read-only unadvertised write zeroes", req(C::WriteZeroes, 0, 0, 512),
       [] {
         TransmissionState s = read_only();
         s.transmission_flags &= uint16_t(~kTransSendWriteZeroes);
         return s;
       }(),
       Error::Perm},
      {"read-only unadvertised trim", req(C::Trim, 0, 0, 512),
       [] {
         TransmissionState s = read_only();
         s.transmission_flags &= uint16_t(~kTransSendTrim);
         return s;
       }(),
       Error::Perm},
  });
}

}  // namespace
}  // namespace layerd::nbd
