// layerctl create: a new qcow2 image (optionally over a backing file) or a
// sparse raw file, with qemu-img create's options and "Formatting" line.
#include <cstdio>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "overlay/image_locks.h"
#include "server/layerctl/commands.h"
#include "server/layerctl/util.h"

namespace layerd::ctl {
namespace {

constexpr const char* kCreateHelp =
    "usage: layerctl create [-q] [-f FMT] [-b BACKING_FILE -F BACKING_FMT] [-u]\n"
    "                       [-o OPTIONS] FILENAME [SIZE]\n"
    "\n"
    "Creates FILENAME as FMT (raw, the default, or qcow2) of SIZE bytes\n"
    "(suffixes k, M, G, T, P, E). With -b, SIZE defaults to the size of\n"
    "BACKING_FILE, which is opened as BACKING_FMT (-F is required); a relative\n"
    "BACKING_FILE is relative to the directory of FILENAME. -u skips opening\n"
    "the backing file (SIZE is then required). -q prints nothing.\n"
    "\n"
    "qcow2 options (-o NAME=VALUE,...):\n"
    "  compat=0.10|1.1|v2|v3   cluster_size=SIZE       extended_l2=on|off\n"
    "  refcount_bits=N         lazy_refcounts=on|off   compression_type=zlib|zstd\n"
    "  preallocation=off|metadata                      data_file=NAME\n"
    "  data_file_raw=on|off    backing_file=NAME       backing_fmt=FMT\n"
    "  size=SIZE\n"
    "raw options: size=SIZE, preallocation=off\n";

// -o NAME=VALUE[,NAME=VALUE...]; ",," stands for a comma inside a value.
std::vector<std::pair<std::string, std::string>> parse_options(
    const std::string& text, const std::string& file) {
  std::vector<std::pair<std::string, std::string>> out;
  std::string item;
  auto flush = [&] {
    if (item.empty()) return;
    auto eq = item.find('=');
    if (eq == std::string::npos) {
      if (item == "help" || item == "?") {
        out.emplace_back("help", "");
      } else {
        fail(fmt::format("{}: Invalid parameter '{}'", file, item));
      }
    } else {
      out.emplace_back(item.substr(0, eq), item.substr(eq + 1));
    }
    item.clear();
  };
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == ',') {
      if (i + 1 < text.size() && text[i + 1] == ',') {
        item += ',';
        ++i;
      } else {
        flush();
      }
    } else {
      item += text[i];
    }
  }
  flush();
  return out;
}

bool parse_bool(const std::string& name, const std::string& v,
                const std::string& file) {
  if (v == "on" || v == "yes" || v == "true" || v == "y") return true;
  if (v == "off" || v == "no" || v == "false" || v == "n") return false;
  fail(fmt::format("{}: Parameter '{}' expects 'on' or 'off'", file, name));
}

struct CreateArgs {
  std::string file;
  ImageFormat format = ImageFormat::Raw;
  std::string format_name = "raw";
  std::string backing;
  std::string backing_format;
  bool have_size = false;
  uint64_t size = 0;
  bool unsafe = false;
  bool quiet = false;
  // Option values as the user spelled them, for the "Formatting" line.
  std::map<std::string, std::string> given;
};

uint64_t backing_size(const CreateArgs& a) {
  ImageFormat f = parse_format_arg(a.backing_format, a.file);
  std::string path = combine_path(a.file, a.backing);
  try {
    // As qemu-img does: the backing image may be in use, only its size
    // is read.
    OpenedImage img = open_image(path, f, OpenFlags{.metadata_only = true,
                                                    .force_share = true});
    return img.size;
  } catch (const CommandError& e) {
    fail(fmt::format("{}: {}\nCould not open backing image.", a.file, e.what()));
  }
}

