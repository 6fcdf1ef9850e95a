// Every handshake option and every command, through libnbd, against a
// default export: -f raw -t -x disk -D "test disk" on a 4 MiB pattern image.

#include <libnbd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "tests/server/harness.h"

namespace layerd::test {
namespace {

class Options : public ServerTest {};

// --- Handshake -----------------------------------------------------------------

TEST_F(Options, StructuredRepliesAreNegotiatedByDefault) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect();
  ASSERT_TRUE(h);
  EXPECT_STREQ(nbd_get_protocol(h.get()), "newstyle-fixed");
  EXPECT_EQ(nbd_get_structured_replies_negotiated(h.get()), 1);
  EXPECT_EQ(nbd_get_size(h.get()), static_cast<int64_t>(kImageSize));
}

TEST_F(Options, ReadAndWriteWorkWithoutStructuredReplies) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect([](nbd_handle* hh) { nbd_set_request_structured_replies(hh, false); });
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_get_structured_replies_negotiated(h.get()), 0);
  std::vector<uint8_t> buf(256 * 1024);
  ASSERT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), 4096, 0), 0) << nbd_error_text();
  EXPECT_EQ(first_difference(buf, pattern(4096, buf.size(), kSeed)), -1);
  auto data = pattern(0, 100000, 77);
  ASSERT_EQ(nbd_pwrite(h.get(), data.data(), data.size(), 1000001, 0), 0) << nbd_error_text();
  std::vector<uint8_t> back(data.size());
  ASSERT_EQ(nbd_pread(h.get(), back.data(), back.size(), 1000001, 0), 0) << nbd_error_text();
  EXPECT_EQ(first_difference(back, data), -1);
}

struct ListedExport {
  std::string name;
  std::string description;
};

int collect_export(void* user_data, const char* name, const char* description) {
  static_cast<std::vector<ListedExport>*>(user_data)->push_back({name, description});
  return 0;
}

TEST_F(Options, ListExportsShowsNameAndDescription) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = nbd_connect_to_unix(socket_path(), [](nbd_handle* hh) { nbd_set_opt_mode(hh, true); });
  ASSERT_TRUE(h);
  std::vector<ListedExport> exports;
  nbd_list_callback cb{.callback = collect_export, .user_data = &exports, .free = nullptr};
  ASSERT_EQ(nbd_opt_list(h.get(), cb), 1) << nbd_error_text();
  ASSERT_EQ(exports.size(), 1u);
  EXPECT_EQ(exports[0].name, kExportName);
  EXPECT_EQ(exports[0].description, kDescription);
  nbd_opt_abort(h.get());
}

TEST_F(Options, ListExportsShowsDefaultEmptyName) {
  ASSERT_NO_FATAL_FAILURE(StartServer({"-f", "raw", "-t"}));
  Nbd h = nbd_connect_to_unix(socket_path(), [](nbd_handle* hh) { nbd_set_opt_mode(hh, true); });
  ASSERT_TRUE(h);
  std::vector<ListedExport> exports;
  nbd_list_callback cb{.callback = collect_export, .user_data = &exports, .free = nullptr};
  ASSERT_EQ(nbd_opt_list(h.get(), cb), 1) << nbd_error_text();
  ASSERT_EQ(exports.size(), 1u);
  EXPECT_EQ(exports[0].name, "");
  EXPECT_EQ(exports[0].description, "");
  // The default export is reachable under the empty name.
  ASSERT_EQ(nbd_set_export_name(h.get(), ""), 0);
  ASSERT_EQ(nbd_opt_go(h.get()), 0) << nbd_error_text();
  EXPECT_EQ(nbd_get_size(h.get()), static_cast<int64_t>(kImageSize));
}

TEST_F(Options, OptInfoReportsSizeFlagsAndBlockSizes) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect([](nbd_handle* hh) { nbd_set_opt_mode(hh, true); });
  ASSERT_TRUE(h);
  ASSERT_EQ(nbd_opt_info(h.get()), 0) << nbd_error_text();
  EXPECT_EQ(nbd_get_size(h.get()), static_cast<int64_t>(kImageSize));
  EXPECT_EQ(nbd_is_read_only(h.get()), 0);
  EXPECT_EQ(nbd_can_flush(h.get()), 1);
  EXPECT_EQ(nbd_can_fua(h.get()), 1);
  EXPECT_EQ(nbd_can_cache(h.get()), 1);
  EXPECT_EQ(nbd_can_trim(h.get()), 1);
  EXPECT_EQ(nbd_can_zero(h.get()), 1);
  EXPECT_EQ(nbd_can_fast_zero(h.get()), 1);
  EXPECT_EQ(nbd_can_df(h.get()), 1);
  EXPECT_EQ(nbd_get_block_size(h.get(), LIBNBD_SIZE_MINIMUM), 1);
  EXPECT_EQ(nbd_get_block_size(h.get(), LIBNBD_SIZE_PREFERRED), 4096);
  EXPECT_EQ(nbd_get_block_size(h.get(), LIBNBD_SIZE_MAXIMUM), 32 << 20);
  // INFO does not end the handshake: GO still works afterwards.
  ASSERT_EQ(nbd_opt_go(h.get()), 0) << nbd_error_text();
  EXPECT_EQ(nbd_aio_is_ready(h.get()), 1);
}

