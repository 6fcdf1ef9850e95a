// layerctl info: what qemu-img info prints, for one image or a whole
// backing chain, as text or JSON (same keys as qemu-img).
#include <ctime>
#include <cstdio>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/printf.h>

#include "server/layerctl/commands.h"
#include "server/layerctl/util.h"

namespace layerd::ctl {
namespace {

namespace json = boost::json;

constexpr const char* kInfoHelp =
    "usage: layerctl info [-f FMT] [-U] [--backing-chain] [--output=human|json] FILENAME\n"
    "\n"
    "Prints the format, sizes, backing file, snapshots and qcow2 features of\n"
    "FILENAME (and, with --backing-chain, of every image below it). Without\n"
    "-f, FILENAME is probed (qcow2 or raw); backing images always use the\n"
    "format their overlay records. Like qemu-img, it refuses an image another\n"
    "process (QEMU, qemu-nbd, layerd) writes, unless -U (--force-share).\n";

constexpr uint64_t kNoIcount = ~0ull;

uint32_t be32(const std::byte* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) |
         uint32_t(p[3]);
}
uint64_t be64(const std::byte* p) {
  return (uint64_t(be32(p)) << 32) | be32(p + 4);
}
uint16_t be16(const std::byte* p) {
  return static_cast<uint16_t>((uint32_t(p[0]) << 8) | uint32_t(p[1]));
}

// The icount of each snapshot, in table order, read from the snapshot
// table's extra data (the engine does not report it). kNoIcount where the
// entry has none, as for snapshots made by QEMU before 5.2.
std::vector<uint64_t> snapshot_icounts(File& file, size_t count) {
  std::vector<uint64_t> out(count, kNoIcount);
  std::byte header[72];
  if (file.pread(header, 0)) return out;
  uint32_t nb = be32(header + 60);
  uint64_t offset = be64(header + 64);
  for (uint32_t i = 0; i < nb && i < count; ++i) {
    std::byte e[40];
    if (file.pread(e, offset)) return out;
    uint16_t id_size = be16(e + 12);
    uint16_t name_size = be16(e + 14);
    uint32_t extra = be32(e + 36);
    if (extra >= 24) {
      std::byte ic[8];
      if (file.pread(ic, offset + 40 + 16)) return out;
      out[i] = be64(ic);
    }
    offset += (40ull + extra + id_size + name_size + 7) & ~7ull;
  }
  return out;
}

struct ImageFacts {
  const OpenedImage* img;
  uint64_t actual_size = 0;
  std::string backing;       // as recorded
  std::string full_backing;  // combined with the image's directory
  std::string backing_format;
  std::vector<qcow2::SnapshotInfo> snapshots;
  std::vector<uint64_t> icounts;
};

ImageFacts gather(const OpenedImage& img) {
  ImageFacts f;
  f.img = &img;
  f.actual_size = allocated_size(img.filename);
  if (!img.image) return f;
  // Like qemu-img 7.2: the image file only, not an external data file.
  f.backing = img.image->backing_file();
  f.backing_format = img.image->backing_format();
  if (!f.backing.empty()) f.full_backing = combine_path(img.filename, f.backing);
  f.snapshots = img.image->snapshots();
  f.icounts = snapshot_icounts(*img.file, f.snapshots.size());
  return f;
}

// Format-specific facts in qemu's order; human names replace '-' by ' '.
json::object format_specific(const qcow2::Image& image) {
  const qcow2::HeaderInfo& h = image.info();
  json::object d;
  const bool v3 = h.version >= 3;
  d["compat"] = v3 ? "1.1" : "0.10";
  d["compression-type"] = h.compression_type == 1 ? "zstd" : "zlib";
  if (v3) d["lazy-refcounts"] = (h.compatible_features & 1) != 0;
  d["refcount-bits"] = h.refcount_bits;
  if (h.has_data_file) {
    d["data-file"] = h.data_file;
    d["data-file-raw"] = h.data_file_raw;
  }
  if (v3) {
    d["corrupt"] = image.corrupt() || (h.incompatible_features & 2) != 0;
    d["extended-l2"] = h.extended_l2;
  }
  return d;
}

json::object to_json(const ImageFacts& f) {
  const OpenedImage& img = *f.img;
  json::object o;
  if (!f.backing.empty() && !f.backing_format.empty())
    o["backing-filename-format"] = f.backing_format;
  if (!f.snapshots.empty()) {
    json::array snaps;
    for (size_t i = 0; i < f.snapshots.size(); ++i) {
      const auto& s = f.snapshots[i];
      json::object js;
      if (f.icounts[i] != kNoIcount) js["icount"] = f.icounts[i];
      js["vm-clock-nsec"] = s.vm_clock_nsec % 1000000000;
      js["name"] = s.name;
      js["date-sec"] = s.date_sec;
      js["date-nsec"] = s.date_nsec;
      js["vm-clock-sec"] = s.vm_clock_nsec / 1000000000;
      js["id"] = s.id;
      js["vm-state-size"] = s.vm_state_size;
      snaps.push_back(std::move(js));
    }
    o["snapshots"] = std::move(snaps);
  }
  o["virtual-size"] = img.size;
  o["filename"] = img.filename;
  if (img.image) o["cluster-size"] = img.image->cluster_size();
  o["format"] = format_name(img.format);
  o["actual-size"] = f.actual_size;
  if (img.image) {
    json::object fs;
    fs["type"] = "qcow2";
    fs["data"] = format_specific(*img.image);
    o["format-specific"] = std::move(fs);
  }
  if (!f.backing.empty()) {
    o["full-backing-filename"] = f.full_backing;
    o["backing-filename"] = f.backing;
  }
  o["dirty-flag"] = img.image ? img.image->dirty() : false;
  return o;
}

std::string snapshot_row(const qcow2::SnapshotInfo& s, uint64_t icount) {
  std::time_t t = static_cast<std::time_t>(s.date_sec);
  std::tm tm{};
  localtime_r(&t, &tm);
  char date[64];
  std::strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S", &tm);
  uint64_t secs = s.vm_clock_nsec / 1000000000;
  std::string clock = fmt::format("{:02}:{:02}:{:02}.{:03}", secs / 3600,
                                  (secs / 60) % 60, secs % 60,
                                  (s.vm_clock_nsec / 1000000) % 1000);
  std::string ic = icount == kNoIcount ? "" : std::to_string(icount);
  return fmt::sprintf("%-9s %-16s %8s%20s%13s%11s", s.id, s.name,
                      human_size(s.vm_state_size), date, clock, ic);
}

std::string to_human(const ImageFacts& f) {
  const OpenedImage& img = *f.img;
  std::string out = fmt::format("image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\n"
                                "disk size: {}\n",
                                img.filename, format_name(img.format),
                                human_size(img.size), img.size,
                                human_size(f.actual_size));
  if (!img.image) return out;
  out += fmt::format("cluster_size: {}\n", img.image->cluster_size());
  if (img.image->dirty()) out += "cleanly shut down: no\n";
  if (!f.backing.empty()) {
    out += "backing file: " + f.backing;
    if (f.full_backing != f.backing) out += " (actual path: " + f.full_backing + ")";
    out += "\n";
    if (!f.backing_format.empty())
      out += "backing file format: " + f.backing_format + "\n";
  }
  if (!f.snapshots.empty()) {
    out += "Snapshot list:\n";
    out += fmt::sprintf("%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE",
                        "DATE", "VM CLOCK", "ICOUNT");
    for (size_t i = 0; i < f.snapshots.size(); ++i)
      out += snapshot_row(f.snapshots[i], f.icounts[i]) + "\n";
  }
  out += "Format specific information:\n";
  for (const auto& kv : format_specific(*img.image)) {
    std::string key(kv.key());
    for (char& c : key)
      if (c == '-') c = ' ';
    std::string value = kv.value().is_string()
                            ? std::string(kv.value().get_string())
                            : json::serialize(kv.value());
    out += fmt::format("    {}: {}\n", key, value);
  }
  return out;
}

}  // namespace

