#include "server/layerctl_util.h"

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

std::string format_name(ImageFormat f) {
  return f == ImageFormat::Qcow2 ? "qcow2" : "raw";
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

// Takes qemu-img's locks for `kind` opened with `flags`; fails with
// qemu-img's message when another process is in the way.
void lock_as_qemu_img(File& file, const std::string& path, LockedFile kind,
                      const OpenFlags& flags) {
  const Access access = flags.writable        ? Access::Write
                        : flags.metadata_only ? Access::Metadata
                                              : Access::Read;
  LockConflict conflict;
  std::error_code ec = file.lock(qemu_locks(kind, access, flags.force_share), &conflict);
  if (ec == std::errc::resource_unavailable_try_again)
    fail(fmt::format("Could not open '{}': {}\nIs another process using the "
                     "image [{}]?", path, conflict.qemu_message(), path));
  if (ec) fail(fmt::format("Could not open '{}': Failed to lock: {}", path, ec.message()));
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

OpenedImage open_image(const std::string& path, ImageFormat format,
                       OpenFlags flags) {
  if (flags.force_share && flags.writable)
    fail(fmt::format("Could not open '{}': force-share=on can only be used "
                     "with read-only images", path));
  OpenedImage img;
  img.filename = path;
  img.format = format;
  img.file = open_file(path, flags.writable);
  lock_as_qemu_img(*img.file, path,
                   format == ImageFormat::Raw ? LockedFile::RawImage
                                              : LockedFile::Qcow2Image,
                   flags);
  if (format == ImageFormat::Raw) {
    // QEMU counts sizes in 512-byte sectors: a raw file's disk is its
    // length rounded up (the tail reads as zeros).
    img.size = (img.file->size() + 511) & ~uint64_t{511};
    return img;
  }
  qcow2::OpenOptions qo;
  qo.read_only = !flags.writable;
  qo.repair_dirty_on_open = flags.repair_dirty_on_open;
  // An image with an external data file needs it open first. As QEMU does,
  // the recorded name is used as it stands: a relative name is relative to
  // the working directory, not to the image.
  qcow2::HeaderInfo header;
  qcow2::Status st = qcow2::Image::probe(img.file, &header);
  if (!st.ok()) fail(fmt::format("Could not open '{}': {}", path, st.message()));
  if (header.has_data_file) {
    img.data_file_path = header.data_file;
    img.data_file = open_file(img.data_file_path, flags.writable);
    lock_as_qemu_img(*img.data_file, img.data_file_path, LockedFile::DataFile, flags);
    qo.data_file = img.data_file;
  }
  st = qcow2::Image::open(img.file, qo, &img.image);
  if (!st.ok()) fail(fmt::format("Could not open '{}': {}", path, st.message()));
  img.size = img.image->size();
  return img;
}

std::vector<OpenedImage> open_image_chain(const std::string& path,
                                          ImageFormat format, OpenFlags flags) {
  std::vector<OpenedImage> chain;
  std::set<std::string> seen;
  std::string current = path;
  for (;;) {
    std::error_code ec;
    std::string canonical = std::filesystem::weakly_canonical(current, ec).string();
    if (ec) canonical = current;
    if (!seen.insert(canonical).second)
      fail(fmt::format("Backing file '{}' creates an infinite loop.", current));
    chain.push_back(open_image(current, format, flags));
    const OpenedImage& img = chain.back();
    if (!img.image || img.image->backing_file().empty()) break;
    const std::string& backing = img.image->backing_file();
    const std::string& bfmt = img.image->backing_format();
    if (bfmt.empty())
      fail(fmt::format("'{}' does not record the format of its backing file "
                       "'{}'; record it with: qemu-img rebase -u -b '{}' -F "
                       "<raw|qcow2> '{}'",
                       current, backing, backing, current));
    if (!parse_image_format(bfmt, &format))
      fail(fmt::format("'{}': backing file '{}' has format '{}', which "
                       "layerctl does not support",
                       current, backing, bfmt));
    current = combine_path(current, backing);
  }
  return chain;
}

}  // namespace layerd::ctl