TEST_F(Options, FullInfoReturnsCanonicalNameAndDescription) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect([](nbd_handle* hh) {
    nbd_set_opt_mode(hh, true);
    nbd_set_full_info(hh, true);
  });
  ASSERT_TRUE(h);
  ASSERT_EQ(nbd_opt_info(h.get()), 0) << nbd_error_text();
  char* name = nbd_get_canonical_export_name(h.get());
  ASSERT_NE(name, nullptr) << nbd_error_text();
  EXPECT_STREQ(name, kExportName);
  free(name);
  char* desc = nbd_get_export_description(h.get());
  ASSERT_NE(desc, nullptr) << nbd_error_text();
  EXPECT_STREQ(desc, kDescription);
  free(desc);
}

TEST_F(Options, UnknownExportNameIsRefusedAndServerKeepsServing) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd bad = nbd_try_connect_unix(socket_path(), [](nbd_handle* hh) {
    nbd_set_export_name(hh, "no-such-export");
  });
  EXPECT_FALSE(bad) << "connecting to an unknown export succeeded";
  bad.reset();
  Nbd good = Connect();
  ASSERT_TRUE(good);
  EXPECT_EQ(nbd_get_size(good.get()), static_cast<int64_t>(kImageSize));
}

TEST_F(Options, OptInfoForUnknownExportFailsButOptionPhaseContinues) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = nbd_connect_to_unix(socket_path(), [](nbd_handle* hh) {
    nbd_set_opt_mode(hh, true);
    nbd_set_export_name(hh, "no-such-export");
  });
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_opt_info(h.get()), -1);
  EXPECT_EQ(nbd_aio_is_negotiating(h.get()), 1) << nbd_connection_state(h.get());
  ASSERT_EQ(nbd_set_export_name(h.get(), kExportName), 0);
  ASSERT_EQ(nbd_opt_go(h.get()), 0) << nbd_error_text();
  EXPECT_EQ(nbd_get_size(h.get()), static_cast<int64_t>(kImageSize));
}

TEST_F(Options, MultiConnIsNotAdvertisedWithSharedOne) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer({"-e", "1"}));
  Nbd h = Connect();
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_can_multi_conn(h.get()), 0);
}

TEST_F(Options, MultiConnIsAdvertisedWithSharedUnlimited) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer({"-e", "0"}));
  Nbd h = Connect();
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_can_multi_conn(h.get()), 1);
}

TEST_F(Options, MultiConnIsAdvertisedWithSharedFour) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer({"-e", "4"}));
  Nbd h = Connect();
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_can_multi_conn(h.get()), 1);
}

TEST_F(Options, ReadOnlyExportAdvertisesReadOnlyAndNoWriteCommands) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer({"-r"}));
  Nbd h = Connect();
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_is_read_only(h.get()), 1);
  EXPECT_EQ(nbd_can_trim(h.get()), 0);
  EXPECT_EQ(nbd_can_zero(h.get()), 0);
  EXPECT_EQ(nbd_can_fast_zero(h.get()), 0);
  EXPECT_EQ(nbd_can_flush(h.get()), 1);
  EXPECT_EQ(nbd_can_fua(h.get()), 1);
  EXPECT_EQ(nbd_can_cache(h.get()), 1);
  EXPECT_EQ(nbd_can_df(h.get()), 1);
  std::vector<uint8_t> buf(65536);
  ASSERT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), 0, 0), 0) << nbd_error_text();
  EXPECT_EQ(first_difference(buf, pattern(0, buf.size(), kSeed)), -1);
}

// --- Meta contexts -----------------------------------------------------------

int collect_context(void* user_data, const char* name) {
  static_cast<std::vector<std::string>*>(user_data)->push_back(name);
  return 0;
}

TEST_F(Options, ListMetaContextsOffersBaseAllocation) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect([](nbd_handle* hh) { nbd_set_opt_mode(hh, true); });
  ASSERT_TRUE(h);
  std::vector<std::string> contexts;
  nbd_context_callback cb{.callback = collect_context, .user_data = &contexts, .free = nullptr};
  int n = nbd_opt_list_meta_context(h.get(), cb);
  ASSERT_GE(n, 1) << nbd_error_text();
  EXPECT_EQ(static_cast<size_t>(n), contexts.size());
  EXPECT_NE(std::find(contexts.begin(), contexts.end(), "base:allocation"), contexts.end());
}

TEST_F(Options, ListMetaContextsWithNamespaceQueryReturnsBaseAllocation) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect([](nbd_handle* hh) {
    nbd_set_opt_mode(hh, true);
    nbd_add_meta_context(hh, "base:");
  });
  ASSERT_TRUE(h);
  std::vector<std::string> contexts;
  nbd_context_callback cb{.callback = collect_context, .user_data = &contexts, .free = nullptr};
  ASSERT_EQ(nbd_opt_list_meta_context(h.get(), cb), 1) << nbd_error_text();
  ASSERT_EQ(contexts.size(), 1u);
  EXPECT_EQ(contexts[0], "base:allocation");
}

