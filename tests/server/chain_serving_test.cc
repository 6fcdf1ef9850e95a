// Serving qcow2 backing chains: what the chain shows clients (checked
// against qemu-img as the oracle), how zeros travel as hole chunks, and the
// rules for following backing files (relative names, formats never probed,
// json: names and loops refused, short backings, read-only backings).
#include <sys/stat.h>

#include <fstream>

#include "tests/server/harness.h"

namespace layerd::test {
namespace {

class ChainServing : public ::testing::Test {
 protected:
  void SetUp() override {
    if (server_is_qemu_nbd()) GTEST_SKIP() << "layerd-only error messages";
  }

  void qemu_img(const std::vector<std::string>& args) {
    std::vector<std::string> argv{"qemu-img"};
    argv.insert(argv.end(), args.begin(), args.end());
    RunResult r = run(argv);
    ASSERT_EQ(r.exit_code, 0) << r.describe();
  }
  void qemu_io(const std::string& file, const std::string& fmt,
               const std::vector<std::string>& commands) {
    std::vector<std::string> argv{"qemu-io", "-f", fmt};
    for (const auto& c : commands) {
      argv.push_back("-c");
      argv.push_back(c);
    }
    argv.push_back(file);
    RunResult r = run(argv);
    ASSERT_EQ(r.exit_code, 0) << r.describe();
  }

