// layerd: serve a disk image over NBD.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <fstream>

#include <fmt/format.h>

#include "overlay/chain.h"
#include "qcow2/file.h"
#include "server/export.h"
#include "server/list_client.h"
#include "server/listeners.h"
#include "server/log.h"
#include "server/options.h"
#include "server/server.h"

namespace layerd {
namespace {

int fail(const std::string& message) {
  fmt::print(stderr, "layerd: {}\n", message);
  return 1;
}

// Without -f, only the image the user named is examined (as qemu-nbd does);
// formats of backing images are never guessed.
bool detect_format(const std::string& path, ImageFormat* format,
                   std::string& error) {
  std::error_code ec;
  auto file = open_posix_file(path, FileOptions{}, ec);
  if (!file) {
    error = fmt::format("cannot open '{}': {}", path, ec.message());
    return false;
  }
  std::byte magic[4] = {};
  if (file->pread(magic, 0)) {
    error = fmt::format("cannot read '{}'", path);
    return false;
  }
  *format = std::memcmp(magic, "QFI\xfb", 4) == 0 ? ImageFormat::Qcow2
                                                  : ImageFormat::Raw;
  if (*format == ImageFormat::Raw)
    log_error("warning: no format given for '{}'; serving it as raw "
              "(pass -f raw to silence this)", path);
  return true;
}

std::shared_ptr<Layer> open_image(const ServerOptions& o, std::string& error) {
  ImageFormat format;
  if (o.format.empty()) {
    if (!detect_format(o.file, &format, error)) return nullptr;
  } else if (!parse_image_format(o.format, &format)) {
    error = fmt::format("unknown format '{}'", o.format);
    return nullptr;
  }
  ChainOptions co;
  co.read_only = o.read_only;
  co.force_share = o.force_share;
  co.direct = o.cache == CacheMode::None || o.cache == CacheMode::DirectSync;
  co.allow_data_files = o.allow_data_file;
  co.l2_cache_bytes = o.l2_cache_bytes;
  OpenedChain chain;
  if (!open_chain(o.file, format, co, &chain, &error)) return nullptr;
  for (size_t i = 1; i < chain.members.size(); ++i)
    log_info("backing image {}: {}", i, chain.members[i].path);
  return chain.layer;
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
void report_ready_to_parent(int ready_fd, char status) {
  ssize_t ignored = ::write(ready_fd, &status, 1);
  (void)ignored;
  ::close(ready_fd);
  int null = ::open("/dev/null", O_RDWR);
  if (null >= 0) {
    ::dup2(null, STDIN_FILENO);
    ::dup2(null, STDOUT_FILENO);
    if (!g_verbose.load()) ::dup2(null, STDERR_FILENO);
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
  g_verbose.store(o.verbose);
  ::signal(SIGPIPE, SIG_IGN);

  if (o.list) return list_exports_of_server(o);

  std::string error;
  std::vector<ListeningSocket> listeners = activated_listeners(error);
  if (!error.empty()) return fail(error);
  if (!listeners.empty() &&
      (!o.socket_path.empty() || o.port_given || o.bind_given))
    return fail("-k, -p and -b cannot be used with socket activation");

  auto layer = open_image(o, error);
  if (!layer) return fail(error);

  auto e = std::make_shared<Export>();
  e->name = o.export_name;
  e->description = o.description;
  e->layer = layer;
  e->policy.read_only = o.read_only;
  e->policy.discard_unmap = o.discard_unmap;
  e->policy.detect_zeroes = o.detect_zeroes;
  e->policy.flush_every_write =
      o.cache == CacheMode::Writethrough || o.cache == CacheMode::DirectSync;
  e->policy.ignore_flush = o.cache == CacheMode::Unsafe;
  e->policy.multi_conn = o.max_connections != 1;
  e->policy.max_request_size = o.max_request_size;
  ExportRegistry exports;
  exports.add(e);

  if (listeners.empty()) {
    listeners = open_listeners(o, error);
    if (listeners.empty()) return fail(error);
  }

  int ready_fd = o.fork ? daemonize() : -1;
  if (!o.pid_file.empty() && !write_pid_file(o.pid_file, error)) {
    int status = fail(error);
    if (ready_fd >= 0) report_ready_to_parent(ready_fd, 1);
    return status;
  }
  if (ready_fd >= 0) report_ready_to_parent(ready_fd, 0);

  ServerConfig config;
  config.max_connections = o.max_connections;
  config.persistent = o.persistent;
  config.handshake_limit_seconds = o.handshake_limit_seconds;
  config.worker_threads = o.threads ? o.threads : default_worker_threads();
  return serve(config, exports, std::move(listeners));
}

}  // namespace
}  // namespace layerd

int main(int argc, char** argv) { return layerd::run(argc, argv); }
