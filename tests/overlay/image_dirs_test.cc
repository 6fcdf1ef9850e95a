// The allowed image directories (overlay/image_dirs.h) on real files: which
// names open, which are refused as outside (EXDEV) and what the refusal
// says, symlinks pointing in and out, `..` escapes, a directory swapped for
// a symlink after the policy was made, magic links, protocol names; and
// open_chain_nodes() with a policy over qemu-img-made chains.
#include <fcntl.h>
#include <unistd.h>

#include <string>

#include <gtest/gtest.h>

#include "overlay/chain.h"
#include "overlay/image_dirs.h"
#include "tests/server/harness.h"

namespace layerd::test {
namespace {

class ImageDirsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fs::create_directories(allowed());
    fs::create_directories(allowed() / "sub");
    fs::create_directories(outside());
    write("img/inside.raw");
    write("img/sub/deep.raw");
    write("out/secret.raw");
    std::string error;
    ASSERT_TRUE(dirs_.add(allowed().string(), &error)) << error;
  }
  fs::path allowed() const { return dir_ / "img"; }
  fs::path outside() const { return dir_ / "out"; }
  void write(const std::string& name) { create_pattern_image(dir_ / name, 4096, 1); }

  // The error of opening `path` read-only through the policy ({} if it opened).
  std::error_code open_error(const fs::path& path) {
    std::error_code ec;
    auto file = dirs_.open(path.string(), FileOptions{}, ec);
    EXPECT_EQ(file == nullptr, bool(ec)) << path;
    return ec;
  }

  TempDir dir_;
  ImageDirs dirs_;
};

const std::error_code kOutside = std::make_error_code(std::errc::cross_device_link);

TEST_F(ImageDirsTest, NamesInsideOpen) {
  EXPECT_FALSE(open_error(allowed() / "inside.raw"));
  EXPECT_FALSE(open_error(allowed() / "sub" / "deep.raw"));
  EXPECT_FALSE(open_error(allowed() / "sub" / ".." / "inside.raw"));  // `..` that stays in
  EXPECT_FALSE(open_error(allowed().string() + "//sub/./deep.raw"));
}

TEST_F(ImageDirsTest, AbsoluteNameOutsideIsRefused) {
  EXPECT_EQ(open_error(outside() / "secret.raw"), kOutside);
  EXPECT_EQ(open_error("/etc/passwd"), kOutside);
  // A directory whose name begins like the allowed one is another directory.
  fs::create_directories(dir_ / "img2");
  write("img2/x.raw");
  EXPECT_EQ(open_error(dir_ / "img2" / "x.raw"), kOutside);
}

TEST_F(ImageDirsTest, DotDotEscapeIsRefused) {
  EXPECT_EQ(open_error(allowed() / ".." / "out" / "secret.raw"), kOutside);
  EXPECT_EQ(open_error(allowed() / "sub" / ".." / ".." / "out" / "secret.raw"), kOutside);
}

TEST_F(ImageDirsTest, SymlinkPointingOutIsRefused) {
  fs::create_symlink(outside() / "secret.raw", allowed() / "abs-link.raw");
  fs::create_symlink("../out/secret.raw", allowed() / "rel-link.raw");
  fs::create_directory_symlink(outside(), allowed() / "dir-link");
  EXPECT_EQ(open_error(allowed() / "abs-link.raw"), kOutside);
  EXPECT_EQ(open_error(allowed() / "rel-link.raw"), kOutside);
  EXPECT_EQ(open_error(allowed() / "dir-link" / "secret.raw"), kOutside);
}

TEST_F(ImageDirsTest, SymlinkInsideOpens) {
  fs::create_symlink("sub/deep.raw", allowed() / "link.raw");
  fs::create_symlink(allowed() / "inside.raw", allowed() / "sub" / "abs-link.raw");
  EXPECT_FALSE(open_error(allowed() / "link.raw"));
  EXPECT_FALSE(open_error(allowed() / "sub" / "abs-link.raw"));
}

TEST_F(ImageDirsTest, SymlinkIntoAnotherAllowedDirectoryOpens) {
  fs::create_symlink(outside() / "secret.raw", allowed() / "link.raw");
  std::string error;
  ASSERT_TRUE(dirs_.add(outside().string(), &error)) << error;
  EXPECT_FALSE(open_error(allowed() / "link.raw"));
}

