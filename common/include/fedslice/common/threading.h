// Worker threads of the model engine. The engine parallelises inside each layer (OpenMP
// loops over samples and channels, Eigen's OpenMP-parallel matrix products); these calls set
// how many threads those use, process-wide.
#pragma once

namespace fedslice {

// Sets the number of worker threads used by every later engine call, process-wide. n <= 0
// restores the default: all cores (or OMP_NUM_THREADS when set). Thread-safety: call it
// between runs, not while another thread is training or evaluating.
void SetNumThreads(int n);

// The number of worker threads the engine currently uses (>= 1).
int NumThreads();

}  // namespace fedslice
