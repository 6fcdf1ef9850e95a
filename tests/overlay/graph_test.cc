// The live graph: requests on many threads keep returning what was written
// while the graph under them is replaced again and again (a new empty
// overlay on top each time, as a live external snapshot does); the gate's
// pause waits for requests in flight; the registry shares one node per file
// and refuses users that would change an image under another.
#include "overlay/graph.h"

#include <unistd.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>

#include "overlay/chain.h"
#include "overlay/temp_overlay.h"
#include "tests/server/harness.h"

namespace layerd {
namespace {

using test::run;
using test::TempDir;

void sh_ok(const std::vector<std::string>& argv) {
  auto r = run(argv);
  ASSERT_EQ(r.exit_code, 0) << r.describe();
}

constexpr uint64_t kSize = 8 << 20;
constexpr uint64_t kBlock = 4096;

class GraphTest : public ::testing::Test {
 protected:
  void SetUp() override {
    base_ = (dir_ / "base.qcow2").string();
    sh_ok({"qemu-img", "create", "-q", "-f", "qcow2", base_, "8M"});
    sh_ok({"qemu-io", "-c", "write -P 0x5a 0 8M", base_});
    ChainOptions co;
    co.registry = &registry_;
    std::string error;
    ASSERT_TRUE(open_chain_nodes(base_, ImageFormat::Qcow2, co, &nodes_, &error)) << error;
  }

