// End-to-end tests of layerctl's live commands (`layerctl --qmp PATH ...`)
// against two servers: qemu-storage-daemon, whose QMP is the protocol
// layerd's control socket speaks, and layerd itself ($LAYERD_BIN). The
// server exports base <- mid <- top over NBD, layerctl drives snapshots and
// block jobs on it, and qemu-img checks the files. The daemon's tests are
// skipped where /usr/bin/qemu-storage-daemon is not installed, layerd's
// when LAYERD_BIN is qemu-nbd.
#include <algorithm>
#include <cstdlib>
#include <iostream>
#include <future>
#include <sstream>
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

// One row of `layerctl info`'s chain table.
struct ChainRow {
  std::string depth, file, format, virt, actual, ro;
};

// The chain table rows of `layerctl info` output (every device's), in
// order: the lines under a "  DEPTH FILE ..." header.
std::vector<ChainRow> info_rows(const std::string& out) {
  std::vector<ChainRow> rows;
  std::istringstream in(out);
  bool in_table = false;
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("  DEPTH ", 0) == 0) {
      in_table = true;
      continue;
    }
    if (!in_table || line.rfind("  ", 0) != 0) {
      in_table = false;
      continue;
    }
    std::istringstream f(line);
    ChainRow r;
    std::string vnum, vunit, anum, aunit;
    f >> r.depth >> r.file >> r.format >> vnum >> vunit >> anum >> aunit >> r.ro;
    r.virt = vnum + " " + vunit;
    r.actual = anum + " " + aunit;
    rows.push_back(r);
  }
  return rows;
}

// "772 KiB", "1.25 MiB" as bytes (0 if it is not such a size).
double human_bytes(const std::string& text) {
  std::istringstream in(text);
  double n = 0;
  std::string unit;
  if (!(in >> n >> unit)) return 0;
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  for (const char* u : units) {
    if (unit == u) return n;
    n *= 1024;
  }
  return 0;
}

// The files of the chain table, top first.
std::vector<std::string> info_files(const std::string& out) {
  std::vector<std::string> files;
  for (const ChainRow& r : info_rows(out)) files.push_back(r.file);
  return files;
}

// `layerctl exports` output for one export.
std::string fmt_export_table(const std::string& id, const std::string& type,
                             const std::string& node) {
  auto pad = [](std::string t, size_t w) {
    t.resize(std::max(w, t.size()), ' ');
    return t;
  };
  return pad("ID", 16) + " " + pad("TYPE", 8) + " NODE\n" + pad(id, 16) + " " + pad(type, 8) +
         " " + node + "\n";
}

// A chain base <- mid <- top in a temporary directory, a server exporting
// it, and layerctl to drive it.
class LiveChainTest : public ::testing::Test {
 protected:
  // base has 0-2M, mid 1.5M-2.5M, top 3M-3.5M (of `mib` MiB; with more
  // than 4, base has 0-mib M).
  void make_chain(int mib = 4) {
    std::string size = std::to_string(mib) + "M";
    make_image("base.qcow2", "", size);
    qemu_io(path("base.qcow2"), {"write -P 1 0 " + (mib > 4 ? size : std::string("2M"))});
    make_image("mid.qcow2", path("base.qcow2"), size);
    qemu_io(path("mid.qcow2"), {"write -P 2 1536k 1M"});
    make_image("top.qcow2", path("mid.qcow2"), size);
    qemu_io(path("top.qcow2"), {"write -P 3 3M 512k"});
    // What the guest sees, to compare with after the jobs.
    RunResult r = qemu_img({"convert", "-O", "raw", path("top.qcow2"), path("guest.raw")});
    ASSERT_EQ(r.exit_code, 0) << r.describe();
  }

  std::string path(std::string_view name) const { return (dir_ / name).string(); }
  std::string qmp() const { return path("qmp.sock"); }

  void make_image(const std::string& name, const std::string& backing,
                  const std::string& size = "4M") {
    std::vector<std::string> argv = {"create", "-q", "-f", "qcow2"};
    if (!backing.empty()) argv.insert(argv.end(), {"-b", backing, "-F", "qcow2"});
    argv.insert(argv.end(), {path(name), size});
    RunResult r = qemu_img(argv);
    ASSERT_EQ(r.exit_code, 0) << r.describe();
  }

