// --image-opts parsing (see image_opts.h). The string becomes a list of
// (key, value) pairs, then the node stack is read top down: each node's
// own keys are checked against what its driver takes in layerd, and the
// keys under "file." are its child's. The messages name the whole key as
// the user wrote it.
#include "server/image_opts.h"

#include <charconv>
#include <cmath>
#include <algorithm>
#include <cctype>
#include <map>
#include <set>

#include <fmt/format.h>

#include "server/options.h"

namespace layerd {
namespace {

using Pairs = std::vector<std::pair<std::string, std::string>>;

// The value of one item, from `p` to the next single ',' (",," is a comma).
std::string_view take_value(std::string_view& rest, std::string* value) {
  value->clear();
  for (;;) {
    size_t comma = rest.find(',');
    if (comma == std::string_view::npos) {
      value->append(rest);
      rest = {};
      return rest;
    }
    if (comma + 1 < rest.size() && rest[comma + 1] == ',') {
      value->append(rest.substr(0, comma + 1));
      rest.remove_prefix(comma + 2);
      continue;
    }
    value->append(rest.substr(0, comma));
    rest.remove_prefix(comma + 1);
    return rest;
  }
}

std::optional<bool> parse_bool(std::string_view v) {
  if (v == "on" || v == "yes" || v == "true") return true;
  if (v == "off" || v == "no" || v == "false") return false;
  return std::nullopt;
}

// A size as QEMU reads one (qemu_strtosz): a decimal number, optionally
// with a fraction and a suffix B, K, M, G, T, P or E (powers of 1024, any
// case), or a 0x hexadecimal number.
std::optional<uint64_t> parse_qemu_size(std::string_view s) {
  if (s.empty() || !std::isdigit(static_cast<unsigned char>(s.front())))
    return std::nullopt;
  uint64_t whole = 0;
  if (s.size() > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
    auto [end, ec] = std::from_chars(s.data() + 2, s.data() + s.size(), whole, 16);
    if (ec != std::errc{} || end != s.data() + s.size()) return std::nullopt;
    return whole;
  }
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), whole);
  if (ec != std::errc{}) return std::nullopt;
  std::string_view rest(end, s.data() + s.size() - end);
  double fraction = 0;
  if (!rest.empty() && rest.front() == '.') {
    size_t digits = 1;
    while (digits < rest.size() && std::isdigit(static_cast<unsigned char>(rest[digits])))
      ++digits;
    if (digits == 1) return std::nullopt;
    fraction = std::stod(std::string(rest.substr(0, digits)));
    rest.remove_prefix(digits);
  }
  int shift = 0;
  if (rest.size() > 1) return std::nullopt;
  if (rest.size() == 1) {
    const std::string_view suffixes = "BKMGTPE";
    size_t k = suffixes.find(static_cast<char>(std::toupper(static_cast<unsigned char>(rest[0]))));
    if (k == std::string_view::npos) return std::nullopt;
    shift = static_cast<int>(k) * 10;
  }
  if (fraction != 0 && shift == 0) return std::nullopt;  // no fractions of a byte
  if (shift >= 64 || whole > (UINT64_MAX >> shift)) return std::nullopt;
  const uint64_t scaled = whole << shift;
  const double extra = std::floor(fraction * std::ldexp(1.0, shift));
  if (extra >= static_cast<double>(UINT64_MAX - scaled)) return std::nullopt;
  return scaled + static_cast<uint64_t>(extra);
}

// qemu's protocols, which it recognizes at the start of a filename when
// the file node's driver is not given.
bool names_qemu_protocol(std::string_view filename, std::string* protocol) {
  size_t colon = filename.find(':');
  if (colon == std::string_view::npos || colon == 0) return false;
  std::string_view p = filename.substr(0, colon);
  if (p.find('/') != std::string_view::npos) return false;
  static const char* const kProtocols[] = {
      "nbd", "nbd+tcp", "nbd+unix", "http", "https", "ftp", "ftps", "ssh",
      "iscsi", "gluster", "gluster+tcp", "gluster+unix", "gluster+rdma", "rbd",
      "nfs", "null-co", "null-aio", "blkdebug", "blkverify", "json", "fat",
      "vvfat", "host_device", "host_cdrom", "quorum", "throttle"};
  for (const char* known : kProtocols)
    if (p == known) {
      *protocol = std::string(p);
      return true;
    }
  return false;
}

class Reader {
 public:
  Reader(const Pairs& pairs, ImageOpts* out) : pairs_(pairs), out_(out) {
    for (const auto& [k, v] : pairs) last_[k] = v;  // the last one wins
  }

