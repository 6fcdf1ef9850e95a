// Walks a backing chain down from its top image, opening each image
// through the registry, and checks the names and formats it records.
#include "overlay/chain.h"

#include <sys/resource.h>

#include <filesystem>
#include <set>

#include <fmt/format.h>

#include "overlay/image_dirs.h"
#include "overlay/image_locks.h"
#include "overlay/raw_layer.h"

namespace layerd {
namespace {

namespace fs = std::filesystem;

constexpr uint32_t kDirectAlignment = 4096;

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

// A backing name, relative to the naming image's directory unless absolute.
std::string resolve_relative(const std::string& image_path,
                             const std::string& backing) {
  if (!backing.empty() && backing[0] == '/') return backing;
  return (fs::path(image_path).parent_path() / backing).string();
}

// The format of the image `current` names as its backing file, or false
// with `error` set.
bool backing_format_of(const BlockNode& current, ImageFormat* format,
                       std::string* error) {
  const std::string& backing = current.image->backing_file();
  const std::string& name = current.image->backing_format();
  if (backing.rfind("json:", 0) == 0) {
    *error = fmt::format("'{}' names a json: backing file, which layerd "
                         "does not open", current.path);
    return false;
  }
  if (auto why = refuse_protocol_name(
          fmt::format("backing file '{}' of '{}'", backing, current.path), backing);
      !why.empty()) {
    *error = why;
    return false;
  }
  if (name.empty()) {
    *error = fmt::format(
        "'{}' does not record the format of its backing file '{}', and "
        "layerd never guesses formats; record it with: qemu-img rebase -u "
        "-b '{}' -F <raw|qcow2> '{}'",
        current.path, backing, backing, current.path);
    return false;
  }
  if (!parse_image_format(name, format)) {
    *error = fmt::format("'{}': backing file '{}' has format '{}', which "
                         "layerd does not support", current.path, backing, name);
    return false;
  }
  return true;
}

}  // namespace

ImageRegistry& process_registry() {
  static ImageRegistry registry;
  return registry;
}

bool open_chain_nodes(const std::string& path, ImageFormat format,
                      const ChainOptions& options,
                      std::vector<std::shared_ptr<BlockNode>>* nodes,
                      std::string* error) {
  raise_open_file_limit();
  if (options.force_share && !options.read_only && options.snapshot.empty()) {
    *error = "force-share (-U) can only be used with read-only images (-r)";
    return false;
  }
  ImageRegistry& registry = options.registry ? *options.registry : process_registry();
  nodes->clear();
  std::set<std::string> seen;
  std::string current = path;
  ImageFormat current_format = format;
  std::string named_by;  // the image whose header named `current`
  for (;;) {
    if (nodes->size() >= options.max_depth) {
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
    const bool top = nodes->empty();
    NodeOptions no;
    no.writable = top && !options.read_only && options.snapshot.empty();
    no.backing = !top || (options.under_overlay && options.snapshot.empty());
    no.named_by = !top ? named_by : no.backing ? "a throwaway overlay" : "";
    no.direct = options.direct;
    no.l2_cache_bytes = options.l2_cache_bytes;
    no.allow_data_files = options.allow_data_files;
    no.image_dirs = options.image_dirs;
    no.trusted_name = top && options.trusted_top;
    no.force_share = options.force_share;
    no.lock_access = options.lock_access;
    no.conflict = options.conflict;
    no.conflict_path = options.conflict_path;
    auto node = registry.open(current, current_format, no, error);
    if (!node) return false;
    if (top && !options.snapshot.empty()) {
      auto view = registry.open_snapshot(node, options.snapshot, error);
      if (!view) return false;
      nodes->push_back(view);
    } else {
      nodes->push_back(node);
    }
    if (!node->image || node->image->backing_file().empty() || options.no_backing)
      return true;
    if (!backing_format_of(*node, &current_format, error)) return false;
    named_by = current;
    current = resolve_relative(current, node->image->backing_file());
  }
}

std::shared_ptr<Layer> serve_nodes(std::vector<std::shared_ptr<BlockNode>> nodes,
                                   bool writable, bool copy_on_read,
                                   uint32_t direct_alignment,
                                   bool format_probed) {
  if (nodes.size() == 1 && nodes.front()->raw)
    return make_raw_layer(nodes.front()->raw,
                          RawLayerOptions{.read_only = !writable,
                                          .direct_alignment = direct_alignment,
                                          .size = nodes.front()->size,
                                          .refuse_format_headers = format_probed});
  return std::make_shared<GraphLayer>(Graph::make(std::move(nodes), copy_on_read),
                                      writable);
}

bool open_chain(const std::string& path, ImageFormat format,
                const ChainOptions& options, OpenedChain* out,
                std::string* error) {
  if (!open_chain_nodes(path, format, options, &out->nodes, error)) return false;
  const bool writable = !options.read_only && options.snapshot.empty();
  out->layer = serve_nodes(out->nodes, writable, /*copy_on_read=*/false,
                           options.direct ? kDirectAlignment : 0);
  return true;
}

}  // namespace layerd
