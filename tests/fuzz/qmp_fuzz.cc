// libFuzzer target: a QMP client's byte stream through the parser and the
// dispatcher, with layerd's real commands (server/control.cc) registered.
//
// The input is what a client sends on the QMP socket. It is fed to a
// QmpSession (server/qmp_protocol.h) twice: in one piece, and in pieces of
// 1 to 17 bytes (sizes drawn from a generator seeded by the input), as
// reads from a socket would cut it. Besides the sanitizers the target checks
// what a client relies on:
//   - both feedings answer with exactly the same lines (the splitter does
//     not depend on how the stream is cut);
//   - every line is one JSON object in QEMU's format: ASCII only, no raw
//     control characters, "\r\n" at the end and nowhere else, with
//     exactly one of "return" or "error" (an error with a known class and
//     a description);
//   - an input that is one well-formed JSON value and a newline gets
//     exactly one line, echoing its "id" if it has one.
// The exports the commands see are built once: a raw export in memory, a
// read-only two-image qcow2 chain in a private temporary directory, and
// exports with dirty bitmaps (-B) and per-client overlays, whose chains
// cannot change. No job can start (no export has a writable qcow2 chain),
// so no file is created or written whatever the input names.
// block-export-add opens in-memory disks only; the exports are reset after
// every feeding, so inputs do not depend on each other.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <boost/json.hpp>

#include "overlay/chain.h"
#include "qcow2/file.h"
#include "qcow2/image.h"
#include "server/control.h"
#include "server/qmp.h"
#include "server/qmp_protocol.h"

namespace layerd {
namespace {

namespace json = boost::json;

void require(bool ok) {
  if (!ok) std::abort();
}

// A disk of zeros that takes writes and forgets them.
class ZeroDisk final : public Layer {
 public:
  ZeroDisk(uint64_t size, bool writable)
      : Layer(size, Capabilities{.writable = writable, .cheap_block_status = true}) {}

 protected:
  std::error_code do_read(uint64_t, std::span<std::byte> buf) override {
    std::fill(buf.begin(), buf.end(), std::byte{0});
    return {};
  }
  std::error_code do_write(uint64_t, std::span<const std::byte>, bool) override { return {}; }
  std::error_code do_write_zeroes(uint64_t, uint64_t, ZeroFlags) override { return {}; }
  std::error_code do_trim(uint64_t, uint64_t, bool) override { return {}; }
  std::error_code do_flush() override { return {}; }
  std::error_code do_block_status(uint64_t, uint64_t length, std::span<Extent> out,
                                  size_t* count) override {
    out[0] = Extent{.length = length, .hole = true, .zero = true};
    *count = 1;
    return {};
  }
};

std::shared_ptr<Export> memory_export(const std::string& name, bool writable) {
  auto e = std::make_shared<Export>();
  e->name = name;
  e->spec.name = name;
  e->spec.file = "/nonexistent/" + name;
  e->layer = std::make_shared<ZeroDisk>(1 << 20, writable);
  e->policy.read_only = !writable;
  return e;
}

void make_image(const std::string& path, const std::string& backing) {
  std::error_code ec;
  auto file = open_posix_file(path, FileOptions{.mode = OpenMode::ReadWrite, .create = true}, ec);
  require(file != nullptr);
  qcow2::CreateOptions co;
  co.size = 1 << 20;
  co.cluster_size = 4096;
  if (!backing.empty()) {
    co.backing_file = backing;
    co.backing_format = "qcow2";
  }
  require(qcow2::Image::create(*file, co).ok());
}

struct World {
  std::string dir;
  ImageRegistry images;
  ExportRegistry exports;
  QmpServer server;  // never started: only its command table is used
  std::vector<std::shared_ptr<BlockNode>> chain_nodes;
  std::shared_ptr<Layer> chain_layer;
  std::unique_ptr<Control> control;

  World() {
    char tmpl[] = "/tmp/layerd-qmp-fuzz-XXXXXX";
    require(::mkdtemp(tmpl) != nullptr);
    dir = tmpl;
    make_image(dir + "/base.qcow2", "");
    make_image(dir + "/top.qcow2", "base.qcow2");
    ChainOptions co;
    co.read_only = true;
    co.registry = &images;
    OpenedChain chain;
    std::string error;
    require(open_chain(dir + "/top.qcow2", ImageFormat::Qcow2, co, &chain, &error));
    // The files stay open; their names are not needed any more.
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);

    chain_nodes = chain.nodes;
    chain_layer = chain.layer;
    reset();
    control = std::make_unique<Control>(
        exports, images, server,
        [](const ExportSpec& spec, std::string*) -> std::shared_ptr<Export> {
          auto e = memory_export(spec.name, !spec.read_only);
          e->spec = spec;
          return e;
        });
    control->register_commands();
  }

