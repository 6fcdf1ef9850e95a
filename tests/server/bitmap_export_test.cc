// -B NAME: persistent dirty bitmaps exported as qemu:dirty-bitmap:NAME, with
// qemu-nbd 7.2 as the oracle. A qcow2 with two enabled bitmaps is written
// through layerd by a verifying client; then qemu-img check must find it
// clean, and layerd -B and qemu-nbd -B over the result must give the same
// maps (nbdinfo --map, qemu-img map with x-dirty-bitmap), with every
// written range dirty. Bitmaps of a backing image, and the refusals at
// start (missing, inconsistent), as qemu-nbd.

#include <libnbd.h>

#include <algorithm>
#include <csignal>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "tests/server/harness.h"
#include "tests/server/qcow2_tools.h"

namespace layerd::test {
namespace {

using qcow2e2e::Rng;
using qcow2e2e::run_expect;
using qcow2e2e::unix_uri;

constexpr uint64_t kSize = 64ull << 20;

struct Written {
  uint64_t offset;
  uint64_t length;
};

// One line of `nbdinfo --map`: offset, length, type.
struct MapEntry {
  uint64_t offset, length;
  uint32_t type;
};

std::vector<MapEntry> parse_map(const std::string& text) {
  std::vector<MapEntry> v;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream l(line);
    MapEntry e{};
    if (l >> e.offset >> e.length >> e.type) v.push_back(e);
  }
  return v;
}

bool all_dirty(const std::vector<MapEntry>& map, Written w) {
  uint64_t at = w.offset;
  const uint64_t end = w.offset + w.length;
  for (const auto& e : map) {
    if (e.offset + e.length <= at || e.offset > at) continue;
    if (!(e.type & 1)) return false;
    at = e.offset + e.length;
    if (at >= end) return true;
  }
  return at >= end;
}

class BitmapExport : public ::testing::Test {
 protected:
  void SetUp() override {
    if (server_is_qemu_nbd()) GTEST_SKIP() << "compares layerd with qemu-nbd";
  }

  fs::path image() const { return dir_ / "disk.qcow2"; }
  fs::path sock() const { return dir_ / "s.sock"; }

  void CreateImageWithBitmaps(const fs::path& file) {
    run_expect({"qemu-img", "create", "-q", "-f", "qcow2", file.string(),
                std::to_string(kSize)});
    run_expect({"qemu-img", "bitmap", "--add", file.string(), "b0"});
    run_expect({"qemu-img", "bitmap", "--add", "-g", "4096", file.string(), "b1"});
  }

  // Starts `binary` (layerd when empty) with `args` then the image.
  void Start(Server& s, const std::string& binary, std::vector<std::string> args,
             const fs::path& file) {
    ServerOptions o;
    o.binary = binary;
    o.args = std::move(args);
    o.args.insert(o.args.end(), {"-k", sock().string(), file.string()});
    o.unix_socket = sock();
    o.log_file = dir_ / (binary.empty() ? "layerd.log" : "qemu-nbd.log");
    ASSERT_TRUE(s.start(o)) << s.error();
  }

  // The map of `context` from layerd and from qemu-nbd serving `file`
  // read-only with -B for every bitmap in `bitmaps`.
  std::string MapOf(const std::string& binary, const fs::path& file,
                    const std::vector<std::string>& bitmaps,
                    const std::string& context) {
    Server s;
    std::vector<std::string> args{"-r", "-t", "-f", "qcow2"};
    for (const auto& b : bitmaps) args.insert(args.end(), {"-B", b});
    Start(s, binary, args, file);
    RunResult r = run_expect({"nbdinfo", "--map=" + context, unix_uri(sock())});
    s.stop();
    return r.out;
  }

  std::string QemuImgMapOf(const std::string& binary, const fs::path& file,
                           const std::string& bitmap) {
    Server s;
    Start(s, binary, {"-r", "-t", "-f", "qcow2", "-B", bitmap}, file);
    RunResult r = run_expect(
        {"qemu-img", "map", "--output=json", "--image-opts",
         "driver=nbd,server.type=unix,server.path=" + sock().string() +
             ",x-dirty-bitmap=qemu:dirty-bitmap:" + bitmap});
    s.stop();
    return r.out;
  }

