#include "server/layerctl/util.h"

#include <sys/stat.h>

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <set>

#include <fmt/format.h>
#include <fmt/printf.h>

#include "overlay/image_locks.h"

namespace layerd::ctl {

namespace json = boost::json;

void usage_error(const std::string& message) {
  throw CommandError(1, message + "\nTry 'layerctl --help' for more information");
}

void fail(const std::string& message) { throw CommandError(1, message); }

bool parse_size(const std::string& text, uint64_t* out) {
  if (text.empty() || !(std::isdigit(static_cast<unsigned char>(text[0])) ||
                        text[0] == '.'))
    return false;
  errno = 0;
  char* end = nullptr;
  // Integers are parsed exactly; a fraction goes through double.
  const char* s = text.c_str();
  unsigned long long whole = std::strtoull(s, &end, 10);
  if (errno != 0) return false;
  double fraction = 0;
  bool has_fraction = false;
  if (*end == '.') {
    char* fend = nullptr;
    fraction = std::strtod(end, &fend);
    if (fend == end || fend == end + 1) return false;  // "1." without digits
    end = fend;
    has_fraction = true;
  }
  uint64_t unit = 1;
  if (*end != '\0') {
    switch (std::toupper(static_cast<unsigned char>(*end))) {
      case 'B': unit = 1; break;
      case 'K': unit = 1ull << 10; break;
      case 'M': unit = 1ull << 20; break;
      case 'G': unit = 1ull << 30; break;
      case 'T': unit = 1ull << 40; break;
      case 'P': unit = 1ull << 50; break;
      case 'E': unit = 1ull << 60; break;
      default: return false;
    }
    ++end;
    if (*end != '\0') return false;
  }
  if (has_fraction && unit == 1) return false;  // qemu: fractions need a unit
  if (whole > UINT64_MAX / unit) return false;
  double extra = fraction * static_cast<double>(unit);
  uint64_t value = whole * unit;
  if (extra >= static_cast<double>(UINT64_MAX - value)) return false;
  *out = value + static_cast<uint64_t>(extra);
  return true;
}

std::string human_size(uint64_t bytes) {
  static const char* const kSuffixes[] = {"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"};
  // Switch to the next unit once the integer part would reach 1000.
  double scaled = static_cast<double>(bytes) * 1.024;
  int i = 0;
  while (i < 6 && scaled >= std::ldexp(1.0, 10 * (i + 1))) ++i;
  double value = static_cast<double>(bytes) / std::ldexp(1.0, 10 * i);
  return fmt::format("{} {}B", fmt::sprintf("%0.3g", value), kSuffixes[i]);
}

std::string combine_path(const std::string& base_path, const std::string& name) {
  if (name.empty() || name[0] == '/') return name;
  auto slash = base_path.rfind('/');
  if (slash == std::string::npos) return name;
  return base_path.substr(0, slash + 1) + name;
}

namespace {

void pretty_into(std::string& out, const json::value& v, int indent) {
  const std::string pad(static_cast<size_t>(indent) + 4, ' ');
  switch (v.kind()) {
    case json::kind::object: {
      const auto& o = v.get_object();
      if (o.empty()) {
        out += "{}";
        return;
      }
      out += "{\n";
      size_t i = 0;
      for (const auto& kv : o) {
        out += pad;
        out += json::serialize(json::string_view(kv.key()));
        out += ": ";
        pretty_into(out, kv.value(), indent + 4);
        out += ++i < o.size() ? ",\n" : "\n";
      }
      out += std::string(static_cast<size_t>(indent), ' ') + "}";
      return;
    }
    case json::kind::array: {
      const auto& a = v.get_array();
      if (a.empty()) {
        out += "[]";
        return;
      }
      out += "[\n";
      for (size_t i = 0; i < a.size(); ++i) {
        out += pad;
        pretty_into(out, a[i], indent + 4);
        out += i + 1 < a.size() ? ",\n" : "\n";
      }
      out += std::string(static_cast<size_t>(indent), ' ') + "]";
      return;
    }
    default:
      out += json::serialize(v);
  }
}

}  // namespace

std::string pretty_json(const json::value& v) {
  std::string out;
  pretty_into(out, v, 0);
  return out;
}

uint64_t allocated_size(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return 0;
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

ImageFormat parse_format_arg(const std::string& name, const std::string& file) {
  ImageFormat f;
  if (!parse_image_format(name, &f))
    fail(fmt::format("{}{}Unknown file format '{}'", file,
                     file.empty() ? "" : ": ", name));
  return f;
}

namespace {

std::shared_ptr<File> open_file(const std::string& path, bool writable) {
  std::error_code ec;
  FileOptions fo;
  fo.mode = writable ? OpenMode::ReadWrite : OpenMode::ReadOnly;
  std::shared_ptr<File> file = open_posix_file(path, fo, ec);
  if (!file) fail(fmt::format("Could not open '{}': {}", path, ec.message()));
  return file;
}

}  // namespace

ImageFormat probe_format(const std::string& path) {
  auto file = open_file(path, false);
  std::byte magic[4] = {};
  if (file->size() < 4) return ImageFormat::Raw;
  if (auto ec = file->pread(magic, 0))
    fail(fmt::format("Could not read '{}': {}", path, ec.message()));
  const unsigned char q[4] = {'Q', 'F', 'I', 0xfb};
  for (int i = 0; i < 4; ++i)
    if (static_cast<unsigned char>(magic[i]) != q[i]) return ImageFormat::Raw;
  return ImageFormat::Qcow2;
}

namespace {

OpenedImage opened_from(std::shared_ptr<BlockNode> node, std::string filename) {
  OpenedImage img;
  img.filename = std::move(filename);
  img.format = node->format;
  img.file = node->file;
  img.image = node->image;
  img.data_file = node->data_file;
  img.data_file_path = node->data_file_path;
  // QEMU counts sizes in 512-byte sectors: a raw file's disk is its length
  // rounded up (the tail reads as zeros).
  const uint64_t size = node->size;
  img.size = node->raw ? (size + 511) & ~uint64_t{511} : size;
  return img;
}

Access access_of(const OpenFlags& flags) {
  return flags.writable        ? Access::Write
         : flags.metadata_only ? Access::Metadata
                               : Access::Read;
}

// Ends the command with qemu-img's words for a lock conflict, or with
// layerd's message for anything else.
[[noreturn]] void fail_open(const std::string& path, const std::string& error,
                            const LockConflict& conflict,
                            const std::string& conflict_path) {
  if (!conflict_path.empty())
    fail(fmt::format("Could not open '{}': {}\nIs another process using the "
                     "image [{}]?",
                     conflict_path, conflict.qemu_message(), conflict_path));
  fail(fmt::format("Could not open '{}': {}", path, error));
}

}  // namespace

// Images are opened the way layerd opens them (overlay/): an external data
// file's relative name is relative to the image's directory, and QEMU's
// image locks are taken as qemu-img takes them.
OpenedImage open_image(const std::string& path, ImageFormat format,
                       OpenFlags flags) {
  if (flags.force_share && flags.writable)
    fail(fmt::format("Could not open '{}': force-share=on can only be used "
                     "with read-only images", path));
  LockConflict conflict;
  std::string conflict_path;
  NodeOptions o;
  o.writable = flags.writable;
  o.backing = true;  // raw images: locked as images, not as an export
  o.allow_data_files = true;
  o.repair_dirty_on_open = flags.repair_dirty_on_open;
  o.refuse_corrupt = false;
  o.lock_access = access_of(flags);
  o.force_share = flags.force_share;
  o.conflict = &conflict;
  o.conflict_path = &conflict_path;
  std::string error;
  auto node = open_block_node(path, format, o, &error);
  if (!node) fail_open(path, error, conflict, conflict_path);
  return opened_from(std::move(node), path);
}

std::vector<OpenedImage> open_image_chain(const std::string& path,
                                          ImageFormat format, OpenFlags flags) {
  ImageRegistry registry;
  LockConflict conflict;
  std::string conflict_path;
  ChainOptions o;
  o.read_only = true;
  o.allow_data_files = true;
  o.registry = &registry;
  o.force_share = flags.force_share;
  o.lock_access = access_of(flags);
  o.conflict = &conflict;
  o.conflict_path = &conflict_path;
  std::vector<std::shared_ptr<BlockNode>> nodes;
  std::string error;
  if (!open_chain_nodes(path, format, o, &nodes, &error))
    fail_open(path, error, conflict, conflict_path);
  std::vector<OpenedImage> chain;
  std::string filename = path;
  for (auto& node : nodes) {
    if (!chain.empty())
      filename = combine_path(filename, chain.back().image->backing_file());
    chain.push_back(opened_from(std::move(node), filename));
  }
  return chain;
}

}  // namespace layerd::ctl