  std::string read() {
    const std::string top = get("driver").value_or("");
    if (top.empty() && !has_child("file") && !last_.count("file"))
      return "no driver and no file: give driver=qcow2|raw|file|compress, or "
             "file.filename=PATH to probe the format";
    if (auto m = node("", top, ""); !m.empty()) return m;
    // Every key must have been looked at by a node.
    for (const auto& [k, v] : pairs_)
      if (!used_.count(k)) return fmt::format("option '{}' is not supported", k);
    return "";
  }

 private:
  std::optional<std::string> get(const std::string& key) {
    auto it = last_.find(key);
    if (it == last_.end()) return std::nullopt;
    used_.insert(key);
    return it->second;
  }

  bool has_child(const std::string& prefix) const {
    const std::string dotted = prefix + ".";
    for (const auto& [k, v] : last_)
      if (k.rfind(dotted, 0) == 0) return true;
    return false;
  }

  // The keys of the node at `prefix` that are neither its child's nor
  // taken already.
  std::vector<std::string> own_keys(const std::string& prefix, bool has_file_child) {
    std::vector<std::string> keys;
    for (const auto& [k, v] : pairs_) {
      if (k.rfind(prefix, 0) != 0 || used_.count(k)) continue;
      std::string_view rest = std::string_view(k).substr(prefix.size());
      if (has_file_child && rest.rfind("file.", 0) == 0) continue;
      if (std::find(keys.begin(), keys.end(), k) == keys.end()) keys.push_back(k);
    }
    return keys;
  }

  // Options every driver takes. True if `name` is one (and then its value
  // is checked into `error`).
  bool common_option(const std::string& key, std::string_view name,
                     const std::string& value, std::string* error) {
    auto as_bool = [&](std::optional<bool>* into) {
      auto b = parse_bool(value);
      if (!b)
        *error = fmt::format("'{}' expects 'on' or 'off', not '{}'", key, value);
      else
        *into = b;
    };
    if (name == "driver" || name == "node-name") {
    } else if (name == "auto-read-only") {
      std::optional<bool> ignored;
      as_bool(&ignored);
    } else if (name == "read-only") {
      as_bool(&out_->read_only);
    } else if (name == "force-share") {
      as_bool(&out_->force_share);
    } else if (name == "cache.direct") {
      as_bool(&out_->cache_direct);
    } else if (name == "cache.no-flush") {
      as_bool(&out_->cache_no_flush);
    } else if (name == "discard") {
      if (value == "ignore" || value == "off") out_->discard_unmap = false;
      else if (value == "unmap" || value == "on") out_->discard_unmap = true;
      else *error = fmt::format("'{}' expects 'ignore' or 'unmap', not '{}'", key, value);
    } else if (name == "detect-zeroes") {
      if (value == "off") out_->detect_zeroes = DetectZeroes::Off;
      else if (value == "on") out_->detect_zeroes = DetectZeroes::On;
      else if (value == "unmap") out_->detect_zeroes = DetectZeroes::Unmap;
      else *error = fmt::format("'{}' expects 'off', 'on' or 'unmap', not '{}'", key, value);
    } else {
      return false;
    }
    return true;
  }

  std::string size_option(const std::string& key, const std::string& value,
                          uint64_t* into) {
    auto n = parse_qemu_size(value);
    if (!n)
      return fmt::format("'{}' expects a size in bytes (a suffix K, M, G, T, "
                         "P or E may follow), not '{}'", key, value);
    *into = *n;
    return "";
  }

  // The options of a driver-specific node; "" or an error.
  std::string node_options(const std::string& prefix, const std::string& driver,
                           bool has_file_child) {
    for (const std::string& key : own_keys(prefix, has_file_child)) {
      const std::string value = *get(key);
      const std::string_view name = std::string_view(key).substr(prefix.size());
      std::string error;
      if (common_option(key, name, value, &error)) {
      } else if (driver == "file" || driver == "host_device") {
        error = file_option(key, name, value);
      } else if (driver == "raw") {
        error = raw_option(key, name, value);
      } else if (driver == "qcow2") {
        error = qcow2_option(key, name, value);
      } else if (driver == "probe") {
        error = fmt::format("option '{}' is not supported by layerd without "
                            "a driver (give driver=qcow2 or driver=raw)", key);
      } else {
        error = unsupported(key, driver);
      }
      if (!error.empty()) return error;
    }
    return "";
  }

  static std::string unsupported(const std::string& key, const std::string& driver) {
    return fmt::format("option '{}' of driver '{}' is not supported by layerd",
                       key, driver);
  }

