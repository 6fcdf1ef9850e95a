// Logging to stderr: errors always, connection events with -v.
#pragma once

#include <atomic>
#include <cstdio>

#include <fmt/format.h>

namespace layerd {

inline std::atomic<bool> g_verbose{false};

void write_log_line(const std::string& line);

template <typename... Args>
void log_error(fmt::format_string<Args...> f, Args&&... args) {
  write_log_line(fmt::format(f, std::forward<Args>(args)...));
}

template <typename... Args>
void log_info(fmt::format_string<Args...> f, Args&&... args) {
  if (g_verbose.load(std::memory_order_relaxed))
    write_log_line(fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace layerd
