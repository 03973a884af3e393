#include "fedslice/common/threading.h"

#include <omp.h>

#include <Eigen/Core>
#include <algorithm>
#include <atomic>

namespace fedslice {
namespace {

// OpenMP's initial default (all cores or OMP_NUM_THREADS), captured before the first change.
int DefaultThreads() {
  static const int n = std::max(1, omp_get_max_threads());
  return n;
}

// 0 = not set. A process-wide atomic rather than omp_set_num_threads() alone, because
// OpenMP's setting is per calling thread and the engine is driven from several threads
// (coordinator, client sessions); every engine parallel region passes num_threads(NumThreads()).
std::atomic<int> g_threads{0};

}  // namespace

void SetNumThreads(int n) {
  const int threads = n > 0 ? n : DefaultThreads();
  g_threads.store(threads, std::memory_order_relaxed);
  omp_set_num_threads(threads);
  // Eigen keeps its own process-wide setting for its parallel matrix products.
  Eigen::setNbThreads(threads);
}

int NumThreads() {
  const int n = g_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : DefaultThreads();
}

}  // namespace fedslice