  // layerctl --qmp <socket> args...
  RunResult live(std::vector<std::string> args) {
    args.insert(args.begin(), {"--qmp", qmp()});
    return ctl(std::move(args));
  }

  // The block jobs the server reports (query-block-jobs through layerctl).
  json::array jobs() {
    RunResult r = live({"jobs", "--output=json"});
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    json::value v = parse(r.out);
    return v.is_array() ? v.get_array() : json::array{};
  }

  // The node names (qemu-storage-daemon) or files (layerd) the exports
  // serve, from `layerctl exports --output=json`.
  std::vector<std::string> export_nodes() {
    RunResult e = live({"exports", "--output=json"});
    EXPECT_EQ(e.exit_code, 0) << e.describe();
    json::value exports = parse(e.out);
    std::vector<std::string> nodes;
    if (exports.is_array())
      for (const auto& x : exports.get_array()) nodes.push_back(str(x.at("node-name")));
    return nodes;
  }

  // Guest data of `image` (through its chain) equals what top showed at
  // the start.
  // The server is stopped first: qemu-img must see its caches written out.
  void expect_guest_data_unchanged(const std::string& image) {
    if (server_.running()) {
      EXPECT_EQ(server_.stop(), 0) << server_.log();
    }
    RunResult r = qemu_img({"compare", "-U", image, path("guest.raw")});
    EXPECT_EQ(r.exit_code, 0) << r.describe();
  }

  TempDir dir_;
  Server server_;
};

class LayerctlQmpTest : public LiveChainTest {
 protected:
  void SetUp() override {
    if (!fs::exists(kQsd)) GTEST_SKIP() << kQsd << " is not installed";
    if (ctl_binary().empty()) GTEST_SKIP() << "LAYERCTL_BIN is not set";
    ASSERT_NO_FATAL_FAILURE(make_chain());

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
    ASSERT_TRUE(server_.start(std::move(o))) << server_.error();
  }

  virtual bool faulty_mid() const { return false; }
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
  EXPECT_NE(i.out.find("snap: " + path("snap.qcow2") + " (qcow2"), std::string::npos) << i.out;
  EXPECT_EQ(info_files(i.out), (std::vector<std::string>{path("snap.qcow2"), path("top.qcow2"),
                                                         path("mid.qcow2"), path("base.qcow2")}))
      << i.out;
  EXPECT_EQ(export_nodes(), std::vector<std::string>{"snap"});
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
  EXPECT_EQ(info_files(i.out), (std::vector<std::string>{path("top.qcow2"), path("base.qcow2")}))
      << i.out;
  expect_guest_data_unchanged(path("top.qcow2"));
  EXPECT_EQ(str(image_info(path("top.qcow2"))["backing-filename"]), path("base.qcow2"));
}

