// Crash safety of layerd's qcow2 engine: kill -9 at a random moment of a
// write load, then
//   - `qemu-img check` reports no corruption (exit 0, or 3 for leaks only);
//   - every write that was durable reads back: acknowledged with FUA, or
//     acknowledged before a FLUSH that was then acknowledged;
//   - every other write left each of its bytes either old or new (no
//     stale or foreign data shows through), data nobody wrote is intact,
//     and an internal snapshot taken before the load is unchanged;
//   - layerd opening the killed image read-write and closing it cleanly
//     leaves `qemu-img check` clean (leaks repaired) and the content as it
//     was (the engine marks an image dirty while it changes metadata, and
//     repairs a dirty image when it next opens it read-write);
//   - SIGTERM instead of SIGKILL in the middle of the load: exit 0, a clean
//     check, and every acknowledged write on disk.
//
// The load: two client threads, each with its own connection and its own
// blocks of the disk (interleaved in 32 KiB stripes over half the disk, so
// that both write into the same clusters at once), write runs of 1 to 8
// blocks of 4 KiB or a cluster's worth (cluster aligned or not, allocating
// or not) and zero writes, some with FUA, with a flush every few requests.
// Within one crash every block is written at most once, so "the latest
// durable content" of a block is simply that of its one write. A flush
// makes durable only what its own connection had acknowledged before the
// flush was sent, which holds whether or not the server's flushes cover
// other connections.
//
// The kill point is seeded: the server is killed once the clients have had
// K requests acknowledged (K random), after a random delay of up to 3 ms, so
// it lands between or inside requests. Thread scheduling still varies from
// run to run, so the exact kill point does too; the seed of each crash is
// printed with any failure.
#include <libnbd.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "tests/server/harness.h"
#include "tests/server/qcow2_tools.h"

namespace layerd::test {
namespace {

using namespace qcow2e2e;

constexpr uint64_t KiB = 1024;
constexpr uint64_t MiB = 1024 * KiB;
constexpr uint64_t kSize = 16 * MiB;
constexpr uint64_t kBlock = 4 * KiB;
constexpr uint32_t kBaseSeed = 77;
constexpr int kThreads = 2;

enum class Backing { None, Raw, Qcow2 };

struct Config {
  std::string name;
  uint64_t cluster = 64 * KiB;
  std::string compat = "1.1";
  bool extended_l2 = false;
  // With lazy refcounts, refcounts on disk may be too low after a crash
  // (the dirty bit says so); the image is only consistent once repaired.
  bool lazy_refcounts = false;
  Backing backing = Backing::None;
  // The top starts with data and an internal snapshot of it, so writes
  // copy shared clusters (refcount 2) and must never change the snapshot.
  bool snapshot = false;
  // Persistent bitmaps: b0 and b1 enabled (layerd marks them in use while
  // it serves), d0 disabled. A kill leaves b0/b1 in use (QEMU calls them
  // inconsistent) and d0 as it was; refcounts count all of them.
  bool bitmaps = false;
  int crashes = 2;  // per test: each test gets its own kill points
};

std::ostream& operator<<(std::ostream& os, const Config& c) { return os << c.name; }

std::vector<Config> Configs() {
  auto C = [](std::string name, uint64_t cluster, Backing b) {
    Config c;
    c.name = std::move(name);
    c.cluster = cluster;
    c.backing = b;
    return c;
  };
  std::vector<Config> v;
  v.push_back(C("c64k", 64 * KiB, Backing::None));
  v.push_back(C("c64k_backing_qcow2", 64 * KiB, Backing::Qcow2));
  v.push_back(C("c4k", 4 * KiB, Backing::None));
  v.push_back(C("c4k_backing_raw", 4 * KiB, Backing::Raw));
  v.push_back(C("c512", 512, Backing::None));
  {
    Config c = C("v2_c64k_backing_raw", 64 * KiB, Backing::Raw);
    c.compat = "0.10";
    v.push_back(c);
  }
  {
    Config c = C("extl2_c64k_backing_qcow2", 64 * KiB, Backing::Qcow2);
    c.extended_l2 = true;
    v.push_back(c);
  }
  {
    Config c = C("snapshot_c64k_backing_raw", 64 * KiB, Backing::Raw);
    c.snapshot = true;
    v.push_back(c);
  }
  {
    Config c = C("snapshot_c4k", 4 * KiB, Backing::None);
    c.snapshot = true;
    v.push_back(c);
  }
  {
    Config c = C("bitmaps_c64k_backing_qcow2", 64 * KiB, Backing::Qcow2);
    c.bitmaps = true;
    v.push_back(c);
  }
  {
    Config c = C("bitmaps_c4k", 4 * KiB, Backing::None);
    c.bitmaps = true;
    v.push_back(c);
  }
  return v;
}

std::vector<Config> LazyConfigs() {
  std::vector<Config> v;
  for (Backing b : {Backing::None, Backing::Qcow2}) {
    Config c;
    c.name = b == Backing::None ? "lazy_c64k" : "lazy_c4k_backing_qcow2";
    c.cluster = b == Backing::None ? 64 * KiB : 4 * KiB;
    c.backing = b;
    c.lazy_refcounts = true;
    v.push_back(c);
  }
  return v;
}

// One write of the load. Writes of one crash never overlap.
struct Write {
  uint64_t off = 0;
  uint64_t len = 0;
  uint32_t seed = 0;  // content pattern(off, len, seed); 0: zeros
  bool fua = false;
  bool acked = false;
  bool durable = false;
};

std::vector<uint8_t> content_of(const Write& w) {
  if (w.seed == 0) return std::vector<uint8_t>(w.len, 0);
  return pattern(w.off, w.len, w.seed);
}

class CrashSafety : public ::testing::TestWithParam<Config> {
 protected:
  const Config& config() const { return GetParam(); }
  fs::path top() const { return dir_ / "top.qcow2"; }
  fs::path sock() const { return dir_ / "nbd.sock"; }