  // base.raw (8 MiB of 0x11 in 16 MiB) <- mid.qcow2 (0x22 at 4..12 MiB)
  // <- top.qcow2 (0x33 at 10 MiB, a zero cluster range at 0..1 MiB).
  void make_three_deep_chain() {
    ASSERT_NO_FATAL_FAILURE(qemu_img({"create", "-q", "-f", "raw", base(), "16M"}));
    ASSERT_NO_FATAL_FAILURE(qemu_io(base(), "raw", {"write -P 0x11 0 8M"}));
    ASSERT_NO_FATAL_FAILURE(
        qemu_img({"create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid()}));
    ASSERT_NO_FATAL_FAILURE(qemu_io(mid(), "qcow2", {"write -P 0x22 4M 8M"}));
    ASSERT_NO_FATAL_FAILURE(
        qemu_img({"create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top()}));
    ASSERT_NO_FATAL_FAILURE(
        qemu_io(top(), "qcow2", {"write -P 0x33 10M 1M", "write -z 0 1M"}));
  }

  bool start(const std::vector<std::string>& extra, const std::string& file) {
    ServerOptions o;
    o.args = {"-k", socket().string(), "-t", "-e", "0"};
    o.args.insert(o.args.end(), extra.begin(), extra.end());
    o.args.push_back(file);
    o.unix_socket = socket();
    o.log_file = dir_ / "server.log";
    bool ok = server_.start(o);
    if (!ok) ADD_FAILURE() << server_.error();
    return ok;
  }

  std::string uri() const { return "nbd+unix:///?socket=" + socket().string(); }
  fs::path socket() const { return dir_ / "s.sock"; }
  std::string base() const { return (dir_ / "base.raw").string(); }
  std::string mid() const { return (dir_ / "mid.qcow2").string(); }
  std::string top() const { return (dir_ / "top.qcow2").string(); }

  TempDir dir_;
  Server server_;
};

TEST_F(ChainServing, ThreeDeepChainReadsExactlyAsQemuReadsIt) {
  ASSERT_NO_FATAL_FAILURE(make_three_deep_chain());
  ASSERT_TRUE(start({"-f", "qcow2"}, top()));
  // -U: layerd holds top.qcow2 writable and locked, as qemu-nbd would.
  RunResult r = run({"qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", top(), uri()});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
}

TEST_F(ChainServing, WithoutFormatTheNamedImageIsRecognisedAsQcow2) {
  ASSERT_NO_FATAL_FAILURE(make_three_deep_chain());
  ASSERT_TRUE(start({}, top()));
  RunResult r = run({"qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", top(), uri()});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
}

TEST_F(ChainServing, WritesLandInTheTopImageOnlyAndQemuReadsThem) {
  ASSERT_NO_FATAL_FAILURE(make_three_deep_chain());
  struct stat before_base {}, before_mid {};
  ASSERT_EQ(::stat(base().c_str(), &before_base), 0);
  ASSERT_EQ(::stat(mid().c_str(), &before_mid), 0);
  ASSERT_TRUE(start({"-f", "qcow2"}, top()));
  {
    Nbd h = nbd_connect_to_unix(socket());
    ASSERT_TRUE(h);
    std::vector<uint8_t> data(100000, 0x5a);
    ASSERT_EQ(nbd_pwrite(h.get(), data.data(), data.size(), 5000000, 0), 0)
        << nbd_error_text();
    ASSERT_EQ(nbd_zero(h.get(), 65536, 6 << 20, 0), 0) << nbd_error_text();
    ASSERT_EQ(nbd_flush(h.get(), 0), 0) << nbd_error_text();
  }
  EXPECT_EQ(server_.stop(), 0);
  RunResult check = run({"qemu-img", "check", top()});
  EXPECT_EQ(check.exit_code, 0) << check.describe();
  ASSERT_NO_FATAL_FAILURE(qemu_io(top(), "qcow2",
                                  {"read -P 0x5a 5000000 100000",
                                   "read -P 0 6M 64k", "read -P 0x22 5M 16"}));
  struct stat after_base {}, after_mid {};
  ASSERT_EQ(::stat(base().c_str(), &after_base), 0);
  ASSERT_EQ(::stat(mid().c_str(), &after_mid), 0);
  EXPECT_EQ(after_base.st_mtim.tv_nsec, before_base.st_mtim.tv_nsec);
  EXPECT_EQ(after_mid.st_mtim.tv_nsec, before_mid.st_mtim.tv_nsec);
  EXPECT_EQ(after_mid.st_size, before_mid.st_size);
}

struct Chunk {
  uint64_t offset;
  size_t length;
  int status;
};

int collect_chunk(void* user, const void*, size_t count, uint64_t offset,
                  unsigned status, int*) {
  static_cast<std::vector<Chunk>*>(user)->push_back(
      {offset, count, static_cast<int>(status)});
  return 0;
}

std::vector<Chunk> structured_read(nbd_handle* h, uint64_t offset, size_t length,
                                   uint32_t flags, std::vector<uint8_t>* data) {
  std::vector<Chunk> chunks;
  data->assign(length, 0xff);
  nbd_chunk_callback cb{.callback = collect_chunk, .user_data = &chunks, .free = nullptr};
  EXPECT_EQ(nbd_pread_structured(h, data->data(), length, offset, cb, flags), 0)
      << nbd_error_text();
  return chunks;
}

TEST_F(ChainServing, ZeroRangesOfAReadTravelAsHoleChunks) {
  ASSERT_NO_FATAL_FAILURE(make_three_deep_chain());
  ASSERT_TRUE(start({"-f", "qcow2"}, top()));
  Nbd h = nbd_connect_to_unix(socket());
  ASSERT_TRUE(h);
  std::vector<uint8_t> data;
  // 0..1 MiB: zero clusters in top; 1..2 MiB: base data (0x11).
  auto chunks = structured_read(h.get(), 0, 2 << 20, 0, &data);
  ASSERT_EQ(chunks.size(), 2u);
  EXPECT_EQ(chunks[0].status, LIBNBD_READ_HOLE);
  EXPECT_EQ(chunks[0].offset, 0u);
  EXPECT_EQ(chunks[0].length, 1u << 20);
  EXPECT_EQ(chunks[1].status, LIBNBD_READ_DATA);
  EXPECT_TRUE(all_zero(std::span(data).first(1 << 20)));
  EXPECT_EQ(data[(1 << 20) + 5], 0x11);
  // Past every image's data: one hole for the whole range.
  chunks = structured_read(h.get(), 14 << 20, 1 << 20, 0, &data);
  ASSERT_EQ(chunks.size(), 1u);
  EXPECT_EQ(chunks[0].status, LIBNBD_READ_HOLE);
  EXPECT_TRUE(all_zero(data));
}

TEST_F(ChainServing, ZeroRangesAreHoleChunksOnEveryReadNotOnlyTheFirst) {
  ASSERT_NO_FATAL_FAILURE(make_three_deep_chain());
  ASSERT_TRUE(start({"-f", "qcow2"}, top()));
  Nbd h = nbd_connect_to_unix(socket());
  ASSERT_TRUE(h);
  std::vector<uint8_t> data;
  // Small reads (the size served from the page cache on the loop thread)
  // of a zero-cluster range, a range with no data anywhere, and one half
  // zero, half data; each twice, so the second finds everything cached.
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE(round);
    auto chunks = structured_read(h.get(), 0, 64 << 10, 0, &data);
    ASSERT_EQ(chunks.size(), 1u);
    EXPECT_EQ(chunks[0].status, LIBNBD_READ_HOLE);
    chunks = structured_read(h.get(), 14 << 20, 32 << 10, 0, &data);
    ASSERT_EQ(chunks.size(), 1u);
    EXPECT_EQ(chunks[0].status, LIBNBD_READ_HOLE);
    chunks = structured_read(h.get(), (1 << 20) - (32 << 10), 64 << 10, 0, &data);
    ASSERT_EQ(chunks.size(), 2u);
    EXPECT_EQ(chunks[0].status, LIBNBD_READ_HOLE);
    EXPECT_EQ(chunks[1].status, LIBNBD_READ_DATA);
    EXPECT_EQ(data[40 << 10], 0x11);
    // Data reads stay one chunk.
    chunks = structured_read(h.get(), 2 << 20, 64 << 10, 0, &data);
    ASSERT_EQ(chunks.size(), 1u);
    EXPECT_EQ(chunks[0].status, LIBNBD_READ_DATA);
  }
}

TEST_F(ChainServing, DontFragmentReadsComeAsOneDataChunk) {
  ASSERT_NO_FATAL_FAILURE(make_three_deep_chain());
  ASSERT_TRUE(start({"-f", "qcow2"}, top()));
  Nbd h = nbd_connect_to_unix(socket());
  ASSERT_TRUE(h);
  std::vector<uint8_t> data;
  auto chunks = structured_read(h.get(), 0, 2 << 20, LIBNBD_CMD_FLAG_DF, &data);
  ASSERT_EQ(chunks.size(), 1u);
  EXPECT_EQ(chunks[0].status, LIBNBD_READ_DATA);
  EXPECT_EQ(chunks[0].length, 2u << 20);
  EXPECT_TRUE(all_zero(std::span(data).first(1 << 20)));
}

TEST_F(ChainServing, BlockStatusLooksThroughEveryImage) {
  ASSERT_NO_FATAL_FAILURE(make_three_deep_chain());
  ASSERT_TRUE(start({"-f", "qcow2"}, top()));
  Nbd h = nbd_connect_to_unix(socket(), [](nbd_handle* hh) {
    nbd_add_meta_context(hh, LIBNBD_CONTEXT_BASE_ALLOCATION);
  });
  ASSERT_TRUE(h);
  auto map = block_status_map(h.get(), 0, 16 << 20);
  ASSERT_TRUE(map);
  // Zero clusters, then data from base/mid/top up to 12 MiB, then the
  // unwritten rest of the raw base (a hole in its file).
  const uint32_t hole_zero = LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO;
  std::vector<Extent> want{{0, 1 << 20, hole_zero},
                           {1 << 20, 11 << 20, 0},
                           {12 << 20, 4 << 20, hole_zero}};
  EXPECT_EQ(*map, want) << to_string(*map);
}

TEST_F(ChainServing, BackingShorterThanItsOverlayReadsZerosPastItsEnd) {
  ASSERT_NO_FATAL_FAILURE(qemu_img({"create", "-q", "-f", "qcow2", mid(), "1M"}));
  ASSERT_NO_FATAL_FAILURE(qemu_io(mid(), "qcow2", {"write -P 0x44 0 1M"}));
  ASSERT_NO_FATAL_FAILURE(qemu_img(
      {"create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top(), "4M"}));
  ASSERT_TRUE(start({"-f", "qcow2"}, top()));
  Nbd h = nbd_connect_to_unix(socket());
  ASSERT_TRUE(h);
  std::vector<uint8_t> data(2 << 20);
  ASSERT_EQ(nbd_pread(h.get(), data.data(), data.size(), 0, 0), 0) << nbd_error_text();
  EXPECT_EQ(data[0], 0x44);
  EXPECT_EQ(data[(1 << 20) - 1], 0x44);
  EXPECT_TRUE(all_zero(std::span(data).subspan(1 << 20)));
  // A partial-cluster write straddling the backing's end: head from the
  // backing, tail zeros.
  std::vector<uint8_t> one(1, 0x99);
  ASSERT_EQ(nbd_pwrite(h.get(), one.data(), 1, (1 << 20) + 7, 0), 0);
  ASSERT_EQ(nbd_pread(h.get(), data.data(), data.size(), 0, 0), 0);
  EXPECT_EQ(data[(1 << 20) - 1], 0x44);
  EXPECT_EQ(data[(1 << 20) + 7], 0x99);
  EXPECT_EQ(data[(1 << 20) + 6], 0);
}

TEST_F(ChainServing, RelativeBackingNamesResolveAgainstTheImageDirectory) {
  ASSERT_NO_FATAL_FAILURE(make_three_deep_chain());
  // The server's working directory is the test's, not the images'; the
  // relative name "mid.qcow2" must still be found next to top.qcow2.
  ASSERT_NE(fs::current_path(), dir_.path());
  ASSERT_FALSE(fs::exists(fs::current_path() / "mid.qcow2"));
  ASSERT_TRUE(start({"-f", "qcow2"}, top()));
  RunResult r = run({"qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", top(), uri()});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
}

TEST_F(ChainServing, RawBackingWithAQcow2HeaderIsStillRaw) {
  // The raw base holds the bytes of a qcow2 image (a guest could write
  // them); the overlay says raw, so they are served as plain bytes.
  std::string fake = (dir_ / "fake.qcow2").string();
  ASSERT_NO_FATAL_FAILURE(qemu_img({"create", "-q", "-f", "qcow2", fake, "1M"}));
  fs::copy_file(fake, base());
  fs::resize_file(base(), 1 << 20);
  ASSERT_NO_FATAL_FAILURE(
      qemu_img({"create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top()}));
  ASSERT_TRUE(start({"-f", "qcow2"}, top()));
  Nbd h = nbd_connect_to_unix(socket());
  ASSERT_TRUE(h);
  EXPECT_EQ(nbd_get_size(h.get()), 1 << 20);
  std::vector<uint8_t> data(4);
  ASSERT_EQ(nbd_pread(h.get(), data.data(), 4, 0, 0), 0);
  EXPECT_EQ(data, (std::vector<uint8_t>{'Q', 'F', 'I', 0xfb}));
}

TEST_F(ChainServing, MissingBackingFormatIsRefusedNotGuessed) {
  ASSERT_NO_FATAL_FAILURE(qemu_img({"create", "-q", "-f", "raw", base(), "1M"}));
  ASSERT_NO_FATAL_FAILURE(
      qemu_img({"create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top()}));
  // Blank the backing-format header extension's magic: qemu-img 7.2 will
  // not write such an image, but older ones exist.
  {
    std::fstream f(top(), std::ios::in | std::ios::out | std::ios::binary);
    std::string head(65536, '\0');
    f.read(head.data(), head.size());
    size_t at = head.find("\xe2\x79\x2a\xca");
    ASSERT_NE(at, std::string::npos);
    f.clear();
    f.seekp(static_cast<std::streamoff>(at));
    f.write("\0\0\0\0", 4);
  }
  RunResult r = run_server_binary({"-k", socket().string(), "-f", "qcow2", top()});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("does not record the format of its backing file"),
            std::string::npos)
      << r.err;
}

TEST_F(ChainServing, JsonBackingNamesAreRefused) {
  ASSERT_NO_FATAL_FAILURE(qemu_img({"create", "-q", "-f", "raw", base(), "1M"}));
  ASSERT_NO_FATAL_FAILURE(qemu_img({"create", "-q", "-f", "qcow2", top(), "1M"}));
  ASSERT_NO_FATAL_FAILURE(qemu_img({"rebase", "-u", "-b",
                                    R"(json:{"file.filename":"base.raw"})", "-F",
                                    "raw", top()}));
  RunResult r = run_server_binary({"-k", socket().string(), "-f", "qcow2", top()});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("json:"), std::string::npos) << r.err;
}

TEST_F(ChainServing, BackingLoopsAreRefused) {
  // top.qcow2 -> mid.qcow2 -> (patched) top.qcow2
  ASSERT_NO_FATAL_FAILURE(qemu_img({"create", "-q", "-f", "qcow2", base(), "1M"}));
  ASSERT_NO_FATAL_FAILURE(
      qemu_img({"create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "qcow2", mid()}));
  ASSERT_NO_FATAL_FAILURE(
      qemu_img({"create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top()}));
  {
    // "base.raw" and "top.qcow" differ in length: point mid at "top.qcow2"
    // by rewriting name and length in place.
    std::fstream f(mid(), std::ios::in | std::ios::out | std::ios::binary);
    std::string head(65536, '\0');
    f.read(head.data(), head.size());
    size_t at = head.find("base.raw");
    ASSERT_NE(at, std::string::npos);
    f.clear();
    f.seekp(static_cast<std::streamoff>(at));
    f.write("top.qcow2", 9);
    const unsigned char len[4] = {0, 0, 0, 9};  // backing_file_size, offset 16
    f.seekp(16);
    f.write(reinterpret_cast<const char*>(len), 4);
  }
  RunResult r = run_server_binary({"-k", socket().string(), "-f", "qcow2", top()});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("loop"), std::string::npos) << r.err;
}

TEST_F(ChainServing, MissingBackingFileNamesBothImages) {
  ASSERT_NO_FATAL_FAILURE(qemu_img({"create", "-q", "-f", "raw", base(), "1M"}));
  ASSERT_NO_FATAL_FAILURE(
      qemu_img({"create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top()}));
  fs::remove(base());
  RunResult r = run_server_binary({"-k", socket().string(), "-f", "qcow2", top()});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("base.raw"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("top.qcow2"), std::string::npos) << r.err;
}

TEST_F(ChainServing, ChainOfTwoHundredImagesServesTheBottomData) {
  ASSERT_NO_FATAL_FAILURE(qemu_img({"create", "-q", "-f", "raw", base(), "1M"}));
  ASSERT_NO_FATAL_FAILURE(qemu_io(base(), "raw", {"write -P 0x61 0 4k"}));
  std::string below = "base.raw", below_fmt = "raw";
  for (int i = 0; i < 200; ++i) {
    std::string name = "l" + std::to_string(i) + ".qcow2";
    // -u with a size: qemu-img does not open the chain below each new
    // image (which made making the chain quadratic, close to the watchdog).
    ASSERT_NO_FATAL_FAILURE(qemu_img({"create", "-q", "-u", "-f", "qcow2", "-b", below,
                                      "-F", below_fmt, (dir_ / name).string(), "1M"}));
    below = name;
    below_fmt = "qcow2";
  }
  ASSERT_NO_FATAL_FAILURE(qemu_io((dir_ / "l100.qcow2").string(), "qcow2",
                                  {"write -P 0x62 64k 4k"}));
  ASSERT_TRUE(start({"-f", "qcow2"}, (dir_ / below).string()));
  Nbd h = nbd_connect_to_unix(socket());
  ASSERT_TRUE(h);
  std::vector<uint8_t> data(128 << 10);
  ASSERT_EQ(nbd_pread(h.get(), data.data(), data.size(), 0, 0), 0) << nbd_error_text();
  EXPECT_EQ(data[0], 0x61);
  EXPECT_EQ(data[65536], 0x62);
  EXPECT_EQ(data[4096], 0);
}

TEST_F(ChainServing, ImageMarkedCorruptIsServedOnlyReadOnly) {
  ASSERT_NO_FATAL_FAILURE(qemu_img({"create", "-q", "-f", "qcow2", top(), "1M"}));
  ASSERT_NO_FATAL_FAILURE(qemu_io(top(), "qcow2", {"write -P 0x71 0 4k"}));
  {
    // Incompatible feature bit 1 ("corrupt"): byte 79 is the low byte of
    // the 64-bit incompatible_features field at offset 72.
    std::fstream f(top(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(79);
    char b = 0;
    f.read(&b, 1);
    b = static_cast<char>(b | 2);
    f.seekp(79);
    f.write(&b, 1);
  }
  RunResult r = run_server_binary({"-k", socket().string(), "-f", "qcow2", top()});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("corrupt"), std::string::npos) << r.err;
  ASSERT_TRUE(start({"-f", "qcow2", "-r"}, top()));
  Nbd h = nbd_connect_to_unix(socket());
  ASSERT_TRUE(h);
  std::vector<uint8_t> data(4096);
  ASSERT_EQ(nbd_pread(h.get(), data.data(), data.size(), 0, 0), 0) << nbd_error_text();
  EXPECT_EQ(data[0], 0x71);
}

std::string image_opts_for(const fs::path& image, const fs::path& data) {
  return "driver=qcow2,file.filename=" + image.string() +
         ",data-file.filename=" + data.string();
}

TEST_F(ChainServing, ExternalDataFileIsOpenedOnlyWhenAllowed) {
  auto image_opts = [&] { return image_opts_for(top(), dir_ / "top.data"); };
  // The data file's name is relative: it resolves next to the image, not
  // in the server's working directory.
  ASSERT_NO_FATAL_FAILURE(qemu_img({"create", "-q", "-f", "qcow2", "-o",
                                    "data_file=" + (dir_ / "top.data").string(),
                                    top(), "4M"}));
  ASSERT_NO_FATAL_FAILURE(qemu_io(top(), "qcow2", {"write -P 0x5d 64k 128k"}));
  ASSERT_NO_FATAL_FAILURE(qemu_img({"amend", "-o", "data_file=top.data",
                                    "--image-opts", image_opts()}));
  RunResult r = run_server_binary({"-k", socket().string(), "-f", "qcow2", top()});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--allow-data-file"), std::string::npos) << r.err;

  ASSERT_TRUE(start({"-f", "qcow2", "--allow-data-file"}, top()));
  Nbd h = nbd_connect_to_unix(socket());
  ASSERT_TRUE(h);
  std::vector<uint8_t> data(256 << 10);
  ASSERT_EQ(nbd_pread(h.get(), data.data(), data.size(), 0, 0), 0) << nbd_error_text();
  EXPECT_TRUE(all_zero(std::span(data).first(64 << 10)));
  EXPECT_EQ(data[64 << 10], 0x5d);
  EXPECT_EQ(data[(192 << 10) - 1], 0x5d);
  std::vector<uint8_t> more(4096, 0x6e);
  ASSERT_EQ(nbd_pwrite(h.get(), more.data(), more.size(), 1 << 20, LIBNBD_CMD_FLAG_FUA), 0);
  h.reset();
  EXPECT_EQ(server_.stop(), 0);
  // qemu would look for "top.data" in its working directory: name the data
  // file for it explicitly.
  RunResult read = run({"qemu-io", "-c", "read -P 0x6e 1M 4k", "-c",
                        "read -P 0x5d 64k 128k", "--image-opts", image_opts()});
  EXPECT_EQ(read.exit_code, 0) << read.describe();
  EXPECT_EQ(read.out.find("Pattern verification failed"), std::string::npos)
      << read.out;
  RunResult check = run({"qemu-img", "check", "--image-opts", image_opts()});
  EXPECT_EQ(check.exit_code, 0) << check.describe();
}

TEST_F(ChainServing, SmallMappingCacheStillServesEveryByte) {
  ASSERT_NO_FATAL_FAILURE(make_three_deep_chain());
  ASSERT_TRUE(start({"-f", "qcow2", "--l2-cache-size=1M"}, top()));
  RunResult r = run({"qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", top(), uri()});
  EXPECT_EQ(r.exit_code, 0) << r.describe();
  RunResult bad = run_server_binary({"-k", socket().string(), "--l2-cache-size=12",
                                     top()});
  EXPECT_EQ(bad.exit_code, 1);
}

}  // namespace
}  // namespace layerd::test