TEST_F(ImageDirsTest, DirectorySwappedForSymlinkAfterwardsStaysConfined) {
  // The policy holds the directory itself, not its name: replacing the
  // name with a symlink to elsewhere leads nowhere new.
  fs::create_directories(dir_ / "swap");
  write("swap/a.raw");
  ImageDirs dirs;
  std::string error;
  ASSERT_TRUE(dirs.add((dir_ / "swap").string(), &error)) << error;
  fs::rename(dir_ / "swap", dir_ / "swap.old");
  fs::create_directory_symlink(outside(), dir_ / "swap");
  fs::copy_file(outside() / "secret.raw", outside() / "a.raw");
  std::error_code ec;
  auto file = dirs.open((dir_ / "swap" / "a.raw").string(), FileOptions{}, ec);
  // Either refused, or the file of the original directory.
  if (file) {
    struct stat opened {}, original {};
    ASSERT_EQ(::stat((dir_ / "swap.old" / "a.raw").c_str(), &original), 0);
    std::error_code e2;
    ASSERT_TRUE(dirs.stat((dir_ / "swap" / "a.raw").string(), &opened, e2)) << e2.message();
    EXPECT_EQ(opened.st_ino, original.st_ino);
  } else {
    EXPECT_EQ(ec, kOutside);
  }
}