  void SetUp() override {
    if (config().backing == Backing::None) return;
    create_pattern_image(dir_ / "base.raw", kSize, kBaseSeed);
    if (config().backing == Backing::Qcow2) {
      ASSERT_EQ(run_expect({"qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2",
                            (dir_ / "base.raw").string(), (dir_ / "base.qcow2").string()})
                    .exit_code, 0);
    }
  }

  // What the disk holds before any write: the backing pattern or zeros, or
  // for snapshot configs what qemu wrote before taking the snapshot.
  std::vector<uint8_t> initial_content() const {
    if (config().snapshot) return snapshot_content_;
    if (config().backing == Backing::None) return std::vector<uint8_t>(kSize, 0);
    return pattern(0, kSize, kBaseSeed);
  }

  // The image as qemu reads it (optionally an internal snapshot of it).
  std::vector<uint8_t> QemuContent(const std::string& snapshot = "") {
    const fs::path raw = dir_ / "qemu.raw";
    std::vector<std::string> argv{"qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw"};
    if (!snapshot.empty()) argv.insert(argv.end(), {"-l", snapshot});
    argv.insert(argv.end(), {top().string(), raw.string()});
    if (run_expect(argv).exit_code != 0) return {};
    auto v = read_file_range(raw, 0, kSize);
    fs::remove(raw);
    return v;
  }

  void CreateTop() {
    const Config& c = config();
    const fs::path templ = dir_ / "template.qcow2";
    if (c.snapshot && fs::exists(templ)) {
      fs::remove(top());
      fs::copy_file(templ, top());
      return;
    }
    fs::remove(top());
    std::string o = "compat=" + c.compat + ",cluster_size=" + std::to_string(c.cluster);
    if (c.extended_l2) o += ",extended_l2=on";
    if (c.lazy_refcounts) o += ",lazy_refcounts=on";
    std::vector<std::string> argv{"qemu-img", "create", "-q", "-f", "qcow2", "-o", o};
    if (c.backing == Backing::Raw) argv.insert(argv.end(), {"-b", "base.raw", "-F", "raw"});
    if (c.backing == Backing::Qcow2)
      argv.insert(argv.end(), {"-b", "base.qcow2", "-F", "qcow2"});
    argv.insert(argv.end(), {top().string(), std::to_string(kSize)});
    ASSERT_EQ(run_expect(argv).exit_code, 0);
    if (c.bitmaps) {
      const std::string t = top().string();
      for (const auto& cmd : {std::vector<std::string>{"qemu-img", "bitmap", "--add", t, "b0"},
                              {"qemu-img", "bitmap", "--add", "-g", "1M", t, "b1"},
                              {"qemu-img", "bitmap", "--add", "--disable", t, "d0"}})
        ASSERT_EQ(run_expect(cmd).exit_code, 0);
    }
    if (c.snapshot) {
      Rng rng(stable_hash(c.name) ^ 0x5a5a);
      std::vector<std::string> cmds;
      for (int i = 0; i < 48; ++i) {
        uint64_t off = rng.below(kSize / c.cluster) * c.cluster;
        uint64_t len = std::min(c.cluster * rng.between(1, 4), kSize - off);
        cmds.push_back("write -q -P " + std::to_string(rng.between(1, 255)) + " " +
                       std::to_string(off) + " " + std::to_string(len));
      }
      ASSERT_EQ(qemu_io(top(), "qcow2", cmds).exit_code, 0);
      ASSERT_EQ(run_expect({"qemu-img", "snapshot", "-c", "s1", top().string()}).exit_code, 0);
      snapshot_content_ = QemuContent("s1");
      ASSERT_EQ(snapshot_content_.size(), kSize);
      fs::copy_file(top(), templ);
    }
  }