TEST_F(Options, ListMetaContextsForUnknownNamespaceIsEmpty) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect([](nbd_handle* hh) {
    nbd_set_opt_mode(hh, true);
    nbd_add_meta_context(hh, "no-such-namespace:thing");
  });
  ASSERT_TRUE(h);
  std::vector<std::string> contexts;
  nbd_context_callback cb{.callback = collect_context, .user_data = &contexts, .free = nullptr};
  EXPECT_EQ(nbd_opt_list_meta_context(h.get(), cb), 0) << nbd_error_text();
  EXPECT_TRUE(contexts.empty());
}

TEST_F(Options, SetMetaContextBaseAllocationIsNegotiated) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect([](nbd_handle* hh) {
    nbd_add_meta_context(hh, "no-such-namespace:thing");
    nbd_add_meta_context(hh, LIBNBD_CONTEXT_BASE_ALLOCATION);
  });
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_can_meta_context(h.get(), LIBNBD_CONTEXT_BASE_ALLOCATION), 1);
  EXPECT_EQ(nbd_can_meta_context(h.get(), "no-such-namespace:thing"), 0);
}

TEST_F(Options, MetaContextIsNotNegotiatedWithoutStructuredReplies) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect([](nbd_handle* hh) {
    nbd_set_request_structured_replies(hh, false);
    nbd_add_meta_context(hh, LIBNBD_CONTEXT_BASE_ALLOCATION);
  });
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_can_meta_context(h.get(), LIBNBD_CONTEXT_BASE_ALLOCATION), 0);
}

// --- Data commands -------------------------------------------------------------

TEST_F(Options, ReadReturnsImageContents) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect();
  ASSERT_TRUE(h);
  std::vector<uint8_t> buf(kImageSize);
  ASSERT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), 0, 0), 0) << nbd_error_text();
  EXPECT_EQ(first_difference(buf, pattern(0, kImageSize, kSeed)), -1);
  // An unaligned read in the middle and one ending exactly at the end.
  std::vector<uint8_t> small(12345);
  ASSERT_EQ(nbd_pread(h.get(), small.data(), small.size(), 777777, 0), 0);
  EXPECT_EQ(first_difference(small, pattern(777777, small.size(), kSeed)), -1);
  ASSERT_EQ(nbd_pread(h.get(), small.data(), small.size(), kImageSize - small.size(), 0), 0);
  EXPECT_EQ(first_difference(small, pattern(kImageSize - small.size(), small.size(), kSeed)), -1);
}

TEST_F(Options, WrittenDataReadsBackAndReachesTheFileAfterFlush) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect();
  ASSERT_TRUE(h);
  const std::vector<std::pair<uint64_t, size_t>> writes = {
      {0, 4096}, {12345, 70000}, {1 << 20, 1 << 20}, {kImageSize - 1, 1}};
  for (auto [off, len] : writes) {
    auto data = pattern(off, len, 2);
    ASSERT_EQ(nbd_pwrite(h.get(), data.data(), len, off, 0), 0)
        << "write at " << off << ": " << nbd_error_text();
  }
  for (auto [off, len] : writes) {
    std::vector<uint8_t> back(len);
    ASSERT_EQ(nbd_pread(h.get(), back.data(), len, off, 0), 0) << nbd_error_text();
    EXPECT_EQ(first_difference(back, pattern(off, len, 2)), -1) << "at " << off;
  }
  ASSERT_EQ(nbd_flush(h.get(), 0), 0) << nbd_error_text();
  for (auto [off, len] : writes)
    EXPECT_EQ(first_difference(read_file_range(image_path(), off, len), pattern(off, len, 2)), -1)
        << "file at " << off;
  // Bytes between the writes are untouched.
  EXPECT_EQ(first_difference(read_file_range(image_path(), 4096, 8249), pattern(4096, 8249, kSeed)), -1);
}

TEST_F(Options, MaximumSizeWriteAndReadRoundTrip) {
  const uint64_t size = 40 << 20;
  create_pattern_image(image_path(), size, kSeed);
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect();
  ASSERT_TRUE(h);
  const uint64_t off = (4 << 20) + 1;  // unaligned
  auto data = pattern(off, 32 << 20, 12);
  ASSERT_EQ(nbd_pwrite(h.get(), data.data(), data.size(), off, 0), 0) << nbd_error_text();
  std::vector<uint8_t> back(data.size());
  ASSERT_EQ(nbd_pread(h.get(), back.data(), back.size(), off, 0), 0) << nbd_error_text();
  EXPECT_EQ(first_difference(back, data), -1);
  ASSERT_EQ(nbd_flush(h.get(), 0), 0) << nbd_error_text();
  EXPECT_EQ(first_difference(read_file_range(image_path(), off, data.size()), data), -1);
  EXPECT_EQ(first_difference(read_file_range(image_path(), 0, off), pattern(0, off, kSeed)), -1);
}

TEST_F(Options, FuaWriteIsInTheFileWhenAcknowledged) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect();
  ASSERT_TRUE(h);
  ASSERT_EQ(nbd_can_fua(h.get()), 1);
  auto data = pattern(65536, 131072, 3);
  ASSERT_EQ(nbd_pwrite(h.get(), data.data(), data.size(), 65536, LIBNBD_CMD_FLAG_FUA), 0)
      << nbd_error_text();
  EXPECT_EQ(first_difference(read_file_range(image_path(), 65536, data.size()), data), -1);
}

