// layerctl: create, inspect, map and check disk images, with command lines,
// output and exit codes shaped like qemu-img's so that scripts port easily.
//
//   layerctl create  (layerctl_create.cc)
//   layerctl info    (layerctl_info.cc)
//   layerctl map     (layerctl_map.cc)
//   layerctl check   (layerctl_check.cc)
//   layerctl --qmp PATH snapshot|commit|stream|jobs|... (live.cc, over QMP)
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include <fmt/format.h>

#include "server/layerctl/commands.h"
#include "server/layerctl/util.h"

namespace layerd::ctl {

void reset_getopt() {
  optind = 0;  // glibc: full reinitialization
  opterr = 0;
}

void bad_option(int c, const char* optarg_value, char** argv) {
  (void)optarg_value;
  const char* text = argv[optind - 1];
  if (c == ':')
    usage_error(fmt::format("option '{}' requires an argument", text));
  if (optopt != 0)
    usage_error(fmt::format("invalid option -- '{}'", static_cast<char>(optopt)));
  usage_error(fmt::format("unrecognized option '{}'", text));
}

bool parse_output_format(const std::string& value) {
  if (value == "json") return true;
  if (value == "human") return false;
  usage_error(fmt::format("--output must be used with human or json as argument."));
}

namespace {

constexpr const char* kHelp =
    "layerctl version " LAYERD_VERSION
    " - the image tool of layerd (qemu-img compatible subset)\n"
    "usage: layerctl [--help | --version] COMMAND [command options]\n"
    "       layerctl --qmp PATH LIVE_COMMAND [command options]\n"
    "\n"
    "Commands:\n"
    "  create [-q] [-f FMT] [-b BACKING_FILE -F BACKING_FMT] [-u] [-o OPTIONS]\n"
    "         FILENAME [SIZE]\n"
    "  info   [-f FMT] [-U] [--backing-chain] [--output=OFMT] FILENAME\n"
    "  map    [-f FMT] [-U] [--start-offset=OFFSET] [--max-length=LEN]\n"
    "         [--output=OFMT] FILENAME\n"
    "  check  [-q] [-f FMT] [-U] [-r leaks|all] [--output=OFMT] FILENAME\n"
    "\n"
    "FMT is raw or qcow2. OFMT is human or json. SIZE takes the suffixes\n"
    "k, M, G, T, P, E (powers of 1024). 'layerctl COMMAND --help' describes\n"
    "a command.\n"
    "\n"
    "Live commands, on a running layerd (or qemu-storage-daemon) through its\n"
    "QMP socket PATH ('layerctl --qmp PATH jobs' or 'layerctl jobs --qmp PATH'):\n"
    "  snapshot [--format=qcow2] [--node-name=NAME] DEVICE NEW_FILE\n"
    "  commit   [--top=FILE | --active] [--base=FILE] [--empty | --depth-first]\n"
    "           [--speed=N] [--no-give-way] [--job-id=ID] [--wait] DEVICE\n"
    "  stream   [--base=FILE] [--speed=N] [--no-give-way] [--job-id=ID] [--wait] DEVICE\n"
    "  jobs | exports | info [DEVICE]\n"
    "  cancel [--force] [--wait] JOB | complete JOB | pause JOB | resume JOB\n"
    "  speed JOB BYTES_PER_S | dismiss JOB | wait JOB\n"
    "All take --output=OFMT. They exit with 0 on success, 1 when a job failed,\n"
    "2 when it was cancelled, 3 when the server refused a command or the QMP\n"
    "connection broke. 'layerctl --qmp PATH jobs --help' tells more.\n"
    "\n"
    "check exits with 0 when the image is clean, 1 when the check could not\n"
    "be completed, 2 when corruptions were found, 3 when only leaked clusters\n"
    "were found, and 63 for formats that cannot be checked.\n";

int run(int argc, char** argv) {
  if (argc < 2) usage_error("Not enough arguments");
  std::string cmd = argv[1];
  if (cmd == "--help" || cmd == "-h") {
    std::fputs(kHelp, stdout);
    return 0;
  }
  if (cmd == "--version" || cmd == "-V") {
    fmt::print("layerctl version {}\n", LAYERD_VERSION);
    return 0;
  }
  // --qmp PATH before the command: a live command on that socket.
  int i = 1;
  std::string qmp;
  while (i < argc) {
    std::string a = argv[i];
    if (a == "--qmp") {
      if (i + 1 >= argc) usage_error("option '--qmp' requires an argument");
      qmp = argv[i + 1];
      i += 2;
    } else if (a.rfind("--qmp=", 0) == 0) {
      qmp = a.substr(6);
      i += 1;
    } else {
      break;
    }
  }
  if (i > 1) {
    if (i >= argc) usage_error("Not enough arguments");
    if (qmp.empty()) usage_error("--qmp needs the path of a QMP socket");
    return cmd_live(qmp, argc - i, argv + i);
  }
  // `info` is both an image command and a live one: --qmp anywhere (before
  // a "--") makes it the live one.
  if (is_live_command(cmd) && cmd != "info") return cmd_live("", argc - 1, argv + 1);
  if (cmd == "info") {
    for (int k = 2; k < argc && std::strcmp(argv[k], "--") != 0; ++k)
      if (std::strncmp(argv[k], "--qmp", 5) == 0) return cmd_live("", argc - 1, argv + 1);
  }
  // Each command parses argv[1..]: argv[1] (the command) plays argv[0].
  if (cmd == "create") return cmd_create(argc - 1, argv + 1);
  if (cmd == "info") return cmd_info(argc - 1, argv + 1);
  if (cmd == "map") return cmd_map(argc - 1, argv + 1);
  if (cmd == "check") return cmd_check(argc - 1, argv + 1);
  usage_error(fmt::format("Command not found: {}", cmd));
}

}  // namespace
}  // namespace layerd::ctl

int main(int argc, char** argv) {
  try {
    return layerd::ctl::run(argc, argv);
  } catch (const layerd::ctl::CommandError& e) {
    std::fflush(stdout);
    if (std::strlen(e.what()) > 0) fmt::print(stderr, "layerctl: {}\n", e.what());
    return e.code;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    fmt::print(stderr, "layerctl: {}\n", e.what());
    return 1;
  }
}