  bool StartLayerd(Server& server, std::vector<std::string> extra = {}) {
    fs::remove(sock());
    ServerOptions o;
    o.args = {"-f", "qcow2"};
    o.args.insert(o.args.end(), extra.begin(), extra.end());
    o.args.insert(o.args.end(), {"-k", sock().string(), "-t", "-e", "0", top().string()});
    o.unix_socket = sock();
    o.log_file = dir_ / "layerd.log";
    bool ok = server.start(std::move(o));
    EXPECT_TRUE(ok) << server.error();
    return ok;
  }

  // Which blocks client thread `t` writes. The lower half of the disk is
  // striped in 32 KiB stripes, so both clients write into the same
  // clusters (of 64 KiB and more) at the same time; the upper half is split
  // in one quarter per client, where whole clusters get written.
  static bool owns(int t, uint64_t block) {
    constexpr uint64_t kBlocks = kSize / kBlock;
    constexpr uint64_t kStripe = 32 * KiB / kBlock;
    if (block < kBlocks / 2) return (block / kStripe) % kThreads == static_cast<uint64_t>(t);
    const uint64_t quarter = kBlocks / 2 / kThreads;
    return (block - kBlocks / 2) / quarter == static_cast<uint64_t>(t);
  }

  // The load of client thread `t`, until the server dies or every block it
  // owns has been written.
  static void Load(nbd_handle* h, int t, uint64_t seed, uint64_t cluster,
                   uint32_t content_seed_base, std::atomic<uint64_t>* acked_total,
                   std::vector<Write>* writes) {
    Rng rng(seed);
    constexpr uint64_t blocks = kSize / kBlock;
    std::vector<bool> used(blocks, false);
    uint64_t unused = 0;
    for (uint64_t b = 0; b < blocks; ++b) unused += owns(t, b);
    uint32_t n = 0;
    uint64_t next_flush = rng.between(2, 24);
    while (unused > 0) {
      if (next_flush-- == 0) {
        next_flush = rng.between(2, 24);
        // Everything acknowledged so far on this connection.
        size_t covered = writes->size();
        if (nbd_flush(h, 0) != 0) return;
        for (size_t i = 0; i < covered; ++i)
          if ((*writes)[i].acked) (*writes)[i].durable = true;
        acked_total->fetch_add(1);
        continue;
      }
      // A run of unused blocks of ours: half the time starting on a
      // cluster, a quarter of the time as long as a cluster.
      uint64_t b = rng.below(blocks);
      if (rng.chance(1, 2)) b = (b * kBlock / cluster * cluster) / kBlock;
      while (used[b] || !owns(t, b)) b = (b + 1) % blocks;
      uint64_t want = rng.chance(1, 4) ? std::max<uint64_t>(1, cluster / kBlock) : rng.between(1, 8);
      uint64_t run = 0;
      while (run < want && b + run < blocks && owns(t, b + run) && !used[b + run]) ++run;
      for (uint64_t i = 0; i < run; ++i) used[b + i] = true;
      unused -= run;

      Write w;
      w.off = b * kBlock;
      w.len = run * kBlock;
      w.seed = rng.chance(1, 6) ? 0 : content_seed_base + ++n;
      w.fua = rng.chance(1, 5);
      writes->push_back(w);
      const uint32_t flags = w.fua ? LIBNBD_CMD_FLAG_FUA : 0;
      int rc;
      if (w.seed == 0) {
        rc = nbd_zero(h, w.len, w.off, flags | (rng.chance(1, 2) ? LIBNBD_CMD_FLAG_NO_HOLE : 0));
      } else {
        auto data = content_of(w);
        rc = nbd_pwrite(h, data.data(), w.len, w.off, flags);
      }
      if (rc != 0) return;
      writes->back().acked = true;
      writes->back().durable = w.fua;
      acked_total->fetch_add(1);
    }
  }

