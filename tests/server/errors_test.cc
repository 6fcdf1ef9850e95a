// Error replies: libnbd's own checks are turned off (strict mode 0) so that
// bad requests reach the server. Each bad request must get an NBD error
// reply with the right errno, and the connection must stay usable: every
// test ends with a normal read on the same handle.

#include <libnbd.h>

#include <cerrno>
#include <string>
#include <vector>

#include "tests/server/harness.h"

namespace layerd::test {
namespace {

class Errors : public ServerTest {
 protected:
  Nbd ConnectLax(bool structured = true, bool meta = false) {
    return Connect([&](nbd_handle* h) {
      nbd_set_strict_mode(h, 0);
      nbd_set_request_structured_replies(h, structured);
      if (meta) nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION);
    });
  }

  // A read that must succeed after an error: proves the connection lives
  // and the stream is still in sync.
  void ExpectReadWorks(nbd_handle* h) {
    std::vector<uint8_t> buf(8192);
    ASSERT_EQ(nbd_aio_is_ready(h), 1) << "connection state: " << nbd_connection_state(h);
    ASSERT_EQ(nbd_pread(h, buf.data(), buf.size(), 40960, 0), 0)
        << "read after the error failed: " << nbd_error_text();
    EXPECT_EQ(first_difference(buf, pattern(40960, buf.size(), kSeed)), -1);
  }
};

// 64 MiB sparse image, for requests larger than 32 MiB that are in range.
class BigImageErrors : public Errors {
 protected:
  static constexpr uint64_t kBigSize = 64 << 20;
  void SetUp() override {
    create_sparse_image(image_path(), kBigSize, {{0, 1 << 20}}, kSeed);
  }
};

// --- Out of range ------------------------------------------------------------

TEST_F(Errors, ReadPastTheEndFailsWithEinvalAndConnectionLives) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = ConnectLax();
  ASSERT_TRUE(h);
  std::vector<uint8_t> buf(4096);
  EXPECT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), kImageSize, 0), -1);
  EXPECT_EQ(nbd_get_errno(), EINVAL) << nbd_error_text();
  ExpectReadWorks(h.get());
}

TEST_F(Errors, ReadStraddlingTheEndFailsWithEinvalAndConnectionLives) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = ConnectLax();
  ASSERT_TRUE(h);
  std::vector<uint8_t> buf(4096);
  EXPECT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), kImageSize - 100, 0), -1);
  EXPECT_EQ(nbd_get_errno(), EINVAL) << nbd_error_text();
  ExpectReadWorks(h.get());
}

TEST_F(Errors, ReadWithHugeOffsetFailsWithEinvalAndConnectionLives) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = ConnectLax();
  ASSERT_TRUE(h);
  std::vector<uint8_t> buf(4096);
  // offset + length overflows 64 bits.
  EXPECT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), UINT64_MAX - 100, 0), -1);
  EXPECT_EQ(nbd_get_errno(), EINVAL) << nbd_error_text();
  ExpectReadWorks(h.get());
}

TEST_F(Errors, WritePastTheEndFailsWithEnospcAndConnectionLives) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = ConnectLax();
  ASSERT_TRUE(h);
  auto data = pattern(0, 4096, 9);
  EXPECT_EQ(nbd_pwrite(h.get(), data.data(), data.size(), kImageSize - 2048, 0), -1);
  EXPECT_EQ(nbd_get_errno(), ENOSPC) << nbd_error_text();
  ExpectReadWorks(h.get());
  // Nothing was written at the end of the image.
  std::vector<uint8_t> tail(2048);
  ASSERT_EQ(nbd_pread(h.get(), tail.data(), tail.size(), kImageSize - 2048, 0), 0);
  EXPECT_EQ(first_difference(tail, pattern(kImageSize - 2048, 2048, kSeed)), -1);
}

TEST_F(Errors, WriteZeroesPastTheEndFailsWithEnospcAndConnectionLives) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = ConnectLax();
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_zero(h.get(), 65536, kImageSize - 4096, 0), -1);
  EXPECT_EQ(nbd_get_errno(), ENOSPC) << nbd_error_text();
  ExpectReadWorks(h.get());
}

TEST_F(Errors, TrimPastTheEndFailsWithEinvalAndConnectionLives) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = ConnectLax();
  ASSERT_TRUE(h);
  // The spec: EINVAL for reads and trims past the end, ENOSPC for writes.
  EXPECT_EQ(nbd_trim(h.get(), 65536, kImageSize, 0), -1);
  EXPECT_EQ(nbd_get_errno(), EINVAL) << nbd_error_text();
  ExpectReadWorks(h.get());
}