  // The exports every input starts with, made anew each time (the registry
  // must hold the only reference for block-export-del to succeed).
  std::vector<std::shared_ptr<const Export>> initial_exports() const {
    auto ro_chain = std::make_shared<Export>();
    ro_chain->name = ro_chain->spec.name = "chain";
    ro_chain->spec.file = chain_nodes[0]->path;
    ro_chain->layer = chain_layer;
    ro_chain->policy.read_only = true;
    auto bitmaps = memory_export("bitmaps", true);
    bitmaps->bitmaps.push_back(ExportedBitmap{.context = "qemu:dirty-bitmap:b0", .name = "b0"});
    auto per_client = memory_export("per-client", false);
    per_client->per_client = std::make_unique<Export::PerClient>();
    per_client->per_client->base = chain_nodes;
    return {memory_export("disk", true), ro_chain, bitmaps, per_client};
  }

  void reset() {
    std::vector<std::string> names;
    for (const auto& e : exports.all()) names.push_back(e->name);
    exports.replace(names, initial_exports());
  }
};

World& world() {
  static World* w = new World();
  return *w;
}

// Feeds `input` in pieces of at most `max_piece` bytes (sizes from a
// generator seeded by `seed`; max_piece 0: in one piece) and returns the
// lines answered.
std::vector<std::string> answer(std::string_view input, size_t max_piece, uint64_t seed) {
  World& w = world();
  std::vector<std::string> lines;
  {
    QmpSession session(w.server.commands());
    auto send = [&](std::string line) {
      lines.push_back(std::move(line));
      return true;
    };
    size_t at = 0;
    while (at < input.size()) {
      size_t n = input.size() - at;
      if (max_piece) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        n = std::min<size_t>(n, 1 + (seed >> 33) % max_piece);
      }
      session.feed(input.data() + at, n, send);
      at += n;
    }
  }
  w.reset();
  return lines;
}

bool is_known_class(std::string_view c) {
  return c == "GenericError" || c == "CommandNotFound" || c == "DeviceNotFound" ||
         c == "DeviceNotActive" || c == "KVMMissingCap";
}

json::parse_options parse_options() {
  json::parse_options o;
  o.max_depth = qmp::kMaxDepth;
  return o;
}

// Checks one reply line and returns it parsed.
json::object check_line(const std::string& line) {
  require(line.size() >= 4 && line.ends_with("\r\n"));
  std::string_view body(line.data(), line.size() - 2);
  for (char ch : body) {
    auto c = static_cast<unsigned char>(ch);
    require(c >= 0x20 && c < 0x7f);
  }
  boost::system::error_code ec;
  json::value v = json::parse(body, ec, {}, parse_options());
  require(!ec && v.is_object());
  json::object& o = v.get_object();
  require(o.contains("return") != o.contains("error"));
  if (const json::value* e = o.if_contains("error")) {
    require(e->is_object() && e->get_object().size() == 2);
    const json::value* cls = e->get_object().if_contains("class");
    const json::value* desc = e->get_object().if_contains("desc");
    require(cls && cls->is_string() && is_known_class(cls->get_string()));
    require(desc && desc->is_string() && !desc->get_string().empty());
  }
  return std::move(o);
}

// Numbers compare by value: QEMU's format prints 1.0 as 1.
bool same_json(const json::value& a, const json::value& b) {
  if (a.is_number() && b.is_number()) return a.to_number<double>() == b.to_number<double>();
  if (a.kind() != b.kind()) return false;
  if (a.is_array()) {
    const auto &x = a.get_array(), &y = b.get_array();
    if (x.size() != y.size()) return false;
    for (size_t i = 0; i < x.size(); ++i)
      if (!same_json(x[i], y[i])) return false;
    return true;
  }
  if (a.is_object()) {
    const auto &x = a.get_object(), &y = b.get_object();
    if (x.size() != y.size()) return false;
    for (const auto& kv : x) {
      const json::value* other = y.if_contains(kv.key());
      if (!other || !same_json(kv.value(), *other)) return false;
    }
    return true;
  }
  return a == b;
}

// A well-formed JSON value and a newline: one line, echoing the id.
void check_single_value(std::string_view input, const std::vector<json::object>& replies) {
  if (input.empty() || input.back() != '\n') return;
  boost::system::error_code ec;
  json::value v = json::parse(input, ec, {}, parse_options());
  if (ec) return;
  require(replies.size() == 1);
  const json::value* id = v.is_object() ? v.get_object().if_contains("id") : nullptr;
  const json::value* echoed = replies[0].if_contains("id");
  require((id == nullptr) == (echoed == nullptr));
  if (id) require(same_json(*id, *echoed));
}

}  // namespace
}  // namespace layerd

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace layerd;
  std::string_view input(reinterpret_cast<const char*>(data), size);
  uint64_t seed = 0;
  for (size_t i = 0; i < size && i < 8; ++i) seed = seed << 8 | data[i];
  std::vector<std::string> whole = answer(input, 0, 0);
  std::vector<std::string> pieces = answer(input, 17, seed);
  require(whole.size() == pieces.size());
  for (size_t i = 0; i < whole.size(); ++i) require(whole[i] == pieces[i]);
  std::vector<json::object> replies;
  for (const std::string& line : whole) replies.push_back(check_line(line));
  check_single_value(input, replies);
  return 0;
}
