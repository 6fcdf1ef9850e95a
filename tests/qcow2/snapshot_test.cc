// Taking and deleting internal snapshots, checked with qemu-img snapshot -l,
// qemu-img check and qemu-img convert -l.
#include <gtest/gtest.h>

#include <cstring>
#include <thread>

#include "test_util.h"

namespace layerd::qcow2::test {
namespace {

std::vector<std::byte> snap_raw(const std::string& img, const std::string& name,
                                const std::string& dir) {
  std::string raw = dir + "/snap.raw";
  run("qemu-img convert -U -O raw -l snapshot.name=" + name + " '" + img + "' '" + raw + "'");
  auto v = slurp(raw);
  std::filesystem::remove(raw);
  return v;
}

class Snapshots : public ::testing::TestWithParam<std::string> {};

TEST_P(Snapshots, CreateWriteDeleteLikeQemu) {
  TempDir d;
  std::string img = d / "s.qcow2";
  run("qemu-img create -q -f qcow2 " + GetParam() + " '" + img + "' 4M");
  run("qemu-io -f qcow2 '" + img + "' -c 'write -P 1 0 1M' -c 'write -c -P 2 2M 64k'");
  std::vector<std::byte> v1, v2;
  {
    auto image = open_image(img, true);
    ASSERT_TRUE(image);
    v1 = read_all(*image);
    SnapshotInfo si;
    Status st = image->create_snapshot("first", &si);
    ASSERT_TRUE(st.ok()) << st.message();
    EXPECT_EQ(si.id, "1");
    EXPECT_EQ(si.name, "first");
    EXPECT_EQ(si.virtual_size, 4u << 20);
    std::vector<std::byte> buf(300000, std::byte{3});
    ASSERT_FALSE(image->write(500000, buf, zero_below()));
    ASSERT_FALSE(image->discard(2 << 20, 64 << 10, DiscardMode::Unallocate, zero_below()));
    ASSERT_TRUE(image->create_snapshot("second").ok());
    EXPECT_FALSE(image->create_snapshot("second").ok());  // duplicate name
    v2 = read_all(*image);
    std::memset(buf.data(), 4, buf.size());
    ASSERT_FALSE(image->write(0, buf, zero_below()));
    std::unique_ptr<Image> view;
    ASSERT_TRUE(image->open_snapshot("first", &view).ok());
    expect_same(read_all(*view), v1);
  }
  qemu_check_clean(img);
  std::string list = run("qemu-img snapshot -l '" + img + "'");
  EXPECT_NE(list.find("first"), std::string::npos) << list;
  EXPECT_NE(list.find("second"), std::string::npos) << list;
  expect_same(snap_raw(img, "first", d.path()), v1);
  expect_same(snap_raw(img, "second", d.path()), v2);
  {
    auto image = open_image(img, true);
    ASSERT_TRUE(image->delete_snapshot("first").ok());
    EXPECT_EQ(image->snapshots().size(), 1u);
    EXPECT_FALSE(image->delete_snapshot("first").ok());
  }
  qemu_check_clean(img);
  expect_same(snap_raw(img, "second", d.path()), v2);
  {
    auto image = open_image(img, true);
    ASSERT_TRUE(image->delete_snapshot("2").ok());
    EXPECT_TRUE(image->snapshots().empty());
  }
  qemu_check_clean(img);
  // qemu can still take and delete snapshots on it.
  run("qemu-img snapshot -c third '" + img + "'");
  run("qemu-img snapshot -d third '" + img + "'");
  qemu_check_clean(img);
  auto cur = qemu_raw(img, d.path());
  EXPECT_EQ(cur[0], std::byte{4});
  EXPECT_EQ(cur[799999], std::byte{3});
  EXPECT_EQ(cur[800000], std::byte{1});
}

INSTANTIATE_TEST_SUITE_P(All, Snapshots,
                         ::testing::Values("", "-o compat=0.10,cluster_size=4k",
                                           "-o extended_l2=on", "-o refcount_bits=4,cluster_size=16k"));

TEST(SnapshotsRefused, OneBitRefcountsAndReadOnly) {
  TempDir d;
  std::string img = d / "r.qcow2";
  run("qemu-img create -q -f qcow2 -o refcount_bits=1 '" + img + "' 1M");
  auto image = open_image(img, true);
  EXPECT_EQ(image->create_snapshot("x").code(), std::make_error_code(std::errc::not_supported));
  auto ro = open_image(img, false);
  EXPECT_FALSE(ro->create_snapshot("x").ok());
}

TEST(SnapshotsConcurrent, TakenWhileWriting) {
  TempDir d;
  std::string img = d / "c.qcow2";
  run("qemu-img create -q -f qcow2 -o cluster_size=4k '" + img + "' 8M");
  {
    auto image = open_image(img, true);
    ASSERT_TRUE(image);
    std::atomic<bool> stop{false};
    std::atomic<int> errors{0};
    std::vector<std::thread> ts;
    for (int t = 0; t < 3; ++t)
      ts.emplace_back([&, t] {
        std::mt19937_64 rng(t);
        std::vector<std::byte> buf(10000, std::byte(t + 1));
        for (int i = 0; i < 400 && !stop; ++i) {
          uint64_t off = (uint64_t(t) << 21) + rng() % ((2 << 20) - buf.size());
          if (image->write(off, buf, zero_below())) ++errors;
          std::vector<std::byte> r(4096);
          if (image->read(off, r, zero_below()) || r[0] != std::byte(t + 1)) ++errors;
        }
      });
    for (int i = 0; i < 6; ++i) {
      ASSERT_TRUE(image->create_snapshot("s" + std::to_string(i)).ok());
      if (i >= 2) {
        ASSERT_TRUE(image->delete_snapshot("s" + std::to_string(i - 2)).ok());
      }
    }
    for (auto& th : ts) th.join();
    EXPECT_EQ(errors, 0);
    EXPECT_EQ(image->snapshots().size(), 2u);
    CheckReport rep;
    ASSERT_TRUE(image->check(Repair::None, &rep).ok());
    EXPECT_TRUE(rep.clean()) << ::testing::PrintToString(rep.messages);
  }
  qemu_check_clean(img);
}

}  // namespace
}  // namespace layerd::qcow2::test
