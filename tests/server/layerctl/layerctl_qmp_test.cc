// End-to-end tests of layerctl's live commands (`layerctl --qmp PATH ...`)
// against qemu-storage-daemon, whose QMP is the protocol layerd's control
// socket speaks: the daemon exports base <- mid <- top over NBD, layerctl
// drives snapshots and block jobs on it, and qemu-img checks the files.
// Skipped where /usr/bin/qemu-storage-daemon is not installed.
#include <cstdlib>
#include <future>
#include <string>
#include <vector>

#include <boost/json.hpp>
#include <gtest/gtest.h>

#include "tests/server/harness.h"

namespace layerd::test {
namespace {

namespace json = boost::json;

constexpr const char* kQsd = "/usr/bin/qemu-storage-daemon";

// $LAYERCTL_BIN if set by hand, else the build's layerctl, in the
// layerctl/ folder beside $LAYERD_BIN (which ctest sets).
std::string ctl_binary() {
  if (const char* bin = std::getenv("LAYERCTL_BIN"); bin && *bin) return bin;
  if (const char* server = std::getenv("LAYERD_BIN"); server && *server) {
    fs::path built = fs::path(server).parent_path() / "layerctl" / "layerctl";
    if (fs::is_regular_file(built)) return built.string();
  }
  return "";
}

RunResult ctl(std::vector<std::string> args) {
  args.insert(args.begin(), ctl_binary());
  return run(args);
}

RunResult qemu_img(std::vector<std::string> args) {
  args.insert(args.begin(), "qemu-img");
  return run(args);
}

void qemu_io(const std::string& image, const std::vector<std::string>& commands) {
  std::vector<std::string> argv = {"qemu-io", "-f", "qcow2"};
  for (const auto& c : commands) {
    argv.push_back("-c");
    argv.push_back(c);
  }
  argv.push_back(image);
  RunResult r = run(argv);
  ASSERT_EQ(r.exit_code, 0) << r.describe();
}

json::value parse(const std::string& text) {
  boost::system::error_code ec;
  json::value v = json::parse(text, ec);
  EXPECT_FALSE(ec) << "not JSON: " << text;
  return v;
}

// A JSON string's text (anything else serialized), for EXPECT_EQ.
std::string str(const json::value& v) {
  return v.is_string() ? std::string(v.get_string()) : json::serialize(v);
}

// qemu-img info -U of one image (the daemon holds it open).
json::object image_info(const std::string& image) {
  RunResult r = qemu_img({"info", "-U", "--output=json", image});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  json::value v = parse(r.out);
  return v.is_object() ? v.get_object() : json::object{};
}

class LayerctlQmpTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(kQsd)) GTEST_SKIP() << kQsd << " is not installed";
    if (ctl_binary().empty()) GTEST_SKIP() << "LAYERCTL_BIN is not set";
    // 4 MiB images: base has 0-2M, mid 1.5M-2.5M, top 3M-3.5M.
    make_image("base.qcow2", "");
    qemu_io(path("base.qcow2"), {"write -P 1 0 2M"});
    make_image("mid.qcow2", path("base.qcow2"));
    qemu_io(path("mid.qcow2"), {"write -P 2 1536k 1M"});
    make_image("top.qcow2", path("mid.qcow2"));
    qemu_io(path("top.qcow2"), {"write -P 3 3M 512k"});
    // What the guest sees, to compare with after the jobs.
    RunResult r = qemu_img({"convert", "-O", "raw", path("top.qcow2"), path("guest.raw")});
    ASSERT_EQ(r.exit_code, 0) << r.describe();

