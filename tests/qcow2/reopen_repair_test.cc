// Crash recovery through the dirty bit: a read-write Image sets the dirty
// bit before its first metadata change and clears it on a clean close, so
// an image left behind by kill -9 is found dirty and repaired by the next
// read-write open; v2 images (no dirty bit) are scanned on every
// read-write open. `qemu-img` is the oracle.
//
// kill -9 is simulated with a FaultyFile that stops the file at its n-th
// pwrite (sticky): every pwrite the process completed before the kill is
// in the file (the page cache survives the process), none after it. That
// is exactly what a killed process leaves, for every n.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <iostream>
#include <mutex>

#include "tests/qcow2/faulty_file.h"
#include "tests/qcow2/forwarding_file.h"
#include "test_util.h"

namespace layerd::qcow2::test {
namespace {

constexpr uint64_t kDirty = 1;  // incompatible feature bit 0

int exit_code(int status) { return WIFEXITED(status) ? WEXITSTATUS(status) : -1; }

struct QemuCheck {
  int exit = -1;  // 0 clean, 2 corruptions, 3 leaks only
  std::string out;
};

QemuCheck qemu_check(const std::string& path) {
  QemuCheck q;
  int st = 0;
  q.out = sh("qemu-img check '" + path + "'", &st);
  q.exit = exit_code(st);
  return q;
}

// Every "ERROR" line of a qemu-img check output that is not about a COPIED
// flag.
std::vector<std::string> real_errors(const std::string& out) {
  std::vector<std::string> v;
  size_t p = 0;
  while (p < out.size()) {
    size_t e = out.find('\n', p);
    if (e == std::string::npos) e = out.size();
    std::string line = out.substr(p, e - p);
    if (line.rfind("ERROR", 0) == 0 && line.find("OFLAG_COPIED") == std::string::npos)
      v.push_back(line);
    p = e + 1;
  }
  return v;
}

uint64_t incompat(const std::string& path) { return peek(path, 72, 8); }
uint32_t version_of(const std::string& path) { return static_cast<uint32_t>(peek(path, 4, 4)); }

void write_bytes(const std::string& path, const std::vector<std::byte>& v) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size()));
}

std::vector<std::byte> bytes_of(File& f) {
  std::vector<std::byte> v(f.size());
  EXPECT_FALSE(f.pread(v, 0));
  return v;
}

// What our engine reads from the image, opened read-only (writes nothing).
std::vector<std::byte> our_content(const std::string& path) {
  auto img = open_image(path, false);
  if (!img) return {};
  return read_all(*img);
}

// --- kill -9 at every point of a write load ------------------------------------

struct Config {
  std::string name;
  std::string create_opts;  // for qemu-img create -o
  bool qemu_snapshot = false;  // data + an internal snapshot made by qemu first
  bool snapshot_ops = false;   // the load takes and deletes snapshots itself
};

std::ostream& operator<<(std::ostream& os, const Config& c) { return os << c.name; }

// Allocating writes (partial clusters, COW of snapshot-shared clusters),
// flushes, discard, zeroing, and for some configs snapshots.
void load(Image& img, bool snapshot_ops) {
  std::vector<std::byte> buf(200000);
  for (int i = 0; i < 12; ++i) {
    std::memset(buf.data(), i + 1, buf.size());
    uint64_t off = (uint64_t(i) * 1234567) % (img.size() - buf.size());
    if (img.write(off, std::span(buf.data(), 5000 + i * 9000), zero_below())) return;
    if (i % 4 == 3 && img.flush()) return;
    if (i == 6 && img.discard(0, 1 << 20, DiscardMode::Unallocate, zero_below())) return;
    if (i == 8 && img.write_zeroes(2 << 20, 300000, true, zero_below())) return;
    if (snapshot_ops && i == 4 && !img.create_snapshot("mine").ok()) return;
    if (snapshot_ops && i == 10 && !img.delete_snapshot("mine").ok()) return;
  }
  (void)img.flush();
}

class KillNine : public ::testing::TestWithParam<Config> {};

