// The image policy end to end (--image-dir): the real binary with chains
// qemu-img made, whose backing and data files lie inside or outside the
// allowed image directories; refused with a message that names the file
// and the --image-dir that allows it, served once that is given; file
// names sent over QMP (blockdev-snapshot-sync, block-export-add) and the
// images a SIGHUP reload opens are held to the same directories.
#include <signal.h>

#include <fstream>

#include <boost/json.hpp>

#include "server/layerctl/qmp_client.h"
#include "tests/server/harness.h"
#include "tests/server/qcow2_tools.h"

namespace layerd::test {
namespace {

namespace json = boost::json;
using ctl::QmpClient;
using qcow2e2e::run_expect;

constexpr uint64_t kSize = 1 << 20;

class ImageDirs : public ::testing::Test {
 protected:
  void SetUp() override {
    SKIP_UNLESS_LAYERD();
    fs::create_directories(img());
    fs::create_directories(other());
    create_pattern_image(other() / "base.raw", kSize, 7);
    create_pattern_image(img() / "near.raw", kSize, 8);
  }
  void TearDown() override {
    qmp_.reset();
    if (server_.running()) server_.stop();
  }
  fs::path img() const { return dir_ / "img"; }
  fs::path other() const { return dir_ / "other"; }
  fs::path socket() const { return dir_ / "nbd.sock"; }
  fs::path qmp_socket() const { return dir_ / "qmp.sock"; }

  // A qcow2 image `top` over the raw backing file named `backing`.
  void make_top(const fs::path& top, const std::string& backing) {
    run_expect({"qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw",
                top.string(), std::to_string(kSize)});
  }
  // layerd's exit and stderr for a start that should fail at once.
  RunResult refused_start(std::vector<std::string> args) {
    args.insert(args.begin(), {"-r", "-f", "qcow2", "-k", socket().string()});
    return run_server_binary(args);
  }
  bool start(std::vector<std::string> args, bool qmp = false) {
    ServerOptions o;
    o.args = {"-t", "-f", "qcow2", "-x", "disk", "-k", socket().string()};
    if (qmp) o.args.insert(o.args.end(), {"--qmp", qmp_socket().string()});
    o.args.insert(o.args.end(), args.begin(), args.end());
    o.unix_socket = socket();
    o.log_file = dir_ / "server.log";
    if (!server_.start(o)) {
      ADD_FAILURE() << server_.error();
      return false;
    }
    if (qmp) {
      if (!wait_until([&] { return unix_socket_listening(qmp_socket()); }, 10s)) return false;
      qmp_ = std::make_unique<QmpClient>(qmp_socket().string());
    }
    return true;
  }
  // The first 4 KiB of export `name`.
  std::vector<uint8_t> read_start(const std::string& name = "disk") {
    Nbd h = nbd_connect_to_unix(socket(),
                                [&](nbd_handle* n) { nbd_set_export_name(n, name.c_str()); });
    std::vector<uint8_t> got(4096);
    if (!h || nbd_pread(h.get(), got.data(), got.size(), 0, 0) != 0) {
      ADD_FAILURE() << "reading export '" << name << "' failed";
      return {};
    }
    return got;
  }
  std::string refused(const std::string& cmd, json::object args) {
    try {
      qmp_->execute(cmd, args);
    } catch (const ctl::QmpError& e) {
      return e.desc;
    }
    ADD_FAILURE() << cmd << " " << json::serialize(args) << " was accepted";
    return {};
  }

