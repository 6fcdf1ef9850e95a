#include "overlay/temp_overlay.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>

#include <fmt/chrono.h>
#include <fmt/format.h>

namespace layerd {
namespace {

namespace fs = std::filesystem;

constexpr uint32_t kDefaultClusterSize = 65536;

std::atomic<uint64_t> g_kept_serial{0};

}  // namespace

std::string default_temp_dir() {
  const char* tmp = std::getenv("TMPDIR");
  return tmp && *tmp ? tmp : "/var/tmp";
}

std::unique_ptr<TempOverlay> TempOverlay::create(
    const std::vector<std::shared_ptr<BlockNode>>& below,
    const TempOverlayOptions& options, std::string* error) {
  const BlockNode& under = *below.front();
  const bool keep = !options.keep_dir.empty();
  if (keep && !under.snapshot_id.empty()) {
    *error = fmt::format("cannot keep an overlay of internal snapshot '{}' of "
                         "'{}': a qcow2 backing file cannot name a snapshot",
                         under.snapshot_id, under.path);
    return nullptr;
  }
  qcow2::CreateOptions co;
  co.size = under.size;
  co.cluster_size = kDefaultClusterSize;
  if (under.image) {
    co.cluster_size = under.image->cluster_size();
    co.extended_l2 = under.image->info().extended_l2;
  }
  if (under.snapshot_id.empty()) {
    std::error_code ec;
    co.backing_file = fs::absolute(under.path, ec).string();
    co.backing_format = format_name(under.format);
  }
  int fd = -1;
  std::error_code ec;
  std::shared_ptr<File> file = open_temp_file(options.dir, &fd, ec);
  if (!file) {
    *error = fmt::format("cannot create a temporary overlay in '{}': {}",
                         options.dir, ec.message());
    return nullptr;
  }
  qcow2::Status st = qcow2::Image::create(*file, co);
  std::unique_ptr<qcow2::Image> image;
  if (st.ok()) st = qcow2::Image::open(file, qcow2::OpenOptions{}, &image);
  if (!st.ok()) {
    *error = fmt::format("cannot create a temporary overlay in '{}': {}",
                         options.dir, st.message());
    return nullptr;
  }
  auto node = std::make_shared<BlockNode>();
  node->path = fmt::format("{}/<overlay of {}>", options.dir, under.path);
  node->format = ImageFormat::Qcow2;
  node->size = image->size();
  node->writable = true;
  node->image = std::move(image);
  return std::unique_ptr<TempOverlay>(
      new TempOverlay(std::move(node), std::move(file), fd, options));
}

std::string TempOverlay::check_keep(const TempOverlayOptions& options) {
  int fd = -1;
  std::error_code ec;
  std::unique_ptr<File> probe = open_temp_file(options.dir, &fd, ec);
  if (!probe)
    return fmt::format("cannot create a temporary overlay in '{}': {}", options.dir,
                       ec.message());
  const std::string name =
      fmt::format("{}/.layerd-keep-probe-{}", options.keep_dir, ::getpid());
  ec = link_temp_file(fd, name);
  if (ec)
    return fmt::format("--keep-overlay={}: overlays made in '{}' cannot be kept "
                       "there ({}); the directory must exist, be writable and be on "
                       "the same file system as --temp-dir, which must support "
                       "O_TMPFILE",
                       options.keep_dir, options.dir, ec.message());
  ::unlink(name.c_str());
  return "";
}

std::error_code TempOverlay::keep(std::string* path) {
  if (auto ec = node_->image->close()) return ec;
  kept_ = true;
  const auto now = std::chrono::system_clock::now();
  *path = fmt::format("{}/{}-{:%Y%m%d-%H%M%S}-{}-{}.qcow2", options_.keep_dir,
                      options_.keep_name.empty() ? "overlay" : options_.keep_name,
                      fmt::localtime(std::chrono::system_clock::to_time_t(now)),
                      ::getpid(), ++g_kept_serial);
  return link_temp_file(fd_, *path);
}

TempOverlay::~TempOverlay() {
  if (options_.keep_dir.empty() || kept_ || file_->size() == created_size_)
    return;
  std::string path;
  if (auto ec = keep(&path))
    fmt::print(stderr, "layerd: could not keep the overlay as '{}': {}\n", path,
               ec.message());
  else
    fmt::print(stderr, "layerd: kept the overlay as '{}'\n", path);
}

}  // namespace layerd