  struct CrashResult {
    int check_exit = -1;
    size_t writes = 0, acked = 0, durable = 0;
    std::vector<uint8_t> content;  // what qemu reads after the crash
  };

  // Starts layerd on top(), runs the load, kills the server at a seeded
  // moment, and checks the image. `before` is the content the image had
  // when the server started.
  // With `graceful`, the server gets SIGTERM instead of SIGKILL: it must
  // exit 0, leave `qemu-img check` clean and every acknowledged write on
  // disk (layerd flushes when it closes the image).
  void CrashOnce(uint64_t seed, const std::vector<uint8_t>& before, CrashResult* result,
                 bool graceful = false) {
    const Config& c = config();
    Rng rng(seed);
    const std::string ctx = "config " + c.name + ", crash seed " + std::to_string(seed);
    Server server;
    ASSERT_TRUE(StartLayerd(server)) << ctx;
    std::vector<Nbd> handles;
    for (int t = 0; t < kThreads; ++t) {
      handles.push_back(nbd_connect_to_unix(sock()));
      ASSERT_TRUE(handles.back()) << ctx;
    }
    std::atomic<uint64_t> acked{0};
    std::vector<std::vector<Write>> writes(kThreads);
    std::vector<std::thread> threads;
    std::atomic<int> finished{0};
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t, thread_seed = rng.next()] {
        Load(handles[static_cast<size_t>(t)].get(), t, thread_seed, c.cluster,
             static_cast<uint32_t>((seed & 0xffff) << 12 | static_cast<uint64_t>(t) << 11) | 1,
             &acked, &writes[static_cast<size_t>(t)]);
        finished.fetch_add(1);
      });
    }
    const uint64_t kill_after = rng.between(1, 400);
    const auto kill_delay = std::chrono::microseconds(rng.below(3000));
    wait_until([&] {
      return acked.load() >= kill_after || finished.load() == kThreads || !server.running();
    }, 15s);
    std::this_thread::sleep_for(kill_delay);
    const bool was_running = server.running();
    server.signal(graceful ? SIGTERM : SIGKILL);
    auto code = server.wait_exit(10s);
    for (auto& th : threads) th.join();
    handles.clear();
    ASSERT_TRUE(was_running) << ctx << ": layerd died before the kill:\n" << server.log();
    if (graceful)
      ASSERT_EQ(code, 0) << ctx << ": layerd did not exit cleanly on SIGTERM:\n" << server.log();
    else
      ASSERT_EQ(code, 128 + SIGKILL) << ctx;

    RunResult chk = run({"qemu-img", "check", top().string()});
    result->check_exit = chk.exit_code;
    if (c.bitmaps) ExpectBitmapsInUse(!graceful, ctx);
    // A dirty image with lazy refcounts may have refcounts that are too low
    // until it is repaired (qemu and layerd do that when they open it
    // read-write); NextReadWriteOpen* checks that repair.
    if (graceful) {
      EXPECT_EQ(chk.exit_code, kCheckClean) << ctx << ": after SIGTERM\n" << chk.describe();
    } else if (c.lazy_refcounts) {
      EXPECT_TRUE(chk.exit_code == kCheckClean || chk.exit_code == kCheckCorrupt ||
                  chk.exit_code == kCheckLeaks)
          << ctx << ": qemu-img check could not check the image\n" << chk.describe();
    } else {
      EXPECT_TRUE(chk.exit_code == kCheckClean || chk.exit_code == kCheckLeaks)
          << ctx << " (killed after " << kill_after << " acknowledged requests + "
          << kill_delay.count() << " us): qemu-img check must find leaks at most\n"
          << chk.describe();
    }

    result->content = QemuContent();
    ASSERT_EQ(result->content.size(), kSize) << ctx;
    if (c.snapshot) {
      auto snap = QemuContent("s1");
      EXPECT_EQ(first_difference(snap, snapshot_content_), -1)
          << ctx << ": the internal snapshot changed";
    }
    const auto& got = result->content;