  TempDir dir_;
  Server server_;
  std::unique_ptr<QmpClient> qmp_;
};

TEST_F(ImageDirs, BackingFileOutsideIsRefusedNamingTheOptionThatAllowsIt) {
  const fs::path top = img() / "top.qcow2", base = other() / "base.raw";
  make_top(top, base.string());
  RunResult r = refused_start({top.string()});
  EXPECT_EQ(r.exit_code, 1) << r.describe();
  EXPECT_NE(r.err.find("backing file '" + base.string() + "' of '" + top.string() +
                       "' is outside the allowed image directories (" + img().string() +
                       "); allow it with --image-dir " + other().string()),
            std::string::npos)
      << r.err;
}

TEST_F(ImageDirs, BackingFileOutsideIsServedWithImageDir) {
  const fs::path top = img() / "top.qcow2";
  make_top(top, (other() / "base.raw").string());
  ASSERT_TRUE(start({"--image-dir", other().string(), top.string()}));
  EXPECT_EQ(read_start(), pattern(0, 4096, 7));
}

TEST_F(ImageDirs, ImageDirRootFollowsNamesAnywhere) {
  const fs::path top = img() / "top.qcow2";
  make_top(top, (other() / "base.raw").string());
  ASSERT_TRUE(start({"--image-dir", "/", top.string()}));
  EXPECT_EQ(read_start(), pattern(0, 4096, 7));
}

TEST_F(ImageDirs, BackingInTheImagesOwnDirectoryIsServedByDefault) {
  const fs::path top = img() / "top.qcow2";
  make_top(top, "near.raw");
  ASSERT_TRUE(start({top.string()}));
  EXPECT_EQ(read_start(), pattern(0, 4096, 8));
}

TEST_F(ImageDirs, EscapesThroughDotDotAndSymlinksAreRefused) {
  struct Case {
    std::string backing;
    std::string link;  // made a symlink to other/base.raw first
  } cases[] = {{"../other/base.raw", ""},
               {"sub/../../other/base.raw", ""},
               {"link.raw", "../other/base.raw"},
               {"abs-link.raw", (other() / "base.raw").string()}};
  fs::create_directories(img() / "sub");
  for (const Case& c : cases) {
    SCOPED_TRACE(c.backing);
    if (!c.link.empty()) fs::create_symlink(c.link, img() / c.backing);
    const fs::path top = img() / "top.qcow2";
    fs::remove(top);
    make_top(top, c.backing);
    RunResult r = refused_start({top.string()});
    EXPECT_EQ(r.exit_code, 1) << r.describe();
    EXPECT_NE(r.err.find("is outside the allowed image directories"), std::string::npos)
        << r.err;
    EXPECT_NE(r.err.find("--image-dir " + other().string()), std::string::npos) << r.err;
  }
}

TEST_F(ImageDirs, ProtocolBackingNamesAreRefused) {
  for (std::string backing : {"nbd:localhost:10809", "nbd+unix:///disk?socket=/tmp/s",
                              "http://example.com/base.raw", "file:near.raw"}) {
    SCOPED_TRACE(backing);
    const fs::path top = img() / "top.qcow2";
    fs::remove(top);
    make_top(top, backing);
    RunResult r = refused_start({"--image-dir", "/", top.string()});
    EXPECT_EQ(r.exit_code, 1) << r.describe();
    EXPECT_NE(r.err.find("protocol name"), std::string::npos) << r.err;
  }
}

TEST_F(ImageDirs, DataFileOutsideIsRefusedAndAllowedWithImageDir) {
  const fs::path top = img() / "top.qcow2", data = other() / "top.data";
  run_expect({"qemu-img", "create", "-q", "-f", "qcow2", "-o",
              "data_file=" + data.string(), top.string(), std::to_string(kSize)});
  run_expect({"qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", top.string()});
  RunResult r = refused_start({"--allow-data-file", top.string()});
  EXPECT_EQ(r.exit_code, 1) << r.describe();
  EXPECT_NE(r.err.find("data file '" + data.string() + "' of '" + top.string() +
                       "' is outside the allowed image directories"),
            std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("--image-dir " + other().string()), std::string::npos) << r.err;
  ASSERT_TRUE(start({"--allow-data-file", "--image-dir", other().string(), top.string()}));
  EXPECT_EQ(read_start(), std::vector<uint8_t>(4096, 0x5a));
}

TEST_F(ImageDirs, SnapshotFileOutsideIsRefusedOverQmp) {
  const fs::path top = img() / "top.qcow2";
  run_expect({"qemu-img", "create", "-q", "-f", "qcow2", top.string(), std::to_string(kSize)});
  ASSERT_TRUE(start({top.string()}, /*qmp=*/true));
  const fs::path outside = other() / "snap.qcow2";
  std::string why = refused("blockdev-snapshot-sync",
                            {{"device", "disk"}, {"snapshot-file", outside.string()}});
  EXPECT_NE(why.find("snapshot file '" + outside.string() +
                     "' is outside the allowed image directories"),
            std::string::npos)
      << why;
  EXPECT_NE(why.find("--image-dir " + other().string()), std::string::npos) << why;
  EXPECT_FALSE(fs::exists(outside));
  EXPECT_TRUE(fs::is_empty(other()) || !fs::exists(other() / ".snap.qcow2.layerd-new"));
  // Through `..` and through a symlinked directory: refused the same way.
  fs::create_directory_symlink(other(), img() / "elsewhere");
  for (const fs::path& p : {img() / ".." / "other" / "snap2.qcow2",
                            img() / "elsewhere" / "snap3.qcow2"}) {
    why = refused("blockdev-snapshot-sync", {{"device", "disk"}, {"snapshot-file", p.string()}});
    EXPECT_NE(why.find("outside the allowed image directories"), std::string::npos) << why;
  }
  EXPECT_FALSE(fs::exists(other() / "snap2.qcow2"));
  EXPECT_FALSE(fs::exists(other() / "snap3.qcow2"));
  why = refused("blockdev-snapshot-sync",
                {{"device", "disk"}, {"snapshot-file", "nbd:localhost:10809"}});
  EXPECT_NE(why.find("protocol name"), std::string::npos) << why;
  // Inside, it works.
  const fs::path inside = img() / "snap.qcow2";
  qmp_->execute("blockdev-snapshot-sync", {{"device", "disk"}, {"snapshot-file", inside.string()}});
  EXPECT_TRUE(fs::exists(inside));
}

TEST_F(ImageDirs, SnapshotFileOutsideIsAllowedWithImageDir) {
  const fs::path top = img() / "top.qcow2";
  run_expect({"qemu-img", "create", "-q", "-f", "qcow2", top.string(), std::to_string(kSize)});
  ASSERT_TRUE(start({"--image-dir", other().string(), top.string()}, /*qmp=*/true));
  const fs::path snap = other() / "snap.qcow2";
  qmp_->execute("blockdev-snapshot-sync", {{"device", "disk"}, {"snapshot-file", snap.string()}});
  RunResult info = run_expect({"qemu-img", "info", "-U", "--output=json", snap.string()});
  EXPECT_NE(info.out.find(top.string()), std::string::npos) << info.out;
}

TEST_F(ImageDirs, BlockExportAddOutsideIsRefused) {
  const fs::path top = img() / "top.qcow2";
  run_expect({"qemu-img", "create", "-q", "-f", "qcow2", top.string(), std::to_string(kSize)});
  ASSERT_TRUE(start({top.string()}, /*qmp=*/true));
  const fs::path outside = other() / "base.raw";
  std::string why = refused("block-export-add", {{"type", "nbd"}, {"id", "more"},
                                                 {"node-name", outside.string()},
                                                 {"format", "raw"}});
  EXPECT_NE(why.find("image '" + outside.string() + "' is outside the allowed image directories"),
            std::string::npos)
      << why;
  // Without a format too (the probe must not read it either).
  why = refused("block-export-add",
                {{"type", "nbd"}, {"id", "more"}, {"node-name", outside.string()}});
  EXPECT_NE(why.find("outside the allowed image directories"), std::string::npos) << why;
  // Inside the directory of the image given at start, it is served.
  qmp_->execute("block-export-add", {{"type", "nbd"}, {"id", "near"},
                                     {"node-name", (img() / "near.raw").string()},
                                     {"format", "raw"}});
  EXPECT_EQ(read_start("near"), pattern(0, 4096, 8));
}

TEST_F(ImageDirs, ReloadedExportWithBackingOutsideIsRefused) {
  const fs::path top = img() / "top.qcow2";
  make_top(top, (other() / "base.raw").string());
  const fs::path config = dir_ / "exports.conf";
  auto write_config = [&](const std::string& text) {
    std::ofstream(config, std::ios::trunc) << text;
  };
  write_config("[export]\nname = near\nfile = " + (img() / "near.raw").string() +
               "\nformat = raw\nread-only = on\n");
  ServerOptions o;
  o.args = {"-t", "--log=info", "-k", socket().string(), "--config", config.string()};
  o.unix_socket = socket();
  o.log_file = dir_ / "server.log";
  ASSERT_TRUE(server_.start(o)) << server_.error();
  // Served: the server handles SIGHUP from now on.
  EXPECT_EQ(read_start("near"), pattern(0, 4096, 8));
  write_config("[export]\nname = top\nfile = " + top.string() +
               "\nformat = qcow2\nread-only = on\n");
  server_.signal(SIGHUP);
  ASSERT_TRUE(wait_until([&] {
    return server_.log().find("keeping the exports as they were") != std::string::npos;
  }, 10s)) << server_.log();
  EXPECT_NE(server_.log().find("is outside the allowed image directories"), std::string::npos)
      << server_.log();
  EXPECT_EQ(read_start("near"), pattern(0, 4096, 8));
}

}  // namespace
}  // namespace layerd::test
