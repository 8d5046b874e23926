#!/usr/bin/env bash
# Install Debian's Fashion-MNIST package (/usr/share/datasets/fashion-mnist): real data for
# machines without internet access. Idempotent; needs root.
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
  echo "data: Fashion-MNIST already in $dir"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt_install() { apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "$@"; }
echo "data: installing dataset-fashion-mnist"
apt_install dataset-fashion-mnist >/dev/null || { apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null; apt_install dataset-fashion-mnist >/dev/null; }
echo "data: Fashion-MNIST in $dir"
