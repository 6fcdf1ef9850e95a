// Helpers for qcow2 tests: a scratch directory, shelling out to qemu-img and
// qemu-io (the oracle), and opening images.
#pragma once

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "qcow2/file.h"
#include "qcow2/image.h"

namespace layerd::qcow2::test {

inline std::string sh(const std::string& cmd, int* status = nullptr) {
  std::string out;
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int st = pclose(p);
  if (status) *status = st;
  return out;
}

// Runs a command and fails the test if it does not exit 0.
inline std::string run(const std::string& cmd) {
  int st = 0;
  std::string out = sh(cmd, &st);
  EXPECT_EQ(st, 0) << cmd << "\n" << out;
  return out;
}

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/qcow2-test-XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

inline std::vector<std::byte> slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<std::byte> out(std::filesystem::file_size(path));
  in.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(out.size()));
  return out;
}

inline std::shared_ptr<File> open_file(const std::string& path, bool rw) {
  std::error_code ec;
  FileOptions fo;
  fo.mode = rw ? OpenMode::ReadWrite : OpenMode::ReadOnly;
  auto f = open_posix_file(path, fo, ec);
  EXPECT_FALSE(ec) << path << ": " << ec.message();
  return std::shared_ptr<File>(std::move(f));
}

inline std::unique_ptr<Image> open_image(const std::string& path, bool rw,
                                         OpenOptions o = {}) {
  o.read_only = !rw;
  std::unique_ptr<Image> img;
  Status st = Image::open(open_file(path, rw), o, &img);
  EXPECT_TRUE(st.ok()) << path << ": " << st.message();
  return img;
}

inline Status try_open(const std::string& path, bool rw,
                       std::unique_ptr<Image>* img, OpenOptions o = {}) {
  o.read_only = !rw;
  return Image::open(open_file(path, rw), o, img);
}

// Reads the whole image (chunked) with a zero-filling below.
inline std::vector<std::byte> read_all(Image& img, uint64_t chunk = 1 << 20) {
  std::vector<std::byte> out(img.size());
  for (uint64_t off = 0; off < out.size(); off += chunk) {
    uint64_t n = std::min<uint64_t>(chunk, out.size() - off);
    auto ec = img.read(off, std::span(out.data() + off, n), zero_below());
    EXPECT_FALSE(ec) << "read at " << off << ": " << ec.message();
  }
  return out;
}

// The raw contents of an image according to qemu-img.
inline std::vector<std::byte> qemu_raw(const std::string& img,
                                       const std::string& dir) {
  std::string raw = dir + "/oracle.raw";
  run("qemu-img convert -U -O raw '" + img + "' '" + raw + "'");
  auto v = slurp(raw);
  std::filesystem::remove(raw);
  return v;
}

inline void expect_same(const std::vector<std::byte>& a,
                        const std::vector<std::byte>& b) {
  ASSERT_EQ(a.size(), b.size());
  if (a.empty() || std::memcmp(a.data(), b.data(), a.size()) == 0) return;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) {
      FAIL() << "first difference at byte " << i << ": "
             << int(a[i]) << " vs " << int(b[i]);
    }
  }
}

inline void qemu_check_clean(const std::string& img) {
  int st = 0;
  std::string out = sh("qemu-img check '" + img + "'", &st);
  EXPECT_EQ(st, 0) << out;
  EXPECT_NE(out.find("No errors were found"), std::string::npos) << out;
}

}  // namespace layerd::qcow2::test

namespace layerd::qcow2::test {

// Overwrites bytes of a file in place.
inline void patch(const std::string& path, uint64_t off, const std::vector<uint8_t>& bytes) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(static_cast<std::streamoff>(off));
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}
inline std::vector<uint8_t> be(uint64_t v, int n) {
  std::vector<uint8_t> out(n);
  for (int i = 0; i < n; ++i) out[i] = static_cast<uint8_t>(v >> (8 * (n - 1 - i)));
  return out;
}
inline void patch32(const std::string& path, uint64_t off, uint32_t v) { patch(path, off, be(v, 4)); }
inline void patch64(const std::string& path, uint64_t off, uint64_t v) { patch(path, off, be(v, 8)); }
inline uint64_t peek(const std::string& path, uint64_t off, int n) {
  std::ifstream f(path, std::ios::binary);
  f.seekg(static_cast<std::streamoff>(off));
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v = v << 8 | static_cast<uint8_t>(f.get());
  return v;
}

}  // namespace layerd::qcow2::test