  TempDir dir_;
  std::string base_;
  ImageRegistry registry_;
  std::vector<std::shared_ptr<BlockNode>> nodes_;
};

TEST_F(GraphTest, RequestsSeeTheirWritesWhileTheGraphIsReplaced) {
  auto layer = std::make_shared<GraphLayer>(Graph::make(nodes_, false), true);
  constexpr int kThreads = 4;
  constexpr uint64_t kBlocks = kSize / kBlock;
  // Block b belongs to thread b % kThreads; expected[b] is its last byte.
  std::vector<uint8_t> expected(kBlocks, 0x5a);
  std::atomic<bool> done{false};
  std::atomic<uint64_t> checked{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      std::vector<std::byte> buf(kBlock);
      uint8_t value = static_cast<uint8_t>(t * 50);
      while (!done.load()) {
        uint64_t b = rng() % (kBlocks / kThreads) * kThreads + t;
        if (rng() % 2) {
          ++value;
          std::memset(buf.data(), value, kBlock);
          ASSERT_FALSE(layer->write(b * kBlock, buf, false));
          expected[b] = value;
        } else {
          auto ec = layer->try_read_nowait(b * kBlock, buf);
          if (ec) {
            ASSERT_FALSE(layer->read(b * kBlock, buf));
          }
          for (std::byte x : buf)
            ASSERT_EQ(static_cast<uint8_t>(x), expected[b]) << "block " << b;
          ++checked;
        }
      }
    });
  }
  std::vector<std::unique_ptr<TempOverlay>> overlays;
  for (int i = 0; i < 20; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    std::string error;
    ASSERT_FALSE(layer->change([&](const Graph& now, std::shared_ptr<const Graph>* next) {
      auto overlay = TempOverlay::create(now.nodes, {.dir = dir_.path().string(),
                                                     .keep_dir = {}, .keep_name = {}},
                                         &error);
      if (!overlay) return std::make_error_code(std::errc::io_error);
      auto nodes = now.nodes;
      nodes.insert(nodes.begin(), overlay->node());
      overlays.push_back(std::move(overlay));
      *next = Graph::make(std::move(nodes), false);
      return std::error_code{};
    })) << error;
  }
  // Slow builds (sanitizers) verify fewer reads per change: go on until
  // enough reads were checked, within a bound.
  for (int i = 0; i < 3000 && checked.load() <= 1000u; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  done = true;
  for (auto& t : threads) t.join();
  EXPECT_GT(checked.load(), 1000u);
  EXPECT_EQ(layer->graph()->nodes.size(), 21u);
  // Everything reads back once more through the final graph.
  std::vector<std::byte> buf(kBlock);
  for (uint64_t b = 0; b < kBlocks; ++b) {
    ASSERT_FALSE(layer->read(b * kBlock, buf));
    ASSERT_EQ(static_cast<uint8_t>(buf[0]), expected[b]);
  }
}

TEST_F(GraphTest, ChangeThatFailsKeepsTheGraph) {
  auto layer = std::make_shared<GraphLayer>(Graph::make(nodes_, false), true);
  auto before = layer->graph();
  EXPECT_TRUE(layer->change([](const Graph&, std::shared_ptr<const Graph>*) {
    return std::make_error_code(std::errc::io_error);
  }));
  EXPECT_EQ(layer->graph(), before);
  std::vector<std::byte> buf(kBlock);
  EXPECT_FALSE(layer->read(0, buf));
}

TEST(Gate, PauseWaitsForRequestsInsideAndStopsNewOnes) {
  Gate gate;
  gate.enter();
  std::atomic<bool> paused{false};
  std::thread pauser([&] {
    gate.pause();
    paused = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(paused.load());  // one request is still inside
  gate.leave();
  pauser.join();
  EXPECT_TRUE(paused.load());
  EXPECT_FALSE(gate.try_enter());
  std::atomic<bool> entered{false};
  std::thread waiter([&] {
    gate.enter();
    entered = true;
    gate.leave();
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(entered.load());
  gate.resume();
  waiter.join();
  EXPECT_TRUE(entered.load());
  EXPECT_TRUE(gate.try_enter());
  gate.leave();
}

TEST_F(GraphTest, RegistrySharesOneNodePerFileWhateverItsName) {
  std::string link = (dir_ / "link.qcow2").string();
  ASSERT_EQ(::symlink(base_.c_str(), link.c_str()), 0);
  std::string error;
  NodeOptions ro;
  auto a = registry_.open(link, ImageFormat::Qcow2, ro, &error);
  ASSERT_TRUE(a) << error;
  EXPECT_EQ(a, nodes_.front());
  EXPECT_EQ(registry_.open_count(), 1u);
}

TEST_F(GraphTest, RegistryRefusesToWriteAReadOnlyOrBackingImage) {
  std::string top = (dir_ / "top.qcow2").string();
  sh_ok({"qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top});
  nodes_.clear();  // the fixture's writable base would lock it away
  ImageRegistry registry;
  ChainOptions co;
  co.registry = &registry;
  std::vector<std::shared_ptr<BlockNode>> chain;
  std::string error;
  ASSERT_TRUE(open_chain_nodes(top, ImageFormat::Qcow2, co, &chain, &error)) << error;
  ASSERT_EQ(chain.size(), 2u);
  NodeOptions ro;
  EXPECT_EQ(registry.open(base_, ImageFormat::Qcow2, ro, &error), chain[1]);
  NodeOptions rw;
  rw.writable = true;
  EXPECT_FALSE(registry.open(base_, ImageFormat::Qcow2, rw, &error));
  EXPECT_NE(error.find("backing image of"), std::string::npos) << error;
  // The writable top cannot become a backing image elsewhere.
  NodeOptions backing;
  backing.backing = true;
  backing.named_by = "other.qcow2";
  EXPECT_FALSE(registry.open(top, ImageFormat::Qcow2, backing, &error));
  EXPECT_NE(error.find("served writable"), std::string::npos) << error;
  // A read-only user of the writable top shares it.
  EXPECT_EQ(registry.open(top, ImageFormat::Qcow2, ro, &error), chain[0]);
  // Once every user is gone, the file can be opened anew, writable.
  chain.clear();
  EXPECT_TRUE(registry.open(base_, ImageFormat::Qcow2, rw, &error)) << error;
}

// A write-back that fails on the way to read-only (the disk lost what the
// job wrote: a loop device over a full 2 MiB tmpfs) leaves the image read-
// only all the same, and the registry says so: the node and its file are
// read-only too, and its flushes keep reporting the loss. Needs root and
// loop devices; skips otherwise.
TEST(RegistryOnALossyDisk, AFailedWriteBackOnTheWayToReadOnlyLeavesTheNodeReadOnly) {
  TempDir dir;
  test::Tmpfs tmpfs(dir / "small", "2m");
  if (!tmpfs.ok()) GTEST_SKIP() << "cannot mount a tmpfs here: " << tmpfs.error();
  const std::string backing = (dir / "small" / "backing").string();
  sh_ok({"truncate", "-s", "64M", backing});
  auto attached = run({"losetup", "-f", "--show", backing});
  if (attached.exit_code != 0) GTEST_SKIP() << "no loop device: " << attached.describe();
  const std::string device = attached.out.substr(0, attached.out.find('\n'));
  struct Detach {
    std::string device;
    ~Detach() { run({"losetup", "-d", device}); }
  } detach{device};
  sh_ok({"qemu-img", "create", "-q", "-f", "qcow2", device, "32M"});

  ImageRegistry registry;
  std::string error;
  std::shared_ptr<BlockNode> node = registry.open(device, ImageFormat::Qcow2, NodeOptions{}, &error);
  ASSERT_TRUE(node) << error;
  ASSERT_TRUE(registry.set_writable(node, true, &error)) << error;
  std::vector<std::byte> data(8 << 20, std::byte{0x42});
  ASSERT_FALSE(node->image->write(0, data, qcow2::zero_below()));
  EXPECT_FALSE(registry.set_writable(node, false, &error));
  EXPECT_FALSE(node->writable);
  EXPECT_TRUE(node->image->read_only());
  EXPECT_FALSE(node->file->writable());
  EXPECT_TRUE(node->image->flush()) << "the loss must stay reported";
  EXPECT_TRUE(node->image->flush());
  // Nor can it be written again: its file fails every sync.
  EXPECT_FALSE(registry.set_writable(node, true, &error));
  EXPECT_FALSE(node->writable);
  EXPECT_TRUE(node->image->read_only());
}

}  // namespace
}  // namespace layerd
