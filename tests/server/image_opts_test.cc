// --image-opts end to end, with qemu-nbd 7.2 (given the same option
// string) and qemu-img, qemu-io and nbdcopy as oracles: a compressed qcow2
// made by nbdcopy through driver=compress, raw windows (offset=, size=)
// and -o over throwaway overlays (-s, --overlay=per-client), qcow2 nodes
// with backing=null and -l, and the refusals that need the files.
#include <libnbd.h>

#include <string>
#include <vector>

#include "tests/server/harness.h"
#include "tests/server/qcow2_tools.h"

namespace layerd::test {
namespace {

using qcow2e2e::qemu_io;
using qcow2e2e::run_expect;
using qcow2e2e::unix_uri;

const std::string kQemuNbd = "/usr/bin/qemu-nbd";

class ImageOpts : public ::testing::Test {
 protected:
  void SetUp() override {
    if (server_is_qemu_nbd()) GTEST_SKIP() << "compares layerd with qemu-nbd";
  }
  fs::path sock() const { return dir_ / "s.sock"; }

  // Starts `binary` (layerd if empty) with `args` (FILE included).
  void Start(Server& s, const std::string& binary, std::vector<std::string> args) {
    ServerOptions o;
    o.binary = binary;
    o.args = {"-t", "-k", sock().string()};
    o.args.insert(o.args.end(), args.begin(), args.end());
    o.unix_socket = sock();
    o.log_file = dir_ / (binary.empty() ? "layerd.log" : "qemu-nbd.log");
    ASSERT_TRUE(s.start(o)) << s.error();
  }

  // Size and first `length` bytes of the export.
  std::pair<int64_t, std::vector<uint8_t>> Serve(const std::string& binary,
                                                 std::vector<std::string> args,
                                                 size_t length) {
    Server s;
    Start(s, binary, std::move(args));
    Nbd h = nbd_connect_to_unix(sock());
    if (!h) return {};
    const int64_t size = nbd_get_size(h.get());
    std::vector<uint8_t> data(std::min<int64_t>(length, size));
    EXPECT_EQ(nbd_pread(h.get(), data.data(), data.size(), 0, 0), 0) << nbd_error_text();
    h.reset();
    s.stop();
    return {size, data};
  }

  // An 8 MiB raw disk of compressible data runs, a zeroed run and holes.
  fs::path MakeSource() {
    const fs::path src = dir_ / "src.raw";
    run_expect({"qemu-img", "create", "-q", "-f", "raw", src.string(), "8M"});
    qemu_io(src, "raw", {"write -P 0x61 0 1M", "write -P 0 1M 64k", "write -P 0x62 3M 10k",
                         "write -P 0x63 7M 1M"});
    return src;
  }

