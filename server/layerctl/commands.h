// The commands of layerctl. Each takes the arguments after "layerctl"
// (argv[0] is the command name), prints its results on stdout and returns
// the exit code; errors are thrown as CommandError (layerctl_util.h).
#pragma once

#include <getopt.h>

#include <string>

namespace layerd::ctl {

int cmd_create(int argc, char** argv);
int cmd_info(int argc, char** argv);
int cmd_map(int argc, char** argv);
int cmd_check(int argc, char** argv);

// The live commands (live.cc) on a running server's QMP socket: snapshot,
// commit, stream, jobs, cancel, complete, pause, resume, speed, dismiss,
// wait, exports, info. `qmp_path` is the socket given before the command
// ("" if none; the command's own --qmp then names it).
bool is_live_command(const std::string& name);
int cmd_live(const std::string& qmp_path, int argc, char** argv);

// Shared getopt handling: resets getopt for a new parse, and turns
// getopt's '?' and ':' results into usage errors.
void reset_getopt();
[[noreturn]] void bad_option(int c, const char* optarg_value, char** argv);

// "human" or "json"; anything else is a usage error.
bool parse_output_format(const std::string& value);  // true for json

}  // namespace layerd::ctl