TEST_F(Options, FlushSucceeds) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect();
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_flush(h.get(), 0), 0) << nbd_error_text();
}

TEST_F(Options, CacheSucceedsAndLeavesDataUnchanged) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect();
  ASSERT_TRUE(h);
  ASSERT_EQ(nbd_can_cache(h.get()), 1);
  EXPECT_EQ(nbd_cache(h.get(), 1 << 20, 4096, 0), 0) << nbd_error_text();
  std::vector<uint8_t> buf(1 << 20);
  ASSERT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), 4096, 0), 0);
  EXPECT_EQ(first_difference(buf, pattern(4096, buf.size(), kSeed)), -1);
}

TEST_F(Options, WriteZeroesReadsBackZerosAndKeepsNeighbours) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect();
  ASSERT_TRUE(h);
  const uint64_t off = 100000, len = 300000;  // unaligned on both ends
  ASSERT_EQ(nbd_zero(h.get(), len, off, 0), 0) << nbd_error_text();
  std::vector<uint8_t> buf(len + 2000);
  ASSERT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), off - 1000, 0), 0);
  std::span<const uint8_t> all(buf);
  EXPECT_EQ(first_difference(all.subspan(0, 1000), pattern(off - 1000, 1000, kSeed)), -1);
  EXPECT_TRUE(all_zero(all.subspan(1000, len)));
  EXPECT_EQ(first_difference(all.subspan(1000 + len), pattern(off + len, 1000, kSeed)), -1);
  ASSERT_EQ(nbd_flush(h.get(), 0), 0);
  EXPECT_TRUE(all_zero(read_file_range(image_path(), off, len)));
}

TEST_F(Options, WriteZeroesWithNoHoleReadsZerosAndKeepsTheFileAllocated) {
  // With --discard=unmap a plain zero may punch holes; NO_HOLE must not.
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer({"--discard=unmap"}));
  Nbd h = Connect();
  ASSERT_TRUE(h);
  const uint64_t before = allocated_bytes(image_path());
  ASSERT_EQ(nbd_zero(h.get(), 1 << 20, 1 << 20, LIBNBD_CMD_FLAG_NO_HOLE), 0) << nbd_error_text();
  ASSERT_EQ(nbd_flush(h.get(), 0), 0) << nbd_error_text();
  std::vector<uint8_t> buf(1 << 20);
  ASSERT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), 1 << 20, 0), 0);
  EXPECT_TRUE(all_zero(buf));
  // (SEEK_HOLE may call fallocated-but-unwritten ranges holes, so block
  // status is no witness here; the file's allocation is.)
  EXPECT_GE(allocated_bytes(image_path()), before) << "NO_HOLE zero punched a hole";
  EXPECT_TRUE(all_zero(read_file_range(image_path(), 1 << 20, 1 << 20)));
}

TEST_F(Options, FastZeroEitherZeroesOrFailsWithEnotsup) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect();
  ASSERT_TRUE(h);
  ASSERT_EQ(nbd_can_fast_zero(h.get()), 1);
  int r = nbd_zero(h.get(), 1 << 20, 2 << 20, LIBNBD_CMD_FLAG_FAST_ZERO);
  std::vector<uint8_t> buf(1 << 20);
  ASSERT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), 2 << 20, 0), 0) << nbd_error_text();
  if (r == 0) {
    EXPECT_TRUE(all_zero(buf));
  } else {
    EXPECT_EQ(nbd_get_errno(), ENOTSUP) << nbd_error_text();
    // A refused fast zero must not have changed anything.
    EXPECT_EQ(first_difference(buf, pattern(2 << 20, buf.size(), kSeed)), -1);
  }
}

TEST_F(Options, TrimWithDiscardIgnoreSucceedsAndKeepsData) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer({"--discard=ignore"}));
  Nbd h = Connect();
  ASSERT_TRUE(h);
  ASSERT_EQ(nbd_can_trim(h.get()), 1);
  ASSERT_EQ(nbd_trim(h.get(), 1 << 20, 1 << 20, 0), 0) << nbd_error_text();
  std::vector<uint8_t> buf(1 << 20);
  ASSERT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), 1 << 20, 0), 0);
  EXPECT_EQ(first_difference(buf, pattern(1 << 20, buf.size(), kSeed)), -1);
}

TEST_F(Options, TrimWithDiscardUnmapPunchesAHole) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer({"--discard=unmap"}));
  Nbd h = Connect([](nbd_handle* hh) { nbd_add_meta_context(hh, LIBNBD_CONTEXT_BASE_ALLOCATION); });
  ASSERT_TRUE(h);
  const uint64_t before = allocated_bytes(image_path());
  ASSERT_EQ(nbd_trim(h.get(), 1 << 20, 1 << 20, 0), 0) << nbd_error_text();
  ASSERT_EQ(nbd_flush(h.get(), 0), 0) << nbd_error_text();
  std::vector<uint8_t> buf(1 << 20);
  ASSERT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), 1 << 20, 0), 0);
  EXPECT_TRUE(all_zero(buf)) << "a punched hole reads back as zeros";
  EXPECT_LE(allocated_bytes(image_path()), before - (1 << 20))
      << "the file did not shrink on disk";
  auto map = block_status_map(h.get(), 0, kImageSize);
  ASSERT_TRUE(map);
  std::vector<Extent> want = {{0, 1 << 20, 0},
                              {1 << 20, 1 << 20, LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO},
                              {2 << 20, 2 << 20, 0}};
  EXPECT_EQ(*map, want) << to_string(*map);
  // The rest of the data is untouched.
  ASSERT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), 2 << 20, 0), 0);
  EXPECT_EQ(first_difference(buf, pattern(2 << 20, buf.size(), kSeed)), -1);
}

