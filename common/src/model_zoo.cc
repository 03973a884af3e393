#include "fedslice/common/model_zoo.h"

#include <string>

namespace fedslice {
namespace {

void AddDense(proto::ModelSpec* spec, const char* name, int in, int out) {
  proto::LayerSpec* l = spec->add_layers();
  l->set_name(name);
  l->mutable_dense()->set_in_features(in);
  l->mutable_dense()->set_out_features(out);
}

void AddConv(proto::ModelSpec* spec, const char* name, int in, int out) {
  proto::LayerSpec* l = spec->add_layers();
  l->set_name(name);
  proto::Conv2DSpec* c = l->mutable_conv2d();
  c->set_in_channels(in);
  c->set_out_channels(out);
  c->set_kernel(5);
  c->set_stride(1);
  c->set_padding(2);  // "same" for a 5x5 kernel at stride 1
}

void AddRelu(proto::ModelSpec* spec, const char* name) {
  proto::LayerSpec* l = spec->add_layers();
  l->set_name(name);
  l->mutable_relu();
}

void AddPool(proto::ModelSpec* spec, const char* name) {
  proto::LayerSpec* l = spec->add_layers();
  l->set_name(name);
  l->mutable_maxpool2d()->set_kernel(2);
  l->mutable_maxpool2d()->set_stride(2);
}

void AddFlatten(proto::ModelSpec* spec, const char* name) {
  proto::LayerSpec* l = spec->add_layers();
  l->set_name(name);
  l->mutable_flatten();
}

proto::ModelSpec Base(const char* name, uint64_t init_seed) {
  proto::ModelSpec spec;
  spec.set_name(name);
  for (int64_t d : {1, 28, 28}) spec.add_input_shape(d);
  spec.set_num_classes(10);
  spec.set_init_seed(init_seed);
  return spec;
}

}  // namespace

proto::ModelSpec MlpSpec(uint64_t init_seed) {
  proto::ModelSpec spec = Base("mlp", init_seed);
  AddFlatten(&spec, "flatten");
  AddDense(&spec, "fc1", 784, 200);
  AddRelu(&spec, "relu1");
  AddDense(&spec, "fc2", 200, 200);
  AddRelu(&spec, "relu2");
  AddDense(&spec, "fc3", 200, 10);
  return spec;
}

proto::ModelSpec CnnSpec(uint64_t init_seed) {
  proto::ModelSpec spec = Base("cnn", init_seed);
  AddConv(&spec, "conv1", 1, 32);
  AddRelu(&spec, "relu1");
  AddPool(&spec, "pool1");
  AddConv(&spec, "conv2", 32, 64);
  AddRelu(&spec, "relu2");
  AddPool(&spec, "pool2");
  AddFlatten(&spec, "flatten");
  AddDense(&spec, "fc1", 64 * 7 * 7, 512);
  AddRelu(&spec, "relu3");
  AddDense(&spec, "fc2", 512, 10);
  return spec;
}

Result<proto::ModelSpec> BuiltinSpec(std::string_view name, uint64_t init_seed) {
  if (name == "mlp") return MlpSpec(init_seed);
  if (name == "cnn") return CnnSpec(init_seed);
  return Status::InvalidArgument("unknown model '" + std::string(name) +
                                 "'; built-in models are: mlp, cnn");
}

}  // namespace fedslice