TEST_P(KillNine, NextReadWriteOpenRepairs) {
  const Config& c = GetParam();
  TempDir d;
  const std::string base = d / "base.qcow2", crashed = d / "crashed.qcow2";
  run("qemu-img create -q -f qcow2 -o " + c.create_opts + " '" + base + "' 8M");
  run("qemu-io -f qcow2 '" + base + "' -c 'write -P 0x5a 0 1M' -c 'write -P 0x6b 5M 300k'");
  if (c.qemu_snapshot) {
    run("qemu-img snapshot -c s1 '" + base + "'");
    run("qemu-io -f qcow2 '" + base + "' -c 'write -P 0x7c 512k 64k'");
  }
  const auto pristine = slurp(base);
  const bool v3 = version_of(base) == 3;

  // How many pwrites a full run makes.
  int total;
  {
    auto mem = std::shared_ptr<File>(make_memory_file());
    ASSERT_FALSE(mem->pwrite(pristine, 0));
    auto faulty = std::make_shared<FaultyFile>(mem);
    std::unique_ptr<Image> img;
    ASSERT_TRUE(Image::open(faulty, {}, &img).ok());
    load(*img, c.snapshot_ops);
    ASSERT_FALSE(img->close());
    total = faulty->pwrites();
    // A clean close leaves a clean image, without the dirty bit.
    write_bytes(crashed, bytes_of(*mem));
    if (v3) {
      EXPECT_EQ(incompat(crashed) & kDirty, 0u);
    }
    EXPECT_EQ(qemu_check(crashed).exit, 0);
  }
  ASSERT_GT(total, 10);
  const int step = std::max(1, total / 30);
  int leaked = 0, repaired_copied = 0;
  for (int n = 0; n <= total; n += step) {
    SCOPED_TRACE("killed after " + std::to_string(n) + " of " + std::to_string(total) +
                 " pwrites");
    auto mem = std::shared_ptr<File>(make_memory_file());
    ASSERT_FALSE(mem->pwrite(pristine, 0));
    auto faulty = std::make_shared<FaultyFile>(mem);
    {
      std::unique_ptr<Image> img;
      ASSERT_TRUE(Image::open(faulty, {}, &img).ok());
      faulty->fail_pwrite_after(n, /*sticky=*/true);
      load(*img, c.snapshot_ops);
      // The destructor's close() cannot write anything any more: the file
      // stays as the kill left it.
    }
    write_bytes(crashed, bytes_of(*mem));

    // The crash leaves leaks at most. Taking or deleting a snapshot has
    // moments where a COPIED flag disagrees with the refcount (reported
    // by qemu as an error, harmless, and fixed by the repair on open).
    QemuCheck q = qemu_check(crashed);
    if (c.snapshot_ops && q.exit == 2) {
      EXPECT_TRUE(real_errors(q.out).empty()) << q.out;
      ++repaired_copied;
    } else {
      EXPECT_TRUE(q.exit == 0 || q.exit == 3) << q.out;
    }
    // Anything to repair means the image was marked dirty (v3).
    if (v3 && q.exit != 0) {
      EXPECT_EQ(incompat(crashed) & kDirty, kDirty) << q.out;
    }
    leaked += q.exit == 3;
    const auto before = our_content(crashed);
    ASSERT_EQ(before.size(), 8u << 20);

    // The next read-write open repairs it; a clean close leaves it clean.
    {
      auto img = open_image(crashed, true);
      ASSERT_TRUE(img);
      EXPECT_FALSE(img->dirty());
      CheckReport rep;
      ASSERT_TRUE(img->check(Repair::None, &rep).ok());
      EXPECT_TRUE(rep.clean()) << ::testing::PrintToString(rep.messages);
      ASSERT_FALSE(img->close());
    }
    QemuCheck after = qemu_check(crashed);
    EXPECT_EQ(after.exit, 0) << "before the repair:\n" << q.out << "after:\n" << after.out;
    if (v3) {
      EXPECT_EQ(incompat(crashed) & kDirty, 0u);
    }
    // The repair changed no content, and qemu reads what we read.
    auto now = our_content(crashed);
    expect_same(now, before);
    expect_same(qemu_raw(crashed, d.path()), before);
    if (HasFailure()) return;
  }
  std::cout << "[   INFO   ] " << leaked << " kill points left leaks"
            << (c.snapshot_ops ? ", " + std::to_string(repaired_copied) +
                                     " left COPIED flags to fix"
                               : "")
            << "\n";
  EXPECT_GT(leaked, 0) << "the load should leak at some kill point";
}