TEST_F(Options, DetectZeroesUnmapTurnsZeroWritesIntoHoles) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer({"--discard=unmap", "--detect-zeroes=unmap"}));
  Nbd h = Connect([](nbd_handle* hh) { nbd_add_meta_context(hh, LIBNBD_CONTEXT_BASE_ALLOCATION); });
  ASSERT_TRUE(h);
  const uint64_t before = allocated_bytes(image_path());
  std::vector<uint8_t> zeros(1 << 20, 0);
  ASSERT_EQ(nbd_pwrite(h.get(), zeros.data(), zeros.size(), 1 << 20, 0), 0) << nbd_error_text();
  ASSERT_EQ(nbd_flush(h.get(), 0), 0) << nbd_error_text();
  std::vector<uint8_t> buf(1 << 20, 0xee);
  ASSERT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), 1 << 20, 0), 0);
  EXPECT_TRUE(all_zero(buf));
  EXPECT_LE(allocated_bytes(image_path()), before - (1 << 20))
      << "a write of zeros with --detect-zeroes=unmap left the range allocated";
  auto map = block_status_map(h.get(), 1 << 20, 1 << 20);
  ASSERT_TRUE(map);
  EXPECT_EQ(*map, (std::vector<Extent>{{1 << 20, 1 << 20, LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO}}))
      << to_string(*map);
}

TEST_F(Options, DetectZeroesOnStoresZeroWritesAsZeros) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer({"--detect-zeroes=on"}));
  Nbd h = Connect();
  ASSERT_TRUE(h);
  std::vector<uint8_t> zeros(256 << 10, 0);
  ASSERT_EQ(nbd_pwrite(h.get(), zeros.data(), zeros.size(), 65536, 0), 0) << nbd_error_text();
  ASSERT_EQ(nbd_flush(h.get(), 0), 0) << nbd_error_text();
  EXPECT_TRUE(all_zero(read_file_range(image_path(), 65536, zeros.size())));
  // Non-zero data next to it is written normally.
  auto data = pattern(65536 + zeros.size(), 4096, 8);
  ASSERT_EQ(nbd_pwrite(h.get(), data.data(), data.size(), 65536 + zeros.size(), 0), 0);
  std::vector<uint8_t> back(data.size());
  ASSERT_EQ(nbd_pread(h.get(), back.data(), back.size(), 65536 + zeros.size(), 0), 0);
  EXPECT_EQ(first_difference(back, data), -1);
}

class OddSizedImage : public ServerTest {
 protected:
  static constexpr uint64_t kOddSize = 1000001;  // not a multiple of 512
  void SetUp() override { create_pattern_image(image_path(), kOddSize, kSeed); }
};

TEST_F(OddSizedImage, LastByteIsReadableAndWritableAndTheFileKeepsItsSize) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect([](nbd_handle* hh) { nbd_set_strict_mode(hh, 0); });
  ASSERT_TRUE(h);
  // Exact (byte-granular) size, or rounded up to 512 as qemu-nbd does.
  const int64_t size = nbd_get_size(h.get());
  EXPECT_TRUE(size == static_cast<int64_t>(kOddSize) || size == (kOddSize + 511) / 512 * 512)
      << "size " << size;
  std::vector<uint8_t> tail(4097);
  ASSERT_EQ(nbd_pread(h.get(), tail.data(), tail.size(), kOddSize - tail.size(), 0), 0)
      << nbd_error_text();
  EXPECT_EQ(first_difference(tail, pattern(kOddSize - tail.size(), tail.size(), kSeed)), -1);
  const uint8_t b = 0x77;
  ASSERT_EQ(nbd_pwrite(h.get(), &b, 1, kOddSize - 1, 0), 0) << nbd_error_text();
  uint8_t back = 0;
  ASSERT_EQ(nbd_pread(h.get(), &back, 1, kOddSize - 1, 0), 0) << nbd_error_text();
  EXPECT_EQ(back, 0x77);
  if (size > static_cast<int64_t>(kOddSize)) {
    std::vector<uint8_t> pad(size - kOddSize, 0xee);
    ASSERT_EQ(nbd_pread(h.get(), pad.data(), pad.size(), kOddSize, 0), 0) << nbd_error_text();
    EXPECT_TRUE(all_zero(pad)) << "the padding after the end of the file reads as zeros";
  }
  EXPECT_EQ(nbd_pread(h.get(), tail.data(), 2, size - 1, 0), -1) << "read past the end";
  ASSERT_EQ(nbd_flush(h.get(), 0), 0);
  EXPECT_EQ(fs::file_size(image_path()), kOddSize) << "the file was resized";
}

