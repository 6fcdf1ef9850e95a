// WrittenSpan: the smallest start and largest end of the writes since the
// last take(), for stepping a file's write-back through only that span.
#include "qcow2/written_span.h"

#include <gtest/gtest.h>

#include <thread>
#include <vector>

namespace layerd::qcow2::test {
namespace {

TEST(WrittenSpan, NothingWrittenIsAnEmptySpan) {
  WrittenSpan span;
  auto [begin, end] = span.take();
  EXPECT_GE(begin, end);
}

TEST(WrittenSpan, ItCoversEveryWriteSinceTheLastTakeAndStartsAfresh) {
  WrittenSpan span;
  span.add(100, 200);
  span.add(50, 60);
  span.add(150, 400);
  span.add(70, 80);  // inside
  EXPECT_EQ(span.take(), std::make_pair(uint64_t{50}, uint64_t{400}));
  auto [begin, end] = span.take();
  EXPECT_GE(begin, end) << "a take starts a new span";
  span.add(1000, 1001);
  EXPECT_EQ(span.take(), std::make_pair(uint64_t{1000}, uint64_t{1001}));
}

TEST(WrittenSpan, WritesFromManyThreadsAreAllCovered) {
  WrittenSpan span;
  std::vector<std::thread> writers;
  for (uint64_t t = 0; t < 4; ++t)
    writers.emplace_back([&span, t] {
      for (uint64_t i = 0; i < 10000; ++i) span.add(1000 + t * 10000 + i, 1000 + t * 10000 + i + 1);
    });
  for (auto& w : writers) w.join();
  EXPECT_EQ(span.take(), std::make_pair(uint64_t{1000}, uint64_t{1000 + 4 * 10000}));
}

}  // namespace
}  // namespace layerd::qcow2::test