INSTANTIATE_TEST_SUITE_P(
    All, KillNine,
    ::testing::Values(Config{"v3_c64k", "cluster_size=64k"},
                      Config{"v3_c4k", "cluster_size=4k"},
                      Config{"v3_c512_rb64", "cluster_size=512,refcount_bits=64"},
                      Config{"v3_extl2_c32k", "cluster_size=32k,extended_l2=on"},
                      Config{"v3_lazy_c64k", "cluster_size=64k,lazy_refcounts=on"},
                      Config{"v3_qemu_snapshot_c4k", "cluster_size=4k", true},
                      Config{"v3_snapshot_ops_c64k", "cluster_size=64k", false, true},
                      Config{"v2_c64k", "compat=0.10,cluster_size=64k"},
                      Config{"v2_snapshot_ops_c4k", "compat=0.10,cluster_size=4k", true,
                             true}),
    [](const auto& pinfo) { return pinfo.param.name; });

// --- the dirty bit on disk while open ---------------------------------------------

std::string qemu_info_json(const std::string& path) {
  return run("qemu-img info -U --output=json '" + path + "'");
}

TEST(DirtyBit, SetWhileChangedAndClearedOnClose) {
  TempDir d;
  const std::string path = d / "i.qcow2";
  run("qemu-img create -q -f qcow2 '" + path + "' 8M");
  auto img = open_image(path, true);
  ASSERT_TRUE(img);
  // Opening read-write changes nothing until the first metadata change.
  EXPECT_FALSE(img->dirty());
  EXPECT_NE(qemu_info_json(path).find("\"dirty-flag\": false"), std::string::npos);
  std::vector<std::byte> buf(100000, std::byte{3});
  ASSERT_FALSE(img->write(70000, buf, zero_below()));
  EXPECT_TRUE(img->dirty());
  EXPECT_NE(qemu_info_json(path).find("\"dirty-flag\": true"), std::string::npos)
      << qemu_info_json(path);
  EXPECT_NE(run("qemu-img info -U '" + path + "'").find("cleanly shut down: no"),
            std::string::npos);
  // Still dirty after a flush: the image stays open for writing.
  ASSERT_FALSE(img->flush());
  EXPECT_EQ(incompat(path) & kDirty, kDirty);
  ASSERT_FALSE(img->close());
  EXPECT_FALSE(img->dirty());
  EXPECT_NE(qemu_info_json(path).find("\"dirty-flag\": false"), std::string::npos);
  EXPECT_EQ(run("qemu-img info -U '" + path + "'").find("cleanly shut down"),
            std::string::npos);
  qemu_check_clean(path);
}

TEST(DirtyBit, CopyTakenWhileOpenIsRepairedOnOpen) {
  // The file as a killed process leaves it: copied while the image is open
  // after writes and a flush.
  TempDir d;
  const std::string path = d / "i.qcow2", copy = d / "copy.qcow2";
  run("qemu-img create -q -f qcow2 -o cluster_size=4k '" + path + "' 8M");
  auto img = open_image(path, true);
  ASSERT_TRUE(img);
  std::vector<std::byte> buf(50000, std::byte{4});
  ASSERT_FALSE(img->write(0, buf, zero_below()));
  ASSERT_FALSE(img->flush());
  // Overwriting by discard + rewrite frees clusters on the next flush.
  ASSERT_FALSE(img->discard(0, 40960, DiscardMode::Unallocate, zero_below()));
  std::memset(buf.data(), 5, buf.size());
  ASSERT_FALSE(img->write(1 << 20, buf, zero_below()));
  ASSERT_FALSE(img->flush());
  std::filesystem::copy_file(path, copy);
  ASSERT_FALSE(img->close());
  ASSERT_EQ(incompat(copy) & kDirty, kDirty);
  QemuCheck q = qemu_check(copy);
  EXPECT_TRUE(q.exit == 0 || q.exit == 3) << q.out;
  auto before = our_content(copy);
  {
    auto re = open_image(copy, true);
    ASSERT_TRUE(re);
    EXPECT_FALSE(re->dirty());
  }
  qemu_check_clean(copy);
  EXPECT_EQ(incompat(copy) & kDirty, 0u);
  expect_same(our_content(copy), before);
}

