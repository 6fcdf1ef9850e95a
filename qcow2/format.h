// On-disk constants and byte-order helpers of the qcow2 format, as described
// in QEMU's docs/interop/qcow2.txt. Everything here is plain data: no I/O.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

namespace layerd::qcow2::fmt {

inline constexpr uint32_t kMagic = 0x514649fb;  // "QFI\xfb"

// Header field offsets.
inline constexpr size_t kOffMagic = 0;
inline constexpr size_t kOffVersion = 4;
inline constexpr size_t kOffBackingOffset = 8;
inline constexpr size_t kOffBackingSize = 16;
inline constexpr size_t kOffClusterBits = 20;
inline constexpr size_t kOffSize = 24;
inline constexpr size_t kOffCryptMethod = 32;
inline constexpr size_t kOffL1Size = 36;
inline constexpr size_t kOffL1Offset = 40;
inline constexpr size_t kOffRefcountTableOffset = 48;
inline constexpr size_t kOffRefcountTableClusters = 56;
inline constexpr size_t kOffNbSnapshots = 60;
inline constexpr size_t kOffSnapshotsOffset = 64;
inline constexpr size_t kOffIncompatible = 72;
inline constexpr size_t kOffCompatible = 80;
inline constexpr size_t kOffAutoclear = 88;
inline constexpr size_t kOffRefcountOrder = 96;
inline constexpr size_t kOffHeaderLength = 100;
inline constexpr size_t kOffCompressionType = 104;

inline constexpr uint32_t kV2HeaderLength = 72;
inline constexpr uint32_t kV3MinHeaderLength = 104;
// What create() writes for v3: through compression_type, padded to 8.
inline constexpr uint32_t kV3HeaderLength = 112;

// Incompatible feature bits.
inline constexpr uint64_t kIncompatDirty = 1ull << 0;
inline constexpr uint64_t kIncompatCorrupt = 1ull << 1;
inline constexpr uint64_t kIncompatDataFile = 1ull << 2;
inline constexpr uint64_t kIncompatCompression = 1ull << 3;
inline constexpr uint64_t kIncompatExtendedL2 = 1ull << 4;
inline constexpr uint64_t kIncompatKnown = 0x1f;

// Compatible feature bits.
inline constexpr uint64_t kCompatLazyRefcounts = 1ull << 0;

// Autoclear feature bits.
inline constexpr uint64_t kAutoclearBitmaps = 1ull << 0;
inline constexpr uint64_t kAutoclearDataFileRaw = 1ull << 1;

// Header extension types.
inline constexpr uint32_t kExtEnd = 0;
inline constexpr uint32_t kExtBackingFormat = 0xe2792aca;
inline constexpr uint32_t kExtFeatureTable = 0x6803f857;
inline constexpr uint32_t kExtBitmaps = 0x23852875;
inline constexpr uint32_t kExtCrypto = 0x0537be77;
inline constexpr uint32_t kExtDataFile = 0x44415441;

// L1 / L2 / refcount table entries.
inline constexpr uint64_t kOflagCopied = 1ull << 63;
inline constexpr uint64_t kOflagCompressed = 1ull << 62;
inline constexpr uint64_t kOflagZero = 1ull << 0;
inline constexpr uint64_t kL1OffsetMask = 0x00fffffffffffe00ull;
inline constexpr uint64_t kL1ReservedMask = 0x7f000000000001ffull;
inline constexpr uint64_t kL2OffsetMask = 0x00fffffffffffe00ull;
inline constexpr uint64_t kL2StdReservedMask = 0x3f000000000001feull;
inline constexpr uint64_t kRefTableOffsetMask = 0xfffffffffffffe00ull;
inline constexpr uint64_t kRefTableReservedMask = 0x1ffull;

inline constexpr int kSubclusters = 32;

// Implementation limits (the same as QEMU's, which bounds every allocation
// derived from the file).
inline constexpr int kMinClusterBits = 9;
inline constexpr int kMaxClusterBits = 21;
inline constexpr uint64_t kMaxL1Bytes = 32ull << 20;
inline constexpr uint64_t kMaxRefcountTableBytes = 8ull << 20;
inline constexpr uint32_t kMaxSnapshots = 65536;
inline constexpr uint64_t kMaxSnapshotTableBytes = 64ull << 20;
inline constexpr uint32_t kMaxBackingNameLength = 1023;
inline constexpr uint32_t kMaxSnapshotExtraData = 1024;

inline constexpr size_t kSnapshotEntryFixed = 40;

// Persistent dirty bitmaps: the extension, directory entries and bitmap
// tables, with QEMU's limits (block/qcow2-bitmap.c), so that every image
// one accepts the other accepts too.
inline constexpr uint32_t kBitmapsExtLength = 24;
inline constexpr uint32_t kMaxBitmaps = 65535;
inline constexpr uint64_t kMaxBitmapDirectoryBytes = 64ull << 20;
inline constexpr size_t kBitmapEntryFixed = 24;
inline constexpr uint32_t kBitmapFlagInUse = 1u << 0;
inline constexpr uint32_t kBitmapFlagAuto = 1u << 1;
inline constexpr uint32_t kBitmapFlagsKnown = kBitmapFlagInUse | kBitmapFlagAuto;
inline constexpr uint8_t kBitmapTypeDirtyTracking = 1;
inline constexpr uint32_t kMinBitmapGranularityBits = 9;
inline constexpr uint32_t kMaxBitmapGranularityBits = 31;
inline constexpr uint32_t kMaxBitmapNameLength = 1023;
inline constexpr uint64_t kMaxBitmapTableEntries = 0x8000000;
inline constexpr uint64_t kMaxBitmapDataBytes = 512ull << 20;
inline constexpr uint64_t kBitmapTableOffsetMask = 0x00fffffffffffe00ull;
inline constexpr uint64_t kBitmapTableReservedMask = 0xff000000000001feull;
inline constexpr uint64_t kBitmapTableAllOnes = 1ull << 0;

// --- Big-endian loads and stores -----------------------------------------

inline uint16_t load16(const std::byte* p) {
  return static_cast<uint16_t>((static_cast<uint16_t>(p[0]) << 8) |
                               static_cast<uint16_t>(p[1]));
}
inline uint32_t load32(const std::byte* p) {
  return (static_cast<uint32_t>(p[0]) << 24) |
         (static_cast<uint32_t>(p[1]) << 16) |
         (static_cast<uint32_t>(p[2]) << 8) | static_cast<uint32_t>(p[3]);
}
inline uint64_t load64(const std::byte* p) {
  return (static_cast<uint64_t>(load32(p)) << 32) | load32(p + 4);
}
inline void store16(std::byte* p, uint16_t v) {
  p[0] = static_cast<std::byte>(v >> 8);
  p[1] = static_cast<std::byte>(v);
}
inline void store32(std::byte* p, uint32_t v) {
  p[0] = static_cast<std::byte>(v >> 24);
  p[1] = static_cast<std::byte>(v >> 16);
  p[2] = static_cast<std::byte>(v >> 8);
  p[3] = static_cast<std::byte>(v);
}
inline void store64(std::byte* p, uint64_t v) {
  store32(p, static_cast<uint32_t>(v >> 32));
  store32(p + 4, static_cast<uint32_t>(v));
}

inline uint64_t round_up(uint64_t v, uint64_t align) {
  return (v + align - 1) / align * align;
}
inline uint64_t div_round_up(uint64_t v, uint64_t d) {
  return v / d + (v % d != 0);
}

}  // namespace layerd::qcow2::fmt
