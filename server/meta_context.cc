#include "server/meta_context.h"

#include <array>

#include "nbd/protocol.h"

namespace layerd {
namespace {

uint32_t base_allocation(const Extent& e) {
  return (e.hole ? nbd::kStateHole : 0u) | (e.zero ? nbd::kStateZero : 0u);
}

// qemu:allocation-depth (docs/interop/nbd.txt in qemu): the depth of the
// image in the chain that provides the data, 1 for the top, 0 for none.
uint32_t allocation_depth(const Extent& e) { return e.depth; }

constexpr std::array kContexts{
    MetaContext{"base:allocation", &base_allocation},
    MetaContext{kAllocationDepthContext, &allocation_depth},
};

}  // namespace

std::span<const MetaContext> meta_contexts() { return kContexts; }

const MetaContext* find_meta_context(std::string_view name) {
  for (const auto& c : kContexts)
    if (c.name == name) return &c;
  return nullptr;
}

}  // namespace layerd
