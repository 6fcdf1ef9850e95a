// layerd: serve a disk image over NBD.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>

#include <fmt/format.h>

#include "overlay/chain.h"
#include "overlay/compress_layer.h"
#include "overlay/offset_layer.h"
#include "qcow2/file.h"
#include "server/control.h"
#include "server/export.h"
#include "server/list_client.h"
#include "server/listeners.h"
#include "server/log.h"
#include "server/options.h"
#include "server/qmp.h"
#include "server/server.h"
#include "server/tls.h"

namespace layerd {
namespace {

int fail(const std::string& message) {
  fmt::print(stderr, "layerd: {}\n", message);
  return 1;
}

// Without -f, only the image the user named is examined (as qemu-nbd does);
// formats of backing images are never guessed.
// A name from a QMP client is looked at only inside `confine`.
bool detect_format(const std::string& path, const ImageDirs* confine,
                   ImageFormat* format, std::string& error) {
  std::error_code ec;
  auto file = confine ? confine->open(path, FileOptions{}, ec)
                      : open_posix_file(path, FileOptions{}, ec);
  if (!file) {
    std::string why;
    if (confine) why = confine->explain(ec, fmt::format("image '{}'", path), path);
    error = why.empty() ? fmt::format("cannot open '{}': {}", path, ec.message()) : why;
    return false;
  }
  std::byte magic[4] = {};
  if (file->pread(magic, 0)) {
    error = fmt::format("cannot read '{}'", path);
    return false;
  }
  *format = std::memcmp(magic, "QFI\xfb", 4) == 0 ? ImageFormat::Qcow2
                                                  : ImageFormat::Raw;
  if (*format == ImageFormat::Raw) {
    // qemu-nbd's words, which say what layerd then does too (see
    // RawLayerOptions::refuse_format_headers).
    fmt::print(stderr,
               "WARNING: Image format was not specified for '{}' and probing "
               "guessed raw.\n"
               "         Automatically detecting the format is dangerous for "
               "raw images, write operations on block 0 will be restricted.\n"
               "         Specify the 'raw' format explicitly to remove the "
               "restrictions.\n",
               path);
  }
  return true;
}

ExportPolicy policy_of(const ServerOptions& o, const ExportSpec& spec) {
  ExportPolicy p;
  p.read_only = spec.read_only ||
                (!spec.snapshot.empty() && spec.overlay == OverlayMode::None);
  p.discard_unmap = o.discard_unmap;
  p.detect_zeroes = o.detect_zeroes;
  p.flush_every_write =
      o.cache == CacheMode::Writethrough || o.cache == CacheMode::DirectSync;
  p.ignore_flush = o.cache == CacheMode::Unsafe;
  p.multi_conn = o.max_connections != 1;
  p.max_request_size = o.max_request_size;
  p.allocation_depth = spec.allocation_depth;
  return p;
}

// -B: each bitmap from the first image of `nodes` that has it, checked as
// qemu-nbd checks it (nbd_export_create), with its messages.
bool find_bitmaps(const ExportSpec& spec, bool read_only,
                  const std::vector<std::shared_ptr<BlockNode>>& nodes,
                  std::vector<ExportedBitmap>* out, std::string& error) {
  for (const std::string& name : spec.bitmaps) {
    const BlockNode* holder = nullptr;
    std::shared_ptr<const qcow2::Image> image;
    std::optional<qcow2::BitmapInfo> info;
    // With -o, qemu-nbd looks only at the offset node above the image (it
    // has no bitmaps), and so does layerd; so with --image-opts' size=.
    const bool window = spec.offset != 0 || spec.length;
    for (size_t i = 0; !window && i < nodes.size() && !info; ++i) {
      const BlockNode& n = *nodes[i];
      // A snapshot view (-l) keeps the bitmaps of its active image, as
      // qemu's temporarily loaded snapshot does.
      image = n.snapshot_of ? n.snapshot_of->image : n.image;
      if (!image) continue;
      for (auto& b : image->bitmaps())
        if (b.name == name) {
          info = b;
          holder = &n;
          break;
        }
    }
    if (!info) {
      error = fmt::format("Bitmap '{}' is not found", name);
      if (window)
        error += " (with -o, bitmaps are looked for above the offset, where "
                 "there are none, as in qemu-nbd)";
      return false;
    }
    if (info->inconsistent) {
      error = fmt::format("Bitmap '{}' is inconsistent and cannot be used", name);
      return false;
    }
    if (read_only && holder->writable && info->enabled) {
      error = fmt::format("Enabled bitmap '{}' incompatible with readonly export",
                          name);
      return false;
    }
    std::string context = fmt::format("{}{}", kDirtyBitmapContextPrefix, name);
    if (std::any_of(out->begin(), out->end(),
                    [&](const ExportedBitmap& b) { return b.context == context; }))
      continue;  // given twice: one context
    out->push_back({std::move(context), name, image, image->size()});
  }
  return true;
}

// The allowed image directories (overlay/image_dirs.h): those of
// --image-dir, to which each export given on the command line or in
// --config adds its image's directory; an image named over QMP
// (block-export-add) must lie in `for_qmp`, the directories of --image-dir
// and of the images given at start.
struct ImagePolicy {
  ImageDirs user;
  ImageDirs for_qmp;
};

bool make_image_policy(const ServerOptions& o, ImagePolicy* policy, std::string& error) {
  for (const auto& dir : o.image_dirs)
    if (!policy->user.add(dir, &error)) return false;
  policy->for_qmp = policy->user;
  for (const auto& spec : o.exports) {
    std::string ignored;  // a missing image fails when its export opens
    if (!policy->for_qmp.everywhere())
      (void)policy->for_qmp.add(std::filesystem::path(spec.file).parent_path().string(),
                                &ignored);
  }
  return true;
}

// The directories the chain of `spec` may use.
std::shared_ptr<ImageDirs> image_dirs_of(const ImagePolicy& policy, const ExportSpec& spec,
                                         bool named_over_qmp, std::string& error) {
  auto dirs = std::make_shared<ImageDirs>(named_over_qmp ? policy.for_qmp : policy.user);
  if (!named_over_qmp && !dirs->everywhere() &&
      !dirs->add(std::filesystem::path(spec.file).parent_path().string(), &error)) {
    error = fmt::format("cannot open '{}': {}", spec.file, error);
    return nullptr;
  }
  return dirs;
}

// Opens the chain of `spec` and builds its export: served as it is, with
// one throwaway overlay (-s), or with an overlay per client.
std::shared_ptr<Export> open_export(const ServerOptions& o, const ImagePolicy& policy,
                                    ExportSpec spec, std::string& error,
                                    bool named_over_qmp = false) {
  if (named_over_qmp) {
    if (auto why = refuse_protocol_name(fmt::format("image '{}'", spec.file), spec.file);
        !why.empty()) {
      error = why;
      return nullptr;
    }
  }
  std::shared_ptr<ImageDirs> dirs = image_dirs_of(policy, spec, named_over_qmp, error);
  if (!dirs) return nullptr;
  // As qemu-nbd: -s with -r serves read-only; nothing can be written, so
  // no overlay is needed.
  const ExportSpec asked = spec;
  if (spec.read_only && spec.overlay == OverlayMode::Temp) spec.overlay = OverlayMode::None;
  ImageFormat format;
  if (spec.format.empty()) {
    if (!detect_format(spec.file, named_over_qmp ? dirs.get() : nullptr, &format, error))
      return nullptr;
  } else if (!parse_image_format(spec.format, &format)) {
    error = fmt::format("unknown format '{}'", spec.format);
    return nullptr;
  }
  const bool direct = o.cache == CacheMode::None || o.cache == CacheMode::DirectSync;
  if (direct && spec.overlay != OverlayMode::None) {
    error = "--cache=none and directsync cannot be combined with throwaway "
            "overlays (-s, --overlay)";
    return nullptr;
  }
  ChainOptions co;
  co.read_only = spec.read_only || spec.overlay != OverlayMode::None;
  co.force_share = o.force_share;
  co.direct = direct;
  co.allow_data_files = o.allow_data_file;
  co.image_dirs = dirs.get();
  co.trusted_top = !named_over_qmp;
  co.l2_cache_bytes = o.l2_cache_bytes;
  co.snapshot = spec.snapshot;
  co.under_overlay = spec.overlay != OverlayMode::None;
  co.no_backing = spec.no_backing;
  std::vector<std::shared_ptr<BlockNode>> nodes;
  if (!open_chain_nodes(spec.file, format, co, &nodes, &error)) return nullptr;
  const std::shared_ptr<qcow2::Image> top = nodes.front()->image;
  if (spec.compress && !top) {
    // qemu's words for a raw image under driver=compress.
    error = "Compression is not supported for underlying format: raw";
    return nullptr;
  }
  for (size_t i = 1; i < nodes.size(); ++i)
    log_info("export '{}': backing image {}: {}", spec.name, i, nodes[i]->path);

  auto e = std::make_shared<Export>();
  e->spec = asked;
  e->name = spec.name;
  e->description = spec.description;
  e->policy = policy_of(o, spec);
  e->image_dirs = dirs;
  if (!find_bitmaps(spec, e->policy.read_only, nodes, &e->bitmaps, error))
    return nullptr;
  TempOverlayOptions overlay{
      .dir = o.temp_dir.empty() ? default_temp_dir() : o.temp_dir,
      .keep_dir = o.keep_overlay_dir,
      .keep_name = spec.name.empty()
                       ? std::filesystem::path(spec.file).stem().string()
                       : spec.name};
  if (spec.overlay != OverlayMode::None && !overlay.keep_dir.empty()) {
    if (auto why = TempOverlay::check_keep(overlay); !why.empty()) {
      error = why;
      return nullptr;
    }
  }
  // A guessed raw format: writes to block 0 are checked (serve_nodes), and
  // clients are asked for whole sectors, as qemu-nbd does.
  const bool probed_raw = spec.format.empty() && format == ImageFormat::Raw;
  switch (spec.overlay) {
    case OverlayMode::None:
      e->layer = serve_nodes(std::move(nodes), !e->policy.read_only,
                             spec.copy_on_read, direct ? 4096 : 0, probed_raw);
      if (probed_raw) e->policy.min_block_size = 512;
      if (spec.compress && !e->policy.read_only)
        e->layer = make_compress_layer(std::move(e->layer), top);
      break;
    case OverlayMode::Temp: {
      auto session = std::make_shared<Session>();
      session->overlay = TempOverlay::create(nodes, overlay, &error);
      if (!session->overlay) return nullptr;
      nodes.insert(nodes.begin(), session->overlay->node());
      session->layer = serve_nodes(std::move(nodes), true, spec.copy_on_read, 0);
      e->layer = session->layer;
      e->temp = std::move(session);
      break;
    }
    case OverlayMode::PerClient: {
      // Fail now, not at the first client, if overlays cannot be made.
      std::unique_ptr<TempOverlay> probe = TempOverlay::create(nodes, overlay, &error);
      if (!probe) return nullptr;
      e->per_client = std::make_unique<Export::PerClient>();
      e->per_client->base = nodes;
      e->per_client->overlay = overlay;
      e->per_client->copy_on_read = spec.copy_on_read;
      e->layer = serve_nodes(std::move(nodes), false, false, 0);
      break;
    }
  }
  if (spec.offset != 0 || spec.length) {
    // qemu-nbd's raw driver with an offset (and --image-opts' size), over
    // the image's format and over the throwaway overlays, as qemu-nbd
    // stacks it; qemu's messages when it does not fit.
    const uint64_t size = e->layer->size();
    if (spec.offset > size) {
      error = fmt::format("Offset ({}) cannot be greater than size of the "
                          "containing file ({})", spec.offset, size);
      return nullptr;
    }
    if (spec.length && *spec.length > size - spec.offset) {
      error = fmt::format("The sum of offset ({}) and size ({}) has to be smaller "
                          "or equal to the actual size of the containing file ({})",
                          spec.offset, *spec.length, size);
      return nullptr;
    }
    // Per-client overlays: each session's layer gets the window too (see
    // Export::open_session); the base's window tells the handshake its size.
    if (e->per_client) e->per_client->window = {spec.offset, spec.length};
    e->layer = make_offset_layer(e->layer, spec.offset, spec.length);
  }
  if (spec.compress && !e->policy.read_only) {
    // As qemu's compress filter: clients that ask for block sizes are asked
    // for whole clusters (where the window allows it); others get merged.
    uint32_t align = top->cluster_size();
    while (align > 1 && (e->layer->size() % align || spec.offset % align)) align /= 2;
    e->policy.min_block_size = std::max(e->policy.min_block_size, align);
  }
  return e;
}

// Opens every export; writable ones first, so that a read-only export of
// the same file shares the writable image (see ImageRegistry).
bool open_exports(const ServerOptions& o, const ImagePolicy& policy,
                  const std::vector<ExportSpec>& specs, ExportRegistry& exports,
                  std::string& error) {
  std::vector<const ExportSpec*> order;
  for (const auto& spec : specs) order.push_back(&spec);
  std::stable_partition(order.begin(), order.end(), [&](const ExportSpec* s) {
    return !policy_of(o, *s).read_only && s->overlay == OverlayMode::None;
  });
  for (const ExportSpec* spec : order) {
    auto e = open_export(o, policy, *spec, error);
    if (!e) {
      if (specs.size() > 1) error = fmt::format("export '{}': {}", spec->name, error);
      return false;
    }
    exports.add(std::move(e));
  }
  return true;
}

// SIGHUP: reads --config again. Exports whose settings did not change
// stay as they are (their overlays and sessions too); new and changed ones
// are opened, and only when all of them open are they installed, in one
// step: connected clients keep the export they negotiated. Names no longer
// in the file go; exports from --export are never touched.
void reload_config(const ServerOptions& o, const ImagePolicy& policy,
                   ExportRegistry& exports, Control* control) {
  static std::mutex one_at_a_time;
  std::lock_guard lock(one_at_a_time);
  std::unique_lock<std::mutex> no_commands;
  if (control) no_commands = control->hold_commands();
  auto keep_as_is = [&](const std::string& why) {
    log_error("reloading {}: {}; keeping the exports as they were", o.config_file, why);
  };
  std::vector<ExportSpec> specs;
  if (auto m = read_export_config(o.config_file, &specs); !m.empty()) return keep_as_is(m);
  std::set<std::string> names;
  std::vector<std::string> gone;
  for (const auto& e : exports.all())
    if (e->spec.from_config) gone.push_back(e->name);
  std::vector<ExportSpec> changed;
  std::vector<std::shared_ptr<const Export>> kept;
  for (const auto& spec : specs) {
    if (!names.insert(spec.name).second)
      return keep_as_is(fmt::format("two exports are named '{}'", spec.name));
    auto old = exports.find(spec.name);
    if (old && !old->spec.from_config)
      return keep_as_is(fmt::format("export '{}' is given by --export", spec.name));
    if (old && old->spec == spec)
      kept.push_back(old);
    else
      changed.push_back(spec);
    if (old && !(old->spec == spec) && control)
      if (auto why = control->job_on(spec.name); !why.empty()) return keep_as_is(why);
  }
  if (control)
    for (const auto& name : gone)
      if (!names.count(name))
        if (auto why = control->job_on(name); !why.empty()) return keep_as_is(why);
  ExportRegistry fresh;
  std::string error;
  if (!open_exports(o, policy, changed, fresh, error)) return keep_as_is(error);
  if (control)
    for (const auto& e : fresh.all())
      if (auto why = control->refuse_new_export(*e); !why.empty()) return keep_as_is(why);
  auto added = fresh.all();
  added.insert(added.end(), kept.begin(), kept.end());
  exports.replace(gone, added);
  log_info("reloaded {}: {} exports, {} opened anew", o.config_file, specs.size(),
           changed.size());
}

// --qmp-listen: moves the activated sockets it names from `*activated`
// to `*qmp`. false with `*error` when one is not there.
bool take_qmp_listeners(const ServerOptions& o, std::vector<ListeningSocket>* activated,
                        std::vector<ListeningSocket>* qmp, std::string* error) {
  if (o.qmp_activated.empty()) return true;
  if (activated->empty()) {
    *error = "--qmp-listen names a socket passed by socket activation, but none was "
             "passed (LISTEN_FDS); use --qmp PATH otherwise";
    return false;
  }
  std::vector<std::string> passed;
  for (const auto& l : *activated) passed.push_back(l.activation_name.empty() ? "(unnamed)" : l.activation_name);
  for (const std::string& name : o.qmp_activated) {
    auto is_named = [&](const ListeningSocket& l) { return l.activation_name == name; };
    auto moved = std::stable_partition(activated->begin(), activated->end(),
                                       [&](const ListeningSocket& l) { return !is_named(l); });
    if (moved == activated->end()) {
      *error = fmt::format("--qmp-listen {}: no socket of that name was passed (LISTEN_FDNAMES: {})",
                           name, fmt::join(passed, ", "));
      return false;
    }
    qmp->insert(qmp->end(), moved, activated->end());
    activated->erase(moved, activated->end());
  }
  return true;
}

bool write_pid_file(const std::string& path, std::string& error) {
  std::ofstream f(path, std::ios::trunc);
  f << ::getpid() << "\n";
  f.close();
  if (!f) {
    error = fmt::format("cannot write pid file '{}'", path);
    return false;
  }
  return true;
}

// Forks; the parent waits until the child reports it is ready (pid file
// written), then exits with the child's verdict. Returns, in the child, the
// pipe on which to report readiness.
int daemonize() {
  int pipefd[2];
  if (::pipe2(pipefd, O_CLOEXEC) != 0) std::exit(fail("pipe failed"));
  pid_t pid = ::fork();
  if (pid < 0) std::exit(fail("fork failed"));
  if (pid > 0) {
    ::close(pipefd[1]);
    char status = 1;
    ssize_t n = ::read(pipefd[0], &status, 1);
    std::_Exit(n == 1 ? status : 1);
  }
  ::close(pipefd[0]);
  ::setsid();
  return pipefd[1];
}

// Tells the waiting parent how start-up went and detaches from its
// terminal (stderr stays open with -v).
void report_ready_to_parent(int ready_fd, char status, bool keep_stderr) {
  ssize_t ignored = ::write(ready_fd, &status, 1);
  (void)ignored;
  ::close(ready_fd);
  int null = ::open("/dev/null", O_RDWR);
  if (null >= 0) {
    ::dup2(null, STDIN_FILENO);
    ::dup2(null, STDOUT_FILENO);
    if (!keep_stderr) ::dup2(null, STDERR_FILENO);
    ::close(null);
  }
}

int run(int argc, char** argv) {
  ParseResult parsed = parse_command_line(argc, argv);
  if (!parsed.options) {
    std::fputs(parsed.message.c_str(), parsed.exit_status ? stderr : stdout);
    return parsed.exit_status;
  }
  const ServerOptions& o = *parsed.options;
  g_verbose.store(o.log == LogLevel::Info);
  ::signal(SIGPIPE, SIG_IGN);
  // SIGHUP re-reads --config once serving; until then (the config was
  // just read) one must not kill layerd, as its default action would.
  if (!o.config_file.empty()) ::signal(SIGHUP, SIG_IGN);

  if (o.list) return list_exports_of_server(o);

  std::string error;
  std::unique_ptr<TlsCredentials> tls;
  if (o.tls.mode != TlsMode::Off) {
    tls = TlsCredentials::load(o.tls, &error);
    if (!tls) return fail(error);
  }
  std::vector<ListeningSocket> listeners = activated_listeners(error);
  if (!error.empty()) return fail(error);
  std::vector<ListeningSocket> qmp_listeners;
  if (!take_qmp_listeners(o, &listeners, &qmp_listeners, &error)) return fail(error);
  if (!listeners.empty() &&
      (!o.socket_path.empty() || o.port_given || o.bind_given))
    return fail("-k, -p and -b cannot be used with socket activation");

  ImagePolicy policy;
  if (!make_image_policy(o, &policy, error)) return fail(error);
  ExportRegistry exports;
  if (!open_exports(o, policy, o.exports, exports, error)) return fail(error);
  if (listeners.empty()) {
    listeners = open_listeners(o, error);
    if (listeners.empty()) return fail(error);
  }

  // The control socket is listening before anyone is told layerd is up.
  std::unique_ptr<QmpServer> qmp;
  std::unique_ptr<Control> control;
  if (!o.qmp_sockets.empty() || !qmp_listeners.empty()) {
    qmp = std::make_unique<QmpServer>();
    control = std::make_unique<Control>(
        exports, process_registry(), *qmp,
        [&o, &policy](const ExportSpec& spec, std::string* why) {
          return open_export(o, policy, spec, *why, /*named_over_qmp=*/true);
        });
    control->register_commands();
    for (const auto& path : o.qmp_sockets)
      if (!qmp->listen(path, &error)) return fail(error);
    for (const auto& l : qmp_listeners)
      if (!qmp->adopt(l.fd, &error)) return fail(error);
  }

  int ready_fd = o.fork ? daemonize() : -1;
  if (!o.pid_file.empty() && !write_pid_file(o.pid_file, error)) {
    int status = fail(error);
    if (ready_fd >= 0) report_ready_to_parent(ready_fd, 1, true);
    return status;
  }
  if (ready_fd >= 0) report_ready_to_parent(ready_fd, 0, o.verbose || o.log == LogLevel::Info);

  ServerConfig config;
  config.max_connections = o.max_connections;
  config.persistent = o.persistent;
  config.max_handshakes = o.max_handshakes;
  config.limits = {.handshake_limit_seconds = o.handshake_limit_seconds,
                   .idle_timeout_seconds = o.idle_timeout_seconds,
                   .max_in_flight_requests = o.max_in_flight,
                   .max_in_flight_bytes = o.max_buffer};
  config.access = AccessList(o.access_rules);
  config.worker_threads = o.threads ? o.threads : default_worker_threads();
  config.tls = tls.get();
  if (!o.config_file.empty())
    config.reload = [&] { reload_config(o, policy, exports, control.get()); };
  if (qmp) qmp->start();
  int status = serve(config, exports, std::move(listeners));
  if (qmp) qmp->stop();
  if (control) control->cancel_all_jobs();
  return status;
}

}  // namespace
}  // namespace layerd

int main(int argc, char** argv) { return layerd::run(argc, argv); }
