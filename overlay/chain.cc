// The chain walks images top to bottom. Reads: each qcow2 image fills what
// it holds and calls back for the rest ("read below"), which recurses to
// the next image; raw images and the zeros below the bottom end the walk.
// Block status: the first image that says anything but "not here" for a
// range decides it, and its depth is the answer for qemu:allocation-depth.
#include "overlay/chain.h"

#include <sys/resource.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <set>

#include <fmt/format.h>

#include "overlay/image_locks.h"
#include "overlay/raw_layer.h"
#include "qcow2/file.h"
#include "qcow2/image.h"

namespace layerd {
namespace {

namespace fs = std::filesystem;

constexpr uint32_t kDirectAlignment = 4096;

// One image of the chain: a qcow2 image or a raw file, and the size it
// answers for (a backing image may be shorter than its overlay).
struct Node {
  std::shared_ptr<qcow2::Image> image;  // qcow2
  std::shared_ptr<File> raw;            // raw
  uint64_t size = 0;
};

class ChainLayer final : public Layer {
  // The reader for what lies below node `depth`, handed to that image.
  struct Below {
    ChainLayer* chain;
    size_t depth;
    std::error_code operator()(uint64_t offset, std::span<std::byte> buf) const {
      return chain->read_at(depth + 1, offset, buf);
    }
  };
  Below below_of(size_t depth) { return Below{this, depth}; }
  struct BelowNowait {
    ChainLayer* chain;
    size_t depth;
    std::error_code operator()(uint64_t offset, std::span<std::byte> buf) const {
      return chain->read_at_nowait(depth + 1, offset, buf);
    }
  };

 public:
  ChainLayer(std::vector<Node> nodes, bool writable)
      : Layer(nodes.front().size,
              Capabilities{.writable = writable,
                           .trim = true,
                           .fast_zero = true,
                           .cheap_block_status = true,
                           .multi_conn_safe = true,
                           .buffered_writes = true}),
        nodes_(std::move(nodes)),
        zero_granularity_(nodes_.front().image->subcluster_size()),
        zero_clusters_(nodes_.front().image->has_zero_clusters()) {}

 protected:
  std::error_code do_read(uint64_t offset, std::span<std::byte> buf) override {
    return read_at(0, offset, buf);
  }

  std::error_code do_read_nowait(uint64_t offset,
                                 std::span<std::byte> buf) override {
    return read_at_nowait(0, offset, buf);
  }

  std::error_code do_write(uint64_t offset, std::span<const std::byte> data,
                           bool fua) override {
    return top().write(offset, data, below_of(0), fua);
  }

  std::error_code do_write_zeroes(uint64_t offset, uint64_t length,
                                  ZeroFlags f) override {
    // Fast only when whole (sub)clusters become zero clusters: v3 metadata,
    // no data written.
    if (f.fast_only && (!zero_clusters_ || offset % zero_granularity_ != 0 ||
                        length % zero_granularity_ != 0))
      return std::make_error_code(std::errc::operation_not_supported);
    return top().write_zeroes(offset, length, f.may_trim, below_of(0), f.fua);
  }

  std::error_code do_trim(uint64_t offset, uint64_t length, bool fua) override {
    // Over a backing image, a freed cluster must not show the older data
    // below it again: it becomes a zero cluster instead.
    auto mode = nodes_.size() > 1 ? qcow2::DiscardMode::Zero
                                  : qcow2::DiscardMode::Unallocate;
    std::error_code ec = top().discard(offset, length, mode, below_of(0));
    if (!ec && fua) ec = top().flush();
    return ec;
  }

  std::error_code do_flush() override { return top().flush(); }

  std::error_code do_block_status(uint64_t offset, uint64_t length,
                                  std::span<Extent> out,
                                  size_t* count) override {
    size_t n = 0;
    while (length > 0 && n < out.size()) {
      Extent e;
      if (auto ec = status_at(0, offset, length, &e)) {
        if (n > 0) break;  // report what we have; the client asks again
        return ec;
      }
      if (n > 0 && out[n - 1].hole == e.hole && out[n - 1].zero == e.zero &&
          out[n - 1].depth == e.depth) {
        out[n - 1].length += e.length;
      } else {
        out[n++] = e;
      }
      offset += e.length;
      length -= e.length;
    }
    *count = n;
    return {};
  }

 private:
  qcow2::Image& top() { return *nodes_.front().image; }


