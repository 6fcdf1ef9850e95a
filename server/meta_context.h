// The meta-context registry: which block-status contexts the server offers
// and how each turns a Layer's extents into NBD status flags. Adding a
// context (qemu:allocation-depth, later) is one entry here.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

#include "overlay/layer.h"

namespace layerd {

struct MetaContext {
  std::string_view name;
  // Status flags of one extent in this context.
  uint32_t (*flags_of)(const Extent& e);
};

inline constexpr std::string_view kAllocationDepthContext = "qemu:allocation-depth";

// Every context the server knows, in a fixed order.
std::span<const MetaContext> meta_contexts();

// The context called `name`, or nullptr.
const MetaContext* find_meta_context(std::string_view name);

}  // namespace layerd