TEST_F(Errors, CachePastTheEndFailsWithEinvalAndConnectionLives) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = ConnectLax();
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_cache(h.get(), 65536, kImageSize + 4096, 0), -1);
  EXPECT_EQ(nbd_get_errno(), EINVAL) << nbd_error_text();
  ExpectReadWorks(h.get());
}

TEST_F(Errors, BlockStatusPastTheEndFailsWithEinvalAndConnectionLives) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = ConnectLax(true, true);
  ASSERT_TRUE(h);
  ASSERT_EQ(nbd_can_meta_context(h.get(), LIBNBD_CONTEXT_BASE_ALLOCATION), 1);
  nbd_extent_callback cb{.callback = [](void*, const char*, uint64_t, uint32_t*, size_t, int*) { return 0; },
                         .user_data = nullptr, .free = nullptr};
  EXPECT_EQ(nbd_block_status(h.get(), 4096, kImageSize + 4096, cb, 0), -1);
  EXPECT_EQ(nbd_get_errno(), EINVAL) << nbd_error_text();
  ExpectReadWorks(h.get());
}

// --- Request size limits ---------------------------------------------------------

TEST_F(BigImageErrors, ReadLargerThan32MiBFailsWithEinvalAndConnectionLives) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = ConnectLax();
  ASSERT_TRUE(h);
  std::vector<uint8_t> buf((32 << 20) + 4096);
  EXPECT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), 0, 0), -1);
  EXPECT_EQ(nbd_get_errno(), EINVAL) << nbd_error_text();
  ExpectReadWorks(h.get());
}

TEST_F(BigImageErrors, ReadOfExactly32MiBSucceeds) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = ConnectLax();
  ASSERT_TRUE(h);
  std::vector<uint8_t> buf(32 << 20);
  ASSERT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), 16 << 20, 0), 0) << nbd_error_text();
  EXPECT_TRUE(all_zero(buf));
}

TEST_F(BigImageErrors, WriteLargerThan32MiBFailsAndConnectionLives) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = ConnectLax();
  ASSERT_TRUE(h);
  std::vector<uint8_t> data((32 << 20) + 4096, 0x5a);
  EXPECT_EQ(nbd_pwrite(h.get(), data.data(), data.size(), 8 << 20, 0), -1);
  const int e = nbd_get_errno();
  EXPECT_TRUE(e == EINVAL || e == EOVERFLOW || e == ENOMEM) << nbd_error_text();
  ExpectReadWorks(h.get());
  // The refused payload was not written.
  std::vector<uint8_t> back(4096);
  ASSERT_EQ(nbd_pread(h.get(), back.data(), back.size(), 8 << 20, 0), 0);
  EXPECT_TRUE(all_zero(back));
}

TEST_F(Errors, SmallerMaxRequestSizeIsAdvertisedAndEnforced) {
  SKIP_UNLESS_LAYERD();
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer({"--max-request-size=1048576"}));
  Nbd h = ConnectLax();
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_get_block_size(h.get(), LIBNBD_SIZE_MAXIMUM), 1 << 20);
  std::vector<uint8_t> buf(2 << 20);
  ASSERT_EQ(nbd_pread(h.get(), buf.data(), 1 << 20, 0, 0), 0) << "read of exactly the limit: "
                                                              << nbd_error_text();
  EXPECT_EQ(nbd_pread(h.get(), buf.data(), (1 << 20) + 1, 0, 0), -1);
  EXPECT_EQ(nbd_get_errno(), EINVAL) << nbd_error_text();
  ExpectReadWorks(h.get());
  EXPECT_EQ(nbd_pwrite(h.get(), buf.data(), 2 << 20, 0, 0), -1);
  const int e = nbd_get_errno();
  EXPECT_TRUE(e == EINVAL || e == EOVERFLOW || e == ENOMEM) << nbd_error_text();
  ExpectReadWorks(h.get());
}

// --- Bad flags -------------------------------------------------------------------

TEST_F(Errors, NoHoleFlagOnReadFailsWithEinvalAndConnectionLives) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = ConnectLax();
  ASSERT_TRUE(h);
  std::vector<uint8_t> buf(4096);
  EXPECT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), 0, LIBNBD_CMD_FLAG_NO_HOLE), -1);
  EXPECT_EQ(nbd_get_errno(), EINVAL) << nbd_error_text();
  ExpectReadWorks(h.get());
}

TEST_F(Errors, DfFlagOnWriteFailsWithEinvalAndWritesNothing) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = ConnectLax();
  ASSERT_TRUE(h);
  auto data = pattern(0, 4096, 9);
  EXPECT_EQ(nbd_pwrite(h.get(), data.data(), data.size(), 0, LIBNBD_CMD_FLAG_DF), -1);
  EXPECT_EQ(nbd_get_errno(), EINVAL) << nbd_error_text();
  ExpectReadWorks(h.get());
  std::vector<uint8_t> back(4096);
  ASSERT_EQ(nbd_pread(h.get(), back.data(), back.size(), 0, 0), 0);
  EXPECT_EQ(first_difference(back, pattern(0, 4096, kSeed)), -1);
}

