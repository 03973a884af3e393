#!/usr/bin/env bash
# FedSlice's main job on a fresh Debian 12 machine: install packages (as root), fetch
# MNIST-10k, build, train the CNN centrally (printing its test accuracy per epoch), then run a
# local federation: a coordinator and 4 edge clients over mutual TLS on loopback, and finally
# split inference: the CNN sliced over 3 clients that pipeline the test set between them.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup.sh
bash scripts/fetch_mnist.sh
bash scripts/build.sh
build_dir=${FEDSLICE_BUILD_DIR:-$root/build}
mkdir -p out

echo
echo "== 1. centralised training: the CNN on MNIST-10k"
"$build_dir/tools/fedslice" train --model cnn --data data/mnist-10k \
  --epochs "${FEDSLICE_DEMO_EPOCHS:-4}" --batch 32 --lr 0.01 --momentum 0.9 --out out/cnn.pb
"$build_dir/tools/fedslice" eval --model-file out/cnn.pb --data data/mnist-10k

echo
echo "== 2. a local federation: coordinator + 4 clients over mutual TLS 1.3, mlp, 5 rounds"
bash examples/local_federation.sh "${FEDSLICE_DEMO_ROUNDS:-5}" mlp

echo
echo "== 3. split inference: the CNN of step 1 sliced over 3 local clients (mutual TLS, pipelined)"
bash examples/split_inference.sh out/cnn.pb