// A dirty image with leaks, made by hand: a v3 image by qemu, a refcount
// raised for a cluster nobody uses, the dirty bit set.
std::string make_dirty_leaky(const TempDir& d, const std::string& opts = "") {
  const std::string path = d / "dirty.qcow2";
  run("qemu-img create -q -f qcow2 " + opts + " '" + path + "' 8M");
  run("qemu-io -f qcow2 '" + path + "' -c 'write -P 7 0 1M'");
  uint64_t fsize = std::filesystem::file_size(path);
  std::filesystem::resize_file(path, fsize + 4 * 65536);
  uint64_t leaked = fsize / 65536 + 2;
  uint64_t rt = peek(path, 48, 8);
  uint64_t block = peek(path, rt, 8);  // the first refcount block covers it
  patch(path, block + leaked * 2, be(1, 2));
  if (version_of(path) == 3) patch64(path, 72, incompat(path) | kDirty);
  return path;
}

TEST(DirtyBit, ReadOnlyOpenOfDirtyImageWritesNothingAndReads) {
  TempDir d;
  const std::string path = make_dirty_leaky(d);
  EXPECT_EQ(qemu_check(path).exit, 3);
  const auto bytes = slurp(path);
  {
    auto img = open_image(path, false);
    ASSERT_TRUE(img);
    EXPECT_TRUE(img->dirty());
    EXPECT_TRUE(img->read_only());
    auto v = read_all(*img);
    EXPECT_EQ(v[12345], std::byte{7});
    EXPECT_EQ(v[(1 << 20) + 1], std::byte{0});
    CheckReport rep;
    ASSERT_TRUE(img->check(Repair::None, &rep).ok());
    EXPECT_EQ(rep.leaks, 1u);
    ASSERT_FALSE(img->close());
  }
  // A read-write File, but a read-only Image: still nothing written.
  {
    OpenOptions o;
    o.read_only = true;
    std::unique_ptr<Image> img;
    ASSERT_TRUE(Image::open(open_file(path, true), o, &img).ok());
    EXPECT_TRUE(img->dirty());
    (void)read_all(*img);
  }
  auto after = slurp(path);
  ASSERT_EQ(after.size(), bytes.size());
  EXPECT_EQ(0, std::memcmp(after.data(), bytes.data(), bytes.size()));
  // The next read-write open repairs it.
  { ASSERT_TRUE(open_image(path, true)); }
  qemu_check_clean(path);
  EXPECT_EQ(incompat(path) & kDirty, 0u);
}

TEST(DirtyBit, WithoutRepairOnOpenADirtyBitSetByOthersStays) {
  TempDir d;
  const std::string path = make_dirty_leaky(d);
  OpenOptions o;
  o.repair_dirty_on_open = false;
  {
    auto img = open_image(path, true, o);
    ASSERT_TRUE(img);
    EXPECT_TRUE(img->dirty());
    std::vector<std::byte> buf(4096, std::byte{1});
    ASSERT_FALSE(img->write(3 << 20, buf, zero_below()));
  }
  // Not ours to clear: the leak is still there and so is the bit.
  EXPECT_EQ(incompat(path) & kDirty, kDirty);
  EXPECT_EQ(qemu_check(path).exit, 3);
  // A repairing check makes the image consistent: then close clears it,
  // as `qemu-img check -r leaks` would.
  {
    auto img = open_image(path, true, o);
    ASSERT_TRUE(img);
    CheckReport rep;
    ASSERT_TRUE(img->check(Repair::Leaks, &rep).ok());
    EXPECT_EQ(rep.leaks_fixed, 1u);
    EXPECT_EQ(incompat(path) & kDirty, kDirty);  // until close
  }
  EXPECT_EQ(incompat(path) & kDirty, 0u);
  qemu_check_clean(path);
}