TEST_F(LayerctlQmpTest, ActiveCommitWithWaitCompletesWhenReadyAndPivots) {
  RunResult r = live({"commit", "--active", "--wait", "top"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("job top: ready"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("job top: completed"), std::string::npos) << r.out;
  // After the pivot the export serves the base, which holds all the data.
  EXPECT_EQ(export_nodes(), std::vector<std::string>{"base"});
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

// --- The same commands against layerd ---------------------------------------

// layerd -t -f qcow2 -x exp0 -k nbd.sock --qmp qmp.sock top.qcow2. Its
// export's name is the device and the job id; its images are named by
// their files (query-block-exports' "node-name" is the top's file). Its
// QMP socket takes any number of clients, so a follower shares it.
class LayerctlLayerdTest : public LiveChainTest {
 protected:
  void SetUp() override {
    SKIP_UNLESS_LAYERD();
    if (server_binary().empty()) GTEST_SKIP() << "LAYERD_BIN is not set";
    if (ctl_binary().empty()) GTEST_SKIP() << "LAYERCTL_BIN is not set";
    ASSERT_NO_FATAL_FAILURE(make_chain(chain_mib()));
    ServerOptions o;
    o.args = {"-t", "-f", "qcow2", "-x", "exp0", "-k", path("nbd.sock"), "--qmp", qmp(),
              path("top.qcow2")};
    o.unix_socket = dir_ / "nbd.sock";
    o.log_file = dir_ / "layerd.log";
    ASSERT_TRUE(server_.start(std::move(o))) << server_.error();
    ASSERT_TRUE(wait_until([&] { return unix_socket_listening(qmp()); }, 10s))
        << server_.log();
  }

  virtual int chain_mib() const { return 4; }

  // qemu-img map of `image` alone (no backing): the extents it holds data
  // or zeros for itself.
  json::array own_extents(const std::string& image) {
    RunResult r = qemu_img({"map", "-U", "--output=json", image});
    EXPECT_EQ(r.exit_code, 0) << r.describe();
    json::value v = parse(r.out);
    json::array own;
    if (v.is_array())
      for (const auto& e : v.get_array())
        if (e.at("depth") == 0 && e.at("present") == true) own.push_back(e);
    return own;
  }

  void TearDown() override {
    if (HasFailure() && server_.running()) std::cerr << "layerd's log:\n" << server_.log();
  }
};

TEST_F(LayerctlLayerdTest, SnapshotPutsTheNewFileOnTopAndTheExportServesIt) {
  RunResult r = live({"snapshot", "exp0", path("snap.qcow2")});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(r.out, "exp0: snapshot " + path("snap.qcow2") + "\n");
  ASSERT_TRUE(fs::exists(path("snap.qcow2")));
  json::object info = image_info(path("snap.qcow2"));
  EXPECT_EQ(info["format"], "qcow2");
  EXPECT_EQ(str(info["backing-filename"]), path("top.qcow2"));
  EXPECT_EQ(info["virtual-size"], 4 << 20);

  // A second one, with the options qemu takes (--node-name is ignored).
  RunResult r2 = live({"snapshot", "--wait", "--node-name=n2", "--format=qcow2", "exp0",
                       path("snap2.qcow2")});
  ASSERT_EQ(r2.exit_code, 0) << r2.describe();

  RunResult i = live({"info", "exp0"});
  ASSERT_EQ(i.exit_code, 0) << i.describe();
  EXPECT_NE(i.out.find("exp0: " + path("snap2.qcow2") + " (qcow2, read-write, 4 backing images)"),
            std::string::npos) << i.out;
  EXPECT_EQ(info_files(i.out),
            (std::vector<std::string>{path("snap2.qcow2"), path("snap.qcow2"), path("top.qcow2"),
                                      path("mid.qcow2"), path("base.qcow2")}))
      << i.out;
  EXPECT_EQ(export_nodes(), std::vector<std::string>{path("snap2.qcow2")});
  expect_guest_data_unchanged(path("snap2.qcow2"));
  EXPECT_EQ(str(image_info(path("snap2.qcow2"))["backing-filename"]), path("snap.qcow2"));
}

TEST_F(LayerctlLayerdTest, StreamWithWaitExits0AndLeavesTheTopWithoutBacking) {
  // layerd copies 2 MiB at a time and waits after each piece: 2.5 MiB at
  // 768 KiB/s take over 3 s, so plain progress lines (one every 2 s when
  // stdout is not a terminal) appear.
  RunResult r = live({"stream", "--speed=768k", "--wait", "exp0"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("job exp0: running"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("job exp0: completed"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("% ("), std::string::npos) << "no progress line: " << r.out;
  EXPECT_NE(r.out.find("ETA"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find('\r'), std::string::npos) << "redraws when not a tty";

  EXPECT_TRUE(jobs().empty());
  RunResult i = live({"info"});
  EXPECT_EQ(info_files(i.out), std::vector<std::string>{path("top.qcow2")}) << i.out;
  expect_guest_data_unchanged(path("top.qcow2"));
  json::object info = image_info(path("top.qcow2"));
  EXPECT_FALSE(info.contains("backing-filename")) << json::serialize(info);
}

TEST_F(LayerctlLayerdTest, StreamToABaseKeepsTheBase) {
  RunResult r = ctl({"stream", "--qmp", qmp(), "--base=" + path("base.qcow2"), "--wait",
                     "--job-id=pull", "exp0"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("job pull: completed"), std::string::npos) << r.out;
  RunResult i = live({"info"});
  EXPECT_EQ(info_files(i.out), (std::vector<std::string>{path("top.qcow2"), path("base.qcow2")}))
      << i.out;
  expect_guest_data_unchanged(path("top.qcow2"));
  EXPECT_EQ(str(image_info(path("top.qcow2"))["backing-filename"]), path("base.qcow2"));
}

TEST_F(LayerctlLayerdTest, CommitOfAnIntermediateImageWithWaitExits0) {
  RunResult r = live({"commit", "--top=" + path("mid.qcow2"), "--base=" + path("base.qcow2"),
                      "--wait", "exp0"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("job exp0: completed"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("job exp0: ready"), std::string::npos) << r.out;
  RunResult i = live({"info", "exp0"});
  EXPECT_EQ(info_files(i.out), (std::vector<std::string>{path("top.qcow2"), path("base.qcow2")}))
      << i.out;
  expect_guest_data_unchanged(path("top.qcow2"));
  EXPECT_EQ(str(image_info(path("top.qcow2"))["backing-filename"]), path("base.qcow2"));
}

// --no-give-way (QMP "give-way": false) on commit and stream; not an
// option of the other commands.
TEST_F(LayerctlLayerdTest, NoGiveWayIsAnOptionOfCommitAndStream) {
  RunResult c = live({"commit", "--top=" + path("mid.qcow2"), "--base=" + path("base.qcow2"),
                      "--no-give-way", "--wait", "exp0"});
  ASSERT_EQ(c.exit_code, 0) << c.describe();
  EXPECT_NE(c.out.find("job exp0: completed"), std::string::npos) << c.out;
  RunResult s = live({"stream", "--no-give-way", "--wait", "exp0"});
  ASSERT_EQ(s.exit_code, 0) << s.describe();
  EXPECT_NE(s.out.find("job exp0: completed"), std::string::npos) << s.out;
  expect_guest_data_unchanged(path("top.qcow2"));
  RunResult bad = live({"cancel", "--no-give-way", "exp0"});
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("unrecognized option '--no-give-way'"), std::string::npos) << bad.err;
}

// --depth-first: the committed image is emptied into the base as it goes.
TEST_F(LayerctlLayerdTest, DepthFirstCommitWithWaitEmptiesTheCommittedImage) {
  ASSERT_FALSE(own_extents(path("mid.qcow2")).empty());
  RunResult r = live({"commit", "--top=" + path("mid.qcow2"), "--base=" + path("base.qcow2"),
                      "--depth-first", "--wait", "exp0"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("job exp0: completed"), std::string::npos) << r.out;
  RunResult i = live({"info", "exp0"});
  EXPECT_EQ(info_files(i.out), (std::vector<std::string>{path("top.qcow2"), path("base.qcow2")}))
      << i.out;
  expect_guest_data_unchanged(path("top.qcow2"));
  // Top shadows nothing of mid: all mid held went to the base.
  EXPECT_TRUE(own_extents(path("mid.qcow2")).empty());
}

TEST_F(LayerctlLayerdTest, ActiveCommitWithWaitCompletesWhenReadyAndPivots) {
  RunResult r = live({"commit", "--active", "--wait", "exp0"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("job exp0: ready"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("job exp0: completed"), std::string::npos) << r.out;
  // After the pivot the export serves the base, read-write, alone.
  EXPECT_EQ(export_nodes(), std::vector<std::string>{path("base.qcow2")});
  RunResult i = live({"info"});
  std::vector<ChainRow> rows = info_rows(i.out);
  ASSERT_EQ(rows.size(), 1u) << i.out;
  EXPECT_EQ(rows[0].file, path("base.qcow2"));
  EXPECT_EQ(rows[0].ro, "rw");
  expect_guest_data_unchanged(path("base.qcow2"));
}

TEST_F(LayerctlLayerdTest, ActiveCommitWithEmptyKeepsTheTopActiveAndEmptiesIt) {
  ASSERT_FALSE(own_extents(path("top.qcow2")).empty());
  uint64_t before = image_info(path("top.qcow2"))["actual-size"].to_number<uint64_t>();
  RunResult r = live({"commit", "--active", "--empty", "--wait", "exp0"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_NE(r.out.find("job exp0: ready"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("job exp0: completed"), std::string::npos) << r.out;
  // The top is still the active image, now right over the base.
  EXPECT_EQ(export_nodes(), std::vector<std::string>{path("top.qcow2")});
  RunResult i = live({"info"});
  std::vector<ChainRow> rows = info_rows(i.out);
  ASSERT_EQ(rows.size(), 2u) << i.out;
  EXPECT_EQ(rows[0].file, path("top.qcow2"));
  EXPECT_EQ(rows[0].ro, "rw");
  EXPECT_EQ(rows[1].file, path("base.qcow2"));
  EXPECT_EQ(rows[1].ro, "ro");
  expect_guest_data_unchanged(path("top.qcow2"));
  // It holds nothing of its own, and its file shrank; the base holds the
  // guest's data alone.
  EXPECT_TRUE(own_extents(path("top.qcow2")).empty());
  json::object info = image_info(path("top.qcow2"));
  EXPECT_EQ(str(info["backing-filename"]), path("base.qcow2"));
  uint64_t after = info["actual-size"].to_number<uint64_t>();
  EXPECT_LT(after, before);
  EXPECT_LE(after, 512u << 10) << "not nearly empty";
  RunResult c = qemu_img({"compare", "-U", path("base.qcow2"), path("guest.raw")});
  EXPECT_EQ(c.exit_code, 0) << c.describe();
  RunResult check = qemu_img({"check", path("top.qcow2")});
  EXPECT_EQ(check.exit_code, 0) << check.describe();
}

TEST_F(LayerctlLayerdTest, CommitWithoutWaitPrintsTheJobIdAndTheJobRuns) {
  RunResult r = live({"commit", "--top=" + path("mid.qcow2"), "--speed=64k",
                      "--job-id=c1", "exp0"});
  ASSERT_EQ(r.exit_code, 0) << r.describe();
  EXPECT_EQ(r.out, "c1\n");
  json::array js = jobs();
  ASSERT_EQ(js.size(), 1u);
  EXPECT_EQ(js[0].at("device"), "c1");
  EXPECT_EQ(js[0].at("type"), "commit");
  EXPECT_EQ(js[0].at("speed"), 64 * 1024);
  RunResult c = live({"cancel", "--wait", "c1"});
  EXPECT_EQ(c.exit_code, 2) << c.describe();
  EXPECT_NE(c.err.find("job c1 was cancelled"), std::string::npos) << c.describe();
  EXPECT_TRUE(jobs().empty());
  // Nothing changed: mid is still in the chain.
  RunResult i = live({"info"});
  EXPECT_EQ(info_files(i.out), (std::vector<std::string>{path("top.qcow2"), path("mid.qcow2"),
                                                         path("base.qcow2")}))
      << i.out;
}

// 16 MiB images, base written all over: 8 pieces of 2 MiB to stream, 32 s
// each at 64 KiB/s. (layerd's resume and set-speed restart the rate
// limit's window, so each of them lets one piece through at once.)
class LayerctlLayerdBigTest : public LayerctlLayerdTest {
 protected:
  int chain_mib() const override { return 16; }
};

TEST_F(LayerctlLayerdBigTest, RateLimitedJobIsListedPausedResumedRetunedAndCancelled) {
  // The follower runs in its own process, as an operator's `--wait` would,
  // on the same socket (layerd serves any number of QMP clients).
  auto follower = std::async(std::launch::async, [this] {
    return ctl({"--qmp", qmp(), "stream", "--speed=64k", "--wait", "exp0"});
  });
  ASSERT_TRUE(wait_until([&] { return !jobs().empty(); }, 10s));

  RunResult table = ctl({"jobs", "--qmp", qmp()});
  ASSERT_EQ(table.exit_code, 0) << table.describe();
  EXPECT_NE(table.out.find("ID"), std::string::npos) << table.out;
  EXPECT_NE(table.out.find("exp0"), std::string::npos) << table.out;
  EXPECT_NE(table.out.find("stream"), std::string::npos) << table.out;
  EXPECT_NE(table.out.find("64 KiB/s"), std::string::npos) << table.out;
  EXPECT_NE(table.out.find("/16 MiB"), std::string::npos) << table.out;

  ASSERT_EQ(live({"pause", "exp0"}).exit_code, 0);
  EXPECT_TRUE(wait_until([&] {
    json::array js = jobs();
    return !js.empty() && js[0].at("status") == "paused";
  }, 5s));
  RunResult paused = live({"jobs"});
  EXPECT_NE(paused.out.find("paused"), std::string::npos) << paused.out;
  ASSERT_EQ(live({"resume", "exp0"}).exit_code, 0);
  EXPECT_TRUE(wait_until([&] {
    json::array js = jobs();
    return !js.empty() && js[0].at("status") == "running";
  }, 5s));
  ASSERT_EQ(live({"speed", "exp0", "32k"}).exit_code, 0);
  json::array js = jobs();
  ASSERT_FALSE(js.empty());
  EXPECT_EQ(js[0].at("speed"), 32 * 1024);
  EXPECT_LT(js[0].at("offset").to_number<uint64_t>(), 16u << 20);

  RunResult cancel = live({"cancel", "exp0"});
  EXPECT_EQ(cancel.exit_code, 0) << cancel.describe();
  RunResult f = follower.get();
  EXPECT_EQ(f.exit_code, 2) << f.describe();
  EXPECT_NE(f.err.find("layerctl: job exp0 was cancelled"), std::string::npos) << f.describe();
  EXPECT_NE(f.out.find("job exp0: paused"), std::string::npos) << f.out;
  EXPECT_TRUE(jobs().empty());
  // The top still has its backing: the stream did not finish.
  EXPECT_EQ(str(image_info(path("top.qcow2"))["backing-filename"]), path("mid.qcow2"));
  expect_guest_data_unchanged(path("top.qcow2"));
}

TEST_F(LayerctlLayerdTest, RefusedCommandsExit3WithLayerdsError) {
  RunResult r = live({"stream", "--wait", "nosuch"});
  EXPECT_EQ(r.exit_code, 3) << r.describe();
  EXPECT_NE(r.err.find("layerctl: Cannot find device='nosuch' nor node-name='nosuch'"),
            std::string::npos) << r.describe();

  RunResult c = live({"commit", "--active", "nosuch"});
  EXPECT_EQ(c.exit_code, 3) << c.describe();
  EXPECT_NE(c.err.find("layerctl: Device 'nosuch' not found"), std::string::npos)
      << c.describe();

  RunResult s = live({"snapshot", "nosuch", path("x.qcow2")});
  EXPECT_EQ(s.exit_code, 3) << s.describe();
  EXPECT_NE(s.err.find("layerctl: Cannot find device='nosuch' nor node-name="),
            std::string::npos) << s.describe();

  // The active image is committed only with --active.
  RunResult a = live({"commit", "--top=" + path("top.qcow2"), "exp0"});
  EXPECT_EQ(a.exit_code, 1) << a.describe();
  EXPECT_NE(a.err.find("is the active image of 'exp0'; use --active"), std::string::npos)
      << a.describe();
  EXPECT_TRUE(jobs().empty());
  EXPECT_FALSE(fs::exists(path("x.qcow2")));

  RunResult t = live({"commit", "--top=" + path("nope.qcow2"), "exp0"});
  EXPECT_EQ(t.exit_code, 3) << t.describe();
  EXPECT_NE(t.err.find("layerctl: Top image file " + path("nope.qcow2") + " not found"),
            std::string::npos) << t.describe();

  for (const char* cmd : {"pause", "resume", "complete", "cancel"}) {
    RunResult p = live({cmd, "nosuchjob"});
    EXPECT_EQ(p.exit_code, 3) << cmd << ": " << p.describe();
    EXPECT_NE(p.err.find("'nosuchjob'"), std::string::npos) << cmd << ": " << p.describe();
  }
  RunResult w = live({"wait", "nosuchjob"});
  EXPECT_EQ(w.exit_code, 3) << w.describe();
  EXPECT_NE(w.err.find("nosuchjob does not exist"), std::string::npos) << w.describe();

  RunResult i = live({"info", "nosuch"});
  EXPECT_EQ(i.exit_code, 3) << i.describe();
  EXPECT_NE(i.err.find("layerctl: Cannot find device=nosuch"), std::string::npos)
      << i.describe();
  EXPECT_TRUE(jobs().empty());
  EXPECT_EQ(export_nodes(), std::vector<std::string>{path("top.qcow2")});
}

TEST_F(LayerctlLayerdTest, InfoShowsTheChainWithDepthSizesAndReadOnly) {
  RunResult i = live({"info"});
  ASSERT_EQ(i.exit_code, 0) << i.describe();
  EXPECT_EQ(i.out.rfind("exp0: " + path("top.qcow2") + " (qcow2, read-write, 2 backing images)\n"
                        "  DEPTH FILE ",
                        0),
            0u) << i.out;
  std::vector<ChainRow> rows = info_rows(i.out);
  ASSERT_EQ(rows.size(), 3u) << i.out;
  const char* files[] = {"top.qcow2", "mid.qcow2", "base.qcow2"};
  for (size_t d = 0; d < rows.size(); ++d) {
    SCOPED_TRACE(files[d]);
    EXPECT_EQ(rows[d].depth, std::to_string(d));
    EXPECT_EQ(rows[d].file, path(files[d]));
    EXPECT_EQ(rows[d].format, "qcow2");
    EXPECT_EQ(rows[d].virt, "4 MiB");
    EXPECT_EQ(rows[d].ro, d == 0 ? "rw" : "ro");
    // qemu-img's actual size of the file, as layerctl rounds it.
    double actual = image_info(path(files[d]))["actual-size"].to_number<double>();
    double shown = human_bytes(rows[d].actual);
    EXPECT_GT(shown, 0) << rows[d].actual;
    EXPECT_NEAR(shown, actual, actual * 0.05) << rows[d].actual;
  }
  // By export name or by the top's file; the same with --output=json.
  RunResult by_file = live({"info", path("top.qcow2")});
  EXPECT_EQ(by_file.exit_code, 0) << by_file.describe();
  EXPECT_EQ(by_file.out, i.out);
  RunResult j = live({"info", "--output=json", "exp0"});
  ASSERT_EQ(j.exit_code, 0) << j.describe();
  json::value dev = parse(j.out);
  ASSERT_TRUE(dev.is_object()) << j.out;
  EXPECT_EQ(dev.at("device"), "exp0");
  const json::value& image = dev.at("inserted").at("image");
  EXPECT_EQ(str(image.at("filename")), path("top.qcow2"));
  EXPECT_EQ(str(image.at("backing-image").at("filename")), path("mid.qcow2"));
  EXPECT_EQ(image.at("backing-image").at("depth"), 1);
  EXPECT_EQ(image.at("backing-image").at("ro"), true);
  RunResult all = live({"info", "--output=json"});
  json::value list = parse(all.out);
  ASSERT_TRUE(list.is_array() && list.get_array().size() == 1) << all.out;
  EXPECT_EQ(list.get_array()[0].at("device"), "exp0");
}

TEST_F(LayerctlLayerdTest, ExportsListsTheExportByItsFile) {
  RunResult e = live({"exports"});
  ASSERT_EQ(e.exit_code, 0) << e.describe();
  EXPECT_EQ(e.out, fmt_export_table("exp0", "nbd", path("top.qcow2"))) << e.out;
  RunResult j = live({"exports", "--output=json"});
  ASSERT_EQ(j.exit_code, 0) << j.describe();
  json::value exports = parse(j.out);
  ASSERT_TRUE(exports.is_array() && exports.get_array().size() == 1) << j.out;
  const json::value& x = exports.get_array()[0];
  EXPECT_EQ(x.at("id"), "exp0");
  EXPECT_EQ(x.at("type"), "nbd");
  EXPECT_EQ(str(x.at("node-name")), path("top.qcow2"));
  EXPECT_EQ(x.at("shutting-down"), false);
}

TEST_F(LayerctlLayerdTest, JsonOutputParses) {
  RunResult s = live({"stream", "--base=" + path("mid.qcow2"), "--wait", "--output=json", "exp0"});
  ASSERT_EQ(s.exit_code, 0) << s.describe();
  json::value event = parse(s.out);
  ASSERT_TRUE(event.is_object()) << s.out;
  EXPECT_EQ(event.at("event"), "BLOCK_JOB_COMPLETED");
  EXPECT_EQ(event.at("data").at("device"), "exp0");
  EXPECT_EQ(event.at("data").at("type"), "stream");
  EXPECT_FALSE(event.at("data").as_object().contains("error"));

  RunResult j = live({"commit", "--top=" + path("mid.qcow2"), "--output=json", "exp0"});
  ASSERT_EQ(j.exit_code, 0) << j.describe();
  EXPECT_EQ(parse(j.out).at("job-id"), "exp0");
  RunResult w = live({"wait", "--output=json", "exp0"});
  // The commit may have ended before `wait` looked (then it is gone: 3).
  if (w.exit_code == 0) {
    EXPECT_EQ(parse(w.out).at("data").at("type"), "commit");
  } else {
    EXPECT_EQ(w.exit_code, 3) << w.describe();
  }
  EXPECT_TRUE(wait_until([&] { return jobs().empty(); }, 10s));

  RunResult snap = live({"snapshot", "--output=json", "exp0", path("snap.qcow2")});
  ASSERT_EQ(snap.exit_code, 0) << snap.describe();
  json::value sargs = parse(snap.out);
  EXPECT_EQ(sargs.at("device"), "exp0");
  EXPECT_EQ(str(sargs.at("snapshot-file")), path("snap.qcow2"));
}

}  // namespace
}  // namespace layerd::test