TEST_F(Errors, FastZeroFlagOnTrimFailsWithEinvalAndConnectionLives) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = ConnectLax();
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_trim(h.get(), 4096, 0, LIBNBD_CMD_FLAG_FAST_ZERO), -1);
  EXPECT_EQ(nbd_get_errno(), EINVAL) << nbd_error_text();
  ExpectReadWorks(h.get());
}

TEST_F(Errors, DfFlagWithoutStructuredRepliesFailsWithEinval) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = ConnectLax(/*structured=*/false);
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_can_df(h.get()), 0) << "DF advertised without structured replies";
  std::vector<uint8_t> buf(4096);
  EXPECT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), 0, LIBNBD_CMD_FLAG_DF), -1);
  EXPECT_EQ(nbd_get_errno(), EINVAL) << nbd_error_text();
  ExpectReadWorks(h.get());
}

// --- Read-only export ------------------------------------------------------------

TEST_F(Errors, WriteToReadOnlyExportFailsWithEpermAndConnectionLives) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer({"-r"}));
  Nbd h = ConnectLax();
  ASSERT_TRUE(h);
  auto data = pattern(0, 65536, 9);
  EXPECT_EQ(nbd_pwrite(h.get(), data.data(), data.size(), 40960, 0), -1);
  EXPECT_EQ(nbd_get_errno(), EPERM) << nbd_error_text();
  ExpectReadWorks(h.get());  // also proves the data was not written
  EXPECT_EQ(first_difference(read_file_range(image_path(), 40960, 65536),
                             pattern(40960, 65536, kSeed)), -1);
}

TEST_F(Errors, TrimOnReadOnlyExportFailsWithEpermAndConnectionLives) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer({"-r"}));
  Nbd h = ConnectLax();
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_trim(h.get(), 65536, 0, 0), -1);
  EXPECT_EQ(nbd_get_errno(), EPERM) << nbd_error_text();
  ExpectReadWorks(h.get());
}

TEST_F(Errors, WriteZeroesOnReadOnlyExportFailsWithEpermAndConnectionLives) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer({"-r"}));
  Nbd h = ConnectLax();
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_zero(h.get(), 65536, 32768, 0), -1);
  EXPECT_EQ(nbd_get_errno(), EPERM) << nbd_error_text();
  ExpectReadWorks(h.get());
}

TEST_F(Errors, FlushOnReadOnlyExportSucceeds) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer({"-r"}));
  Nbd h = ConnectLax();
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_flush(h.get(), 0), 0) << nbd_error_text();
  ExpectReadWorks(h.get());
}

// --- Block status without a context ------------------------------------------------

TEST_F(Errors, BlockStatusWithoutMetaContextFailsWithEinvalAndConnectionLives) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = ConnectLax(/*structured=*/true, /*meta=*/false);
  ASSERT_TRUE(h);
  int calls = 0;
  nbd_extent_callback cb{
      .callback = [](void* ud, const char*, uint64_t, uint32_t*, size_t, int*) {
        ++*static_cast<int*>(ud);
        return 0;
      },
      .user_data = &calls, .free = nullptr};
  EXPECT_EQ(nbd_block_status(h.get(), 65536, 0, cb, 0), -1);
  EXPECT_EQ(nbd_get_errno(), EINVAL) << nbd_error_text();
  EXPECT_EQ(calls, 0);
  ExpectReadWorks(h.get());
}

TEST_F(Errors, BlockStatusWithoutStructuredRepliesFailsWithEinvalAndConnectionLives) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = ConnectLax(/*structured=*/false, /*meta=*/false);
  ASSERT_TRUE(h);
  nbd_extent_callback cb{.callback = [](void*, const char*, uint64_t, uint32_t*, size_t, int*) { return 0; },
                         .user_data = nullptr, .free = nullptr};
  EXPECT_EQ(nbd_block_status(h.get(), 65536, 0, cb, 0), -1);
  EXPECT_EQ(nbd_get_errno(), EINVAL) << nbd_error_text();
  ExpectReadWorks(h.get());
}

TEST_F(Errors, SeveralErrorsInARowLeaveTheConnectionUsable) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = ConnectLax();
  ASSERT_TRUE(h);
  std::vector<uint8_t> buf(4096);
  for (int i = 0; i < 20; ++i) {
    EXPECT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), kImageSize + uint64_t(i) * 4096, 0), -1);
    EXPECT_EQ(nbd_pwrite(h.get(), buf.data(), buf.size(), kImageSize, LIBNBD_CMD_FLAG_DF), -1);
  }
  ExpectReadWorks(h.get());
}

}  // namespace
}  // namespace layerd::test
