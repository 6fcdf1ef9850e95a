// The allowed image directories: names opened beneath directory
// descriptors with openat2 (see image_dirs.h).
#include "overlay/image_dirs.h"

#include <fcntl.h>
#include <unistd.h>

#include <filesystem>

#include <fmt/format.h>

namespace layerd {

namespace fs = std::filesystem;

struct ImageDirs::Dir {
  std::string name;       // absolute, as given (lexically normal)
  std::string canonical;  // its symlinks resolved
  int fd = -1;            // O_PATH
  ~Dir() {
    if (fd >= 0) ::close(fd);
  }
};

namespace {

std::error_code errno_code() { return {errno, std::generic_category()}; }

std::string absolute(const std::string& path) {
  std::error_code ec;
  fs::path p = fs::absolute(path, ec);
  return ec ? path : p.string();
}

// `path` relative to the directory `root` if it names something beneath it
// by its spelling ("." for the directory itself), else "". Whether it
// really lies beneath is openat2's to decide.
std::string beneath(const std::string& path, const std::string& root) {
  if (path.size() < root.size() || path.compare(0, root.size(), root) != 0) return "";
  if (path.size() == root.size()) return ".";
  if (path[root.size()] != '/') return "";
  size_t start = path.find_first_not_of('/', root.size());
  return start == std::string::npos ? "." : path.substr(start);
}

}  // namespace

bool ImageDirs::add(const std::string& dir, std::string* error) {
  std::error_code ec;
  fs::path canonical = fs::canonical(dir.empty() ? "." : dir, ec);
  if (ec) {
    *error = fmt::format("image directory '{}': {}", dir, ec.message());
    return false;
  }
  if (canonical == "/") {
    everywhere_ = true;
    return true;
  }
  auto d = std::make_shared<Dir>();
  d->fd = ::open(canonical.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (d->fd < 0) {
    *error = fmt::format("image directory '{}': {}", dir, errno_code().message());
    return false;
  }
  d->name = fs::path(absolute(dir.empty() ? "." : dir)).lexically_normal().string();
  while (d->name.size() > 1 && d->name.back() == '/') d->name.pop_back();
  d->canonical = canonical.string();
  for (const auto& known : dirs_)
    if (known->canonical == d->canonical && known->name == d->name) return true;
  dirs_.push_back(std::move(d));
  return true;
}

std::string ImageDirs::describe() const {
  if (everywhere_) return "/";
  std::string out;
  for (const auto& d : dirs_) {
    if (!out.empty()) out += ", ";
    out += d->name;
  }
  return out;
}

int ImageDirs::open_fd(const std::string& path, int flags, std::error_code& ec) const {
  if (everywhere_) {
    int fd = ::open(path.c_str(), flags | O_CLOEXEC, 0644);
    if (fd < 0) ec = errno_code();
    return fd;
  }
  std::vector<std::string> candidates{absolute(path)};
  std::error_code ignored;
  std::string resolved = fs::weakly_canonical(candidates[0], ignored).string();
  if (!ignored && resolved != candidates[0]) candidates.push_back(resolved);
  std::error_code other;  // the first error that is not "outside"
  for (const std::string& name : candidates) {
    for (const auto& d : dirs_) {
      for (const std::string* root : {&d->name, &d->canonical}) {
        if (root == &d->canonical && d->canonical == d->name) continue;
        std::string relative = beneath(name, *root);
        if (relative.empty()) continue;
        std::error_code e;
        int fd = open_beneath(d->fd, relative, flags, e);
        if (fd >= 0) {
          ec.clear();
          return fd;
        }
        if (e == std::errc::function_not_supported) {
          ec = e;
          return -1;
        }
        if (e != std::errc::cross_device_link && !other) other = e;
      }
    }
  }
  ec = other ? other : std::make_error_code(std::errc::cross_device_link);
  return -1;
}

std::unique_ptr<File> ImageDirs::open(const std::string& path,
                                      const FileOptions& options,
                                      std::error_code& ec) const {
  int fd = open_fd(path, posix_open_flags(options), ec);
  if (fd < 0) return nullptr;
  return adopt_posix_fd(fd, options, ec);
}

bool ImageDirs::stat(const std::string& path, struct stat* st,
                     std::error_code& ec) const {
  int fd = open_fd(path, O_PATH, ec);
  if (fd < 0) return false;
  bool ok = ::fstat(fd, st) == 0;
  if (!ok) ec = errno_code();
  ::close(fd);
  return ok;
}

std::string ImageDirs::explain(std::error_code ec, const std::string& what,
                               const std::string& path) const {
  if (ec == std::errc::cross_device_link) {
    std::error_code ignored;
    const fs::path normal = fs::path(absolute(path)).lexically_normal();
    const fs::path real = fs::weakly_canonical(normal, ignored);
    std::string resolves;
    if (!ignored && real != normal)
      resolves = fmt::format(" (it resolves to '{}')", real.string());
    return fmt::format(
        "{} is outside the allowed image directories ({}){}; allow it with "
        "--image-dir {}",
        what, describe(), resolves, (ignored ? normal : real).parent_path().string());
  }
  if (ec == std::errc::function_not_supported)
    return fmt::format(
        "cannot open {}: this kernel has no openat2 (Linux 5.6 or later), which "
        "layerd needs to keep image names inside the allowed image directories; "
        "--image-dir / follows names anywhere, as qemu-nbd does",
        what);
  if (ec == std::errc::too_many_symbolic_link_levels)
    return fmt::format("cannot open {}: {} (layerd follows no /proc magic links)",
                       what, ec.message());
  return {};
}

std::string protocol_prefix(const std::string& name) {
  size_t stop = name.find_first_of(":/");
  if (stop == std::string::npos || name[stop] != ':') return "";
  return name.substr(0, stop + 1);
}

std::string refuse_protocol_name(const std::string& what, const std::string& name) {
  const std::string prefix = protocol_prefix(name);
  if (prefix.empty()) return "";
  return fmt::format(
      "{} is a '{}' protocol name, which layerd does not follow: it opens local "
      "files only (a local file whose name has a colon can be written './{}')",
      what, prefix, name);
}

}  // namespace layerd