    ServerOptions o;
    o.binary = kQsd;
    o.args = {"--blockdev", "driver=file,filename=" + path("base.qcow2") + ",node-name=base-file",
              "--blockdev", "driver=qcow2,file=base-file,node-name=base",
              "--blockdev", "driver=file,filename=" + path("mid.qcow2") + ",node-name=" +
                                (faulty_mid() ? "mid-raw" : "mid-file"),
              "--blockdev", "driver=qcow2,file=mid-file,backing=base,node-name=mid",
              "--blockdev", "driver=file,filename=" + path("top.qcow2") + ",node-name=top-file",
              "--blockdev", "driver=qcow2,file=top-file,backing=mid,node-name=top",
              "--nbd-server", "addr.type=unix,addr.path=" + path("nbd.sock"),
              "--export", "type=nbd,id=exp0,node-name=top,name=exp0,writable=on",
              "--chardev", "socket,path=" + qmp() + ",server=on,wait=off,id=m",
              "--monitor", "chardev=m",
              // A QEMU monitor serves one client at a time: a second one
              // for a follower that stays connected.
              "--chardev", "socket,path=" + path("qmp2.sock") + ",server=on,wait=off,id=m2",
              "--monitor", "chardev=m2"};
    if (faulty_mid()) {
      // Every data read from mid's file fails with EIO. (Its filename is
      // then blkdebug's JSON, not mid.qcow2.)
      o.args.insert(o.args.begin() + 6,
                    {"--blockdev", "driver=blkdebug,image=mid-raw,node-name=mid-file,"
                                   "inject-error.0.event=read_aio,inject-error.0.errno=5"});
    }
    o.unix_socket = dir_ / "qmp2.sock";  // made after qmp.sock
    o.log_file = dir_ / "qsd.log";
    ASSERT_TRUE(qsd_.start(std::move(o))) << qsd_.error();
  }

  virtual bool faulty_mid() const { return false; }

  std::string path(std::string_view name) const { return (dir_ / name).string(); }
  std::string qmp() const { return path("qmp.sock"); }

  void make_image(const std::string& name, const std::string& backing) {
    std::vector<std::string> argv = {"create", "-q", "-f", "qcow2"};
    if (!backing.empty()) argv.insert(argv.end(), {"-b", backing, "-F", "qcow2"});
    argv.insert(argv.end(), {path(name), "4M"});
    RunResult r = qemu_img(argv);
    ASSERT_EQ(r.exit_code, 0) << r.describe();
  }

  // layerctl --qmp <socket> args...
  RunResult live(std::vector<std::string> args) {
    args.insert(args.begin(), {"--qmp", qmp()});
    return ctl(std::move(args));
  }

  // The block jobs the daemon reports (query-block-jobs through layerctl).
  json::array jobs() {
    RunResult r = live({"jobs", "--output=json"});
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    json::value v = parse(r.out);
    return v.is_array() ? v.get_array() : json::array{};
  }

  // Guest data of `image` (through its chain) equals what top showed at
  // the start.
  // The daemon is stopped first: qemu-img must see its caches written out.
  void expect_guest_data_unchanged(const std::string& image) {
    if (qsd_.running()) {
      EXPECT_EQ(qsd_.stop(), 0) << qsd_.log();
    }
    RunResult r = qemu_img({"compare", "-U", image, path("guest.raw")});
    EXPECT_EQ(r.exit_code, 0) << r.describe();
  }

  TempDir dir_;
  Server qsd_;
};

TEST_F(LayerctlQmpTest, SnapshotOfTheExportedNodePutsTheNewFileOnTopOfTheChain) {
  RunResult r = live({"snapshot", "--node-name=snap", "top", path("snap.qcow2")});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  ASSERT_TRUE(fs::exists(path("snap.qcow2")));

  json::object info = image_info(path("snap.qcow2"));
  EXPECT_EQ(info["format"], "qcow2");
  EXPECT_EQ(str(info["backing-filename"]), path("top.qcow2"));
  EXPECT_EQ(info["virtual-size"], 4 << 20);

  // The daemon's view: the new node's chain is snap <- top <- mid <- base,
  // and the export now serves it.
  RunResult i = live({"info", "snap"});
  ASSERT_EQ(i.exit_code, 0) << i.describe();
  EXPECT_NE(i.out.find(path("snap.qcow2") + " (qcow2"), std::string::npos) << i.out;
  for (const char* below : {"top.qcow2", "mid.qcow2", "base.qcow2"})
    EXPECT_NE(i.out.find("backing: " + path(below)), std::string::npos) << i.out;
  RunResult e = live({"exports", "--output=json"});
  ASSERT_EQ(e.exit_code, 0) << e.describe();
  json::value exports = parse(e.out);
  ASSERT_TRUE(exports.is_array() && exports.get_array().size() == 1) << e.out;
  EXPECT_EQ(exports.get_array()[0].at("node-name"), "snap");
  expect_guest_data_unchanged(path("snap.qcow2"));
}