TEST_F(OddSizedImage, SizeIsExactWhereQemuNbdRoundsUp) {
  // qemu's block layer counts in 512-byte sectors: qemu-nbd 7.2 serves a
  // file of 1000001 bytes as 1000448 (qemu-iotests 241 expects that).
  // layerd serves the file's exact size: a client never sees bytes the
  // file does not have (docs/compatibility.md).
  SKIP_UNLESS_LAYERD();
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect([](nbd_handle* hh) { nbd_add_meta_context(hh, LIBNBD_CONTEXT_BASE_ALLOCATION); });
  ASSERT_TRUE(h);
  ASSERT_EQ(nbd_get_size(h.get()), static_cast<int64_t>(kOddSize));
  auto map = block_status_map(h.get(), kOddSize - 1, 1);
  ASSERT_TRUE(map);
  EXPECT_EQ((*map)[0].flags, 0u) << "the last byte of the file is data";
}

// Without -f a raw image is served as raw after a look at its first bytes;
// as qemu-nbd, layerd then refuses writes that would make those bytes an
// image header (the next probe would open it as, say, qcow2 with a backing
// file the client chose), and asks for whole sectors.
class ProbedRawImage : public ServerTest {
 protected:
  void StartProbed(std::vector<std::string> extra = {}) {
    extra.insert(extra.end(), {"-t", "-x", kExportName});
    StartServer(std::move(extra));
  }
  static std::vector<uint8_t> qcow2_header() {
    std::vector<uint8_t> b(512, 0);
    const uint8_t magic[] = {'Q', 'F', 'I', 0xfb, 0, 0, 0, 3};
    std::memcpy(b.data(), magic, sizeof magic);
    return b;
  }
};

TEST_F(ProbedRawImage, WarnsInQemuNbdsWords) {
  ASSERT_NO_FATAL_FAILURE(StartProbed());
  ASSERT_TRUE(wait_until([&] { return server_.log().find("restrictions") != std::string::npos; }, 5s))
      << server_.log();
  const std::string expected =
      "WARNING: Image format was not specified for '" + image_path().string() +
      "' and probing guessed raw.\n"
      "         Automatically detecting the format is dangerous for raw images, "
      "write operations on block 0 will be restricted.\n"
      "         Specify the 'raw' format explicitly to remove the restrictions.\n";
  EXPECT_EQ(server_.log(), expected);
}

TEST_F(ProbedRawImage, WritingAnImageHeaderIntoBlockZeroIsRefused) {
  ASSERT_NO_FATAL_FAILURE(StartProbed());
  Nbd h = Connect();
  ASSERT_TRUE(h);
  const auto before = read_file_range(image_path(), 0, 512);
  auto header = qcow2_header();
  EXPECT_EQ(nbd_pwrite(h.get(), header.data(), header.size(), 0, 0), -1);
  EXPECT_EQ(nbd_get_errno(), EPERM) << nbd_error_text();
  // A longer write that starts with a header is refused as a whole.
  std::vector<uint8_t> big(64 * 1024, 0x5a);
  std::memcpy(big.data(), header.data(), 8);
  EXPECT_EQ(nbd_pwrite(h.get(), big.data(), big.size(), 0, 0), -1);
  EXPECT_EQ(nbd_get_errno(), EPERM) << nbd_error_text();
  EXPECT_EQ(read_file_range(image_path(), 0, 512), before);
  // Other data in block 0, and a header anywhere else, are fine.
  auto data = pattern(0, 4096, 9);
  ASSERT_EQ(nbd_pwrite(h.get(), data.data(), data.size(), 0, 0), 0) << nbd_error_text();
  ASSERT_EQ(nbd_pwrite(h.get(), header.data(), header.size(), 512, 0), 0) << nbd_error_text();
  ASSERT_EQ(nbd_flush(h.get(), 0), 0);
  EXPECT_EQ(read_file_range(image_path(), 0, 512), pattern(0, 512, 9));
  EXPECT_EQ(read_file_range(image_path(), 512, 512), header);
}

TEST_F(ProbedRawImage, AHeaderAssembledFromUnalignedWritesIsRefused) {
  ASSERT_NO_FATAL_FAILURE(StartProbed());
  // A client that does not ask for block sizes may write single bytes.
  Nbd h = Connect([](nbd_handle* hh) { nbd_set_request_block_size(hh, false); });
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_get_block_size(h.get(), LIBNBD_SIZE_MINIMUM), 1);
  const uint8_t qf[] = {'Q', 'F'};
  const uint8_t ifb[] = {'I', 0xfb};
  ASSERT_EQ(nbd_pwrite(h.get(), qf, 2, 0, 0), 0) << nbd_error_text();
  EXPECT_EQ(nbd_pwrite(h.get(), ifb, 2, 2, 0), -1) << "completes QFI\\xfb";
  EXPECT_EQ(nbd_get_errno(), EPERM) << nbd_error_text();
  const uint8_t other[] = {'X', 'Y'};
  EXPECT_EQ(nbd_pwrite(h.get(), other, 2, 2, 0), 0) << nbd_error_text();
}

TEST_F(ProbedRawImage, MinimumBlockSizeIs512ForClientsThatAsk) {
  ASSERT_NO_FATAL_FAILURE(StartProbed());
  Nbd h = Connect();
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_get_block_size(h.get(), LIBNBD_SIZE_MINIMUM), 512);
}

