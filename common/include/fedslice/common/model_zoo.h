// Built-in model specs: the two MNIST models of McMahan et al., "Communication-Efficient
// Learning of Deep Networks from Decentralized Data" (2017). Both take {1, 28, 28} samples
// (the MNIST Dataset's sample_shape) and output 10 logits.
#pragma once

#include <cstdint>
#include <string_view>

#include "fedslice/common/status.h"
#include "fedslice/model.pb.h"

namespace fedslice {

// Seed the built-in specs use unless told otherwise.
inline constexpr uint64_t kDefaultInitSeed = 1;

// "2NN": flatten, dense 784-200, ReLU, dense 200-200, ReLU, dense 200-10. 199,210 parameters.
proto::ModelSpec MlpSpec(uint64_t init_seed = kDefaultInitSeed);

// "CNN": conv 5x5x32 (same padding), ReLU, max-pool 2x2, conv 5x5x64 (same padding), ReLU,
// max-pool 2x2, flatten, dense 3136-512, ReLU, dense 512-10. 1,663,370 parameters.
proto::ModelSpec CnnSpec(uint64_t init_seed = kDefaultInitSeed);

// MlpSpec() for "mlp", CnnSpec() for "cnn"; InvalidArgument naming the valid names otherwise.
Result<proto::ModelSpec> BuiltinSpec(std::string_view name,
                                     uint64_t init_seed = kDefaultInitSeed);

}  // namespace fedslice
