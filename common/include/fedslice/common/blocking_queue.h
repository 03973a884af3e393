// BlockingQueue: an unbounded FIFO handing items from producer threads (I/O threads, readers)
// to one consumer that waits with a deadline. The coordinator's round thread and the inference
// requester use it to turn transport callbacks into sequential code.
//
// Thread-safety: Push and Pop may be called from any threads concurrently.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <utility>

namespace fedslice {

template <typename T>
class BlockingQueue {
 public:
  void Push(T item) {
    {
      std::lock_guard lock(mu_);
      items_.push_back(std::move(item));
    }
    cv_.notify_one();
  }

  // The oldest item, or nullopt once `deadline` passes with the queue empty.
  template <typename Clock, typename Duration>
  std::optional<T> Pop(std::chrono::time_point<Clock, Duration> deadline) {
    std::unique_lock lock(mu_);
    if (!cv_.wait_until(lock, deadline, [&] { return !items_.empty(); })) return std::nullopt;
    T item = std::move(items_.front());
    items_.pop_front();
    return item;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<T> items_;
};

}  // namespace fedslice
