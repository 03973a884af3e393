// In-memory labelled data set: the currency between the data loaders, the partitioners and
// the trainers. Raw data never leaves a client; only sample indices derived from
// (scheme, seed, index, count) describe a client's share.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <span>
#include <vector>

namespace fedslice::data {

struct Dataset {
  // Shape of one sample, batch excluded: {C, H, W} for images (NCHW once batched), {F} for
  // vectors.
  std::vector<int64_t> sample_shape;
  int num_classes = 10;
  // size() x sample_size() floats, row-major, pixel values scaled to [0, 1].
  std::vector<float> features;
  // size() labels in [0, num_classes).
  std::vector<int32_t> labels;

  int64_t size() const { return static_cast<int64_t>(labels.size()); }
  int64_t sample_size() const {
    return std::accumulate(sample_shape.begin(), sample_shape.end(), int64_t{1},
                           [](int64_t a, int64_t b) { return a * b; });
  }
  std::span<const float> sample(int64_t i) const {
    return {features.data() + i * sample_size(), static_cast<size_t>(sample_size())};
  }
};

// The samples at `indices`, in that order. Indices must be in [0, source.size()).
inline Dataset Subset(const Dataset& source, std::span<const int64_t> indices) {
  Dataset out;
  out.sample_shape = source.sample_shape;
  out.num_classes = source.num_classes;
  const int64_t n = source.sample_size();
  out.features.resize(indices.size() * n);
  out.labels.resize(indices.size());
  for (size_t k = 0; k < indices.size(); ++k) {
    const int64_t i = indices[k];
    std::copy_n(source.features.data() + i * n, n, out.features.data() + k * n);
    out.labels[k] = source.labels[i];
  }
  return out;
}

}  // namespace fedslice::data