TEST(DirtyBit, RepairingCheckOfACleanImageMarksItDirtyUntilClose) {
  TempDir d;
  const std::string path = make_dirty_leaky(d);
  patch64(path, 72, incompat(path) & ~kDirty);  // leaky but clean-looking
  OpenOptions o;
  o.repair_dirty_on_open = false;
  auto img = open_image(path, true, o);
  ASSERT_TRUE(img);
  EXPECT_FALSE(img->dirty());
  CheckReport rep;
  ASSERT_TRUE(img->check(Repair::Leaks, &rep).ok());
  EXPECT_EQ(rep.leaks_fixed, 1u);
  EXPECT_EQ(incompat(path) & kDirty, kDirty);
  ASSERT_FALSE(img->close());
  EXPECT_EQ(incompat(path) & kDirty, 0u);
  qemu_check_clean(path);
}

TEST(DirtyBit, FailedDirtyBitWriteFailsTheWriteAndMapsNothing) {
  auto mem = std::shared_ptr<File>(make_memory_file());
  CreateOptions co;
  co.size = 8 << 20;
  ASSERT_TRUE(Image::create(*mem, co).ok());
  auto faulty = std::make_shared<FaultyFile>(mem);
  std::unique_ptr<Image> img;
  ASSERT_TRUE(Image::open(faulty, {}, &img).ok());
  faulty->fail_flush(true);
  std::vector<std::byte> buf(100000, std::byte{9});
  EXPECT_TRUE(img->write(0, buf, zero_below()));
  EXPECT_FALSE(img->dirty());
  MapExtent m;
  ASSERT_FALSE(img->block_status(0, 8 << 20, &m));
  EXPECT_EQ(m.kind, ExtentKind::Unallocated);
  faulty->fail_flush(false);
  ASSERT_FALSE(img->write(0, buf, zero_below()));
  EXPECT_TRUE(img->dirty());
  ASSERT_FALSE(img->close());
  CheckReport rep;
  ASSERT_TRUE(Image::open(mem, {}, &img).ok());
  EXPECT_FALSE(img->dirty());
  ASSERT_TRUE(img->check(Repair::None, &rep).ok());
  EXPECT_TRUE(rep.clean()) << ::testing::PrintToString(rep.messages);
}

TEST(DirtyBit, LazyRefcountsKillIsRepairedLikeQemuAbort) {
  // QEMU's lazy refcounts leave refcounts too low; our reopen fixes that.
  TempDir d;
  const std::string path = d / "lazy.qcow2";
  run("qemu-img create -q -f qcow2 -o lazy_refcounts=on '" + path + "' 8M");
  sh("qemu-io -f qcow2 '" + path + "' -c 'write -P 3 0 2M' -c abort");
  ASSERT_EQ(incompat(path) & kDirty, kDirty);
  EXPECT_EQ(qemu_check(path).exit, 2);
  {
    auto img = open_image(path, true);
    ASSERT_TRUE(img);
    EXPECT_FALSE(img->dirty());
    std::vector<std::byte> buf(4096, std::byte{8});
    ASSERT_FALSE(img->write(4 << 20, buf, zero_below()));
    EXPECT_TRUE(img->dirty());
  }
  qemu_check_clean(path);
  auto v = qemu_raw(path, d.path());
  EXPECT_EQ(v[100], std::byte{3});
  EXPECT_EQ(v[(4 << 20) + 100], std::byte{8});
}

// --- v2: no dirty bit, scanned on every read-write open -----------------------

