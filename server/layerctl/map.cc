// layerctl map: where each range of the virtual disk comes from, through
// the whole backing chain, printed like qemu-img map.
//
// Each image answers only for itself (qcow2::Image::block_status); this
// walker asks the images top to bottom as qemu-img does, numbering them
// from 0 at the top, and reports ranges past the end of a shorter backing
// file as zeros of the image above it. Like QEMU, for an image that looks
// preallocated (many more clusters in use than the file has blocks on
// disk) it also asks the host file whether a data cluster's bytes are a
// hole there: then the range reads as zeros.
#include <algorithm>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/printf.h>

#include "server/layerctl/commands.h"
#include "server/layerctl/util.h"

namespace layerd::ctl {
namespace {

constexpr const char* kMapHelp =
    "usage: layerctl map [-f FMT] [-U] [--start-offset=OFFSET] [--max-length=LEN]\n"
    "                    [--output=human|json] FILENAME\n"
    "\n"
    "Describes every range of FILENAME's virtual disk: which image of the\n"
    "backing chain provides it (depth 0 is FILENAME itself), whether it is\n"
    "allocated (present), reads as zeros, holds data, and where the data lies\n"
    "in the file. The human format lists only data ranges. An image another\n"
    "process writes is refused unless -U (--force-share).\n";

struct Entry {
  uint64_t start = 0;
  uint64_t length = 0;
  uint64_t depth = 0;
  bool present = false;
  bool zero = false;
  bool data = false;
  bool has_offset = false;
  uint64_t offset = 0;
  std::string filename;  // of the file holding `offset`
};

uint32_t be32(const std::byte* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) |
         uint32_t(p[3]);
}
uint64_t be64(const std::byte* p) { return (uint64_t(be32(p)) << 32) | be32(p + 4); }

// QEMU's test for metadata preallocation: at least max(n * 10 / 9, n + 2)
// clusters have a nonzero refcount, where n is the number of clusters the
// file occupies on disk. Reads the refcount structures directly.
bool looks_preallocated(const OpenedImage& img) {
  File& f = *img.file;
  std::byte h[104] = {};
  if (f.pread(h, 0)) return false;
  const uint32_t version = be32(h + 4);
  const uint32_t cluster_bits = be32(h + 20);
  if (cluster_bits < 9 || cluster_bits > 21) return false;
  const uint64_t cs = 1ull << cluster_bits;
  const uint64_t rt_offset = be64(h + 48);
  const uint64_t rt_clusters = be32(h + 56);
  const uint32_t order = version >= 3 ? be32(h + 96) : 4;
  if (order > 6) return false;
  const uint64_t width = 1ull << order;  // bits per refcount
  const uint64_t per_block = cs * 8 / width;

  const uint64_t real_clusters = allocated_size(img.filename) / cs;
  const uint64_t threshold = std::max(real_clusters * 10 / 9, real_clusters + 2);
  const uint64_t end_cluster = (f.size() + cs - 1) / cs;

  if (rt_clusters * cs > (64u << 20)) return false;  // implausible: skip
  std::vector<std::byte> table(rt_clusters * cs);
  if (f.pread(table, rt_offset)) return false;
  std::vector<std::byte> block(cs);
  uint64_t loaded = UINT64_MAX;
  uint64_t count = 0;
  for (uint64_t i = 0; i < end_cluster && count < threshold; ++i) {
    const uint64_t bi = i / per_block;
    if ((bi + 1) * 8 > table.size()) break;
    const uint64_t boff = be64(&table[bi * 8]) & ~(cs - 1) & 0x00ffffffffffffffull;
    if (!boff) {
      i = (bi + 1) * per_block - 1;  // a whole block of zero refcounts
      continue;
    }
    if (bi != loaded) {
      if (f.pread(block, boff)) return false;
      loaded = bi;
    }
    const uint64_t idx = i % per_block;
    uint64_t rc = 0;
    if (width < 8) {
      const auto byte = static_cast<unsigned>(block[idx * width / 8]);
      rc = (byte >> (width * (idx % (8 / width)))) & ((1u << width) - 1);
    } else {
      for (uint64_t k = 0; k < width / 8; ++k)
        rc = (rc << 8) | static_cast<unsigned>(block[idx * width / 8 + k]);
    }
    count += rc != 0;
  }
  return count >= threshold;
}

bool mergeable(const Entry& a, const Entry& b) {
  if (a.length == 0) return false;
  if (a.zero != b.zero || a.data != b.data || a.depth != b.depth ||
      a.present != b.present || a.filename != b.filename ||
      a.has_offset != b.has_offset)
    return false;
  return !a.has_offset || a.offset + a.length == b.offset;
}

// Where an extent's bytes live: its host offset, in the image or in the
// external data file.
void set_host(Entry& e, const qcow2::MapExtent& m, const OpenedImage& img) {
  e.has_offset = true;
  e.offset = m.host_offset;
  e.filename = m.in_data_file && img.data_file ? img.data_file_path : img.filename;
}

// The extent at `offset` (at most `length` bytes), asked top to bottom.
// preallocated[d]: -1 not known yet, else looks_preallocated(chain[d]).
Entry status_at(const std::vector<OpenedImage>& chain, std::vector<int>& preallocated,
                uint64_t offset, uint64_t length) {
  Entry e;
  e.start = offset;
  for (size_t d = 0;; ++d) {
    const OpenedImage& img = chain[d];
    e.depth = d;
    if (!img.image) {  // raw: always present; holes read as zeros
      bool is_data = true;
      uint64_t n = img.file->extent_at(offset, length, &is_data);
      e.length = n == 0 || n > length ? length : n;
      e.present = true;
      e.data = is_data;
      e.zero = !is_data;
      e.has_offset = true;
      e.offset = offset;
      e.filename = img.filename;
      return e;
    }
    qcow2::MapExtent m;
    if (auto ec = img.image->block_status(offset, length, &m))
      fail(fmt::format("Could not read file metadata of '{}': {}", img.filename,
                       ec.message()));
    if (m.length == 0 || m.length > length)
      fail(fmt::format("'{}': block status returned a bad length", img.filename));
    length = m.length;
    if (m.kind == qcow2::ExtentKind::Data) {
      e.present = true;
      e.data = true;
      if (m.has_host_offset && !m.compressed) {
        set_host(e, m, img);
        if (preallocated[d] < 0) preallocated[d] = looks_preallocated(img);
        if (preallocated[d]) {
          File& host = m.in_data_file && img.data_file ? *img.data_file : *img.file;
          bool is_data = true;
          uint64_t n = host.extent_at(m.host_offset, length, &is_data);
          if (!is_data) e.zero = true;
          if (n > 0 && n < length) length = n;
        }
      }
      e.length = length;
      return e;
    }
    if (m.kind == qcow2::ExtentKind::Zero) {
      e.present = true;
      e.zero = true;
      if (m.has_host_offset) set_host(e, m, img);
      e.length = length;
      return e;
    }
    // Not here: the bottom reads zeros, as does whatever lies past the end
    // of a shorter backing file. (An unallocated subcluster of an allocated
    // cluster still has a host offset, which qemu-img shows.)
    if (d + 1 == chain.size() || offset >= chain[d + 1].size) {
      e.zero = true;
      e.length = length;
      if (m.has_host_offset) set_host(e, m, img);
      return e;
    }
    length = std::min(length, chain[d + 1].size - offset);
  }
}

void print_json(const Entry& e, bool last) {
  std::string s = fmt::format(
      "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, "
      "\"zero\": {}, \"data\": {}",
      e.start, e.length, e.depth, e.present, e.zero, e.data);
  if (e.has_offset) s += fmt::format(", \"offset\": {}", e.offset);
  s += last ? "}" : "},\n";
  std::fputs(s.c_str(), stdout);
}

// Prints `e`; may relabel `next` as qemu-img does to coalesce more.
void print_human(const Entry& e, Entry* next) {
  if (e.data && !e.has_offset) {
    std::fflush(stdout);
    fail("File contains external, encrypted or compressed clusters.");
  }
  if (e.data && !e.zero) {
    auto hex = [](uint64_t v) { return v ? fmt::format("{:#x}", v) : std::string("0"); };
    fmt::print("{:<16}{:<16}{:<16}{}\n", hex(e.start), hex(e.length),
               e.has_offset ? hex(e.offset) : "0", e.filename);
  }
  // Zeros and unallocated ranges print nothing: let them merge.
  if (next && (!next->data || next->zero) && (!e.data || e.zero)) {
    next->data = false;
    next->zero = true;
  }
}

}  // namespace