int cmd_info(int argc, char** argv) {
  static const option kLong[] = {{"help", no_argument, nullptr, 'h'},
                                 {"format", required_argument, nullptr, 'f'},
                                 {"force-share", no_argument, nullptr, 'U'},
                                 {"output", required_argument, nullptr, 'O'},
                                 {"backing-chain", no_argument, nullptr, 'B'},
                                 {nullptr, 0, nullptr, 0}};
  std::string format;
  bool as_json = false;
  bool chain = false;
  OpenFlags flags{.metadata_only = true};
  reset_getopt();
  for (int c; (c = getopt_long(argc, argv, ":hUf:", kLong, nullptr)) != -1;) {
    switch (c) {
      case 'h': std::fputs(kInfoHelp, stdout); return 0;
      case 'f': format = optarg; break;
      case 'U': flags.force_share = true; break;
      case 'O': as_json = parse_output_format(optarg); break;
      case 'B': chain = true; break;
      default: bad_option(c, optarg, argv);
    }
  }
  if (optind != argc - 1) usage_error("Expecting one image file name");
  std::string path = argv[optind];
  ImageFormat f = format.empty() ? probe_format(path) : parse_format_arg(format, "");

  std::vector<OpenedImage> images;
  if (chain) {
    images = open_image_chain(path, f, flags);
  } else {
    images.push_back(open_image(path, f, flags));
  }
  std::vector<ImageFacts> facts;
  for (const auto& img : images) facts.push_back(gather(img));

  if (as_json) {
    if (chain) {
      json::array a;
      for (const auto& x : facts) a.push_back(to_json(x));
      fmt::print("{}\n", pretty_json(a));
    } else {
      fmt::print("{}\n", pretty_json(to_json(facts.front())));
    }
  } else {
    for (size_t i = 0; i < facts.size(); ++i)
      fmt::print("{}{}", i ? "\n" : "", to_human(facts[i]));
  }
  return 0;
}

}  // namespace layerd::ctl