TEST_F(ImageDirsTest, MagicLinkIsRefused) {
  int fd = ::open((outside() / "secret.raw").c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  fs::create_symlink("/proc/self/fd/" + std::to_string(fd), allowed() / "magic.raw");
  std::error_code ec = open_error(allowed() / "magic.raw");
  ::close(fd);
  EXPECT_TRUE(ec == kOutside || ec == std::errc::too_many_symbolic_link_levels) << ec.message();
}

TEST_F(ImageDirsTest, MissingFileInsideIsNotCalledOutside) {
  EXPECT_EQ(open_error(allowed() / "missing.raw"),
            std::make_error_code(std::errc::no_such_file_or_directory));
}

TEST_F(ImageDirsTest, RefusalNamesTheFileAndTheOptionThatAllowsIt) {
  const std::string path = (outside() / "secret.raw").string();
  std::string why = dirs_.explain(kOutside, "backing file '" + path + "' of 'top'", path);
  EXPECT_NE(why.find("backing file '" + path + "' of 'top' is outside the allowed image "
                     "directories (" + allowed().string() + ")"),
            std::string::npos) << why;
  EXPECT_NE(why.find("--image-dir " + outside().string()), std::string::npos) << why;
  // Through a symlink: the directory it resolves to is the one to allow.
  fs::create_symlink("../out/secret.raw", allowed() / "link.raw");
  const std::string link = (allowed() / "link.raw").string();
  why = dirs_.explain(kOutside, "backing file '" + link + "'", link);
  EXPECT_NE(why.find("resolves to '" + path + "'"), std::string::npos) << why;
  EXPECT_NE(why.find("--image-dir " + outside().string()), std::string::npos) << why;
}

TEST_F(ImageDirsTest, RootFollowsNamesAnywhere) {
  ImageDirs everywhere;
  std::string error;
  ASSERT_TRUE(everywhere.add("/", &error)) << error;
  EXPECT_TRUE(everywhere.everywhere());
  std::error_code ec;
  EXPECT_TRUE(everywhere.open((outside() / "secret.raw").string(), FileOptions{}, ec))
      << ec.message();
}

TEST_F(ImageDirsTest, MissingDirectoryIsAnError) {
  ImageDirs dirs;
  std::string error;
  EXPECT_FALSE(dirs.add((dir_ / "nowhere").string(), &error));
  EXPECT_NE(error.find("nowhere"), std::string::npos) << error;
}

TEST(ProtocolNames, AreRecognisedAsQemuDoes) {
  EXPECT_EQ(protocol_prefix("nbd:localhost:10809"), "nbd:");
  EXPECT_EQ(protocol_prefix("nbd+unix:///disk?socket=/s"), "nbd+unix:");
  EXPECT_EQ(protocol_prefix("http://example.com/x.qcow2"), "http:");
  EXPECT_EQ(protocol_prefix("file:/etc/passwd"), "file:");
  EXPECT_EQ(protocol_prefix(R"(json:{"file.filename":"x"})"), "json:");
  EXPECT_EQ(protocol_prefix("base.qcow2"), "");
  EXPECT_EQ(protocol_prefix("./a:b.qcow2"), "");
  EXPECT_EQ(protocol_prefix("/img/a:b.qcow2"), "");
  const std::string why = refuse_protocol_name("backing file 'nbd:h:1' of 't'", "nbd:h:1");
  EXPECT_NE(why.find("'nbd:' protocol name"), std::string::npos) << why;
  EXPECT_EQ(refuse_protocol_name("x", "base.qcow2"), "");
}

// open_chain_nodes with a policy, over chains qemu-img made.
class ConfinedChainTest : public ImageDirsTest {
 protected:
  bool open(const fs::path& top, std::string* error) {
    ChainOptions co;
    co.read_only = true;
    co.image_dirs = &dirs_;
    std::vector<std::shared_ptr<BlockNode>> nodes;
    return open_chain_nodes(top.string(), ImageFormat::Qcow2, co, &nodes, error);
  }
  void make_top(const fs::path& top, const std::string& backing) {
    RunResult r = run({"qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing,
                       "-F", "raw", top.string(), "4096"});
    ASSERT_EQ(r.exit_code, 0) << r.describe();
  }
};

TEST_F(ConfinedChainTest, BackingInsideOpens) {
  ASSERT_NO_FATAL_FAILURE(make_top(allowed() / "top.qcow2", "sub/deep.raw"));
  std::string error;
  EXPECT_TRUE(open(allowed() / "top.qcow2", &error)) << error;
}

TEST_F(ConfinedChainTest, BackingOutsideIsRefusedByName) {
  const std::string secret = (outside() / "secret.raw").string();
  ASSERT_NO_FATAL_FAILURE(make_top(allowed() / "top.qcow2", secret));
  std::string error;
  EXPECT_FALSE(open(allowed() / "top.qcow2", &error));
  EXPECT_NE(error.find("backing file '" + secret + "' of '"), std::string::npos) << error;
  EXPECT_NE(error.find("--image-dir " + outside().string()), std::string::npos) << error;
}

TEST_F(ConfinedChainTest, BackingEscapingWithDotDotIsRefused) {
  ASSERT_NO_FATAL_FAILURE(make_top(allowed() / "top.qcow2", "../out/secret.raw"));
  std::string error;
  EXPECT_FALSE(open(allowed() / "top.qcow2", &error));
  EXPECT_NE(error.find("outside the allowed image directories"), std::string::npos) << error;
}

TEST_F(ConfinedChainTest, ProtocolBackingIsRefused) {
  ASSERT_NO_FATAL_FAILURE(make_top(allowed() / "top.qcow2", "nbd:localhost:10809"));
  write("img/nbd:localhost:10809");  // a plain file of that name is not opened either
  std::string error;
  EXPECT_FALSE(open(allowed() / "top.qcow2", &error));
  EXPECT_NE(error.find("'nbd:' protocol name"), std::string::npos) << error;
}

TEST_F(ConfinedChainTest, JsonBackingIsRefused) {
  ASSERT_NO_FATAL_FAILURE(make_top(allowed() / "top.qcow2", R"(json:{"file.filename":"x"})"));
  std::string error;
  EXPECT_FALSE(open(allowed() / "top.qcow2", &error));
  EXPECT_NE(error.find("json:"), std::string::npos) << error;
}

TEST_F(ConfinedChainTest, OpenElsewhereIsNotSharedPastThePolicy) {
  // A file outside that some other user of the registry has open already is
  // refused as well (the registry looks names up through the policy).
  const std::string secret = (outside() / "secret.raw").string();
  ImageRegistry registry;
  NodeOptions trusted;
  std::string error;
  auto held = registry.open(secret, ImageFormat::Raw, trusted, &error);
  ASSERT_TRUE(held) << error;
  ASSERT_NO_FATAL_FAILURE(make_top(allowed() / "top.qcow2", secret));
  ChainOptions co;
  co.read_only = true;
  co.image_dirs = &dirs_;
  co.registry = &registry;
  std::vector<std::shared_ptr<BlockNode>> nodes;
  EXPECT_FALSE(open_chain_nodes((allowed() / "top.qcow2").string(), ImageFormat::Qcow2, co,
                                &nodes, &error));
  EXPECT_NE(error.find("outside the allowed image directories"), std::string::npos) << error;
}

}  // namespace
}  // namespace layerd::test
