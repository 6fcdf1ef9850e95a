// layerctl check: qemu-img check for qcow2 images, with its messages and
// exit codes (0 clean, 1 check failed, 2 corruptions, 3 leaks only, 63 the
// format cannot be checked). -r repairs, then checks the image again.
#include <cstdio>
#include <string>

#include <fmt/format.h>
#include <fmt/printf.h>

#include "server/layerctl/commands.h"
#include "server/layerctl/util.h"

namespace layerd::ctl {
namespace {

namespace json = boost::json;

constexpr const char* kCheckHelp =
    "usage: layerctl check [-q] [-f FMT] [-U] [-r leaks|all] [--output=human|json] FILENAME\n"
    "\n"
    "Checks the metadata of a qcow2 image: every cluster's refcount against\n"
    "the references to it. -r leaks frees leaked clusters; -r all also fixes\n"
    "refcounts that are too low. Exit codes: 0 no errors, 1 the check could\n"
    "not be completed, 2 corruptions found, 3 only leaked clusters found,\n"
    "63 the format does not support checks. An image another process writes\n"
    "is refused unless -U (--force-share, not with -r).\n";

struct Fragmentation {
  uint64_t fragmented = 0;
  uint64_t compressed = 0;
};

// What qemu-img check counts besides allocation, from the active L1 table:
// compressed clusters (each also counts as fragmented) and clusters whose
// host offset does not follow the previous one of the same L2 table.
Fragmentation fragmentation(qcow2::Image& image) {
  Fragmentation f;
  const uint64_t cs = image.cluster_size();
  const uint64_t l2_entries = cs / (image.info().extended_l2 ? 16 : 8);
  uint64_t next_contiguous = 0;
  uint64_t current_l2 = UINT64_MAX;
  uint64_t last_cluster = UINT64_MAX;  // counted already (subclusters)
  for (uint64_t offset = 0; offset < image.size();) {
    qcow2::MapExtent m;
    if (auto ec = image.block_status(offset, image.size() - offset, &m))
      fail(fmt::format("Check failed: {}", ec.message()));
    if (m.length == 0) fail("Check failed: block status returned no extent");
    const bool mapped = m.has_host_offset &&
                        (m.kind == qcow2::ExtentKind::Data ||
                         m.kind == qcow2::ExtentKind::Zero);
    if (mapped || (m.kind == qcow2::ExtentKind::Data && m.compressed)) {
      for (uint64_t p = offset; p < offset + m.length;) {
        const uint64_t cluster = p / cs;
        const uint64_t next_p = (cluster + 1) * cs;
        if (cluster != last_cluster) {
          last_cluster = cluster;
          if (cluster / l2_entries != current_l2) {
            current_l2 = cluster / l2_entries;
            next_contiguous = 0;
          }
          if (m.compressed) {
            ++f.compressed;
            ++f.fragmented;
          } else {
            uint64_t host = m.host_offset + (p - offset) - (p % cs);
            if (next_contiguous && host != next_contiguous) ++f.fragmented;
            next_contiguous = host + cs;
          }
        }
        p = next_p;
      }
    }
    offset += m.length;
  }
  return f;
}

struct Result {
  qcow2::CheckReport report;
  Fragmentation frag;
};

Result run_check(qcow2::Image& image, qcow2::Repair repair) {
  Result r;
  qcow2::Status st = image.check(repair, &r.report);
  for (const auto& line : r.report.messages) fmt::print(stderr, "{}\n", line);
  if (!st.ok()) {
    std::fflush(stdout);
    fail(fmt::format("Check failed: {}", st.message()));
  }
  r.frag = fragmentation(image);
  return r;
}

void print_human(const Result& r) {
  const auto& c = r.report;
  if (c.corruptions == 0 && c.leaks == 0 && c.check_errors == 0) {
    fmt::print("No errors were found on the image.\n");
  } else {
    if (c.corruptions)
      fmt::print("\n{} errors were found on the image.\nData may be corrupted, "
                 "or further writes to the image may corrupt it.\n",
                 c.corruptions);
    if (c.leaks)
      fmt::print("\n{} leaked clusters were found on the image.\nThis means "
                 "waste of disk space, but no harm to data.\n",
                 c.leaks);
    if (c.check_errors)
      fmt::print("\n{} internal errors have occurred during the check.\n",
                 c.check_errors);
  }
  if (c.total_clusters != 0 && c.allocated_clusters != 0) {
    const double a = static_cast<double>(c.allocated_clusters);
    fmt::print("{}", fmt::sprintf("%llu/%llu = %0.2f%% allocated, %0.2f%% fragmented, "
                                  "%0.2f%% compressed clusters\n",
                                  static_cast<unsigned long long>(c.allocated_clusters),
                                  static_cast<unsigned long long>(c.total_clusters),
                                  a * 100.0 / static_cast<double>(c.total_clusters),
                                  static_cast<double>(r.frag.fragmented) * 100.0 / a,
                                  static_cast<double>(r.frag.compressed) * 100.0 / a));
  }
  if (c.image_end_offset) fmt::print("Image end offset: {}\n", c.image_end_offset);
}

void print_json(const Result& r, uint64_t leaks_fixed, uint64_t corruptions_fixed,
                const std::string& filename) {
  const auto& c = r.report;
  json::object o;
  // Keys in the order qemu-img 7.2 prints them.
  if (c.image_end_offset) o["image-end-offset"] = c.image_end_offset;
  if (r.frag.compressed) o["compressed-clusters"] = r.frag.compressed;
  if (c.total_clusters) o["total-clusters"] = c.total_clusters;
  if (c.corruptions) o["corruptions"] = c.corruptions;
  if (corruptions_fixed) o["corruptions-fixed"] = corruptions_fixed;
  o["check-errors"] = c.check_errors;
  if (c.leaks) o["leaks"] = c.leaks;
  if (leaks_fixed) o["leaks-fixed"] = leaks_fixed;
  if (c.allocated_clusters) o["allocated-clusters"] = c.allocated_clusters;
  o["filename"] = filename;
  o["format"] = "qcow2";
  if (r.frag.fragmented) o["fragmented-clusters"] = r.frag.fragmented;
  fmt::print("{}\n", pretty_json(o));
}

}  // namespace

int cmd_check(int argc, char** argv) {
  static const option kLong[] = {{"help", no_argument, nullptr, 'h'},
                                 {"format", required_argument, nullptr, 'f'},
                                 {"force-share", no_argument, nullptr, 'U'},
                                 {"repair", required_argument, nullptr, 'r'},
                                 {"output", required_argument, nullptr, 'O'},
                                 {nullptr, 0, nullptr, 0}};
  std::string format;
  bool as_json = false;
  bool quiet = false;
  qcow2::Repair repair = qcow2::Repair::None;
  bool force_share = false;
  reset_getopt();
  for (int c; (c = getopt_long(argc, argv, ":hUf:r:q", kLong, nullptr)) != -1;) {
    switch (c) {
      case 'h': std::fputs(kCheckHelp, stdout); return 0;
      case 'f': format = optarg; break;
      case 'U': force_share = true; break;
      case 'O': as_json = parse_output_format(optarg); break;
      case 'q': quiet = true; break;
      case 'r':
        if (std::string(optarg) == "leaks") repair = qcow2::Repair::Leaks;
        else if (std::string(optarg) == "all") repair = qcow2::Repair::All;
        else usage_error(fmt::format("Unknown option value for -r (expecting "
                                     "'leaks' or 'all'): {}", optarg));
        break;
      default: bad_option(c, optarg, argv);
    }
  }
  if (optind != argc - 1) usage_error("Expecting one image file name");
  std::string path = argv[optind];
  ImageFormat f = format.empty() ? probe_format(path) : parse_format_arg(format, "");
  if (f != ImageFormat::Qcow2)
    throw CommandError(63, "This image format does not support checks");

  OpenedImage img = open_image(path, f, OpenFlags{.writable = repair != qcow2::Repair::None,
                                                  .repair_dirty_on_open = false,
                                                  .force_share = force_share});
  Result r = run_check(*img.image, repair);
  const uint64_t leaks_fixed = r.report.leaks_fixed;
  const uint64_t corruptions_fixed = r.report.corruptions_fixed;
  if (leaks_fixed || corruptions_fixed) {
    if (!as_json && !quiet)
      fmt::print("The following inconsistencies were found and repaired:\n\n"
                 "    {} leaked clusters\n    {} corruptions\n\n"
                 "Double checking the fixed image now...\n",
                 leaks_fixed, corruptions_fixed);
    if (auto ec = img.image->flush())
      fail(fmt::format("Check failed: {}", ec.message()));
    r = run_check(*img.image, qcow2::Repair::None);
  }
  if (!quiet) {
    if (as_json) print_json(r, leaks_fixed, corruptions_fixed, path);
    else print_human(r);
  }
  std::fflush(stdout);
  if (r.report.check_errors) fail("Check failed");
  if (r.report.corruptions) return 2;
  if (r.report.leaks) return 3;
  return 0;
}

}  // namespace layerd::ctl
