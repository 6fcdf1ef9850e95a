// libFuzzer target: the handshake state machine fed with a client's bytes.
//
// The first input byte picks the server's exports (sizes, flags, block
// sizes, meta contexts); the rest is the client's byte stream, fed in
// bytes_wanted() pieces as the server would read it. Besides the sanitizers,
// the target checks what a client relies on: the machine always wants bytes
// until it ends, and its output is the greeting followed by well-framed
// option replies (or the NBD_OPT_EXPORT_NAME reply), never more than a
// bounded amount per option.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "nbd/codec.h"
#include "nbd/handshake.h"

namespace layerd::nbd {
namespace {

// Aborts (a crash to libFuzzer) when an invariant does not hold.
void require(bool ok) {
  if (!ok) std::abort();
}

class FuzzHost final : public HandshakeHost {
 public:
  explicit FuzzHost(uint8_t config) {
    ExportInfo disk;
    disk.name = "disk";
    disk.description = (config & 1) ? "the main disk" : "";
    disk.size = (config & 2) ? uint64_t{1} << 40 : 0;
    disk.transmission_flags =
        (config & 4) ? uint16_t(kTransReadOnly | kTransSendFlush)
                     : uint16_t(kTransSendFlush | kTransSendFua |
                                kTransSendTrim | kTransSendWriteZeroes |
                                kTransSendFastZero | kTransSendDf |
                                kTransSendCache | kTransCanMultiConn);
    disk.min_block_size = (config & 8) ? 512 : 1;
    disk.preferred_block_size = (config & 8) ? 65536 : 4096;
    disk.max_block_size = (config & 8) ? 1u << 20 : kDefaultMaxPayload;
    exports_.push_back(disk);
    if (config & 16) {
      ExportInfo other;
      other.name = std::string(config & 32 ? 4096 : 3, 'x');
      other.size = 512;
      other.transmission_flags = kTransReadOnly;
      exports_.push_back(other);
    }
    contexts_ = {"base:allocation"};
    if (config & 64) {
      contexts_.push_back("qemu:allocation-depth");
      contexts_.push_back("qemu:dirty-bitmap:b0");
    }
    default_is_first_ = !(config & 128);
  }

  std::optional<ExportInfo> find_export(std::string_view name) override {
    if (name.empty() && default_is_first_) return exports_.front();
    for (const ExportInfo& e : exports_)
      if (e.name == name) return e;
    return std::nullopt;
  }
  std::vector<ExportInfo> list_exports() override { return exports_; }
  std::vector<std::string> meta_contexts(const ExportInfo&) override {
    return contexts_;
  }

 private:
  std::vector<ExportInfo> exports_;
  std::vector<std::string> contexts_;
  bool default_is_first_ = true;
};

constexpr size_t kGreetingSize = 18;  // NBDMAGIC, IHAVEOPT, handshake flags
constexpr size_t kReplyHeaderSize = 20;

// Checks one option's output: a sequence of option replies, each with the
// reply magic, the option's own number and a payload it frames exactly.
void check_option_replies(std::span<const std::byte> out, uint32_t option) {
  size_t pos = 0;
  while (pos < out.size()) {
    require(out.size() - pos >= kReplyHeaderSize);
    require(get_be64(&out[pos]) == kOptReplyMagic);
    require(get_be32(&out[pos + 8]) == option);
    const uint32_t length = get_be32(&out[pos + 16]);
    require(length <= kMaxOptionLength);
    require(out.size() - pos - kReplyHeaderSize >= length);
    pos += kReplyHeaderSize + length;
  }
}

}  // namespace
}  // namespace layerd::nbd

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace layerd::nbd;
  if (size == 0) return 0;
  FuzzHost host(data[0]);
  std::span<const std::byte> input(reinterpret_cast<const std::byte*>(data + 1),
                                   size - 1);
  Handshake hs(host);
  std::vector<std::byte> greeting = hs.take_output();
  require(greeting.size() == kGreetingSize);
  require(get_be64(greeting.data()) == kNbdMagic);

  // Mirrors the framing: after the client flags come option headers, each
  // followed by its payload (read whole or skipped in pieces).
  uint32_t last_option = 0;
  uint64_t payload_left = 0;
  size_t pos = 0;
  while (hs.phase() == Handshake::Phase::Greeting ||
         hs.phase() == Handshake::Phase::Options) {
    const size_t wanted = hs.bytes_wanted();
    require(wanted > 0);
    if (input.size() - pos < wanted) break;  // the client hung up
    if (hs.phase() == Handshake::Phase::Greeting) {
      require(wanted == 4);
    } else if (payload_left == 0) {
      require(wanted == 16);
      last_option = get_be32(&input[pos + 8]);
      payload_left = get_be32(&input[pos + 12]);
    } else {
      require(wanted <= payload_left && wanted <= kMaxOptionLength);
      payload_left -= wanted;
    }
    hs.consume(input.subspan(pos, wanted));
    pos += wanted;
    std::vector<std::byte> out = hs.take_output();
    if (hs.phase() == Handshake::Phase::Transmission &&
        last_option == uint32_t(Opt::ExportName)) {
      // size(8) flags(2), then 124 zero bytes unless NO_ZEROES.
      require(out.size() == 10 || out.size() == 134);
    } else {
      check_option_replies(out, last_option);
    }
  }

  if (hs.phase() == Handshake::Phase::Transmission) {
    const ExportInfo& e = hs.chosen_export();
    require(e.transmission_flags & kTransHasFlags);
    require(!(e.transmission_flags & kTransSendDf) || hs.structured_replies());
    const auto& contexts = hs.selected_contexts();
    for (size_t i = 0; i < contexts.size(); ++i) {
      require(contexts[i].id == i);
      require(!contexts[i].name.empty());
    }
  }
  if (hs.phase() == Handshake::Phase::Closed) require(!hs.close_reason().empty());
  return 0;
}