  // read_at and read_at_nowait share this walk; `nowait` picks the
  // non-blocking calls.
  template <bool nowait>
  std::error_code read_walk(size_t depth, uint64_t offset,
                            std::span<std::byte> buf) {
    if (depth >= nodes_.size() || offset >= nodes_[depth].size) {
      std::memset(buf.data(), 0, buf.size());
      return {};
    }
    const Node& node = nodes_[depth];
    if (buf.size() > node.size - offset) {  // a shorter backing image
      size_t inside = static_cast<size_t>(node.size - offset);
      std::memset(buf.data() + inside, 0, buf.size() - inside);
      buf = buf.first(inside);
    }
    if constexpr (nowait) {
      if (node.raw) return node.raw->pread_nowait(buf, offset);
      return node.image->read_nowait(offset, buf, BelowNowait{this, depth});
    } else {
      if (node.raw) return node.raw->pread(buf, offset);
      return node.image->read(offset, buf, below_of(depth));
    }
  }
  std::error_code read_at(size_t depth, uint64_t offset, std::span<std::byte> buf) {
    return read_walk<false>(depth, offset, buf);
  }
  std::error_code read_at_nowait(size_t depth, uint64_t offset,
                                 std::span<std::byte> buf) {
    return read_walk<true>(depth, offset, buf);
  }

  std::error_code status_at(size_t depth, uint64_t offset, uint64_t length,
                            Extent* e) {
    for (;; ++depth) {
      if (depth >= nodes_.size() || offset >= nodes_[depth].size) {
        *e = Extent{.length = length, .hole = true, .zero = true, .depth = 0};
        return {};
      }
      const Node& node = nodes_[depth];
      length = std::min(length, node.size - offset);
      const uint32_t here = static_cast<uint32_t>(depth + 1);
      if (node.raw) {
        bool is_data = true;
        uint64_t len = node.raw->extent_at(offset, length, &is_data);
        if (len == 0 || len > length) len = length;
        *e = Extent{.length = len, .hole = !is_data, .zero = !is_data, .depth = here};
        return {};
      }
      qcow2::MapExtent m;
      if (auto ec = node.image->block_status(offset, length, &m)) return ec;
      if (m.length == 0 || m.length > length)
        return std::make_error_code(std::errc::io_error);
      length = m.length;
      if (m.kind == qcow2::ExtentKind::Data) {
        *e = Extent{.length = length, .hole = false, .zero = false, .depth = here};
        return {};
      }
      if (m.kind == qcow2::ExtentKind::Zero) {
        *e = Extent{.length = length, .hole = true, .zero = true, .depth = here};
        return {};
      }
      // Unallocated here: the same (possibly shortened) range, one down.
    }
  }

