// Tensor: a float32 buffer with a shape, batch-first (NCHW for images, NF for vectors).
//
// Storage is 64-byte aligned (one AVX-512 register / cache line) and only ever grows:
// Resize() to a shape that fits the current capacity neither allocates nor moves the data
// pointer, so layers can keep their scratch tensors across batches without per-batch
// allocation.
//
// Ownership: a Tensor owns its storage; copies are deep. Thread-safety: like a std::vector
// (concurrent const access is safe, anything else needs external synchronisation).
#pragma once

// GCC 12 reports false -Wmaybe-uninitialized warnings inside its own AVX-512 intrinsics as
// Eigen uses them (GCC bug 105593, fixed in GCC 13). Diagnostic pragmas apply by source
// location, so silencing the warning over the region where the intrinsics headers are first
// included removes exactly those reports and nothing in FedSlice's own code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <Eigen/Core>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace fedslice {

// Row-major float matrix, the shape every batch is viewed as: batch x sample_size.
using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMatrixMap = Eigen::Map<RowMatrix, Eigen::Aligned64>;
using ConstRowMatrixMap = Eigen::Map<const RowMatrix, Eigen::Aligned64>;

class Tensor {
 public:
  Tensor() = default;
  // A zero-filled tensor of `shape`. Every dimension must be >= 0.
  explicit Tensor(std::vector<int64_t> shape);
  Tensor(const Tensor& other);
  Tensor& operator=(const Tensor& other);
  // A moved-from tensor is empty (no data, no capacity), ready to be Resize()d again.
  Tensor(Tensor&& other) noexcept { *this = std::move(other); }
  Tensor& operator=(Tensor&& other) noexcept {
    if (this != &other) {
      data_ = std::move(other.data_);
      shape_ = std::move(other.shape_);
      size_ = std::exchange(other.size_, 0);
      capacity_ = std::exchange(other.capacity_, 0);
      other.shape_.clear();
    }
    return *this;
  }

  // Gives the tensor `shape`. Keeps the storage when it is large enough (no allocation, data()
  // unchanged, the values left where they were: callers overwrite what they need, or keep a
  // prefix they wrote before growing within capacity()); otherwise allocates new storage whose
  // values are unspecified. Every dimension must be >= 0.
  void Resize(const std::vector<int64_t>& shape);
  // Elements the storage holds (>= size()).
  int64_t capacity() const { return capacity_; }
  // Sets every element to zero.
  void SetZero();

  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t dim(size_t i) const { return shape_[i]; }
  int rank() const { return static_cast<int>(shape_.size()); }
  // The leading (batch) dimension; 0 for a rank-0 (empty) tensor.
  int64_t batch() const { return shape_.empty() ? 0 : shape_[0]; }
  // Elements per batch entry: the product of every dimension but the first.
  int64_t sample_size() const;
  int64_t size() const { return size_; }

  float* data() { return data_.get(); }
  const float* data() const { return data_.get(); }
  std::span<float> span() { return {data_.get(), static_cast<size_t>(size_)}; }
  std::span<const float> span() const { return {data_.get(), static_cast<size_t>(size_)}; }

  // batch() x sample_size() row-major view of the data (no copy).
  RowMatrixMap matrix() { return RowMatrixMap(data(), batch(), sample_size()); }
  ConstRowMatrixMap matrix() const { return ConstRowMatrixMap(data(), batch(), sample_size()); }

  // "[10, 1, 28, 28]", for error messages.
  std::string ShapeString() const { return ShapeToString(shape_); }
  static std::string ShapeToString(std::span<const int64_t> shape);

 private:
  struct FreeDeleter {
    void operator()(float* p) const;
  };

  std::vector<int64_t> shape_;
  int64_t size_ = 0;
  int64_t capacity_ = 0;
  std::unique_ptr<float[], FreeDeleter> data_;
};

}  // namespace fedslice
