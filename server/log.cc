#include "server/log.h"

#include <unistd.h>

#include <string>

namespace layerd {

void write_log_line(const std::string& line) {
  // One write(2) per line, so lines from several threads never interleave.
  std::string s = "layerd: " + line + "\n";
  ssize_t ignored = ::write(STDERR_FILENO, s.data(), s.size());
  (void)ignored;
}

}  // namespace layerd
