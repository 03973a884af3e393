#include "fedslice/common/net/io_cost.h"

#include <gtest/gtest.h>

#include <cmath>

namespace fedslice::net {
namespace {

// The cost is a CPU time per MB: positive and finite. Loose sanity bounds rather than a
// speed (tests never assert performance): two copies, a parse and AES-GCM both ways of a
// megabyte take far more than a nanosecond and far less than a second on any machine.
TEST(IoCostTest, ActivationIoCostIsAPlausibleCpuTimePerMegabyte) {
  auto ms = MeasureActivationIoMsPerMb(std::chrono::milliseconds(20));
  ASSERT_TRUE(ms.ok()) << ms.status().ToString();
  EXPECT_TRUE(std::isfinite(*ms));
  EXPECT_GT(*ms, 1e-6);
  EXPECT_LT(*ms, 1000.0);
}

}  // namespace
}  // namespace fedslice::net
