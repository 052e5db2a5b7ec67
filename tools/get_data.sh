#!/usr/bin/env bash
# Bring the data sets that tests and `difflab demo` use and that pip cannot install:
# Fashion-MNIST, from the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist).
# Never fails the build: where it cannot install, it prints one line with the command to run;
# the tests that need the data are then skipped (with that reason) and the demo says which data it used.
# DIFFLAB_NO_APT=1 skips the install attempt (to try the no-data path on a machine that could install).
set -u
dir=${DIFFLAB_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
have() { for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
           [ -f "$dir/$f.gz" ] || [ -f "$dir/$f" ] || return 1; done; }
have && exit 0
cmd="apt-get update && apt-get install -y dataset-fashion-mnist"
if [ "${DIFFLAB_NO_APT:-0}" != 1 ] && command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi
    if [ "$sudo" != none ]; then
        echo "difflab set-up: installing Fashion-MNIST (Debian package dataset-fashion-mnist, 31 MB)"
        { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist; } >/tmp/difflab-apt.log 2>&1
        have && exit 0
        echo "difflab set-up: apt-get could not install dataset-fashion-mnist (log: /tmp/difflab-apt.log)"
    fi
fi
echo "difflab set-up: Fashion-MNIST is not installed; run \`sudo sh -c '$cmd'\` (until then its tests are skipped and the demo uses sklearn's digits)"
exit 0