  TempDir dir_;
};

TEST_F(BitmapExport, WritesThroughLayerdAreDirtyAndMapsMatchQemuNbd) {
  CreateImageWithBitmaps(image());
  std::vector<Written> written;
  {
    Server s;
    ASSERT_NO_FATAL_FAILURE(
        Start(s, "", {"-f", "qcow2", "--discard=unmap", "-B", "b0", "-B", "b1"}, image()));
    Nbd h = nbd_connect_to_unix(sock());
    ASSERT_TRUE(h);
    Rng rng(10);
    // Writes, zero writes and trims at known ranges, each read back.
    for (int i = 0; i < 40; ++i) {
      uint64_t len = rng.between(1, 300000);
      uint64_t off = rng.below(kSize - len);
      std::vector<uint8_t> data = pattern(off, len, 7 + i);
      switch (i % 4) {
        case 0:
        case 1:
          ASSERT_EQ(nbd_pwrite(h.get(), data.data(), len, off, 0), 0) << nbd_error_text();
          break;
        case 2:
          ASSERT_EQ(nbd_zero(h.get(), len, off, 0), 0) << nbd_error_text();
          data.assign(len, 0);
          break;
        case 3:
          // Written first, so the trim has something to free.
          ASSERT_EQ(nbd_pwrite(h.get(), data.data(), len, off, 0), 0) << nbd_error_text();
          ASSERT_EQ(nbd_trim(h.get(), len, off, 0), 0) << nbd_error_text();
          data.clear();
          break;
      }
      if (!data.empty()) {
        std::vector<uint8_t> back(len);
        ASSERT_EQ(nbd_pread(h.get(), back.data(), len, off, 0), 0) << nbd_error_text();
        ASSERT_EQ(first_difference(back, data), -1) << "at " << off;
      }
      written.push_back({off, len});
    }
    h.reset();
    EXPECT_EQ(s.stop(), 0) << s.log();
  }
  RunResult check = run_expect({"qemu-img", "check", image().string()});
  EXPECT_NE(check.out.find("No errors were found"), std::string::npos) << check.out;

  for (const char* b : {"b0", "b1"}) {
    const std::string ctx = std::string("qemu:dirty-bitmap:") + b;
    const std::string ours = MapOf("", image(), {"b0", "b1"}, ctx);
    const std::string theirs = MapOf("/usr/bin/qemu-nbd", image(), {"b0", "b1"}, ctx);
    EXPECT_EQ(ours, theirs) << b;
    auto map = parse_map(ours);
    ASSERT_FALSE(map.empty()) << ours;
    for (const Written& w : written)
      EXPECT_TRUE(all_dirty(map, w)) << b << ": " << w.offset << "+" << w.length
                                     << " not dirty in\n" << ours;
    EXPECT_EQ(QemuImgMapOf("", image(), b), QemuImgMapOf("/usr/bin/qemu-nbd", image(), b))
        << b;
  }
}

TEST_F(BitmapExport, LiveExportShowsWritesAsTheyHappen) {
  CreateImageWithBitmaps(image());
  Server s;
  ASSERT_NO_FATAL_FAILURE(Start(s, "", {"-f", "qcow2", "-B", "b1"}, image()));
  Nbd h = nbd_connect_to_unix(sock(), [](nbd_handle* c) {
    nbd_add_meta_context(c, "qemu:dirty-bitmap:b1");
  });
  ASSERT_TRUE(h);
  ASSERT_EQ(nbd_can_meta_context(h.get(), "qemu:dirty-bitmap:b1"), 1);
  struct Seen {
    std::vector<uint32_t> v;
  } seen;
  auto status = [&](uint64_t off, uint64_t len) {
    seen.v.clear();
    nbd_extent_callback cb{
        .callback = [](void* u, const char* ctx, uint64_t, uint32_t* e, size_t n,
                       int*) -> int {
          if (std::string(ctx) == "qemu:dirty-bitmap:b1")
            static_cast<Seen*>(u)->v.assign(e, e + n);
          return 0;
        },
        .user_data = &seen,
        .free = nullptr};
    EXPECT_EQ(nbd_block_status(h.get(), len, off, cb, 0), 0) << nbd_error_text();
    return seen.v;
  };
  EXPECT_EQ(status(0, 1 << 20), (std::vector<uint32_t>{1 << 20, 0}));
  std::vector<uint8_t> data(100, 0xab);
  ASSERT_EQ(nbd_pwrite(h.get(), data.data(), data.size(), 8192 + 10, 0), 0);
  // 4 KiB granularity: the granule [8K, 12K) is dirty.
  EXPECT_EQ(status(0, 1 << 20),
            (std::vector<uint32_t>{8192, 0, 4096, 1, (1 << 20) - 12288, 0}));
  // REQ_ONE: one extent.
  seen.v.clear();
  nbd_extent_callback cb{
      .callback = [](void* u, const char* ctx, uint64_t, uint32_t* e, size_t n,
                     int*) -> int {
        if (std::string(ctx) == "qemu:dirty-bitmap:b1")
          static_cast<Seen*>(u)->v.assign(e, e + n);
        return 0;
      },
      .user_data = &seen,
      .free = nullptr};
  ASSERT_EQ(nbd_block_status(h.get(), 1 << 20, 9000, cb, LIBNBD_CMD_FLAG_REQ_ONE), 0);
  EXPECT_EQ(seen.v, (std::vector<uint32_t>{12288 - 9000, 1}));
  h.reset();
  s.stop();
}

// One BLOCK_STATUS for base:allocation and two bitmaps at once, whole and
// with REQ_ONE, gives each context its own extents, as qemu-nbd does
// (libnbd's interop/dirty-bitmap.sh): a context's first extent is never
// merged into the previous context's last one when their flags match.
TEST_F(BitmapExport, BlockStatusOfSeveralContextsAtOnceMatchesQemuNbd) {
  run_expect({"qemu-img", "create", "-q", "-f", "qcow2", image().string(), "1M"});
  qcow2e2e::qemu_io(image(), "qcow2", {"write 0 64k"});
  run_expect({"qemu-img", "bitmap", "--add", image().string(), "b0"});
  run_expect({"qemu-img", "bitmap", "--add", image().string(), "b1"});
  qcow2e2e::qemu_io(image(), "qcow2", {"write 64k 64k", "write -z 512k 64k"});
  const std::vector<std::string> contexts{"base:allocation", "qemu:dirty-bitmap:b0",
                                          "qemu:dirty-bitmap:b1"};
  // Context name -> its extents, for one request.
  using Answer = std::map<std::string, std::vector<uint32_t>>;
  auto statuses = [&](const std::string& binary) {
    Server s;
    Start(s, binary, {"-r", "-f", "qcow2", "-B", "b0", "-B", "b1"}, image());
    Nbd h = nbd_connect_to_unix(sock(), [&](nbd_handle* c) {
      for (const auto& ctx : contexts) nbd_add_meta_context(c, ctx.c_str());
    });
    std::vector<Answer> answers;
    if (!h) {
      ADD_FAILURE() << binary << ": " << nbd_error_text();
      return answers;
    }
    for (uint32_t flags : {0u, uint32_t{LIBNBD_CMD_FLAG_REQ_ONE}}) {
      Answer a;
      nbd_extent_callback cb{
          .callback = [](void* u, const char* ctx, uint64_t, uint32_t* e, size_t n,
                         int*) -> int {
            (*static_cast<Answer*>(u))[ctx].assign(e, e + n);
            return 0;
          },
          .user_data = &a,
          .free = nullptr};
      EXPECT_EQ(nbd_block_status(h.get(), 1 << 20, 0, cb, flags), 0) << nbd_error_text();
      answers.push_back(a);
    }
    h.reset();
    s.stop();
    return answers;
  };
  const std::vector<Answer> ours = statuses("");
  const std::vector<Answer> theirs = statuses("/usr/bin/qemu-nbd");
  ASSERT_EQ(ours.size(), 2u);
  EXPECT_EQ(ours, theirs);
  const std::vector<uint32_t> dirty{65536, 0, 65536, 1, 393216, 0, 65536, 1, 458752, 0};
  EXPECT_EQ(ours[0].at("base:allocation"), (std::vector<uint32_t>{131072, 0, 917504, 3}));
  EXPECT_EQ(ours[0].at("qemu:dirty-bitmap:b0"), dirty);
  EXPECT_EQ(ours[0].at("qemu:dirty-bitmap:b1"), dirty);
  EXPECT_EQ(ours[1].at("base:allocation"), (std::vector<uint32_t>{131072, 0}));
  EXPECT_EQ(ours[1].at("qemu:dirty-bitmap:b0"), (std::vector<uint32_t>{65536, 0}));
  EXPECT_EQ(ours[1].at("qemu:dirty-bitmap:b1"), (std::vector<uint32_t>{65536, 0}));
}

TEST_F(BitmapExport, ListingQemuDirtyBitmapNamespaceGivesEveryBitmap) {
  CreateImageWithBitmaps(image());
  Server s;
  ASSERT_NO_FATAL_FAILURE(Start(s, "", {"-r", "-f", "qcow2", "-B", "b0", "-B", "b1"}, image()));
  Nbd h(nbd_create());
  ASSERT_TRUE(h);
  nbd_set_opt_mode(h.get(), true);
  ASSERT_EQ(nbd_connect_unix(h.get(), sock().c_str()), 0) << nbd_error_text();
  nbd_add_meta_context(h.get(), "qemu:dirty-bitmap:");
  std::vector<std::string> names;
  nbd_context_callback cb{
      .callback = [](void* u, const char* name) -> int {
        static_cast<std::vector<std::string>*>(u)->push_back(name);
        return 0;
      },
      .user_data = &names,
      .free = nullptr};
  ASSERT_GE(nbd_opt_list_meta_context(h.get(), cb), 0) << nbd_error_text();
  EXPECT_EQ(names, (std::vector<std::string>{"qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"}));
  nbd_opt_abort(h.get());
  h.reset();
  s.stop();
}

TEST_F(BitmapExport, BitmapOfABackingImageIsFoundAsQemuNbdFindsIt) {
  const fs::path base = dir_ / "base.qcow2";
  CreateImageWithBitmaps(base);
  qcow2e2e::qemu_io(base, "qcow2", {"write 1M 64k", "write 20M 1k"});
  run_expect({"qemu-img", "create", "-q", "-f", "qcow2", "-b", base.string(), "-F",
              "qcow2", image().string()});
  qcow2e2e::qemu_io(image(), "qcow2", {"write 30M 64k"});  // not in base's bitmap
  const std::string ctx = "qemu:dirty-bitmap:b0";
  const std::string ours = MapOf("", image(), {"b0"}, ctx);
  EXPECT_EQ(ours, MapOf("/usr/bin/qemu-nbd", image(), {"b0"}, ctx));
  auto map = parse_map(ours);
  EXPECT_TRUE(all_dirty(map, {1 << 20, 65536})) << ours;
  EXPECT_TRUE(all_dirty(map, {20 << 20, 1024})) << ours;
  EXPECT_FALSE(all_dirty(map, {30 << 20, 65536})) << ours;
}

TEST_F(BitmapExport, MissingBitmapIsRefusedAtStartAsQemuNbdRefusesIt) {
  CreateImageWithBitmaps(image());
  for (const std::string& binary : {server_binary(), std::string("/usr/bin/qemu-nbd")}) {
    RunResult r = run({binary, "-r", "-f", "qcow2", "-B", "b0", "-B", "nope", "-k",
                       sock().string(), image().string()},
                      10s);
    EXPECT_EQ(r.exit_code, 1) << binary << r.describe();
    EXPECT_NE(r.err.find("Bitmap 'nope' is not found"), std::string::npos) << r.describe();
    EXPECT_FALSE(unix_socket_listening(sock()));
  }
  // A raw image has no bitmaps.
  const fs::path raw = dir_ / "disk.raw";
  create_pattern_image(raw, 1 << 20, 1);
  RunResult r = run_server_binary({"-r", "-f", "raw", "-B", "b0", "-k", sock().string(),
                                   raw.string()});
  EXPECT_EQ(r.exit_code, 1) << r.describe();
  EXPECT_NE(r.err.find("Bitmap 'b0' is not found"), std::string::npos) << r.describe();
}

TEST_F(BitmapExport, InconsistentBitmapIsRefusedAtStartAsQemuNbdRefusesIt) {
  CreateImageWithBitmaps(image());
  {
    // A writer killed while it records leaves the bitmaps in use.
    Server s;
    ASSERT_NO_FATAL_FAILURE(Start(s, "", {"-f", "qcow2"}, image()));
    s.signal(SIGKILL);
    s.wait_exit(10s);
  }
  RunResult info = run_expect({"qemu-img", "info", "-U", image().string()});
  ASSERT_NE(info.out.find("in-use"), std::string::npos) << info.out;
  for (const std::string& binary : {server_binary(), std::string("/usr/bin/qemu-nbd")}) {
    RunResult r = run({binary, "-r", "-f", "qcow2", "-B", "b1", "-k", sock().string(),
                       image().string()},
                      10s);
    EXPECT_EQ(r.exit_code, 1) << binary << r.describe();
    EXPECT_NE(r.err.find("Bitmap 'b1' is inconsistent and cannot be used"),
              std::string::npos)
        << r.describe();
  }
}

TEST_F(BitmapExport, OffsetHidesBitmapsAsInQemuNbd) {
  CreateImageWithBitmaps(image());
  for (const std::string& binary : {server_binary(), std::string("/usr/bin/qemu-nbd")}) {
    RunResult r = run({binary, "-r", "-f", "qcow2", "-o", "65536", "-B", "b0", "-k",
                       sock().string(), image().string()},
                      10s);
    EXPECT_EQ(r.exit_code, 1) << binary << r.describe();
    EXPECT_NE(r.err.find("Bitmap 'b0' is not found"), std::string::npos) << r.describe();
  }
}

TEST_F(BitmapExport, BitmapKeyInExportSpec) {
  CreateImageWithBitmaps(image());
  ServerOptions o;
  o.args = {"--export", "name=d,file=" + image().string() +
                            ",format=qcow2,read-only=on,bitmap=b0,bitmap=b1",
            "-k", sock().string()};
  o.unix_socket = sock();
  o.log_file = dir_ / "spec.log";
  Server t;
  ASSERT_TRUE(t.start(o)) << t.error();
  RunResult r = run_expect({"nbdinfo", "--list", unix_uri(sock())});
  EXPECT_NE(r.out.find("qemu:dirty-bitmap:b0"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("qemu:dirty-bitmap:b1"), std::string::npos) << r.out;
  t.stop();
}

}  // namespace
}  // namespace layerd::test
