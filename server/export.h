// Exports: a named Layer with the policy it is served under, and the
// registry the handshake looks exports up in.
//
// An export with per-client overlays serves each client (each "session")
// its own throwaway overlay over a shared read-only base. A client names
// its session by asking for "NAME@SESSION": connections with the same
// session share one overlay (so they see each other's writes, and
// multi-conn holds); plain "NAME" gives every connection an overlay of its
// own. A session's overlay lives while one of its connections is open.
//
// Thread safety: ExportRegistry and Export::open_session may be used from
// any thread.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "nbd/handshake.h"
#include "overlay/image_registry.h"
#include "overlay/layer.h"
#include "overlay/temp_overlay.h"
#include "server/options.h"

namespace layerd {

struct ExportPolicy {
  bool read_only = false;
  bool discard_unmap = false;      // TRIM and zero writes may deallocate
  DetectZeroes detect_zeroes = DetectZeroes::Off;
  bool flush_every_write = false;  // writethrough / directsync
  bool ignore_flush = false;       // cache=unsafe
  bool multi_conn = false;         // more than one client may connect
  bool allocation_depth = false;   // offer qemu:allocation-depth (-A)
  uint32_t max_request_size = 32u << 20;
  // Announced to clients that ask for block sizes (and then enforced).
  uint32_t min_block_size = 1;
};

// A persistent dirty bitmap offered as the meta context
// "qemu:dirty-bitmap:NAME" (-B): NAME in the first image of the export's
// chain that has it, as qemu-nbd searches. Block status answers from
// Image::dirty_status (no I/O, no allocation); bytes past that image's
// size (a backing image smaller than the top) read as clean, as in qemu.
struct ExportedBitmap {
  std::string context;  // "qemu:dirty-bitmap:NAME"
  std::string name;
  std::shared_ptr<const qcow2::Image> image;
  uint64_t size = 0;  // the image's virtual size
};

inline constexpr std::string_view kDirtyBitmapContextPrefix = "qemu:dirty-bitmap:";

// What one client (or one named session of clients) is served.
struct Session {
  std::unique_ptr<TempOverlay> overlay;  // per-client overlays only
  std::shared_ptr<Layer> layer;          // destroyed before the overlay
  ~Session();
};

struct Export {
  ExportSpec spec;  // what it was opened from
  std::string name;
  std::string description;
  // -s: the throwaway overlay and its layer (declared before `layer`, so
  // that it goes last and can keep the overlay).
  std::shared_ptr<Session> temp;
  // What clients are served; with per-client overlays, the shared base
  // (which only the sessions' overlays read).
  std::shared_ptr<Layer> layer;
  ExportPolicy policy;
  std::vector<ExportedBitmap> bitmaps;  // -B, in the order given
  // Where the names its images record, and file names a QMP client sends
  // for it (a live snapshot), may lead.
  std::shared_ptr<const ImageDirs> image_dirs;

  // Per-client overlays: set for such an export.
  struct PerClient {
    std::vector<std::shared_ptr<BlockNode>> base;  // [0] under the overlays
    TempOverlayOptions overlay;
    bool copy_on_read = false;
    // -o (and --image-opts' size): each session's window into its overlay.
    struct Window {
      uint64_t offset = 0;
      std::optional<uint64_t> length;
    } window;
    std::mutex mutex;
    std::map<std::string, std::weak_ptr<Session>> sessions;
  };
  std::unique_ptr<PerClient> per_client;

  // What the handshake advertises; `session` is the session a client
  // named ("" for none).
  nbd::ExportInfo info(const std::string& session = {}) const;

  // The session `id` of a per-client export ("": a new one of its own),
  // creating its overlay if needed. Blocks on file I/O: call off the event
  // loop. nullptr with `error` set on failure.
  std::shared_ptr<Session> open_session(const std::string& id,
                                        std::string* error) const;
};

class ExportRegistry {
 public:
  // Adds `e`, or replaces the export of its name: clients connected to
  // the old one keep it (and what they were told about it).
  void add(std::shared_ptr<const Export> e);
  // Removes `names`, then adds `exports`, in one step (no client sees a
  // state in between).
  void replace(const std::vector<std::string>& names,
               const std::vector<std::shared_ptr<const Export>>& exports);
  std::shared_ptr<const Export> find(std::string_view name) const;
  // The export a client's name asks for: an export of that name, else
  // "NAME@SESSION" for a per-client export NAME (session set).
  std::shared_ptr<const Export> resolve(std::string_view name,
                                        std::string* session) const;
  std::vector<std::shared_ptr<const Export>> all() const;

 private:
  mutable std::mutex mutex_;
  std::map<std::string, std::shared_ptr<const Export>, std::less<>> exports_;
};

}  // namespace layerd