// Locks a file about to be (re)formatted as qemu-img create does, before
// anything is written: an image another process uses is left alone.
void lock_for_create(File& file, const std::string& image, const std::string& path) {
  LockConflict conflict;
  std::error_code ec = file.lock(qemu_locks(LockedFile::RawImage, Access::Create, false),
                                 &conflict);
  if (ec == std::errc::resource_unavailable_try_again)
    fail(fmt::format("{}: {}\nIs another process using the image [{}]?", image,
                     conflict.qemu_message(), path));
  if (ec) fail(fmt::format("{}: Failed to lock '{}': {}", image, path, ec.message()));
}

// A sparse raw file (preallocation=off is the only mode).
int create_raw(const CreateArgs& a) {
  if (!a.quiet) {
    std::string line = fmt::format("Formatting '{}', fmt=raw size={}", a.file, a.size);
    if (a.given.count("preallocation"))
      line += " preallocation=" + a.given.at("preallocation");
    fmt::print("{}\n", line);
    std::fflush(stdout);
  }
  std::error_code ec;
  FileOptions fo{.mode = OpenMode::ReadWrite, .direct = false, .create = true};
  auto file = open_posix_file(a.file, fo, ec);
  if (!file) fail(fmt::format("{}: Could not create '{}': {}", a.file, a.file, ec.message()));
  lock_for_create(*file, a.file, a.file);
  if ((ec = file->truncate(0)) || (ec = file->truncate(a.size)) || (ec = file->flush()))
    fail(fmt::format("{}: Could not resize file: {}", a.file, ec.message()));
  return 0;
}

}  // namespace

