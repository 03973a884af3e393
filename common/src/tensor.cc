#include "fedslice/common/tensor.h"

#include <algorithm>
#include <cstdlib>
#include <new>

namespace fedslice {
namespace {

constexpr size_t kAlignment = 64;

int64_t Product(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

}  // namespace

void Tensor::FreeDeleter::operator()(float* p) const { std::free(p); }

Tensor::Tensor(std::vector<int64_t> shape) {
  Resize(shape);
  SetZero();
}

Tensor::Tensor(const Tensor& other) { *this = other; }

Tensor& Tensor::operator=(const Tensor& other) {
  if (this == &other) return *this;
  Resize(other.shape_);
  if (size_ > 0) std::copy_n(other.data(), size_, data());
  return *this;
}

void Tensor::Resize(const std::vector<int64_t>& shape) {
  const int64_t n = shape.empty() ? 0 : Product(shape);
  if (n > capacity_) {
    // aligned_alloc needs a size that is a multiple of the alignment.
    const size_t bytes =
        (static_cast<size_t>(n) * sizeof(float) + kAlignment - 1) / kAlignment * kAlignment;
    float* p = static_cast<float*>(std::aligned_alloc(kAlignment, bytes));
    if (p == nullptr) throw std::bad_alloc();
    data_.reset(p);
    capacity_ = static_cast<int64_t>(bytes / sizeof(float));
  }
  shape_ = shape;
  size_ = n;
}

void Tensor::SetZero() {
  if (size_ > 0) std::fill_n(data(), size_, 0.0f);
}

int64_t Tensor::sample_size() const {
  if (shape_.empty()) return 0;
  int64_t n = 1;
  for (size_t i = 1; i < shape_.size(); ++i) n *= shape_[i];
  return n;
}

std::string Tensor::ShapeToString(std::span<const int64_t> shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

}  // namespace fedslice