  std::vector<Node> nodes_;
  uint64_t zero_granularity_;
  bool zero_clusters_;
};

// Deep chains hold one descriptor per image: lift the soft limit as far as
// the hard limit allows, once.
void raise_open_file_limit() {
  static const bool done = [] {
    rlimit rl{};
    if (::getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
      rl.rlim_cur = rl.rlim_max;
      ::setrlimit(RLIMIT_NOFILE, &rl);
    }
    return true;
  }();
  (void)done;
}

// A name an image records (backing or data file), relative to the image's
// own directory unless absolute.
std::string resolve_relative(const std::string& image_path,
                            const std::string& backing) {
  if (!backing.empty() && backing[0] == '/') return backing;
  fs::path dir = fs::path(image_path).parent_path();
  return (dir / backing).string();
}

}  // namespace

bool parse_image_format(const std::string& name, ImageFormat* out) {
  if (name == "raw") *out = ImageFormat::Raw;
  else if (name == "qcow2") *out = ImageFormat::Qcow2;
  else return false;
  return true;
}

bool open_chain(const std::string& path, ImageFormat format,
                const ChainOptions& options, OpenedChain* out,
                std::string* error) {
  raise_open_file_limit();
  if (options.force_share && !options.read_only) {
    *error = "force-share (-U) can only be used with read-only images (-r)";
    return false;
  }
  std::vector<Node> nodes;
  std::vector<ChainMember> members;
  std::set<std::string> seen;
  std::string current = path;
  ImageFormat current_format = format;
  std::string named_by;  // the image whose header named `current`

  for (;;) {
    if (nodes.size() >= options.max_depth) {
      *error = fmt::format("backing chain of '{}' is deeper than {} images",
                           path, options.max_depth);
      return false;
    }
    std::error_code ec;
    std::string canonical = fs::weakly_canonical(current, ec).string();
    if (ec) canonical = current;
    if (!seen.insert(canonical).second) {
      *error = fmt::format("backing chain loop: '{}' names '{}', which is "
                           "already in the chain", named_by, current);
      return false;
    }
    const bool top = nodes.empty();
    FileOptions fo;
    fo.mode = top && !options.read_only ? OpenMode::ReadWrite : OpenMode::ReadOnly;
    fo.direct = options.direct;
    std::shared_ptr<File> file = open_posix_file(current, fo, ec);
    if (!file) {
      std::string hint;
      if (fo.direct && ec == std::errc::invalid_argument)
        hint = " (the filesystem does not support O_DIRECT; use --cache=writeback)";
      *error = named_by.empty()
                   ? fmt::format("cannot open '{}': {}{}", current, ec.message(), hint)
                   : fmt::format("cannot open backing file '{}' of '{}': {}",
                                 current, named_by, ec.message());
      return false;
    }
    const Access access =
        fo.mode == OpenMode::ReadWrite ? Access::Write : Access::Read;
    const LockedFile kind = current_format == ImageFormat::Qcow2 ? LockedFile::Qcow2Image
                            : top ? LockedFile::RawExport
                                  : LockedFile::RawImage;
    if (!lock_image_file(*file, current,
                         qemu_locks(kind, access, options.force_share), error))
      return false;

    Node node;
    if (options.direct && (current_format != ImageFormat::Raw || !top)) {
      *error = "--cache=none and directsync are only supported for raw images";
      return false;
    }
    if (options.direct && file->size() % kDirectAlignment != 0) {
      *error = fmt::format("'{}' is not a multiple of {} bytes long, which "
                           "O_DIRECT needs; use --cache=writeback",
                           current, kDirectAlignment);
      return false;
    }
    if (current_format == ImageFormat::Raw) {
      node.raw = file;
      node.size = file->size();
      nodes.push_back(node);
      members.push_back({current, ImageFormat::Raw, node.size});
      break;  // raw images have no backing
    }

    qcow2::OpenOptions qo;
    qo.read_only = fo.mode == OpenMode::ReadOnly;
    qo.l2_cache_bytes = options.l2_cache_bytes;
    qcow2::HeaderInfo header;
    qcow2::Status st = qcow2::Image::probe(file, &header);
    if (!st.ok()) {
      *error = fmt::format("'{}': {}", current, st.message());
      return false;
    }
    if (header.has_data_file) {
      if (!options.allow_data_files) {
        *error = fmt::format("'{}' keeps its data in the external file '{}'; "
                             "pass --allow-data-file to let layerd open it",
                             current, header.data_file);
        return false;
      }
      if (header.data_file.empty()) {
        *error = fmt::format("'{}' needs an external data file but does not "
                             "name one", current);
        return false;
      }
      std::string data_path = resolve_relative(current, header.data_file);
      qo.data_file = open_posix_file(data_path, fo, ec);
      if (!qo.data_file) {
        *error = fmt::format("cannot open data file '{}' of '{}': {}",
                             data_path, current, ec.message());
        return false;
      }
      if (!lock_image_file(*qo.data_file, data_path,
                           qemu_locks(LockedFile::DataFile, access,
                                      options.force_share),
                           error))
        return false;
    }
    std::unique_ptr<qcow2::Image> image;
    st = qcow2::Image::open(file, qo, &image);
    if (!st.ok()) {
      *error = fmt::format("'{}': {}", current, st.message());
      return false;
    }
    if (top && !options.read_only && image->read_only()) {
      *error = fmt::format("'{}' is marked corrupt and can only be served "
                           "read-only (-r); repair it with qemu-img check -r all",
                           current);
      return false;
    }
    node.size = image->size();
    std::string backing = image->backing_file();
    std::string backing_format = image->backing_format();
    node.image = std::move(image);
    nodes.push_back(std::move(node));
    members.push_back({current, ImageFormat::Qcow2, nodes.back().size});

    if (backing.empty()) break;
    if (backing.rfind("json:", 0) == 0) {
      *error = fmt::format("'{}' names a json: backing file, which layerd "
                           "does not open", current);
      return false;
    }
    if (backing_format.empty()) {
      *error = fmt::format(
          "'{}' does not record the format of its backing file '{}', and "
          "layerd never guesses formats; record it with: qemu-img rebase -u "
          "-b '{}' -F <raw|qcow2> '{}'",
          current, backing, backing, current);
      return false;
    }
    if (!parse_image_format(backing_format, &current_format)) {
      *error = fmt::format("'{}': backing file '{}' has format '{}', which "
                           "layerd does not support", current, backing,
                           backing_format);
      return false;
    }
    named_by = current;
    current = resolve_relative(current, backing);
  }

  if (nodes.size() == 1 && nodes.front().raw) {
    out->layer = make_raw_layer(
        nodes.front().raw,
        RawLayerOptions{.read_only = options.read_only,
                        .direct_alignment = options.direct ? kDirectAlignment : 0});
  } else {
    out->layer = std::make_shared<ChainLayer>(std::move(nodes), !options.read_only);
  }
  out->members = std::move(members);
  return true;
}

}  // namespace layerd
