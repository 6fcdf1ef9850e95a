// QmpSession without sockets: what a client's byte stream is answered,
// whatever pieces the socket's reads cut it into (qmp_test.cc drives the
// same through QmpServer and a socket, where the pieces are not chosen).
#include "server/qmp_protocol.h"

#include <gtest/gtest.h>

#include <string>
#include <string_view>
#include <vector>

namespace layerd {
namespace {

constexpr std::string_view kCaps = "{\"execute\": \"qmp_capabilities\"}\n";

// The lines answered to `stream` fed in pieces of `piece` bytes (0: whole).
std::vector<std::string> answers(std::string_view stream, size_t piece = 0) {
  QmpCommands commands;
  commands.add("echo", [](const boost::json::object& args) -> boost::json::value {
    return boost::json::value(args);
  });
  QmpSession session(commands);
  std::vector<std::string> lines;
  auto send = [&](std::string line) {
    lines.push_back(std::move(line));
    return true;
  };
  for (size_t at = 0; at < stream.size();) {
    size_t n = piece ? std::min(piece, stream.size() - at) : stream.size() - at;
    session.feed(stream.data() + at, n, send);
    at += n;
  }
  return lines;
}

const std::string kSyntaxError =
    "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, syntax error\"}}\r\n";

// Found by the qmp fuzzer (tests/fuzz/regressions/qmp/): a message found
// bad only when the parser was given the whole read swallowed every
// message after it in that read, because a '{' at the start of a line
// began a new message only if the parser had already said "bad".
TEST(QmpSession, BadMessageThenGoodOnesInOneReadAreAllAnswered) {
  std::string stream(kCaps);
  stream += "{\"execute\": \"echo\", \"id\": {\x1d" "a\": null}}\n";
  stream += "{\"execute\": \"echo\", \"arguments\": {\"n\": 1}}\n";
  stream += "{\"execute\": \"echo\", \"arguments\": {\"n\": 2}}\n";
  const std::vector<std::string> expected = {
      "{\"return\": {}}\r\n", kSyntaxError, "{\"return\": {\"n\": 1}}\r\n",
      "{\"return\": {\"n\": 2}}\r\n"};
  EXPECT_EQ(answers(stream), expected);
  EXPECT_EQ(answers(stream, 1), expected);
}

// Found by the qmp fuzzer in the clean-clone CI run (tests/fuzz/
// regressions/qmp/id-too-large-for-a-double): 1.5e315 parses as infinity,
// and echoing that id wrote `"id": inf`, which is not JSON. Such numbers
// anywhere in a message refuse it; its neighbours are answered as ever.
TEST(QmpSession, NumbersTooLargeForADoubleRefuseTheMessageInsteadOfWritingInf) {
  std::string stream(kCaps);
  stream += "{\"execute\": \"echo\", \"id\": 1.5e315}\n";
  stream += "{\"execute\": \"echo\", \"arguments\": {\"n\": [-1e400]}}\n";
  stream += "{\"execute\": \"echo\", \"id\": 1e300, \"arguments\": {\"n\": 1}}\n";
  const std::string refused =
      "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, number out of "
      "range\"}}\r\n";
  const std::vector<std::string> expected = {"{\"return\": {}}\r\n", refused, refused,
                                             "{\"return\": {\"n\": 1}, \"id\": 1.0000000000000001e+300}\r\n"};
  EXPECT_EQ(answers(stream), expected);
}

// Found by the qmp fuzzer in the clean-clone CI run (tests/fuzz/
// regressions/qmp/bad-u-escape-named-by-where-it-is-cut): Boost.JSON
// called the same broken \u escape "expected hex digit" or "illegal
// trailing surrogate" depending on where the reads cut it.
TEST(QmpSession, ABadUEscapeGetsOneMessageHoweverTheStreamIsCut) {
  const std::string refused =
      "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, invalid \\\\u "
      "escape\"}}\r\n";
  for (const char* bad : {"{\"a\": \"\\ud83d\\u00e9\"}\n", "{\"a\": \"\\ude00\"}\n",
                          "{\"a\": \"\\ud83d\\uzzzz\"}\n", "{\"a\": \"\\u12\"}\n"}) {
    std::string stream(kCaps);
    stream += bad;
    const std::vector<std::string> expected = {"{\"return\": {}}\r\n", refused};
    for (size_t piece : {0, 1, 2, 3, 5, 7, 11, 13})
      EXPECT_EQ(answers(stream, piece), expected) << bad << " in pieces of " << piece;
  }
}

TEST(QmpSession, AnswersDoNotDependOnHowTheStreamIsCut) {
  std::string stream(kCaps);
  for (const char* m :
       {"{\"execute\": \"echo\", \"arguments\": {\"a\": [1, {\"b\": 'q'}]}}", "[1, 2\n",
        "{\"s\": \"unterminated\n", "{'execute': 'echo', 'id': 'it\\'s'}", "}", "tru\n",
        "{\"execute\": \"echo\" \"x\"}\n", "{\"execute\": \"echo\", \"id\": 7}"}) {
    stream += m;
    stream += '\n';
  }
  const std::vector<std::string> whole = answers(stream);
  // Eight lines for nine messages: the unclosed "[1, 2" takes the next line
  // with it (it is not bad until the '{' there).
  EXPECT_EQ(whole.size(), 9u - 1);
  for (size_t piece : {1, 2, 3, 7, 64}) EXPECT_EQ(answers(stream, piece), whole) << piece;
}

TEST(QmpSession, ClientGoneStopsDispatching) {
  QmpCommands commands;
  int runs = 0;
  commands.add("count", [&](const boost::json::object&) -> boost::json::value {
    ++runs;
    return nullptr;
  });
  QmpSession session(commands);
  std::string stream(kCaps);
  for (int i = 0; i < 5; ++i) stream += "{\"execute\": \"count\"}\n";
  int lines = 0;
  session.feed(stream.data(), stream.size(), [&](std::string) { return ++lines < 3; });
  EXPECT_EQ(lines, 3);
  EXPECT_EQ(runs, 2);  // the third reply's send said the client is gone
}

}  // namespace
}  // namespace layerd
