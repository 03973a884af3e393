// Worker threads of the model engine, process-wide. The engine uses OpenMP: a batch is split
// across the threads when there is enough work per parameter to pay for it (Model), large
// layers split their outputs or samples across threads otherwise, and Eigen's products use
// the same count.
//
// Several trainings at once (e.g. simulated clients on threads of one process, or several
// client processes on one machine) must share the cores: give each 1 thread, or split the
// cores between them. OpenMP teams that oversubscribe the cores spend their time waiting
// for descheduled team members, and run many times slower than one thread.
#pragma once

namespace fedslice {

// Sets the number of worker threads used by every later engine call, process-wide. n <= 0
// restores the default: all cores (or OMP_NUM_THREADS when set). Thread-safety: call it
// between runs, not while another thread is training or evaluating.
void SetNumThreads(int n);

// The number of worker threads the engine currently uses (>= 1).
int NumThreads();


}  // namespace fedslice
