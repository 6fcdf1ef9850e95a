// open_chain's image locks, inside one process: chains opened twice
// refuse each other as two processes would (OFD locks), chains over one
// backing image share it, and each file carries the bytes qemu-nbd locks
// for the same use (read off qemu 7.2; see overlay/image_locks.h).
#include <deque>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "overlay/chain.h"
#include "tests/server/harness.h"

namespace layerd::test {
namespace {

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

class ChainLocks : public ::testing::Test {
 protected:
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  void qemu_img(const std::vector<std::string>& args) {
    std::vector<std::string> argv{"qemu-img"};
    argv.insert(argv.end(), args.begin(), args.end());
    RunResult r = run(argv);
    ASSERT_EQ(r.exit_code, 0) << r.describe();
  }

  // Opens `name` as qcow2; returns the chain (its layer null on failure)
  // and leaves the error in `error_`.
  // Each open stands for another program: it gets a registry of its own,
  // as another process would (one registry shares a file, see
  // ImageRegistry).
  OpenedChain open(const std::string& name, ChainOptions options = {}) {
    OpenedChain chain;
    error_.clear();
    options.registry = &registries_.emplace_back();
    if (!open_chain(path(name), ImageFormat::Qcow2, options, &chain, &error_))
      chain.layer.reset();
    return chain;
  }

  // The lock bytes of `name` some open holds, as qemu's /proc/locks would
  // list them.
  std::vector<int> held_bytes(const std::string& name) const {
    std::vector<int> out;
    for (int base : {100, 200})
      for (int i = 0; i < 4; ++i)
        if (image_lock_byte_held(path(name), base + i)) out.push_back(base + i);
    return out;
  }

  TempDir dir_;
  std::deque<ImageRegistry> registries_;
  std::string error_;
};

TEST_F(ChainLocks, ASecondOpenOfAWrittenImageIsRefusedWithTheReason) {
  ASSERT_NO_FATAL_FAILURE(qemu_img({"create", "-q", "-f", "qcow2", path("top.qcow2"), "1M"}));
  OpenedChain writer = open("top.qcow2");
  ASSERT_TRUE(writer.layer) << error_;

  EXPECT_FALSE(open("top.qcow2").layer);
  EXPECT_TRUE(contains(error_, "'" + path("top.qcow2") +
                                   "' is in use: another process has it open and "
                                   "does not share the \"write\" lock"))
      << error_;

  EXPECT_FALSE(open("top.qcow2", ChainOptions{.read_only = true}).layer);
  EXPECT_TRUE(contains(error_, "another process holds the \"write\" lock")) << error_;
  EXPECT_TRUE(contains(error_, "pass -U/--force-share to read it anyway")) << error_;

  OpenedChain shared = open("top.qcow2", ChainOptions{.read_only = true, .force_share = true});
  EXPECT_TRUE(shared.layer) << error_;

  writer = {};  // the locks go with the last reference to the file
  shared = {};
  EXPECT_TRUE(open("top.qcow2").layer) << error_;
}

TEST_F(ChainLocks, ChainsOverOneBackingImageShareIt) {
  ASSERT_NO_FATAL_FAILURE(qemu_img({"create", "-q", "-f", "qcow2", path("base.qcow2"), "1M"}));
  for (const char* top : {"a.qcow2", "b.qcow2"})
    ASSERT_NO_FATAL_FAILURE(qemu_img({"create", "-q", "-f", "qcow2", "-b", "base.qcow2",
                                      "-F", "qcow2", path(top)}));
  OpenedChain a = open("a.qcow2");
  ASSERT_TRUE(a.layer) << error_;
  OpenedChain b = open("b.qcow2");
  EXPECT_TRUE(b.layer) << error_;
  EXPECT_EQ(held_bytes("a.qcow2"), (std::vector<int>{100, 101, 103, 201, 203}));
  EXPECT_EQ(held_bytes("base.qcow2"), (std::vector<int>{100, 201, 203}));
}

TEST_F(ChainLocks, RawBackingAndDataFilesAreLockedAsQemuNbdLocksThem) {
  ASSERT_NO_FATAL_FAILURE(qemu_img({"create", "-q", "-f", "raw", path("base.raw"), "1M"}));
  ASSERT_NO_FATAL_FAILURE(qemu_img({"create", "-q", "-f", "qcow2", "-b", "base.raw", "-F",
                                    "raw", path("over.qcow2")}));
  ASSERT_NO_FATAL_FAILURE(qemu_img({"create", "-q", "-f", "qcow2", "-o",
                                    "data_file=" + path("d.data"), path("d.qcow2"), "1M"}));
  OpenedChain over = open("over.qcow2");
  ASSERT_TRUE(over.layer) << error_;
  EXPECT_EQ(held_bytes("base.raw"), (std::vector<int>{100}));
  OpenedChain with_data = open("d.qcow2", ChainOptions{.allow_data_files = true});
  ASSERT_TRUE(with_data.layer) << error_;
  EXPECT_EQ(held_bytes("d.data"), (std::vector<int>{100, 101, 103, 203}));
  with_data = {};
  with_data = open("d.qcow2", ChainOptions{.read_only = true, .allow_data_files = true});
  ASSERT_TRUE(with_data.layer) << error_;
  EXPECT_EQ(held_bytes("d.data"), (std::vector<int>{100, 203}));
}

TEST_F(ChainLocks, ForceShareNeedsReadOnly) {
  ASSERT_NO_FATAL_FAILURE(qemu_img({"create", "-q", "-f", "qcow2", path("top.qcow2"), "1M"}));
  EXPECT_FALSE(open("top.qcow2", ChainOptions{.force_share = true}).layer);
  EXPECT_TRUE(contains(error_, "can only be used with read-only images")) << error_;
}

}  // namespace
}  // namespace layerd::test