int cmd_map(int argc, char** argv) {
  static const option kLong[] = {{"help", no_argument, nullptr, 'h'},
                                 {"format", required_argument, nullptr, 'f'},
                                 {"force-share", no_argument, nullptr, 'U'},
                                 {"output", required_argument, nullptr, 'O'},
                                 {"start-offset", required_argument, nullptr, 's'},
                                 {"max-length", required_argument, nullptr, 'l'},
                                 {nullptr, 0, nullptr, 0}};
  std::string format;
  bool as_json = false;
  uint64_t start = 0;
  uint64_t max_length = UINT64_MAX;
  OpenFlags flags;
  reset_getopt();
  for (int c; (c = getopt_long(argc, argv, ":hUf:", kLong, nullptr)) != -1;) {
    switch (c) {
      case 'h': std::fputs(kMapHelp, stdout); return 0;
      case 'f': format = optarg; break;
      case 'U': flags.force_share = true; break;
      case 'O': as_json = parse_output_format(optarg); break;
      case 's':
        if (!parse_size(optarg, &start)) fail("Invalid start offset specified");
        break;
      case 'l':
        if (!parse_size(optarg, &max_length)) fail("Invalid length specified");
        break;
      default: bad_option(c, optarg, argv);
    }
  }
  if (optind != argc - 1) usage_error("Expecting one image file name");
  std::string path = argv[optind];
  ImageFormat f = format.empty() ? probe_format(path) : parse_format_arg(format, "");
  std::vector<OpenedImage> chain = open_image_chain(path, f, flags);

  const uint64_t size = chain.front().size;
  const uint64_t end = max_length > size || start > size - max_length
                           ? size
                           : start + max_length;
  if (as_json) std::fputs("[", stdout);
  else fmt::print("{:<16}{:<16}{:<16}{}\n", "Offset", "Length", "Mapped to", "File");

  std::vector<int> preallocated(chain.size(), -1);
  std::optional<Entry> curr;
  for (uint64_t offset = start; offset < end;) {
    Entry next = status_at(chain, preallocated, offset, end - offset);
    offset += next.length;
    if (curr && mergeable(*curr, next)) {
      curr->length += next.length;
      continue;
    }
    if (curr) {
      if (as_json) print_json(*curr, false);
      else print_human(*curr, &next);
    }
    curr = std::move(next);
  }
  if (curr) {
    if (as_json) print_json(*curr, true);
    else print_human(*curr, nullptr);
  }
  if (as_json) std::fputs("]\n", stdout);
  return 0;
}

}  // namespace layerd::ctl