    std::vector<bool> touched(kSize / kBlock, false);
    int reported = 0;
    for (const auto& ws : writes) {
      for (const auto& w : ws) {
        ++result->writes;
        result->acked += w.acked;
        result->durable += w.durable;
        for (uint64_t b = w.off / kBlock; b < (w.off + w.len) / kBlock; ++b) touched[b] = true;
        const auto want = content_of(w);
        std::span<const uint8_t> have(got.data() + w.off, w.len);
        if (w.durable || (graceful && w.acked)) {
          int64_t d = first_difference(have, want);
          if (d >= 0 && reported++ < 5)
            ADD_FAILURE() << ctx << ": durable " << (w.seed ? "write" : "zero write") << " ["
                          << w.off << ", +" << w.len << ")"
                          << (w.fua ? " (FUA)"
                                    : w.durable ? " (flushed)" : " (acknowledged before SIGTERM)")
                          << " lost: byte " << w.off + static_cast<uint64_t>(d) << " reads "
                          << int(have[static_cast<size_t>(d)]) << ", want "
                          << int(want[static_cast<size_t>(d)]);
        } else {
          for (uint64_t i = 0; i < w.len; ++i) {
            uint8_t x = have[i];
            if (x != want[i] && x != before[w.off + i]) {
              if (reported++ < 5)
                ADD_FAILURE() << ctx << ": byte " << w.off + i << " of a "
                              << (w.acked ? "acknowledged" : "unacknowledged")
                              << " non-durable write [" << w.off << ", +" << w.len
                              << ") reads " << int(x) << ", neither old "
                              << int(before[w.off + i]) << " nor new " << int(want[i]);
              break;
            }
          }
        }
      }
    }
    for (uint64_t b = 0; b < kSize / kBlock; ++b) {
      if (touched[b]) continue;
      std::span<const uint8_t> have(got.data() + b * kBlock, kBlock);
      std::span<const uint8_t> old(before.data() + b * kBlock, kBlock);
      int64_t d = first_difference(have, old);
      if (d >= 0 && reported++ < 5)
        ADD_FAILURE() << ctx << ": block at " << b * kBlock
                      << " was not written but changed at byte "
                      << b * kBlock + static_cast<uint64_t>(d);
    }
  }

  void CrashThenReopenReadWrite(uint64_t seed_base);

  // qemu-img info lists all three bitmaps; b0 and b1 are in use (after a
  // kill, and still after layerd reopened the killed image) or not (after
  // SIGTERM); d0 never is.
  void ExpectBitmapsInUse(bool in_use, const std::string& ctx) {
    RunResult info = run({"qemu-img", "info", "-U", "--output=json", top().string()});
    ASSERT_EQ(info.exit_code, 0) << ctx << info.describe();
    size_t uses = 0;
    for (size_t p = 0; (p = info.out.find("\"in-use\"", p)) != std::string::npos; ++p) ++uses;
    EXPECT_EQ(uses, in_use ? 2u : 0u) << ctx << "\n" << info.out;
    for (const char* name : {"\"b0\"", "\"b1\"", "\"d0\""})
      EXPECT_NE(info.out.find(name), std::string::npos) << ctx << "\n" << info.out;
  }

  TempDir dir_;
  std::vector<uint8_t> snapshot_content_;
};

// Fresh image for every crash; the content before is the backing or zeros.
TEST_P(CrashSafety, KillNineKeepsImageConsistentAndDurableWritesReadBack) {
  const Config& c = config();
  int leaks = 0;
  for (int i = 0; i < c.crashes; ++i) {
    ASSERT_NO_FATAL_FAILURE(CreateTop());
    const auto before = initial_content();
    CrashResult r;
    const uint64_t seed = stable_hash(c.name) + static_cast<uint64_t>(i);
    ASSERT_NO_FATAL_FAILURE(CrashOnce(seed, before, &r));
    leaks += r.check_exit == kCheckLeaks;
    std::cout << "[   INFO   ] crash " << i << " (seed " << seed << "): " << r.writes
              << " writes, " << r.acked << " acknowledged, " << r.durable
              << " durable; qemu-img check exit " << r.check_exit << "\n";
    if (HasFailure()) return;
  }
  std::cout << "[   INFO   ] " << leaks << " of " << c.crashes << " crashes left leaks\n";
}

// The same load ended by SIGTERM: a clean shutdown in the middle of
// concurrent allocating writes from two connections loses nothing that was
// acknowledged and leaves a clean image.
TEST_P(CrashSafety, SigtermDuringLoadLeavesCleanImage) {
  const Config& c = config();
  for (int i = 0; i < 1; ++i) {
    ASSERT_NO_FATAL_FAILURE(CreateTop());
    const auto before = initial_content();
    CrashResult r;
    const uint64_t seed = stable_hash(c.name) + 4000 + static_cast<uint64_t>(i);
    ASSERT_NO_FATAL_FAILURE(CrashOnce(seed, before, &r, /*graceful=*/true));
    if (HasFailure()) return;
  }
}

