// Many connections at once and many requests in flight on one connection,
// with every byte verified.

#include <libnbd.h>

#include <atomic>
#include <chrono>
#include <latch>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "tests/server/harness.h"

namespace layerd::test {
namespace {

class Concurrency : public ServerTest {};

size_t count_fds(pid_t pid) {
  std::error_code ec;
  size_t n = 0;
  for (auto it = fs::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec);
       !ec && it != fs::directory_iterator(); it.increment(ec))
    ++n;
  return n;
}

TEST_F(Concurrency, SixteenClientsWriteAndReadDisjointRegionsAtOnce) {
  constexpr int kClients = 16;
  constexpr uint64_t kRegion = 1 << 20;
  constexpr uint64_t kSize = kClients * kRegion;
  constexpr size_t kBlock = 64 << 10;
  create_pattern_image(image_path(), kSize, kSeed);
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer({"-e", "0"}));

  // All clients connect first, then all work at the same time.
  std::vector<Nbd> handles(kClients);
  for (int i = 0; i < kClients; ++i) {
    handles[i] = Connect();
    ASSERT_TRUE(handles[i]) << "client " << i << " could not connect while "
                            << i << " others were connected";
  }
  std::latch start(kClients);
  std::mutex mu;
  std::vector<std::string> failures;
  auto fail = [&](std::string s) {
    std::lock_guard lock(mu);
    failures.push_back(std::move(s));
  };
  std::vector<std::thread> threads;
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      nbd_handle* h = handles[i].get();
      const uint32_t seed = 100 + i;
      const uint64_t base = i * kRegion;
      start.arrive_and_wait();
      for (uint64_t off = base; off < base + kRegion; off += kBlock) {
        auto data = pattern(off, kBlock, seed);
        if (nbd_pwrite(h, data.data(), kBlock, off, 0) != 0)
          return fail("client " + std::to_string(i) + " write: " + nbd_error_text());
        std::vector<uint8_t> back(kBlock);
        if (nbd_pread(h, back.data(), kBlock, off, 0) != 0)
          return fail("client " + std::to_string(i) + " read: " + nbd_error_text());
        if (first_difference(back, data) != -1)
          return fail("client " + std::to_string(i) + " read back wrong data at " +
                      std::to_string(off));
      }
      if (nbd_flush(h, 0) != 0) fail("client " + std::to_string(i) + " flush: " + nbd_error_text());
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& f : failures) ADD_FAILURE() << f;
  handles.clear();
  for (int i = 0; i < kClients; ++i) {
    EXPECT_EQ(first_difference(read_file_range(image_path(), i * kRegion, kRegion),
                               pattern(i * kRegion, kRegion, 100 + i)), -1)
        << "region of client " << i << " in the file";
  }
}

struct AioOp {
  bool is_write = false;
  uint64_t offset = 0;
  std::vector<uint8_t> buf;
  int error = -1;  // set by the completion callback
};

int on_complete(void* user_data, int* error) {
  static_cast<AioOp*>(user_data)->error = *error;
  return 1;  // auto-retire the command
}

// Issues all ops at once, then polls (bounded) until every one completed.
void run_in_flight(nbd_handle* h, std::vector<AioOp>& ops, int* max_in_flight) {
  for (auto& op : ops) {
    nbd_completion_callback cb{.callback = on_complete, .user_data = &op, .free = nullptr};
    int64_t cookie = op.is_write
        ? nbd_aio_pwrite(h, op.buf.data(), op.buf.size(), op.offset, cb, 0)
        : nbd_aio_pread(h, op.buf.data(), op.buf.size(), op.offset, cb, 0);
    ASSERT_NE(cookie, -1) << nbd_error_text();
  }
  *max_in_flight = nbd_aio_in_flight(h);
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  while (nbd_aio_in_flight(h) > 0) {
    ASSERT_LT(std::chrono::steady_clock::now(), deadline)
        << nbd_aio_in_flight(h) << " requests still in flight after 20 s";
    ASSERT_NE(nbd_poll(h, 100), -1) << nbd_error_text();
    *max_in_flight = std::max(*max_in_flight, nbd_aio_in_flight(h));
  }
}

