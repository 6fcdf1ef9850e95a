// NBD wire constants, from NetworkBlockDevice/nbd doc/proto.md.
//
// Everything on the wire is big-endian. This header holds numbers only; the
// encoders and decoders live in codec.h and the handshake in handshake.h.
#pragma once

#include <cstdint>

namespace layerd::nbd {

// Handshake magics.
inline constexpr uint64_t kNbdMagic = 0x4e42444d41474943ULL;       // "NBDMAGIC"
inline constexpr uint64_t kIHaveOpt = 0x49484156454F5054ULL;       // "IHAVEOPT"
inline constexpr uint64_t kOptReplyMagic = 0x3e889045565a9ULL;
inline constexpr uint64_t kOldstyleMagic = 0x00420281861253ULL;

// Handshake flags (server, 16 bits) and client flags (32 bits).
inline constexpr uint16_t kFlagFixedNewstyle = 1u << 0;
inline constexpr uint16_t kFlagNoZeroes = 1u << 1;
inline constexpr uint32_t kClientFlagFixedNewstyle = 1u << 0;
inline constexpr uint32_t kClientFlagNoZeroes = 1u << 1;

// Transmission flags (16 bits).
inline constexpr uint16_t kTransHasFlags = 1u << 0;
inline constexpr uint16_t kTransReadOnly = 1u << 1;
inline constexpr uint16_t kTransSendFlush = 1u << 2;
inline constexpr uint16_t kTransSendFua = 1u << 3;
inline constexpr uint16_t kTransRotational = 1u << 4;
inline constexpr uint16_t kTransSendTrim = 1u << 5;
inline constexpr uint16_t kTransSendWriteZeroes = 1u << 6;
inline constexpr uint16_t kTransSendDf = 1u << 7;
inline constexpr uint16_t kTransCanMultiConn = 1u << 8;
inline constexpr uint16_t kTransSendResize = 1u << 9;
inline constexpr uint16_t kTransSendCache = 1u << 10;
inline constexpr uint16_t kTransSendFastZero = 1u << 11;

// Option codes.
enum class Opt : uint32_t {
  ExportName = 1,
  Abort = 2,
  List = 3,
  PeekExport = 4,
  StartTls = 5,
  Info = 6,
  Go = 7,
  StructuredReply = 8,
  ListMetaContext = 9,
  SetMetaContext = 10,
  ExtendedHeaders = 11,
};

// Option reply types. Errors have bit 31 set.
inline constexpr uint32_t kRepErrBit = 1u << 31;
enum class Rep : uint32_t {
  Ack = 1,
  Server = 2,
  Info = 3,
  MetaContext = 4,
  ErrUnsup = kRepErrBit | 1,
  ErrPolicy = kRepErrBit | 2,
  ErrInvalid = kRepErrBit | 3,
  ErrPlatform = kRepErrBit | 4,
  ErrTlsReqd = kRepErrBit | 5,
  ErrUnknown = kRepErrBit | 6,
  ErrShutdown = kRepErrBit | 7,
  ErrBlockSizeReqd = kRepErrBit | 8,
  ErrTooBig = kRepErrBit | 9,
};

// NBD_OPT_INFO / NBD_OPT_GO information types.
enum class Info : uint16_t {
  Export = 0,
  Name = 1,
  Description = 2,
  BlockSize = 3,
};

// Transmission phase.
inline constexpr uint32_t kRequestMagic = 0x25609513;
inline constexpr uint32_t kSimpleReplyMagic = 0x67446698;
inline constexpr uint32_t kStructuredReplyMagic = 0x668e33ef;
inline constexpr size_t kRequestHeaderSize = 28;
inline constexpr size_t kSimpleReplySize = 16;
inline constexpr size_t kStructuredChunkHeaderSize = 20;

enum class Cmd : uint16_t {
  Read = 0,
  Write = 1,
  Disc = 2,
  Flush = 3,
  Trim = 4,
  Cache = 5,
  WriteZeroes = 6,
  BlockStatus = 7,
  Resize = 8,
};

// Command flags (16 bits).
inline constexpr uint16_t kCmdFlagFua = 1u << 0;
inline constexpr uint16_t kCmdFlagNoHole = 1u << 1;
inline constexpr uint16_t kCmdFlagDf = 1u << 2;
inline constexpr uint16_t kCmdFlagReqOne = 1u << 3;
inline constexpr uint16_t kCmdFlagFastZero = 1u << 4;

// Structured reply flags and chunk types.
inline constexpr uint16_t kReplyFlagDone = 1u << 0;
enum class ChunkType : uint16_t {
  None = 0,
  OffsetData = 1,
  OffsetHole = 2,
  BlockStatus = 5,
  Error = 32769,        // (1 << 15) + 1
  ErrorOffset = 32770,  // (1 << 15) + 2
};

// base:allocation flags.
inline constexpr uint32_t kStateHole = 1u << 0;
inline constexpr uint32_t kStateZero = 1u << 1;
// qemu:dirty-bitmap:NAME flags (qemu's docs/interop/nbd.txt).
inline constexpr uint32_t kStateDirty = 1u << 0;

// Error values on the wire (Linux errno numbers, fixed by the spec).
enum class Error : uint32_t {
  Ok = 0,
  Perm = 1,
  Io = 5,
  NoMem = 12,
  Inval = 22,
  NoSpc = 28,
  Overflow = 75,
  NotSup = 95,
  Shutdown = 108,
};

// Limits a conforming client must respect unless told otherwise.
inline constexpr uint32_t kMaxStringLength = 4096;  // names, descriptions
inline constexpr uint32_t kDefaultMaxPayload = 32u << 20;

}  // namespace layerd::nbd
