// Opening one image file (raw or qcow2, with its external data file) and
// sharing it: see image_registry.h for the rules.
#include "overlay/image_registry.h"

#include <sys/stat.h>

#include <cstring>
#include <filesystem>

#include <fmt/format.h>

namespace layerd {
namespace {

namespace fs = std::filesystem;

constexpr uint32_t kDirectAlignment = 4096;

// A name an image records (a data file), relative to the image's own
// directory unless absolute.
std::string resolve_relative(const std::string& image_path,
                             const std::string& name) {
  if (!name.empty() && name[0] == '/') return name;
  return (fs::path(image_path).parent_path() / name).string();
}

// How messages name the file `path` of a node opened with `o`.
std::string describe_file(const std::string& path, const NodeOptions& o) {
  if (o.backing && !o.named_by.empty() && o.named_by != "a throwaway overlay")
    return fmt::format("backing file '{}' of '{}'", path, o.named_by);
  return fmt::format("image '{}'", path);
}

// The policy that confines the node's own file, or nullptr.
const ImageDirs* confining(const NodeOptions& o) {
  return o.trusted_name ? nullptr : o.image_dirs;
}

std::string cannot_open(const std::string& path, const NodeOptions& o,
                        std::error_code ec) {
  if (const ImageDirs* dirs = confining(o)) {
    std::string why = dirs->explain(ec, describe_file(path, o), path);
    if (!why.empty()) return why;
  }
  if (o.backing && !o.named_by.empty() && o.named_by != "a throwaway overlay")
    return fmt::format("cannot open backing file '{}' of '{}': {}", path,
                       o.named_by, ec.message());
  std::string hint;
  if (o.direct && ec == std::errc::invalid_argument)
    hint = " (the filesystem does not support O_DIRECT; use --cache=writeback)";
  return fmt::format("cannot open '{}': {}{}", path, ec.message(), hint);
}

// Takes QEMU's locks for `kind` on `file`, false with `error` set if
// another process (or another open in this one) is in the way.
bool lock_file(File& file, const std::string& path, LockedFile kind,
               const NodeOptions& o, std::string* error) {
  const Access access = o.lock_access.value_or(o.writable ? Access::Write : Access::Read);
  const LockSet locks = qemu_locks(kind, access, o.force_share);
  if (o.conflict) {
    std::error_code ec = file.lock(locks, o.conflict);
    if (ec == std::errc::resource_unavailable_try_again && o.conflict_path)
      *o.conflict_path = path;
    if (!ec) return true;
  }
  return lock_image_file(file, path, locks, error);
}

}  // namespace

std::shared_ptr<BlockNode> open_block_node(const std::string& path,
                                           ImageFormat format,
                                           const NodeOptions& o,
                                           std::string* error) {
  FileOptions fo;
  fo.mode = o.writable ? OpenMode::ReadWrite : OpenMode::ReadOnly;
  fo.direct = o.direct;
  std::error_code ec;
  const ImageDirs* dirs = confining(o);
  std::shared_ptr<File> file = dirs ? dirs->open(path, fo, ec) : open_posix_file(path, fo, ec);
  if (!file) {
    *error = cannot_open(path, o, ec);
    return nullptr;
  }
  auto node = std::make_shared<BlockNode>();
  node->path = path;
  node->format = format;
  node->writable = o.writable;
  node->file = file;
  const LockedFile kind = format == ImageFormat::Qcow2 ? LockedFile::Qcow2Image
                          : o.backing                 ? LockedFile::RawImage
                                                      : LockedFile::RawExport;
  if (!lock_file(*file, path, kind, o, error)) return nullptr;
  if (o.direct && (format != ImageFormat::Raw || o.backing)) {
    *error = "--cache=none and directsync are only supported for raw images";
    return nullptr;
  }
  if (o.direct && file->size() % kDirectAlignment != 0) {
    *error = fmt::format("'{}' is not a multiple of {} bytes long, which "
                         "O_DIRECT needs; use --cache=writeback",
                         path, kDirectAlignment);
    return nullptr;
  }
  if (format == ImageFormat::Raw) {
    node->raw = file;
    // Its exact size. (qemu's block layer counts 512-byte sectors and
    // serves a file of 1000 bytes as 1024; docs/compatibility.md.)
    node->size = file->size();
    return node;
  }

  qcow2::OpenOptions qo;
  qo.read_only = !o.writable;
  qo.l2_cache_bytes = o.l2_cache_bytes;
  qo.repair_dirty_on_open = o.repair_dirty_on_open;
  qcow2::HeaderInfo header;
  qcow2::Status st = qcow2::Image::probe(file, &header);
  if (!st.ok()) {
    *error = fmt::format("'{}': {}", path, st.message());
    return nullptr;
  }
  if (header.has_data_file) {
    if (!o.allow_data_files) {
      *error = fmt::format("'{}' keeps its data in the external file '{}'; "
                           "pass --allow-data-file to let layerd open it",
                           path, header.data_file);
      return nullptr;
    }
    if (header.data_file.empty()) {
      *error = fmt::format("'{}' needs an external data file but does not "
                           "name one", path);
      return nullptr;
    }
    const std::string what = fmt::format("data file '{}' of '{}'", header.data_file, path);
    if (auto why = refuse_protocol_name(what, header.data_file); !why.empty()) {
      *error = why;
      return nullptr;
    }
    node->data_file_path = resolve_relative(path, header.data_file);
    node->data_file = o.image_dirs ? o.image_dirs->open(node->data_file_path, fo, ec)
                                   : open_posix_file(node->data_file_path, fo, ec);
    if (!node->data_file) {
      if (o.image_dirs) {
        *error = o.image_dirs->explain(
            ec, fmt::format("data file '{}' of '{}'", node->data_file_path, path),
            node->data_file_path);
        if (!error->empty()) return nullptr;
      }
      *error = fmt::format("cannot open data file '{}' of '{}': {}",
                           node->data_file_path, path, ec.message());
      return nullptr;
    }
    if (!lock_file(*node->data_file, node->data_file_path, LockedFile::DataFile, o,
                   error))
      return nullptr;
    qo.data_file = node->data_file;
  }
  std::unique_ptr<qcow2::Image> image;
  st = qcow2::Image::open(file, qo, &image);
  if (!st.ok()) {
    *error = fmt::format("'{}': {}", path, st.message());
    return nullptr;
  }
  if (o.writable && o.refuse_corrupt && image->read_only()) {
    *error = fmt::format("'{}' is marked corrupt and can only be served "
                         "read-only (-r); repair it with qemu-img check -r all",
                         path);
    return nullptr;
  }
  node->size = image->size();
  node->image = std::move(image);
  return node;
}

bool same_file(const std::string& a, const std::string& b) {
  struct stat sa {}, sb {};
  return ::stat(a.c_str(), &sa) == 0 && ::stat(b.c_str(), &sb) == 0 &&
         sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

bool parse_image_format(const std::string& name, ImageFormat* out) {
  if (name == "raw") *out = ImageFormat::Raw;
  else if (name == "qcow2") *out = ImageFormat::Qcow2;
  else return false;
  return true;
}

const char* format_name(ImageFormat f) {
  return f == ImageFormat::Raw ? "raw" : "qcow2";
}

std::shared_ptr<BlockNode> ImageRegistry::share(Entry& entry,
                                                const std::string& path,
                                                const NodeOptions& o,
                                                std::string* error) {
  std::shared_ptr<BlockNode> node = entry.node.lock();
  if (!node) return nullptr;
  if (o.writable && (!node->writable || entry.backing)) {
    *error = entry.backing
                 ? fmt::format("'{}' is the backing image of '{}', so layerd "
                               "cannot also serve it writable",
                               path, entry.backing_of)
                 : fmt::format("'{}' is already open read-only in this "
                               "server, so it cannot also be served writable",
                               path);
    return nullptr;
  }
  if (o.backing && node->writable) {
    *error = fmt::format("'{}' is served writable, so it cannot also be the "
                         "backing image of '{}'", path, o.named_by);
    return nullptr;
  }
  return node;
}

std::shared_ptr<BlockNode> ImageRegistry::open(const std::string& path,
                                               ImageFormat format,
                                               const NodeOptions& o,
                                               std::string* error) {
  // A confined name is looked up as it will be opened, so that a file
  // outside is not shared either because some export has it open.
  struct stat st {};
  std::error_code ec;
  const ImageDirs* dirs = confining(o);
  if (dirs ? !dirs->stat(path, &st, ec) : ::stat(path.c_str(), &st) != 0) {
    if (!dirs) ec = std::error_code(errno, std::generic_category());
    *error = cannot_open(path, o, ec);
    return nullptr;
  }
  Key key{st.st_dev, st.st_ino, ""};
  std::unique_lock lock(mutex_);
  // A node that set_writable is reopening is shared once it is done (its
  // access is known then).
  reopened_.wait(lock, [&] {
    auto it = entries_.find(key);
    if (it == entries_.end()) return true;
    std::shared_ptr<BlockNode> node = it->second.node.lock();
    return !node || !reopening_.count(node.get());
  });
  Entry& entry = entries_[key];
  error->clear();
  std::shared_ptr<BlockNode> node = share(entry, path, o, error);
  if (!node) {
    if (!error->empty()) return nullptr;
    node = open_block_node(path, format, o, error);
    if (!node) return nullptr;
    entry = Entry{node, false, ""};
  } else if (node->format != format) {
    *error = fmt::format("'{}' is already open as {}, not {}", path,
                         format_name(node->format), format_name(format));
    return nullptr;
  }
  if (o.backing && !entry.backing) {
    entry.backing = true;
    entry.backing_of = o.named_by;
  }
  return node;
}

std::string SnapshotSelector::describe() const {
  if (!id_or_name.empty()) return fmt::format("with id or name '{}'", id_or_name);
  if (!id.empty() && !name.empty())
    return fmt::format("with id '{}' and name '{}'", id, name);
  return id.empty() ? fmt::format("with name '{}'", name)
                    : fmt::format("with id '{}'", id);
}

std::shared_ptr<BlockNode> ImageRegistry::open_snapshot(
    const std::shared_ptr<BlockNode>& active, const SnapshotSelector& which,
    std::string* error) {
  if (!active->image) {
    *error = fmt::format("'{}' is a raw image, which has no internal snapshots",
                         active->path);
    return nullptr;
  }
  // Name the view by its id, so that "1" and the name of snapshot 1 share.
  std::string id;
  const auto snapshots = active->image->snapshots();
  for (const auto& s : snapshots) {
    bool match = which.id_or_name.empty()
                     ? (which.id.empty() || s.id == which.id) &&
                           (which.name.empty() || s.name == which.name)
                     : s.id == which.id_or_name;
    if (match) {
      id = s.id;
      break;
    }
  }
  if (id.empty() && !which.id_or_name.empty()) {
    for (const auto& s : snapshots) {
      if (s.name == which.id_or_name) {  // the first, as qemu picks it
        id = s.id;
        break;
      }
    }
  }
  if (id.empty()) {
    *error = fmt::format("'{}' has no internal snapshot {}", active->path,
                         which.describe());
    return nullptr;
  }
  struct stat st {};
  if (::stat(active->path.c_str(), &st) != 0) {
    *error = fmt::format("cannot open '{}': {}", active->path,
                         std::strerror(errno));
    return nullptr;
  }
  std::lock_guard lock(mutex_);
  Entry& entry = entries_[Key{st.st_dev, st.st_ino, id}];
  if (auto node = entry.node.lock()) return node;
  std::unique_ptr<qcow2::Image> view;
  qcow2::Status s = active->image->open_snapshot(id, &view);
  if (!s.ok()) {
    *error = fmt::format("'{}': snapshot {}: {}", active->path, id, s.message());
    return nullptr;
  }
  auto node = std::make_shared<BlockNode>();
  node->path = active->path;
  node->format = ImageFormat::Qcow2;
  node->size = view->size();
  node->snapshot_id = id;
  node->snapshot_of = active;
  node->image = std::move(view);
  entry = Entry{node, false, ""};
  return node;
}

namespace {

// Reopens the files of `node` in `mode` and takes the locks of `access`.
// On failure, what was done is undone.
bool reopen_files(BlockNode& node, OpenMode mode, Access access, std::string* error) {
  struct Step {
    File* file;
    LockedFile kind;
    std::string path;
  };
  const LockedFile own = node.image ? LockedFile::Qcow2Image : LockedFile::RawImage;
  std::vector<Step> steps{{node.file.get(), own, node.path}};
  if (node.data_file)
    steps.push_back({node.data_file.get(), LockedFile::DataFile, node.data_file_path});
  const OpenMode back = mode == OpenMode::ReadWrite ? OpenMode::ReadOnly : OpenMode::ReadWrite;
  const Access old_access = access == Access::Write ? Access::Read : Access::Write;
  for (size_t i = 0; i < steps.size(); ++i) {
    Step& s = steps[i];
    // Write locks before the write mode, and read-only mode before the
    // write locks go.
    std::error_code ec;
    std::string why;
    if (mode == OpenMode::ReadWrite) {
      if (!lock_image_file(*s.file, s.path, qemu_locks(s.kind, access, false), &why))
        ec = std::make_error_code(std::errc::resource_unavailable_try_again);
      else if ((ec = s.file->reopen(mode)))
        (void)s.file->lock(qemu_locks(s.kind, old_access, false), nullptr);
    } else if (!(ec = s.file->reopen(mode))) {
      (void)s.file->lock(qemu_locks(s.kind, access, false), nullptr);
    }
    if (ec) {
      *error = !why.empty() ? why
                            : fmt::format("cannot reopen '{}' {}: {}", s.path,
                                          mode == OpenMode::ReadWrite ? "read-write"
                                                                      : "read-only",
                                          ec.message());
      for (size_t j = 0; j < i; ++j) {
        (void)steps[j].file->reopen(back);
        (void)steps[j].file->lock(qemu_locks(steps[j].kind, old_access, false), nullptr);
      }
      return false;
    }
  }
  return true;
}

}  // namespace

// The image's own reopen (a repair scan, a write-back with its syncs) runs
// without the registry's mutex, so that exports opening other files, or
// sharing this one, do not wait for it. Meanwhile the node counts as
// writable (nothing may take it as a backing image) and a second
// set_writable of it is refused, and open() of its file waits.
bool ImageRegistry::set_writable(const std::shared_ptr<BlockNode>& node,
                                 bool writable, std::string* error) {
  {
    std::lock_guard lock(mutex_);
    if (reopening_.count(node.get())) {
      *error = fmt::format("'{}' is being reopened already", node->path);
      return false;
    }
    if (node->writable == writable) return true;
    if (!node->snapshot_id.empty()) {
      *error = fmt::format("'{}' is an internal snapshot, which cannot be written",
                           node->path);
      return false;
    }
    if (writable) {
      if (!reopen_files(*node, OpenMode::ReadWrite, Access::Write, error)) return false;
      node->writable = true;
    }
    reopening_.insert(node.get());
  }
  qcow2::Status st = qcow2::Status::Ok();
  if (node->image && writable) {
    st = node->image->reopen_read_write();
    // In use from now on: the dirty bit's sync is not left to a write.
    if (st.ok()) {
      if (auto ec = node->image->begin_writes()) {
        (void)node->image->reopen_read_only();
        st = qcow2::Status::IoError(ec, "setting the dirty bit");
      }
    }
  } else if (node->image) {
    st = node->image->reopen_read_only();
  }
  std::lock_guard lock(mutex_);
  reopening_.erase(node.get());
  reopened_.notify_all();
  // A failed reopen leaves the image read-only either way (a write-back
  // that failed on the way to read-only too): so are its files and node.
  if (!st.ok()) {
    std::string ignored;
    (void)reopen_files(*node, OpenMode::ReadOnly, Access::Read, &ignored);
    node->writable = false;
    *error = fmt::format("cannot make '{}' {}: {}", node->path,
                         writable ? "writable" : "read-only", st.message());
    return false;
  }
  if (!writable) {
    if (!reopen_files(*node, OpenMode::ReadOnly, Access::Read, error)) return false;
    node->writable = false;
  }
  return true;
}

void ImageRegistry::mark_backing(const std::shared_ptr<BlockNode>& node,
                                 const std::string& named_by) {
  std::lock_guard lock(mutex_);
  for (auto& [_, entry] : entries_) {
    if (entry.node.lock() == node && !entry.backing) {
      entry.backing = true;
      entry.backing_of = named_by;
    }
  }
}

size_t ImageRegistry::open_count() const {
  std::lock_guard lock(mutex_);
  size_t n = 0;
  for (const auto& [_, e] : entries_)
    if (!e.node.expired()) ++n;
  return n;
}

}  // namespace layerd