  std::string file_option(const std::string& key, std::string_view name,
                          const std::string& value) {
    if (name == "filename") return "";  // read by file_node
    if (name == "aio") {
      if (value != "threads" && value != "native" && value != "io_uring")
        return fmt::format("'{}' expects 'threads', 'native' or 'io_uring', not '{}'",
                           key, value);
      return "";  // layerd picks its own I/O strategy, as with --aio
    }
    if (name == "locking") {
      if (value == "on" || value == "auto") return "";
      if (value == "off")
        return fmt::format("'{}=off' is not supported: layerd always takes "
                           "QEMU's image locks; to serve an image another "
                           "process writes, serve it read-only with -U "
                           "(read-only=on,force-share=on)", key);
      return fmt::format("'{}' expects 'on', 'off' or 'auto', not '{}'", key, value);
    }
    return unsupported(key, "file");
  }

  std::string raw_option(const std::string& key, std::string_view name,
                         const std::string& value) {
    if (name == "offset") return size_option(key, value, &out_->offset);
    if (name == "size") {
      uint64_t n = 0;
      if (auto m = size_option(key, value, &n); !m.empty()) return m;
      out_->size = n;
      return "";
    }
    return unsupported(key, "raw");
  }

  std::string qcow2_option(const std::string& key, std::string_view name,
                           const std::string& value) {
    if (name == "backing") {
      if (value.empty() || value == "null") {
        out_->no_backing = true;
        return "";
      }
      return fmt::format("'{}={}' is not supported: layerd opens block "
                         "nodes by file name only; 'backing=' serves the "
                         "image without its backing file", key, value);
    }
    if (name.rfind("backing.", 0) == 0)
      return fmt::format("'{}' is not supported: layerd opens the backing "
                         "chain the image names (change it with 'qemu-img "
                         "rebase -u -b FILE -F FORMAT IMAGE'), or none with "
                         "'backing='", key);
    if (name.rfind("data-file", 0) == 0)
      return fmt::format("'{}' is not supported: layerd opens the data file "
                         "the image names, with --allow-data-file", key);
    if (name == "l2-cache-size") {
      uint64_t n = 0;
      if (auto m = size_option(key, value, &n); !m.empty()) return m;
      out_->l2_cache_bytes = n;
      return "";
    }
    if (name == "cache-size") {  // all of it for L2 tables, unless given apart
      uint64_t n = 0;
      if (auto m = size_option(key, value, &n); !m.empty()) return m;
      if (!last_.count(key.substr(0, key.size() - name.size()) + "l2-cache-size"))
        out_->l2_cache_bytes = n;
      return "";
    }
    if (name == "refcount-cache-size") {  // layerd sizes that cache itself
      uint64_t n = 0;
      return size_option(key, value, &n);
    }
    if (name == "cache-clean-interval") {  // idle tables are not freed early
      uint64_t n = 0;
      auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), n);
      if (ec != std::errc{} || end != value.data() + value.size())
        return fmt::format("'{}' expects a number of seconds, not '{}'", key, value);
      return "";
    }
    if (name == "lazy-refcounts" || name == "pass-discard-request" ||
        name == "pass-discard-other") {
      auto b = parse_bool(value);
      if (!b) return fmt::format("'{}' expects 'on' or 'off', not '{}'", key, value);
      // layerd keeps refcounts exact and always gives freed clusters back
      // to the filesystem.
      const bool layerds = name != "lazy-refcounts";
      if (*b != layerds)
        return fmt::format("'{}={}' is not supported: layerd {}", key, value,
                           layerds ? "always gives freed clusters back to the "
                                     "filesystem"
                                   : "keeps refcounts exact on every write");
      return "";
    }
    return unsupported(key, "qcow2");
  }

  // The file (protocol) node at `prefix`; `driver` given or inferred.
  std::string file_node(const std::string& prefix, const std::string& driver,
                        bool inferred) {
    auto filename = get(prefix + "filename");
    if (!filename || filename->empty())
      return fmt::format("'{}filename' is missing: name the image file", prefix);
    std::string protocol;
    if (inferred && filename->rfind("file:", 0) == 0) {
      filename->erase(0, 5);
    } else if (inferred && names_qemu_protocol(*filename, &protocol)) {
      return fmt::format("'{}filename={}' names qemu's '{}' protocol, which "
                         "layerd does not open: serve a local file or block "
                         "device", prefix, *filename, protocol);
    }
    out_->filename = *filename;
    return node_options(prefix, driver, false);
  }

  // The node at `prefix` with driver `driver` ("" at the top: probe);
  // `above` is the driver of the node above ("" at the top).
  std::string node(const std::string& prefix, const std::string& driver,
                   const std::string& above) {
    const std::string driver_key = prefix + "driver";
    if (driver == "file" || driver == "host_device") {
      if (prefix.empty()) out_->format = "raw";
      return file_node(prefix, driver, false);
    }
    static const char* const kSupported =
        "supported: qcow2, raw, file, host_device and compress";
    if (driver != "qcow2" && driver != "raw" && driver != "compress" && !driver.empty())
      return fmt::format("'{}={}': driver not supported by layerd ({})",
                         driver_key, driver, kSupported);
    if (driver == "raw" && above == "raw")
      return fmt::format("'{}=raw' under another raw driver is not supported "
                         "(give one offset and size)", driver_key);
    if (driver == "compress" && !above.empty() && above != "raw")
      return fmt::format("'{}=compress' under '{}' is not supported", driver_key, above);

    const std::string child = prefix + "file";
    if (last_.count(child)) {
      get(child);
      return fmt::format("'{}={}' is not supported: qemu reads it as the name "
                         "of another block node; name the image file with "
                         "'{}.filename={}'", child, last_.at(child), child,
                         last_.at(child));
    }
    if (!has_child(child))
      return fmt::format("'{}' needs a file: give '{}.filename=PATH'",
                         driver.empty() ? std::string("the image") : driver_key + "=" + driver,
                         child);
    if (auto m = node_options(prefix, driver.empty() ? "probe" : driver, true); !m.empty())
      return m;
    auto child_driver = get(child + ".driver");
    const std::string below = child_driver.value_or("file");
    const std::string here = driver.empty() ? "probe" : driver;
    if (driver == "compress") {
      if (below != "qcow2")
        return fmt::format("'{}.driver={}': compression is not supported for "
                           "underlying format: {} (driver=compress goes over "
                           "driver=qcow2)", child, below, below);
      out_->compress = true;
    } else if (driver == "raw") {
      if (below != "file" && below != "host_device" && below != "qcow2" &&
          below != "compress")
        return fmt::format("'{}.driver={}': driver not supported by layerd "
                           "under raw ({})", child, below, kSupported);
    } else {  // qcow2, or probing: a file below
      if (below != "file" && below != "host_device") {
        if (below == "raw")
          return fmt::format("'{}.driver=raw': an image inside another file "
                             "(a raw driver under {}) is not supported by "
                             "layerd", child, here);
        return fmt::format("'{}.driver={}': driver not supported by layerd "
                           "under {} ({})", child, below, here, kSupported);
      }
    }
    if (driver == "qcow2" || driver.empty()) {
      out_->format = driver;
      return file_node(child + ".", below, !child_driver.has_value());
    }
    if (driver == "raw" && (below == "file" || below == "host_device")) {
      out_->format = "raw";
      return file_node(child + ".", below, !child_driver.has_value());
    }
    return node(child + ".", below, driver);
  }

  const Pairs& pairs_;
  ImageOpts* out_;
  std::map<std::string, std::string> last_;
  std::set<std::string> used_;
};

}  // namespace

