// --image-opts parsing (server/image_opts.h) and how the command line
// combines it with -f, -o, -s, -l, -r and the cache options: pure parsing,
// no server. What the parsed exports serve is checked end to end in
// image_opts_test.cc.
#include <gtest/gtest.h>

#include <initializer_list>
#include <string>
#include <vector>

#include "server/image_opts.h"
#include "server/options.h"

namespace layerd {
namespace {

ImageOpts parsed(const std::string& text) {
  ImageOpts o;
  std::string error = parse_image_opts(text, &o);
  EXPECT_EQ(error, "") << text;
  return o;
}

std::string refusal(const std::string& text) {
  ImageOpts o;
  return parse_image_opts(text, &o);
}

ParseResult command_line(std::initializer_list<const char*> args) {
  std::vector<char*> argv{const_cast<char*>("layerd")};
  for (const char* a : args) argv.push_back(const_cast<char*>(a));
  argv.push_back(nullptr);
  optind = 0;  // getopt_long starts over
  return parse_command_line(static_cast<int>(argv.size() - 1), argv.data());
}

TEST(SplitQemuOpts, SplitsAtSingleCommasAndReadsDoubledOnesAsCommas) {
  std::vector<std::pair<std::string, std::string>> pairs;
  ASSERT_EQ(split_qemu_opts("a=1,b=x,,y,,,c,nod,id=z,e=", "file", &pairs), "");
  std::vector<std::pair<std::string, std::string>> want{
      {"a", "1"}, {"b", "x,y,"}, {"c", "on"}, {"d", "off"}, {"e", ""}};
  EXPECT_EQ(pairs, want);
  ASSERT_EQ(split_qemu_opts("disk.img,read-only=on", "file", &pairs), "");
  want = {{"file", "disk.img"}, {"read-only", "on"}};
  EXPECT_EQ(pairs, want);
  EXPECT_NE(split_qemu_opts("a=1,=2", "file", &pairs), "");
}

TEST(ImageOptsParse, QcowOverAFileNode) {
  for (const char* text : {"driver=qcow2,file.filename=/d/x.qcow2",
                           "driver=qcow2,file.driver=file,file.filename=/d/x.qcow2",
                           "driver=qcow2,file.filename=file:/d/x.qcow2"}) {
    ImageOpts o = parsed(text);
    EXPECT_EQ(o.filename, "/d/x.qcow2") << text;
    EXPECT_EQ(o.format, "qcow2") << text;
    EXPECT_FALSE(o.compress);
    EXPECT_EQ(o.offset, 0u);
    EXPECT_FALSE(o.size);
  }
}

TEST(ImageOptsParse, FileNodeAloneIsRawAndNoTopDriverProbes) {
  ImageOpts o = parsed("driver=file,filename=a,,b.img");
  EXPECT_EQ(o.filename, "a,b.img");
  EXPECT_EQ(o.format, "raw");
  o = parsed("file.filename=x.img");
  EXPECT_EQ(o.filename, "x.img");
  EXPECT_EQ(o.format, "");
}

TEST(ImageOptsParse, RawWindowWithQemuSizes) {
  ImageOpts o = parsed("driver=raw,file.filename=t.tar,offset=1536,size=1G");
  EXPECT_EQ(o.format, "raw");
  EXPECT_EQ(o.offset, 1536u);
  EXPECT_EQ(o.size, 1ull << 30);
  o = parsed("driver=raw,offset=0x200,size=1.5M,file.filename=t.tar");
  EXPECT_EQ(o.offset, 512u);
  EXPECT_EQ(o.size, 3ull << 19);
  // A raw window over a qcow2 image: -o's stack.
  o = parsed("driver=raw,offset=64k,file.driver=qcow2,file.file.filename=q");
  EXPECT_EQ(o.format, "qcow2");
  EXPECT_EQ(o.offset, 65536u);
  EXPECT_EQ(o.filename, "q");
}

TEST(ImageOptsParse, CompressOverQcowAndUnderRaw) {
  ImageOpts o = parsed("driver=compress,file.driver=qcow2,file.file.filename=c.qcow2");
  EXPECT_TRUE(o.compress);
  EXPECT_EQ(o.format, "qcow2");
  EXPECT_EQ(o.filename, "c.qcow2");
  o = parsed("driver=raw,size=1M,file.driver=compress,file.file.driver=qcow2,"
             "file.file.file.filename=c.qcow2");
  EXPECT_TRUE(o.compress);
  EXPECT_EQ(o.size, 1u << 20);
}

TEST(ImageOptsParse, NodeSettingsMapOntoLayerdsOptions) {
  ImageOpts o = parsed("driver=qcow2,file.filename=q,read-only=on,force-share=on,"
                       "discard=unmap,detect-zeroes=unmap,cache.direct=off,"
                       "cache.no-flush=on,l2-cache-size=4M,backing=null,"
                       "file.locking=auto,file.aio=threads,node-name=n0");
  EXPECT_EQ(o.read_only, true);
  EXPECT_EQ(o.force_share, true);
  EXPECT_EQ(o.discard_unmap, true);
  EXPECT_EQ(o.detect_zeroes, DetectZeroes::Unmap);
  EXPECT_EQ(o.cache_direct, false);
  EXPECT_EQ(o.cache_no_flush, true);
  EXPECT_EQ(o.l2_cache_bytes, 4u << 20);
  EXPECT_TRUE(o.no_backing);
  EXPECT_TRUE(parsed("driver=qcow2,file.filename=q,backing=").no_backing);
}

// Every refusal names the key at fault, as the user wrote it.
TEST(ImageOptsParse, WhatLayerdDoesNotSupportIsRefusedNamingTheKey) {
  struct Case {
    const char* text;
    const char* names;
  };
  for (const Case& c : std::initializer_list<Case>{
           {"driver=vmdk,file.filename=x", "'driver=vmdk'"},
           {"driver=qcow2,file.driver=nbd,file.host=h", "'file.driver=nbd'"},
           {"driver=qcow2,file.filename=nbd://h/x", "'file.filename=nbd://h/x'"},
           {"driver=qcow2,file.filename=q,foo=bar", "'foo'"},
           {"driver=qcow2,file.filename=q,file.aio-max-batch=4", "'file.aio-max-batch'"},
           {"driver=raw,file.filename=r,compress=on", "'compress'"},
           {"driver=qcow2,file.filename=q,backing=other", "'backing=other'"},
           {"driver=qcow2,file.filename=q,backing.file.filename=b", "'backing.file.filename'"},
           {"driver=qcow2,file.filename=q,data-file=d", "'data-file'"},
           {"driver=qcow2,file.filename=q,lazy-refcounts=on", "'lazy-refcounts=on'"},
           {"driver=qcow2,file.filename=q,file.locking=off", "'file.locking=off'"},
           {"driver=qcow2,file.filename=q,read-only=maybe", "'read-only'"},
           {"driver=qcow2,file.filename=q,discard=sometimes", "'discard'"},
           {"driver=qcow2,file.filename=q,detect-zeroes=yes", "'detect-zeroes'"},
           {"driver=raw,file.filename=r,offset=-1", "'offset'"},
           {"driver=raw,file.filename=r,size=1Q", "'size'"},
           {"driver=qcow2,file=node0", "'file=node0'"},
           {"x.qcow2", "'file=x.qcow2'"},
           {"driver=qcow2", "'file.filename=PATH'"},
           {"driver=qcow2,file.driver=file", "'file.filename'"},
           {"driver=compress,file.filename=x", "'file.driver=file'"},
           {"driver=compress,file.driver=raw,file.file.filename=x", "'file.driver=raw'"},
           {"driver=qcow2,file.driver=qcow2,file.file.filename=x", "'file.driver=qcow2'"},
           {"driver=raw,file.driver=raw,file.file.filename=x", "'file.driver=raw'"},
           {"read-only=on", "driver="},
           {"file.filename=x,offset=4k", "'offset' is not supported by layerd without a driver"},
       }) {
    const std::string m = refusal(c.text);
    EXPECT_NE(m.find(c.names), std::string::npos) << c.text << ": " << m;
  }
  // qemu's words where it has them.
  EXPECT_EQ(refusal("driver=compress,file.driver=raw,file.file.filename=x"),
            "'file.driver=raw': compression is not supported for underlying "
            "format: raw (driver=compress goes over driver=qcow2)");
}

TEST(ImageOptsCommandLine, BecomesTheExportOfTheFileArgument) {
  ParseResult r = command_line(
      {"--image-opts", "driver=raw,file.filename=t.tar,offset=4096,size=1M,read-only=on"});
  ASSERT_TRUE(r.options) << r.message;
  ASSERT_EQ(r.options->exports.size(), 1u);
  const ExportSpec& e = r.options->exports[0];
  EXPECT_EQ(e.file, "t.tar");
  EXPECT_EQ(e.format, "raw");
  EXPECT_EQ(e.offset, 4096u);
  EXPECT_EQ(e.length, 1u << 20);
  EXPECT_TRUE(e.read_only);

  r = command_line({"--image-opts", "driver=compress,file.driver=qcow2,file.file.filename=c",
                    "--discard=unmap"});
  ASSERT_TRUE(r.options) << r.message;
  EXPECT_TRUE(r.options->exports[0].compress);
  EXPECT_EQ(r.options->exports[0].format, "qcow2");
  EXPECT_TRUE(r.options->discard_unmap);
}

TEST(ImageOptsCommandLine, DashOStacksAWindowOnTop) {
  ParseResult r = command_line(
      {"-o", "512", "--image-opts", "driver=raw,file.filename=t,offset=1024,size=4096"});
  ASSERT_TRUE(r.options) << r.message;
  EXPECT_EQ(r.options->exports[0].offset, 1536u);
  EXPECT_EQ(r.options->exports[0].length, 3584u);
  r = command_line({"-o", "8192", "--image-opts", "driver=raw,file.filename=t,size=4096"});
  ASSERT_FALSE(r.options);
  EXPECT_NE(r.message.find("Offset (8192) cannot be greater than size of the containing "
                           "file (4096)"),
            std::string::npos)
      << r.message;
}

TEST(ImageOptsCommandLine, NodeSettingsBecomeTheServersAndConflictsAreRefused) {
  ParseResult r = command_line({"--image-opts",
                                "driver=qcow2,file.filename=q,cache.direct=on,"
                                "discard=unmap,detect-zeroes=unmap"});
  ASSERT_TRUE(r.options) << r.message;
  EXPECT_EQ(r.options->cache, CacheMode::None);
  EXPECT_EQ(r.options->detect_zeroes, DetectZeroes::Unmap);
  r = command_line({"--cache=writethrough", "--image-opts",
                    "driver=qcow2,file.filename=q,cache.direct=on"});
  ASSERT_TRUE(r.options) << r.message;
  EXPECT_EQ(r.options->cache, CacheMode::DirectSync);
  r = command_line({"--image-opts", "driver=qcow2,file.filename=q,cache.no-flush=on"});
  ASSERT_TRUE(r.options) << r.message;
  EXPECT_EQ(r.options->cache, CacheMode::Unsafe);

  struct Case {
    std::vector<const char*> args;
    const char* says;
  };
  for (const Case& c : std::initializer_list<Case>{
           {{"-f", "qcow2", "--image-opts", "driver=qcow2,file.filename=q"},
            "--image-opts and -f are mutually exclusive"},
           {{"--image-opts", "driver=qcow2,file.filename=q,detect-zeroes=unmap"},
            "setting detect-zeroes to unmap is not allowed without setting discard "
            "operation to unmap"},
           {{"--image-opts", "driver=qcow2,file.filename=q,cache.direct=on,cache.no-flush=on"},
            "cache.no-flush=on cannot be combined"},
           {{"-s", "--image-opts", "driver=compress,file.driver=qcow2,file.file.filename=c"},
            "driver=compress cannot be combined with -s"},
           {{"--overlay=per-client", "--image-opts",
             "driver=compress,file.driver=qcow2,file.file.filename=c"},
            "driver=compress cannot be combined with -s"},
           {{"--image-opts", "--export", "name=a,file=b", "driver=qcow2,file.filename=q"},
            "--image-opts describes the FILE argument"},
           {{"--image-opts", "driver=qcow2,file.filename=q,bogus=1"}, "'bogus'"},
       }) {
    std::vector<char*> argv{const_cast<char*>("layerd")};
    for (const char* a : c.args) argv.push_back(const_cast<char*>(a));
    argv.push_back(nullptr);
    optind = 0;
    ParseResult bad = parse_command_line(static_cast<int>(argv.size() - 1), argv.data());
    EXPECT_FALSE(bad.options) << c.says;
    EXPECT_EQ(bad.exit_status, 1) << c.says;
    EXPECT_NE(bad.message.find(c.says), std::string::npos) << bad.message;
  }
}

}  // namespace
}  // namespace layerd