TEST_F(LayerctlQmpTest, StreamWithWaitExits0AndLeavesTheTopWithoutBacking) {
  // 2.5 MiB to copy at 768 KiB/s: over 3 s, so plain progress lines (one
  // every 2 s when stdout is not a terminal) appear.
  RunResult r = live({"stream", "--speed=768k", "--wait", "top"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("job top: running"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("job top: completed"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("% ("), std::string::npos) << "no progress line: " << r.out;
  EXPECT_NE(r.out.find("ETA"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find('\r'), std::string::npos) << "redraws when not a tty";

  EXPECT_TRUE(jobs().empty());
  expect_guest_data_unchanged(path("top.qcow2"));
  json::object info = image_info(path("top.qcow2"));
  EXPECT_FALSE(info.contains("backing-filename")) << json::serialize(info);
}

TEST_F(LayerctlQmpTest, StreamToABaseKeepsTheBase) {
  RunResult r = ctl({"stream", "--qmp", qmp(), "--base=" + path("base.qcow2"), "--wait",
                     "--job-id=pull", "top"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("job pull: completed"), std::string::npos) << r.out;
  expect_guest_data_unchanged(path("top.qcow2"));
  EXPECT_EQ(str(image_info(path("top.qcow2"))["backing-filename"]), path("base.qcow2"));
}

TEST_F(LayerctlQmpTest, CommitOfAnIntermediateImageWithWaitExits0) {
  RunResult r = live({"commit", "--top=" + path("mid.qcow2"), "--base=" + path("base.qcow2"),
                      "--wait", "top"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("job top: completed"), std::string::npos) << r.out;
  RunResult i = live({"info", "top"});
  EXPECT_NE(i.out.find("backing: " + path("base.qcow2")), std::string::npos) << i.out;
  EXPECT_EQ(i.out.find("mid.qcow2"), std::string::npos) << i.out;
  expect_guest_data_unchanged(path("top.qcow2"));
  EXPECT_EQ(str(image_info(path("top.qcow2"))["backing-filename"]), path("base.qcow2"));
}

TEST_F(LayerctlQmpTest, ActiveCommitWithWaitCompletesWhenReadyAndPivots) {
  RunResult r = live({"commit", "--active", "--wait", "top"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("job top: ready"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("job top: completed"), std::string::npos) << r.out;
  // After the pivot the export serves the base, which holds all the data.
  RunResult e = live({"exports", "--output=json"});
  json::value exports = parse(e.out);
  ASSERT_TRUE(exports.is_array() && exports.get_array().size() == 1) << e.out;
  EXPECT_EQ(exports.get_array()[0].at("node-name"), "base");
  expect_guest_data_unchanged(path("base.qcow2"));
}

TEST_F(LayerctlQmpTest, CommitWithoutWaitPrintsTheJobIdAndTheJobRuns) {
  RunResult r = live({"commit", "--top=" + path("mid.qcow2"), "--speed=64k",
                      "--job-id=c1", "top"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(r.out, "c1\n");
  json::array js = jobs();
  ASSERT_EQ(js.size(), 1u);
  EXPECT_EQ(js[0].at("device"), "c1");
  EXPECT_EQ(js[0].at("type"), "commit");
  RunResult c = live({"cancel", "--wait", "c1"});
  EXPECT_EQ(c.exit_code, 2) << c.describe();
}

TEST_F(LayerctlQmpTest, RateLimitedJobIsListedPausedResumedRetunedAndCancelled) {
  // The follower runs in its own process, as an operator's `--wait` would.
  auto follower = std::async(std::launch::async, [this] {
    return ctl({"--qmp", path("qmp2.sock"), "stream", "--speed=64k", "--wait", "top"});
  });
  ASSERT_TRUE(wait_until([&] { return !jobs().empty(); }, 10s));

  RunResult table = ctl({"jobs", "--qmp", qmp()});
  ASSERT_EQ(table.exit_code, 0) << table.describe();
  EXPECT_NE(table.out.find("ID"), std::string::npos) << table.out;
  EXPECT_NE(table.out.find("stream"), std::string::npos) << table.out;
  EXPECT_NE(table.out.find("64 KiB/s"), std::string::npos) << table.out;

  ASSERT_EQ(live({"pause", "top"}).exit_code, 0);
  EXPECT_TRUE(wait_until([&] {
    json::array js = jobs();
    return !js.empty() && js[0].at("status") == "paused";
  }, 5s));
  ASSERT_EQ(live({"resume", "top"}).exit_code, 0);
  EXPECT_TRUE(wait_until([&] {
    json::array js = jobs();
    return !js.empty() && js[0].at("status") == "running";
  }, 5s));
  ASSERT_EQ(live({"speed", "top", "32k"}).exit_code, 0);
  json::array js = jobs();
  ASSERT_FALSE(js.empty());
  EXPECT_EQ(js[0].at("speed"), 32 * 1024);

  RunResult cancel = live({"cancel", "top"});
  EXPECT_EQ(cancel.exit_code, 0) << cancel.describe();
  RunResult f = follower.get();
  EXPECT_EQ(f.exit_code, 2) << f.describe();
  EXPECT_NE(f.err.find("cancelled"), std::string::npos) << f.describe();
  EXPECT_NE(f.out.find("job top: paused"), std::string::npos) << f.out;
  // The top still has its backing: the stream did not finish.
  EXPECT_EQ(str(image_info(path("top.qcow2"))["backing-filename"]), path("mid.qcow2"));
}

TEST_F(LayerctlQmpTest, RefusedCommandsExit3WithTheServersError) {
  RunResult r = live({"stream", "--wait", "nosuch"});
  EXPECT_EQ(r.exit_code, 3) << r.describe();
  EXPECT_NE(r.err.find("layerctl: Cannot find device"), std::string::npos) << r.describe();

  RunResult p = live({"pause", "nosuchjob"});
  EXPECT_EQ(p.exit_code, 3) << p.describe();
  EXPECT_NE(p.err.find("nosuchjob"), std::string::npos) << p.describe();

  // --empty is layerd's own argument; qemu-storage-daemon refuses it.
  RunResult e = live({"commit", "--active", "--empty", "top"});
  EXPECT_EQ(e.exit_code, 3) << e.describe();
  EXPECT_NE(e.err.find("'empty'"), std::string::npos) << e.describe();
  EXPECT_TRUE(jobs().empty());
}

TEST_F(LayerctlQmpTest, NoServerOnTheSocketExits3) {
  RunResult r = ctl({"--qmp", path("nothing.sock"), "jobs"});
  EXPECT_EQ(r.exit_code, 3) << r.describe();
  EXPECT_NE(r.err.find("nothing.sock"), std::string::npos) << r.describe();
}

TEST_F(LayerctlQmpTest, UsageMistakesExit1WithoutContactingTheServer) {
  EXPECT_EQ(ctl({"jobs"}).exit_code, 1);  // no --qmp
  EXPECT_EQ(live({"commit", "top"}).exit_code, 1);  // neither --top nor --active
  EXPECT_EQ(live({"stream", "--speed=fast", "top"}).exit_code, 1);
  EXPECT_EQ(live({"jobs", "--top=x"}).exit_code, 1);
  EXPECT_TRUE(jobs().empty());
}

TEST_F(LayerctlQmpTest, JsonOutputParses) {
  // A stream down to the image right below copies nothing and keeps the
  // chain for the commit below.
  RunResult s = live({"stream", "--base=" + path("mid.qcow2"), "--wait", "--output=json", "top"});
  ASSERT_EQ(s.exit_code, 0) << s.describe();
  json::value event = parse(s.out);
  ASSERT_TRUE(event.is_object()) << s.out;
  EXPECT_EQ(event.at("event"), "BLOCK_JOB_COMPLETED");
  EXPECT_EQ(event.at("data").at("device"), "top");
  EXPECT_EQ(event.at("data").at("type"), "stream");
  EXPECT_FALSE(event.at("data").as_object().contains("error"));

  RunResult i = live({"info", "--output=json"});
  ASSERT_EQ(i.exit_code, 0) << i.describe();
  json::value nodes = parse(i.out);
  ASSERT_TRUE(nodes.is_array()) << i.out;
  bool saw_top = false;
  for (const auto& n : nodes.get_array())
    if (n.at("node-name") == "top") saw_top = true;
  EXPECT_TRUE(saw_top) << i.out;

  RunResult one = ctl({"info", "--qmp", qmp(), "--output=json", "mid"});
  ASSERT_EQ(one.exit_code, 0) << one.describe();
  json::value mid = parse(one.out);
  ASSERT_TRUE(mid.is_object()) << one.out;
  EXPECT_EQ(str(mid.at("image").at("filename")), path("mid.qcow2"));

  RunResult j = live({"commit", "--top=" + path("mid.qcow2"), "--output=json", "top"});
  ASSERT_EQ(j.exit_code, 0) << j.describe();
  EXPECT_EQ(parse(j.out).at("job-id"), "top");
}

// Every data read from mid's file fails with EIO (blkdebug).
class LayerctlQmpFaultTest : public LayerctlQmpTest {
 protected:
  bool faulty_mid() const override { return true; }
};

TEST_F(LayerctlQmpFaultTest, JobThatFailsWithWaitExits1WithTheError) {
  RunResult r = live({"stream", "--wait", "top"});
  EXPECT_EQ(r.exit_code, 1) << r.describe();
  EXPECT_NE(r.out.find("I/O error on read"), std::string::npos) << r.out;
  EXPECT_NE(r.err.find("layerctl: job top failed: Input/output error"), std::string::npos)
      << r.describe();

  RunResult j = live({"stream", "--wait", "--output=json", "top"});
  EXPECT_EQ(j.exit_code, 1) << j.describe();
  json::value event = parse(j.out);
  ASSERT_TRUE(event.is_object()) << j.out;
  EXPECT_EQ(event.at("event"), "BLOCK_JOB_COMPLETED");
  EXPECT_TRUE(event.at("data").as_object().contains("error")) << j.out;
}

}  // namespace
}  // namespace layerd::test