// As qemu-nbd (libnbd's interop/interop-qemu-block-size.sh): NBD_OPT_INFO
// from a client that does not ask for block sizes is refused with
// NBD_REP_ERR_BLOCK_SIZE_REQD when the minimum is above 1, while GO admits
// it with a minimum of 1.
TEST_F(ProbedRawImage, InfoWithoutBlockSizeRequestIsRefusedAndGoAdmitsIt) {
  ASSERT_NO_FATAL_FAILURE(StartProbed());
  Nbd h = Connect([](nbd_handle* hh) {
    nbd_set_opt_mode(hh, true);
    nbd_set_request_block_size(hh, false);
  });
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_opt_info(h.get()), -1) << "INFO answered without a block size request";
  EXPECT_EQ(nbd_aio_is_negotiating(h.get()), 1) << nbd_connection_state(h.get());
  ASSERT_EQ(nbd_opt_go(h.get()), 0) << nbd_error_text();
  EXPECT_EQ(nbd_get_block_size(h.get(), LIBNBD_SIZE_MINIMUM), 1);
  h.reset();  // one client at a time (-e 1)
  // A client that asks is told the real minimum by INFO and GO alike.
  Nbd asks = Connect([](nbd_handle* hh) { nbd_set_opt_mode(hh, true); });
  ASSERT_TRUE(asks);
  ASSERT_EQ(nbd_opt_info(asks.get()), 0) << nbd_error_text();
  EXPECT_EQ(nbd_get_block_size(asks.get(), LIBNBD_SIZE_MINIMUM), 512);
  ASSERT_EQ(nbd_opt_go(asks.get()), 0) << nbd_error_text();
  EXPECT_EQ(nbd_get_block_size(asks.get(), LIBNBD_SIZE_MINIMUM), 512);
}

TEST_F(ProbedRawImage, WithFormatRawHeadersMayBeWrittenAndBlocksAreBytes) {
  ASSERT_NO_FATAL_FAILURE(StartProbed({"-f", "raw"}));
  Nbd h = Connect();
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_get_block_size(h.get(), LIBNBD_SIZE_MINIMUM), 1);
  auto header = qcow2_header();
  ASSERT_EQ(nbd_pwrite(h.get(), header.data(), header.size(), 0, 0), 0) << nbd_error_text();
  ASSERT_EQ(nbd_flush(h.get(), 0), 0);
  EXPECT_EQ(read_file_range(image_path(), 0, 512), header);
  EXPECT_EQ(server_.log(), "") << "no warning with -f";
}

// --- Block status and sparse reads ---------------------------------------------

class SparseImage : public ServerTest {
 protected:
  // 8 MiB: data at [1M, 2M) and [5M, 5M+64K), holes elsewhere.
  static constexpr uint64_t kSize = 8 << 20;
  void SetUp() override {
    create_sparse_image(image_path(), kSize, {{1 << 20, 1 << 20}, {5 << 20, 64 << 10}}, kSeed);
  }
  static std::vector<Extent> Expected() {
    const uint32_t hz = LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO;
    return {{0, 1 << 20, hz},
            {1 << 20, 1 << 20, 0},
            {2 << 20, 3 << 20, hz},
            {5 << 20, 64 << 10, 0},
            {(5 << 20) + (64 << 10), (3 << 20) - (64 << 10), hz}};
  }
};

TEST_F(SparseImage, BlockStatusReportsHolesAsHoleAndZero) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect([](nbd_handle* hh) { nbd_add_meta_context(hh, LIBNBD_CONTEXT_BASE_ALLOCATION); });
  ASSERT_TRUE(h);
  ASSERT_EQ(nbd_can_meta_context(h.get(), LIBNBD_CONTEXT_BASE_ALLOCATION), 1);
  auto map = block_status_map(h.get(), 0, kSize);
  ASSERT_TRUE(map);
  EXPECT_EQ(*map, Expected()) << to_string(*map);
}

TEST_F(SparseImage, BlockStatusOfAnUnalignedRangeStartsAtItsOffset) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect([](nbd_handle* hh) { nbd_add_meta_context(hh, LIBNBD_CONTEXT_BASE_ALLOCATION); });
  ASSERT_TRUE(h);
  // From the middle of the first hole to the middle of the first data run.
  auto map = block_status_map(h.get(), 1000, (1 << 20) + 5000 - 1000);
  ASSERT_TRUE(map);
  const uint32_t hz = LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO;
  std::vector<Extent> want = {{1000, (1 << 20) - 1000, hz}, {1 << 20, 5000, 0}};
  EXPECT_EQ(*map, want) << to_string(*map);
}

struct ExtentCalls {
  int calls = 0;
  std::vector<Extent> extents;
};