int cmd_create(int argc, char** argv) {
  static const option kLong[] = {{"help", no_argument, nullptr, 'h'},
                                 {nullptr, 0, nullptr, 0}};
  CreateArgs a;
  std::string options_text;
  reset_getopt();
  for (int c; (c = getopt_long(argc, argv, ":hf:b:F:o:qu", kLong, nullptr)) != -1;) {
    switch (c) {
      case 'h': std::fputs(kCreateHelp, stdout); return 0;
      case 'f': a.format_name = optarg; break;
      case 'b': a.backing = optarg; break;
      case 'F': a.backing_format = optarg; break;
      case 'o':
        if (!options_text.empty()) options_text += ',';
        options_text += optarg;
        break;
      case 'q': a.quiet = true; break;
      case 'u': a.unsafe = true; break;
      default: bad_option(c, optarg, argv);
    }
  }
  if (options_text == "help" || options_text == "?") {
    std::fputs(kCreateHelp, stdout);
    return 0;
  }
  if (optind >= argc) usage_error("Expecting image file name");
  a.file = argv[optind++];
  if (optind < argc) {
    std::string s = argv[optind++];
    if (!parse_size(s, &a.size))
      fail("Invalid image size specified. You may use k, M, G, T, P or E "
           "suffixes for\nlayerctl: kilobytes, megabytes, gigabytes, "
           "terabytes, petabytes and exabytes.");
    a.have_size = true;
  }
  if (optind < argc) usage_error(fmt::format("Unexpected argument: {}", argv[optind]));
  a.format = parse_format_arg(a.format_name, a.file);

  // Options, checked against the format.
  qcow2::CreateOptions co;
  for (const auto& [name, value] : parse_options(options_text, a.file)) {
    if (name == "help") {
      std::fputs(kCreateHelp, stdout);
      return 0;
    }
    const bool qcow2_only = name != "size" && name != "preallocation";
    if (a.format == ImageFormat::Raw && qcow2_only)
      fail(fmt::format("{}: Invalid parameter '{}'", a.file, name));
    if (name == "size") {
      if (!parse_size(value, &a.size))
        fail(fmt::format("{}: Parameter 'size' expects a non-negative number "
                         "below 2^64", a.file));
      a.have_size = true;
    } else if (name == "compat") {
      if (value == "0.10" || value == "v2") co.version = 2;
      else if (value == "1.1" || value == "v3") co.version = 3;
      else fail(fmt::format("{}: Invalid compatibility level: '{}'", a.file, value));
      a.given[name] = value;
    } else if (name == "backing_file") {
      a.backing = value;
    } else if (name == "backing_fmt") {
      a.backing_format = value;
    } else if (name == "cluster_size") {
      uint64_t cs = 0;
      if (!parse_size(value, &cs) || cs > (1u << 31))
        fail(fmt::format("{}: Parameter 'cluster_size' expects a non-negative "
                         "number below 2^64", a.file));
      co.cluster_size = static_cast<uint32_t>(cs);
      a.given[name] = std::to_string(cs);
    } else if (name == "extended_l2") {
      co.extended_l2 = parse_bool(name, value, a.file);
      a.given[name] = value;
    } else if (name == "lazy_refcounts") {
      co.lazy_refcounts = parse_bool(name, value, a.file);
      a.given[name] = value;
    } else if (name == "data_file_raw") {
      co.data_file_raw = parse_bool(name, value, a.file);
      a.given[name] = value;
    } else if (name == "refcount_bits") {
      uint64_t bits = 0;
      if (!parse_size(value, &bits) || bits > 64)
        fail(fmt::format("{}: Refcount width must be a power of two and may "
                         "not exceed 64 bits", a.file));
      co.refcount_bits = static_cast<uint32_t>(bits);
      a.given[name] = value;
    } else if (name == "compression_type") {
      if (value == "zlib") co.compression_type = 0;
      else if (value == "zstd") co.compression_type = 1;
      else fail(fmt::format("{}: Parameter 'compression-type' does not accept "
                            "value '{}'", a.file, value));
      a.given[name] = value;
    } else if (name == "preallocation") {
      if (value == "off") co.preallocation = qcow2::Preallocation::Off;
      else if (value == "metadata" && a.format == ImageFormat::Qcow2)
        co.preallocation = qcow2::Preallocation::Metadata;
      else fail(fmt::format("{}: Unsupported preallocation mode '{}'", a.file, value));
      a.given[name] = value;
    } else if (name == "data_file") {
      co.data_file = value;
      a.given[name] = value;
    } else {
      fail(fmt::format("{}: Invalid parameter '{}'", a.file, name));
    }
  }

  if (!a.backing.empty() && a.format == ImageFormat::Raw)
    fail(fmt::format("{}: Backing file not supported for file format 'raw'", a.file));
  if (!a.backing.empty() && a.backing_format.empty())
    fail(fmt::format("{}: Backing file specified without backing format", a.file));
  if (a.backing.empty() && !a.backing_format.empty())
    fail(fmt::format("{}: Backing format specified without backing file", a.file));
  if (!a.backing.empty()) {
    parse_format_arg(a.backing_format, a.file);
    if (!a.unsafe) {
      uint64_t bsize = backing_size(a);
      if (!a.have_size) {
        a.size = bsize;
        a.have_size = true;
      }
    }
  }
  if (!a.have_size) fail(fmt::format("{}: Image creation needs a size parameter", a.file));

  if (a.format == ImageFormat::Raw) return create_raw(a);

  // qemu's checks, with qemu's words, before the engine's own.
  if (co.version == 2) {
    if (co.lazy_refcounts)
      fail(fmt::format("{}: Lazy refcounts only supported with compatibility "
                       "level 1.1 and above (use version=v3 or greater)", a.file));
    if (co.refcount_bits != 16)
      fail(fmt::format("{}: Different refcount widths than 16 bits require "
                       "compatibility level 1.1 or above (use version=v3 or "
                       "greater)", a.file));
    if (co.extended_l2)
      fail(fmt::format("{}: Extended L2 entries are only supported with "
                       "compatibility level 1.1 and above", a.file));
    if (!co.data_file.empty())
      fail(fmt::format("{}: External data files are only supported with "
                       "compatibility level 1.1 and above", a.file));
    if (co.compression_type != 0)
      fail(fmt::format("{}: Non-zlib compression type is only supported with "
                       "compatibility level 1.1 and above", a.file));
  }
  auto pow2 = [](uint64_t x) { return x && !(x & (x - 1)); };
  if (!pow2(co.cluster_size) || co.cluster_size < 512 || co.cluster_size > (2u << 20))
    fail(fmt::format("{}: Cluster size must be a power of two between 512 and "
                     "2048k", a.file));
  if (!pow2(co.refcount_bits) || co.refcount_bits > 64)
    fail(fmt::format("{}: Refcount width must be a power of two and may not "
                     "exceed 64 bits", a.file));
  if (co.extended_l2 && co.cluster_size < 16384)
    fail(fmt::format("{}: Extended L2 entries are only supported with cluster "
                     "sizes of at least 16384 bytes", a.file));
  if (co.data_file_raw && co.data_file.empty())
    fail(fmt::format("{}: 'data-file-raw' requires 'data-file'", a.file));
  if (co.data_file_raw && !a.backing.empty())
    fail(fmt::format("{}: Backing file and data-file-raw can not be used at "
                     "the same time", a.file));
  // QEMU counts qcow2 sizes in 512-byte sectors and rounds up (the
  // "Formatting" line still shows the size asked for).
  co.size = (a.size + 511) & ~uint64_t{511};
  co.backing_file = a.backing;
  co.backing_format = a.backing.empty() ? "" : a.backing_format;

  if (!a.quiet) {
    auto given = [&](const char* n, const std::string& def) {
      auto it = a.given.find(n);
      return it != a.given.end() ? it->second : def;
    };
    std::string line = fmt::format(
        "Formatting '{}', fmt=qcow2 cluster_size={} extended_l2={}", a.file,
        given("cluster_size", "65536"), given("extended_l2", "off"));
    if (a.given.count("preallocation"))
      line += " preallocation=" + a.given.at("preallocation");
    line += fmt::format(" compression_type={} size={}",
                        given("compression_type", "zlib"), a.size);
    if (a.given.count("compat")) line += " compat=" + a.given.at("compat");
    if (!a.backing.empty())
      line += fmt::format(" backing_file={} backing_fmt={}", a.backing, a.backing_format);
    if (a.given.count("data_file")) line += " data_file=" + a.given.at("data_file");
    if (a.given.count("data_file_raw"))
      line += " data_file_raw=" + a.given.at("data_file_raw");
    line += fmt::format(" lazy_refcounts={} refcount_bits={}",
                        given("lazy_refcounts", "off"), given("refcount_bits", "16"));
    fmt::print("{}\n", line);
    std::fflush(stdout);
  }

  std::error_code ec;
  FileOptions fo{.mode = OpenMode::ReadWrite, .direct = false, .create = true};
  if (!co.data_file.empty()) {
    // Relative to the working directory, as qemu-img creates it (and as
    // QEMU opens it).
    const std::string& dpath = co.data_file;
    auto data = open_posix_file(dpath, fo, ec);
    if (!data)
      fail(fmt::format("{}: Could not create '{}': {}", a.file, dpath, ec.message()));
    lock_for_create(*data, a.file, dpath);
    if ((ec = data->truncate(0)) || (ec = data->truncate(a.size)) || (ec = data->flush()))
      fail(fmt::format("{}: Could not resize '{}': {}", a.file, dpath, ec.message()));
  }
  auto file = open_posix_file(a.file, fo, ec);
  if (!file) fail(fmt::format("{}: Could not create '{}': {}", a.file, a.file, ec.message()));
  lock_for_create(*file, a.file, a.file);
  if ((ec = file->truncate(0)))
    fail(fmt::format("{}: Could not resize file: {}", a.file, ec.message()));
  qcow2::Status st = qcow2::Image::create(*file, co);
  if (!st.ok()) fail(fmt::format("{}: {}", a.file, st.message()));
  if ((ec = file->flush()))
    fail(fmt::format("{}: Could not flush: {}", a.file, ec.message()));
  return 0;
}

}  // namespace layerd::ctl
