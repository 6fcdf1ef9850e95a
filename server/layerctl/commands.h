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

// Shared getopt handling: resets getopt for a new parse, and turns
// getopt's '?' and ':' results into usage errors.
void reset_getopt();
[[noreturn]] void bad_option(int c, const char* optarg_value, char** argv);

// "human" or "json"; anything else is a usage error.
bool parse_output_format(const std::string& value);  // true for json

}  // namespace layerd::ctl