// Crashes on top of crashes: every restart opens the killed image
// read-write and goes on writing; the content before each crash is what
// qemu read after the previous one.
TEST_P(CrashSafety, RepeatedKillsOnTheSameImage) {
  const Config& c = config();
  ASSERT_NO_FATAL_FAILURE(CreateTop());
  auto before = initial_content();
  for (int i = 0; i < c.crashes; ++i) {
    CrashResult r;
    const uint64_t seed = stable_hash(c.name) + 1000 + static_cast<uint64_t>(i);
    ASSERT_NO_FATAL_FAILURE(CrashOnce(seed, before, &r));
    if (HasFailure()) return;
    before = std::move(r.content);
  }
}

// After a crash, the next read-write open by layerd repairs what the crash
// left (leaks; for lazy refcounts, refcounts too low): once it is closed
// cleanly, `qemu-img check` is clean and the content is unchanged.
void CrashSafety::CrashThenReopenReadWrite(uint64_t seed_base) {
  const Config& c = config();
  int needed_repair = 0;
  for (int i = 0; i < c.crashes; ++i) {
    ASSERT_NO_FATAL_FAILURE(CreateTop());
    const auto before = initial_content();
    CrashResult r;
    const uint64_t seed = stable_hash(c.name) + seed_base + static_cast<uint64_t>(i);
    ASSERT_NO_FATAL_FAILURE(CrashOnce(seed, before, &r));
    needed_repair += r.check_exit != kCheckClean;

    Server server;
    ASSERT_TRUE(StartLayerd(server));
    {
      Nbd h = nbd_connect_to_unix(sock());
      ASSERT_TRUE(h);
      nbd_shutdown(h.get(), 0);
    }
    ASSERT_EQ(server.stop(), 0) << server.log();
    RunResult chk = run({"qemu-img", "check", top().string()});
    EXPECT_EQ(chk.exit_code, kCheckClean)
        << "seed " << seed << ": after the crash qemu-img check exited " << r.check_exit
        << "; after layerd opened the image read-write and closed it:\n" << chk.describe();
    if (c.bitmaps) ExpectBitmapsInUse(true, "seed " + std::to_string(seed) + ", reopened");
    const fs::path raw = dir_ / "repaired.raw";
    ASSERT_EQ(run_expect({"qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw",
                          top().string(), raw.string()}).exit_code, 0);
    auto now = read_file_range(raw, 0, kSize);
    EXPECT_EQ(first_difference(now, r.content), -1)
        << "seed " << seed << ": reopening the crashed image changed its content";
    if (HasFailure()) return;
  }
  std::cout << "[   INFO   ] " << needed_repair << " of " << c.crashes
            << " crashes left something to repair\n";
}

// The crash may leave leaks (refcount block written, L2 entry not); the
// next read-write open by layerd finds the image dirty and repairs it.
TEST_P(CrashSafety, NextReadWriteOpenLeavesCheckClean) {
  CrashThenReopenReadWrite(2000);
}

// Lazy refcounts: the crash leaves the dirty bit set, and layerd repairs
// the image when it next opens it read-write.
class LazyCrashSafety : public CrashSafety {};

TEST_P(LazyCrashSafety, KillNineThenNextReadWriteOpenRepairs) {
  CrashThenReopenReadWrite(3000);
}

TEST_P(LazyCrashSafety, KillNineDurableWritesReadBack) {
  const Config& c = config();
  for (int i = 0; i < c.crashes; ++i) {
    ASSERT_NO_FATAL_FAILURE(CreateTop());
    const auto before = initial_content();
    CrashResult r;
    ASSERT_NO_FATAL_FAILURE(CrashOnce(stable_hash(c.name) + static_cast<uint64_t>(i), before, &r));
    if (HasFailure()) return;
  }
}

std::string config_name(const ::testing::TestParamInfo<Config>& i) { return i.param.name; }

INSTANTIATE_TEST_SUITE_P(Configs, CrashSafety, ::testing::ValuesIn(Configs()), config_name);
INSTANTIATE_TEST_SUITE_P(Configs, LazyCrashSafety, ::testing::ValuesIn(LazyConfigs()),
                         config_name);

}  // namespace
}  // namespace layerd::test