TEST(V2, LeaksAreRepairedByOneReadWriteOpen) {
  TempDir d;
  const std::string path = make_dirty_leaky(d, "-o compat=0.10");
  ASSERT_EQ(version_of(path), 2u);
  EXPECT_EQ(qemu_check(path).exit, 3);
  // A read-only open leaves them.
  { ASSERT_TRUE(open_image(path, false)); }
  EXPECT_EQ(qemu_check(path).exit, 3);
  // So does a read-write open that asks for no repair.
  {
    OpenOptions o;
    o.repair_dirty_on_open = false;
    auto img = open_image(path, true, o);
    ASSERT_TRUE(img);
    CheckReport rep;
    ASSERT_TRUE(img->check(Repair::None, &rep).ok());
    EXPECT_EQ(rep.leaks, 1u);
  }
  EXPECT_EQ(qemu_check(path).exit, 3);
  auto before = our_content(path);
  { ASSERT_TRUE(open_image(path, true)); }
  qemu_check_clean(path);
  expect_same(our_content(path), before);
  EXPECT_EQ(version_of(path), 2u);
}

// Forwards to a file; once armed, a pread at `offset` blocks until
// release().
class HeldReadFile final : public ForwardingFile {
 public:
  using ForwardingFile::ForwardingFile;
  void hold_at(uint64_t offset) {
    std::lock_guard l(m_);
    held_ = true;
    offset_ = offset;
  }
  void release() {
    std::lock_guard l(m_);
    held_ = false;
    cv_.notify_all();
  }
  bool wait_blocked() {
    std::unique_lock l(m_);
    return cv_.wait_for(l, std::chrono::seconds(10), [&] { return blocked_; });
  }

  std::error_code pread(std::span<std::byte> b, uint64_t o) override {
    {
      std::unique_lock l(m_);
      if (held_ && o == offset_) {
        blocked_ = true;
        cv_.notify_all();
        cv_.wait(l, [&] { return !held_; });
      }
    }
    return ForwardingFile::pread(b, o);
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  bool held_ = false, blocked_ = false;
  uint64_t offset_ = 0;
};

// The repair scan of reopen_read_write reads every table; reads of the
// image (a commit's base, read through the chain by clients) go on while
// it waits for the disk, also those that load an L2 table into the cache
// (the read here is the first), and the repair that follows is complete.
TEST(ReopenReadWrite, TheRepairScanOfADirtyImageLetsReadsGoOn) {
  TempDir d;
  const std::string path = make_dirty_leaky(d);
  const uint64_t block = peek(path, peek(path, 48, 8), 8);  // a refcount block
  auto held = std::make_shared<HeldReadFile>(open_file(path, true));
  OpenOptions o;
  o.read_only = true;
  std::unique_ptr<Image> img;
  ASSERT_TRUE(Image::open(held, o, &img).ok());
  std::vector<std::byte> buf(4096);
  held->hold_at(block);
  auto reopen = std::async(std::launch::async, [&] { return img->reopen_read_write(); });
  ASSERT_TRUE(held->wait_blocked()) << "the scan did not read the refcount block";
  auto read = std::async(std::launch::async, [&] {
    std::vector<std::byte> b(4096);
    std::error_code ec = img->read(8192, b, zero_below());
    return !ec && b[0] == std::byte{7};
  });
  const bool read_went_on = read.wait_for(std::chrono::seconds(5)) == std::future_status::ready;
  held->release();
  EXPECT_TRUE(read_went_on) << "a read waited for the repair scan";
  EXPECT_TRUE(read.get());
  Status st = reopen.get();
  ASSERT_TRUE(st.ok()) << st.message();
  EXPECT_FALSE(img->read_only());
  EXPECT_FALSE(img->dirty());
  std::memset(buf.data(), 9, buf.size());
  ASSERT_FALSE(img->write(2 << 20, buf, zero_below()));
  ASSERT_FALSE(img->close());
  qemu_check_clean(path);
  EXPECT_EQ(incompat(path) & kDirty, 0u);
  run("qemu-io -c 'read -P 7 0 1M' -c 'read -P 9 2M 4k' '" + path + "'");
}

}  // namespace
}  // namespace layerd::qcow2::test