int record_extents(void* user_data, const char* metacontext, uint64_t offset,
                   uint32_t* entries, size_t nr_entries, int* /*error*/) {
  auto* c = static_cast<ExtentCalls*>(user_data);
  if (std::strcmp(metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0) return 0;
  ++c->calls;
  for (size_t i = 0; i + 1 < nr_entries; i += 2) {
    c->extents.push_back({offset, entries[i], entries[i + 1]});
    offset += entries[i];
  }
  return 0;
}

TEST_F(SparseImage, BlockStatusWithReqOneReturnsOneExtent) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect([](nbd_handle* hh) { nbd_add_meta_context(hh, LIBNBD_CONTEXT_BASE_ALLOCATION); });
  ASSERT_TRUE(h);
  ExtentCalls c;
  nbd_extent_callback cb{.callback = record_extents, .user_data = &c, .free = nullptr};
  ASSERT_EQ(nbd_block_status(h.get(), kSize, 0, cb, LIBNBD_CMD_FLAG_REQ_ONE), 0) << nbd_error_text();
  EXPECT_EQ(c.calls, 1);
  ASSERT_EQ(c.extents.size(), 1u) << to_string(c.extents);
  EXPECT_EQ(c.extents[0].offset, 0u);
  EXPECT_GT(c.extents[0].length, 0u);
  EXPECT_LE(c.extents[0].length, uint64_t{1} << 20);
  EXPECT_EQ(c.extents[0].flags, LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO);
}

struct Chunks {
  std::vector<uint8_t>* buf;
  uint64_t base;
  int data_chunks = 0;
  int hole_chunks = 0;
  bool bad = false;
};

int record_chunk(void* user_data, const void* subbuf, size_t count, uint64_t offset,
                 unsigned status, int* /*error*/) {
  auto* c = static_cast<Chunks*>(user_data);
  if (offset < c->base || offset + count > c->base + c->buf->size()) {
    c->bad = true;
    return 0;
  }
  if (status == LIBNBD_READ_DATA) {
    ++c->data_chunks;
    std::memcpy(c->buf->data() + (offset - c->base), subbuf, count);
  } else if (status == LIBNBD_READ_HOLE) {
    ++c->hole_chunks;
    std::memset(c->buf->data() + (offset - c->base), 0, count);
  } else {
    c->bad = true;
  }
  return 0;
}

TEST_F(SparseImage, StructuredReadAcrossHolesReturnsCorrectBytes) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect();
  ASSERT_TRUE(h);
  // [512K, 2.5M): hole, data, hole.
  const uint64_t off = 512 << 10, len = 2 << 20;
  std::vector<uint8_t> buf(len, 0xee), chunked(len, 0xee);
  Chunks c{&chunked, off};
  nbd_chunk_callback cb{.callback = record_chunk, .user_data = &c, .free = nullptr};
  ASSERT_EQ(nbd_pread_structured(h.get(), buf.data(), len, off, cb, 0), 0) << nbd_error_text();
  EXPECT_FALSE(c.bad) << "chunk outside the requested range or of unknown type";
  EXPECT_GE(c.data_chunks, 1);
  std::vector<uint8_t> want(len, 0);
  auto data = pattern(1 << 20, 1 << 20, kSeed);
  std::copy(data.begin(), data.end(), want.begin() + (512 << 10));
  EXPECT_EQ(first_difference(buf, want), -1);
  EXPECT_EQ(first_difference(chunked, want), -1) << "chunks do not cover the read";
}

TEST_F(SparseImage, ReadWithDfFlagArrivesInOneChunk) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect();
  ASSERT_TRUE(h);
  ASSERT_EQ(nbd_can_df(h.get()), 1);
  const uint64_t off = 512 << 10, len = 2 << 20;
  std::vector<uint8_t> buf(len), chunked(len, 0xee);
  Chunks c{&chunked, off};
  nbd_chunk_callback cb{.callback = record_chunk, .user_data = &c, .free = nullptr};
  ASSERT_EQ(nbd_pread_structured(h.get(), buf.data(), len, off, cb, LIBNBD_CMD_FLAG_DF), 0)
      << nbd_error_text();
  EXPECT_FALSE(c.bad);
  EXPECT_EQ(c.data_chunks + c.hole_chunks, 1) << "DF read split into " << c.data_chunks
                                              << " data and " << c.hole_chunks << " hole chunks";
  std::vector<uint8_t> want(len, 0);
  auto data = pattern(1 << 20, 1 << 20, kSeed);
  std::copy(data.begin(), data.end(), want.begin() + (512 << 10));
  EXPECT_EQ(first_difference(buf, want), -1);
  EXPECT_EQ(first_difference(chunked, want), -1);
}

TEST_F(SparseImage, WriteIntoAHoleShowsUpAsDataInBlockStatus) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect([](nbd_handle* hh) { nbd_add_meta_context(hh, LIBNBD_CONTEXT_BASE_ALLOCATION); });
  ASSERT_TRUE(h);
  auto data = pattern(3 << 20, 64 << 10, 5);
  ASSERT_EQ(nbd_pwrite(h.get(), data.data(), data.size(), 3 << 20, 0), 0) << nbd_error_text();
  auto map = block_status_map(h.get(), 2 << 20, 2 << 20);
  ASSERT_TRUE(map);
  const uint32_t hz = LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO;
  std::vector<Extent> want = {{2 << 20, 1 << 20, hz},
                              {3 << 20, 64 << 10, 0},
                              {(3 << 20) + (64 << 10), (1 << 20) - (64 << 10), hz}};
  EXPECT_EQ(*map, want) << to_string(*map);
}

}  // namespace
}  // namespace layerd::test