  fs::path MakeQcow(const std::string& name, const std::string& size,
                    const std::vector<std::string>& extra = {}) {
    const fs::path img = dir_ / name;
    std::vector<std::string> argv{"qemu-img", "create", "-q", "-f", "qcow2"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    argv.insert(argv.end(), {img.string(), size});
    run_expect(argv);
    return img;
  }

  static std::string compress_opts(const fs::path& img) {
    return "driver=compress,file.driver=qcow2,file.file.filename=" + img.string();
  }

  TempDir dir_;
};

// "N/M = X% allocated, Y% fragmented, Z% compressed clusters" and the
// verdict of qemu-img check.
std::string check_summary(const fs::path& img) {
  RunResult r = run_expect({"qemu-img", "check", img.string()});
  EXPECT_NE(r.out.find("No errors were found on the image."), std::string::npos) << r.out;
  size_t p = r.out.find(" allocated, ");
  if (p == std::string::npos) return r.out;
  size_t begin = r.out.rfind('\n', p) + 1;
  return r.out.substr(begin, r.out.find('\n', p) - begin);
}

TEST_F(ImageOpts, NbdcopyIntoACompressExportMakesTheImageQemuNbdMakes) {
  const fs::path src = MakeSource();
  const fs::path ours = MakeQcow("ours.qcow2", "8M");
  const fs::path theirs = MakeQcow("theirs.qcow2", "8M");
  for (const auto& [binary, img] : {std::pair{std::string(), ours}, std::pair{kQemuNbd, theirs}}) {
    Server s;
    ASSERT_NO_FATAL_FAILURE(Start(s, binary, {"--image-opts", compress_opts(img)}));
    {
      // Clients that ask are told to write whole clusters, as qemu's
      // compress filter asks them.
      Nbd h = nbd_connect_to_unix(sock());
      ASSERT_TRUE(h);
      EXPECT_EQ(nbd_get_block_size(h.get(), LIBNBD_SIZE_MINIMUM), 65536) << binary;
      EXPECT_EQ(nbd_get_block_size(h.get(), LIBNBD_SIZE_PREFERRED), 65536) << binary;
    }
    run_expect({"nbdcopy", src.string(), unix_uri(sock())});
    s.stop();
  }
  run_expect({"qemu-img", "compare", "-f", "raw", "-F", "qcow2", src.string(), ours.string()});
  const std::string summary = check_summary(ours);
  EXPECT_NE(summary.find("100.00% compressed clusters"), std::string::npos) << summary;
  EXPECT_EQ(summary, check_summary(theirs));
  // qemu 7.2 maps compressed data with no host offset: the same map.
  RunResult map = run_expect({"qemu-img", "map", "--output=json", ours.string()});
  EXPECT_EQ(map.out.find("\"offset\""), std::string::npos) << map.out;
  EXPECT_NE(map.out.find("\"data\": true"), std::string::npos) << map.out;
  EXPECT_EQ(map.out, run_expect({"qemu-img", "map", "--output=json", theirs.string()}).out);
}

TEST_F(ImageOpts, CompressExportMergesUnalignedConcurrentWritesOverABackingFile) {
  // A backing image with data, an overlay served compressed, and a client
  // that does not ask for block sizes writing 1000-byte pieces, all at
  // once, into the same clusters; a zero write of part of a cluster.
  const fs::path base = dir_ / "base.raw";
  run_expect({"qemu-img", "create", "-q", "-f", "raw", base.string(), "1M"});
  qemu_io(base, "raw", {"write -P 0x5a 0 1M"});
  const fs::path img = MakeQcow("top.qcow2", "1M", {"-b", base.string(), "-F", "raw"});
  const fs::path expected = dir_ / "expected.raw";
  fs::copy_file(base, expected);

  Server s;
  ASSERT_NO_FATAL_FAILURE(Start(s, "", {"--image-opts", compress_opts(img)}));
  Nbd h = nbd_connect_to_unix(sock(), [](nbd_handle* hh) {
    nbd_set_request_block_size(hh, false);
  });
  ASSERT_TRUE(h);
  std::vector<std::vector<uint8_t>> pieces;
  for (int i = 0; i < 200; ++i) pieces.emplace_back(1000, uint8_t(0x80 + i % 64));
  std::vector<int64_t> cookies;
  for (int i = 0; i < 200; ++i) {
    const uint64_t off = 300 + uint64_t(i) * 1000;
    int64_t c = nbd_aio_pwrite(h.get(), pieces[i].data(), 1000, off, NBD_NULL_COMPLETION, 0);
    ASSERT_GE(c, 0) << nbd_error_text();
    cookies.push_back(c);
    write_file_range(expected, off, pieces[i]);
  }
  for (int64_t c : cookies) {
    while (nbd_aio_command_completed(h.get(), c) == 0)
      ASSERT_NE(nbd_poll(h.get(), -1), -1) << nbd_error_text();
  }
  ASSERT_EQ(nbd_zero(h.get(), 3000, 500 << 10, 0), 0) << nbd_error_text();
  write_file_range(expected, 500 << 10, std::vector<uint8_t>(3000, 0));
  // The last byte of the disk.
  uint8_t last = 0x11;
  ASSERT_EQ(nbd_pwrite(h.get(), &last, 1, (1 << 20) - 1, 0), 0) << nbd_error_text();
  write_file_range(expected, (1 << 20) - 1, std::vector<uint8_t>{last});
  ASSERT_EQ(nbd_flush(h.get(), 0), 0);
  h.reset();
  s.stop();
  run_expect({"qemu-img", "compare", "-f", "raw", "-F", "qcow2", expected.string(),
              img.string()});
  const std::string summary = check_summary(img);
  EXPECT_NE(summary.find("100.00% compressed clusters"), std::string::npos) << summary;
}

TEST_F(ImageOpts, RawWindowServesWhatQemuNbdServesAndWritesLandInIt) {
  const fs::path raw = dir_ / "disk.tar";
  create_pattern_image(raw, 1 << 20, 7);
  const std::string opts = "driver=raw,file.driver=file,file.filename=" + raw.string() +
                           ",offset=1536,size=512k";
  auto [ours_size, ours] = Serve("", {"--image-opts", opts}, 1 << 20);
  auto [qemu_size, theirs] = Serve(kQemuNbd, {"--image-opts", opts}, 1 << 20);
  EXPECT_EQ(ours_size, 512 << 10);
  EXPECT_EQ(ours_size, qemu_size);
  EXPECT_EQ(ours, theirs);
  EXPECT_EQ(ours, pattern(1536, 512 << 10, 7));

  // -o stacks one more window on top, as in qemu-nbd.
  auto [stacked_size, stacked] = Serve("", {"-o", "512", "--image-opts", opts}, 4096);
  auto [qemu_stacked_size, qemu_stacked] = Serve(kQemuNbd, {"-o", "512", "--image-opts", opts}, 4096);
  EXPECT_EQ(stacked_size, (512 << 10) - 512);
  EXPECT_EQ(stacked_size, qemu_stacked_size);
  EXPECT_EQ(stacked, qemu_stacked);

  Server s;
  ASSERT_NO_FATAL_FAILURE(Start(s, "", {"--image-opts", opts}));
  Nbd h = nbd_connect_to_unix(sock());
  ASSERT_TRUE(h);
  std::vector<uint8_t> data(4096, 0xc3);
  ASSERT_EQ(nbd_pwrite(h.get(), data.data(), data.size(), (512 << 10) - 4096, 0), 0)
      << nbd_error_text();
  EXPECT_EQ(nbd_pwrite(h.get(), data.data(), 1, 512 << 10, 0), -1);  // past the window
  h.reset();
  s.stop();
  EXPECT_EQ(read_file_range(raw, 1536 + (512 << 10) - 4096, 4096), data);
  EXPECT_EQ(read_file_range(raw, 1536 + (512 << 10), 4096), pattern(1536 + (512 << 10), 4096, 7));
  EXPECT_EQ(read_file_range(raw, 0, 1536), pattern(0, 1536, 7));
}

TEST_F(ImageOpts, QcowNodeWithBackingNullReadOnlyAndASnapshot) {
  const fs::path base = MakeQcow("base.qcow2", "1M");
  qemu_io(base, "qcow2", {"write -P 0x21 0 1M"});
  const fs::path top = MakeQcow("top.qcow2", "1M", {"-b", base.string(), "-F", "qcow2"});
  qemu_io(top, "qcow2", {"write -P 0x42 64k 64k"});
  run_expect({"qemu-img", "snapshot", "-c", "snap1", top.string()});
  qemu_io(top, "qcow2", {"write -P 0x43 64k 4k"});

  // "backing=" on qemu's command line; layerd also reads "backing=null"
  // (JSON's null) so, where qemu looks for a node named "null".
  const std::string opts = "driver=qcow2,file.filename=" + top.string() + ",backing=";
  auto [size, ours] = Serve("", {"--image-opts", opts + ",read-only=on"}, 1 << 20);
  // qemu-nbd needs -r besides read-only=on ("Block node is read-only").
  auto [qemu_size, theirs] = Serve(kQemuNbd, {"-r", "--image-opts", opts}, 1 << 20);
  EXPECT_EQ(size, 1 << 20);
  EXPECT_EQ(size, qemu_size);
  EXPECT_EQ(ours, theirs);
  EXPECT_EQ(Serve("", {"-r", "--image-opts", opts + "null"}, 1 << 20).second, theirs);
  EXPECT_EQ(ours[0], 0);  // not the backing file's 0x21
  EXPECT_EQ(ours[64 << 10], 0x43);
  EXPECT_EQ(ours[(64 << 10) + 4096], 0x42);

  // read-only=on makes a read-only export.
  {
    Server s;
    ASSERT_NO_FATAL_FAILURE(Start(s, "", {"--image-opts", opts + ",read-only=on"}));
    Nbd h = nbd_connect_to_unix(sock());
    ASSERT_TRUE(h);
    EXPECT_EQ(nbd_is_read_only(h.get()), 1);
  }
  // -l with the chain the image names.
  const std::string chain = "driver=qcow2,file.filename=" + top.string();
  auto [snap_size, snap] = Serve("", {"-l", "snap1", "--image-opts", chain}, 1 << 20);
  auto [qemu_snap_size, qemu_snap] = Serve(kQemuNbd, {"-l", "snap1", "--image-opts", chain}, 1 << 20);
  EXPECT_EQ(snap, qemu_snap);
  EXPECT_EQ(snap[0], 0x21);
  EXPECT_EQ(snap[64 << 10], 0x42);
  // Over driver=compress too, read-only (qemu-nbd cannot load a snapshot
  // through the compress filter).
  auto [compressed_size, compressed_snap] =
      Serve("", {"-l", "snap1", "--image-opts", compress_opts(top)}, 1 << 20);
  EXPECT_EQ(compressed_snap, snap);
}

TEST_F(ImageOpts, OffsetWithThrowawayOverlaysAsQemuNbd) {
  const fs::path raw = dir_ / "disk.raw";
  create_pattern_image(raw, 4 << 20, 9);
  const auto before = read_file_range(raw, 0, 4 << 20);
  // qemu-nbd 7.2 serves -o over -s: the window over the overlay.
  auto [ours_size, ours] = Serve("", {"-o", "1048576", "-s", "-f", "raw", raw.string()}, 65536);
  auto [qemu_size, theirs] =
      Serve(kQemuNbd, {"-o", "1048576", "-s", "-f", "raw", raw.string()}, 65536);
  EXPECT_EQ(ours_size, 3 << 20);
  EXPECT_EQ(ours_size, qemu_size);
  EXPECT_EQ(ours, theirs);
  EXPECT_EQ(ours, pattern(1 << 20, 65536, 9));

  for (const char* overlay : {"-s", "--overlay=per-client"}) {
    Server s;
    ASSERT_NO_FATAL_FAILURE(Start(s, "", {"-o", "1048576", overlay, "-f", "raw", raw.string()}));
    std::vector<uint8_t> data(4096, 0xe1);
    {
      Nbd h = nbd_connect_to_unix(sock());
      ASSERT_TRUE(h);
      EXPECT_EQ(nbd_get_size(h.get()), 3 << 20) << overlay;
      ASSERT_EQ(nbd_pwrite(h.get(), data.data(), data.size(), (3 << 20) - 4096, 0), 0)
          << nbd_error_text();
      EXPECT_EQ(nbd_pwrite(h.get(), data.data(), 1, 3 << 20, 0), -1);
      std::vector<uint8_t> back(4096);
      ASSERT_EQ(nbd_pread(h.get(), back.data(), back.size(), (3 << 20) - 4096, 0), 0);
      EXPECT_EQ(back, data) << overlay;
    }
    // A second client: with -s it shares the overlay, per client it has
    // its own.
    Nbd h = nbd_connect_to_unix(sock());
    ASSERT_TRUE(h);
    EXPECT_EQ(nbd_get_size(h.get()), 3 << 20) << overlay;
    std::vector<uint8_t> back(4096);
    ASSERT_EQ(nbd_pread(h.get(), back.data(), back.size(), (3 << 20) - 4096, 0), 0);
    EXPECT_EQ(back, std::string(overlay) == "-s" ? data : pattern((4 << 20) - 4096, 4096, 9))
        << overlay;
    h.reset();
    s.stop();
  }
  EXPECT_EQ(read_file_range(raw, 0, 4 << 20), before);  // the file is untouched
}

TEST_F(ImageOpts, RefusalsThatNeedTheFilesSayWhatQemuNbdSays) {
  const fs::path raw = dir_ / "disk.raw";
  create_pattern_image(raw, 1 << 20, 3);
  const fs::path img = MakeQcow("c.qcow2", "1M");
  struct Case {
    std::vector<std::string> args;
    std::string says;
  };
  const std::string file = "file.filename=" + raw.string();
  for (const Case& c : std::vector<Case>{
           {{"--image-opts", "driver=raw," + file + ",offset=512k,size=1M"},
            "The sum of offset (524288) and size (1048576) has to be smaller or equal to "
            "the"},
           {{"--image-opts", "driver=raw," + file + ",offset=2M"},
            "Offset (2097152) cannot be greater than size of the containing file (1048576)"},
           {{"--image-opts", "driver=compress,file.driver=raw,file." + file},
            "ompression is not supported for underlying format: raw"},
           {{"-f", "raw", "--image-opts", "driver=raw," + file},
            "--image-opts and -f are mutually exclusive"},
           {{"--image-opts", "driver=qcow2,file.filename=" + img.string() + ",backing=b0"},
            "backing"},
           {{"--image-opts", "driver=qcow2,file.filename=" + img.string() + ",bogus=1"},
            "'bogus'"},
       }) {
    for (const std::string& binary : {server_binary(), kQemuNbd}) {
      std::vector<std::string> argv{binary, "-k", sock().string()};
      argv.insert(argv.end(), c.args.begin(), c.args.end());
      RunResult r = run(argv, 10s);
      EXPECT_EQ(r.exit_code, 1) << binary << " " << c.says << r.describe();
      EXPECT_NE(r.err.find(c.says), std::string::npos) << binary << r.describe();
      EXPECT_FALSE(unix_socket_listening(sock()));
    }
  }
  // Where qemu-nbd would serve what layerd cannot do well: refused, naming why.
  for (const Case& c : std::vector<Case>{
           {{"-s", "--image-opts", compress_opts(img)}, "driver=compress cannot be combined with -s"},
           {{"--image-opts", "driver=qcow2,file.driver=nbd,file.path=/x"}, "'file.driver=nbd'"},
       }) {
    RunResult r = run_server_binary([&] {
      std::vector<std::string> a{"-k", sock().string()};
      a.insert(a.end(), c.args.begin(), c.args.end());
      return a;
    }());
    EXPECT_EQ(r.exit_code, 1) << r.describe();
    EXPECT_NE(r.err.find(c.says), std::string::npos) << r.describe();
  }
}

}  // namespace
}  // namespace layerd::test