std::string split_qemu_opts(std::string_view text, std::string_view implied_key,
                            Pairs* out) {
  out->clear();
  bool first = true;
  while (!text.empty()) {
    const size_t name_end = text.find_first_of("=,");
    std::string key, value;
    if (name_end == std::string_view::npos || text[name_end] == ',') {
      if (first && !implied_key.empty()) {
        key = std::string(implied_key);
        take_value(text, &value);
      } else {
        key = std::string(text.substr(0, name_end));
        text = name_end == std::string_view::npos ? "" : text.substr(name_end + 1);
        value = "on";
        if (key.rfind("no", 0) == 0 && key.size() > 2) {
          key.erase(0, 2);
          value = "off";
        }
      }
    } else {
      key = std::string(text.substr(0, name_end));
      text.remove_prefix(name_end + 1);
      take_value(text, &value);
    }
    first = false;
    if (key.empty()) return fmt::format("an option with no name ('={}')", value);
    if (key == "id") continue;
    out->emplace_back(std::move(key), std::move(value));
  }
  return "";
}

std::string parse_image_opts(std::string_view text, ImageOpts* out) {
  *out = {};
  Pairs pairs;
  if (auto m = split_qemu_opts(text, "file", &pairs); !m.empty()) return m;
  return Reader(pairs, out).read();
}

}  // namespace layerd