TEST_F(Concurrency, SixtyFourInFlightMixedRequestsOnOneConnectionComplete) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  Nbd h = Connect();
  ASSERT_TRUE(h);
  constexpr size_t kBlock = 64 << 10;  // 64 blocks of 64 KiB = the 4 MiB image
  std::vector<AioOp> ops(64);
  for (size_t i = 0; i < ops.size(); ++i) {
    // Interleaved: even slots write blocks 0..31, odd slots read 32..63.
    auto& op = ops[i];
    op.is_write = i % 2 == 0;
    op.offset = (op.is_write ? i / 2 : 32 + i / 2) * kBlock;
    op.buf = op.is_write ? pattern(op.offset, kBlock, 7) : std::vector<uint8_t>(kBlock, 0xee);
  }
  int max_in_flight = 0;
  ASSERT_NO_FATAL_FAILURE(run_in_flight(h.get(), ops, &max_in_flight));
  EXPECT_GT(max_in_flight, 1) << "requests were not in flight together";
  for (const auto& op : ops) {
    EXPECT_EQ(op.error, 0) << (op.is_write ? "write" : "read") << " at " << op.offset;
    if (!op.is_write) {
      EXPECT_EQ(first_difference(op.buf, pattern(op.offset, kBlock, kSeed)), -1)
          << "read at " << op.offset << " returned wrong data";
    }
  }
  std::vector<uint8_t> all(kImageSize);
  ASSERT_EQ(nbd_pread(h.get(), all.data(), all.size(), 0, 0), 0) << nbd_error_text();
  std::span<const uint8_t> s(all);
  EXPECT_EQ(first_difference(s.subspan(0, 32 * kBlock), pattern(0, 32 * kBlock, 7)), -1);
  EXPECT_EQ(first_difference(s.subspan(32 * kBlock), pattern(32 * kBlock, 32 * kBlock, kSeed)), -1);
}

TEST_F(Concurrency, FlushOnOneConnectionCoversWritesOfAnotherWithMultiConn) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer({"-e", "0"}));
  Nbd a = Connect();
  Nbd b = Connect();
  ASSERT_TRUE(a && b);
  ASSERT_EQ(nbd_can_multi_conn(a.get()), 1);
  auto data = pattern(0, 65536, 11);
  ASSERT_EQ(nbd_pwrite(a.get(), data.data(), data.size(), 131072, 0), 0) << nbd_error_text();
  ASSERT_EQ(nbd_flush(b.get(), 0), 0) << nbd_error_text();
  std::vector<uint8_t> back(data.size());
  ASSERT_EQ(nbd_pread(b.get(), back.data(), back.size(), 131072, 0), 0) << nbd_error_text();
  EXPECT_EQ(first_difference(back, data), -1);
  EXPECT_EQ(first_difference(read_file_range(image_path(), 131072, data.size()), data), -1);
}

TEST_F(Concurrency, RepeatedConnectionsDoNotLeakFileDescriptors) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer());
  auto one_client = [&] {
    Nbd h = Connect();
    ASSERT_TRUE(h);
    std::vector<uint8_t> buf(4096);
    ASSERT_EQ(nbd_pread(h.get(), buf.data(), buf.size(), 0, 0), 0) << nbd_error_text();
    nbd_shutdown(h.get(), 0);
  };
  ASSERT_NO_FATAL_FAILURE(one_client());
  // Let the server notice the disconnect before counting.
  std::this_thread::sleep_for(200ms);
  const size_t before = count_fds(server_.pid());
  ASSERT_GT(before, 0u);
  for (int i = 0; i < 50; ++i) ASSERT_NO_FATAL_FAILURE(one_client());
  size_t after = 0;
  // Closing is asynchronous in the server; allow it a moment.
  wait_until([&] { return (after = count_fds(server_.pid())) <= before; }, 3s);
  EXPECT_LE(after, before) << "server fds grew from " << before << " to " << after
                           << " over 50 connections";
  EXPECT_TRUE(server_.running());
}

TEST_F(Concurrency, ClientsDisconnectingAbruptlyMidRequestDoNotDisturbOthers) {
  ASSERT_NO_FATAL_FAILURE(StartDefaultServer({"-e", "0"}));
  Nbd steady = Connect();
  ASSERT_TRUE(steady);
  for (int i = 0; i < 8; ++i) {
    // Start a big read and close the socket before the reply arrives.
    RawClient c;
    ASSERT_TRUE(c.connect_unix(socket_path()));
    ASSERT_TRUE(c.handshake(kExportName));
    std::vector<uint8_t> req;
    append_be32(req, 0x25609513);
    append_be16(req, 0);
    append_be16(req, 0);  // READ
    append_be64(req, 1);
    append_be64(req, 0);
    append_be32(req, 4 << 20);
    ASSERT_TRUE(c.send_bytes(req));
    c.close();
  }
  std::vector<uint8_t> buf(1 << 20);
  ASSERT_EQ(nbd_pread(steady.get(), buf.data(), buf.size(), 0, 0), 0) << nbd_error_text();
  EXPECT_EQ(first_difference(buf, pattern(0, buf.size(), kSeed)), -1);
  EXPECT_TRUE(server_.running());
}

}  // namespace
}  // namespace layerd::test
