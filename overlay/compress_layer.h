// qemu's compress filter (--image-opts driver=compress over qcow2): every
// write is stored as compressed clusters (qcow2::Image::write_compressed),
// so that, for example, `nbdcopy` into the export makes a compressed image.
//
// A write that covers only part of a cluster reads the whole cluster
// through `below` (so backing data and earlier writes are kept), merges the
// new bytes in and writes the cluster compressed; so do zero writes of part
// of a cluster. Zero writes of whole clusters and trims go to `below` as
// they are (zero clusters take no space). Reads, flush, cache and block
// status are `below`'s.
//
// Thread safety: every call may run on many threads. Requests that touch
// the same clusters (writes, zero writes, trims) wait for each other, so a
// merge never loses a concurrent write to the rest of its cluster.
#pragma once

#include <memory>

#include "overlay/layer.h"
#include "qcow2/image.h"

namespace layerd {

// `below` serves `top` (the top of its chain) and must be as large.
// Writes go to `top` directly, so the graph of `below` must not change
// while the layer is in use (live jobs are refused for such exports).
std::shared_ptr<Layer> make_compress_layer(std::shared_ptr<Layer> below,
                                           std::shared_ptr<qcow2::Image> top);

}  // namespace layerd
