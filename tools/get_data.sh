#!/usr/bin/env bash
# Bring what tests and `difflab demo` use and that pip cannot install, from Debian packages:
# Fashion-MNIST (dataset-fashion-mnist, in /usr/share/datasets/fashion-mnist) and the headless
# browser the `difflab ui` test drives (chromium, chromium-driver).
# Never fails the build: where it cannot install, it prints one line with the command to run;
# the tests that need the package are then skipped (with that reason) and the demo says which data it used.
# DIFFLAB_NO_APT=1 skips the install attempt (to try the no-package path on a machine that could install).
set -u
dir=${DIFFLAB_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
have_data() { for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
                [ -f "$dir/$f.gz" ] || [ -f "$dir/$f" ] || return 1; done; }
have_browser() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }
want=""
have_data || want="$want dataset-fashion-mnist"
have_browser || want="$want chromium chromium-driver"
[ -z "$want" ] && exit 0
cmd="apt-get update && apt-get install -y$want"
if [ "${DIFFLAB_NO_APT:-0}" != 1 ] && command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi
    if [ "$sudo" != none ]; then
        echo "difflab set-up: installing Debian packages:$want (Fashion-MNIST is 31 MB, the browser about 300 MB)"
        { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $want; } >/tmp/difflab-apt.log 2>&1
        have_data && have_browser && exit 0
        echo "difflab set-up: apt-get could not install all of$want (log: /tmp/difflab-apt.log)"
    fi
fi
have_data || echo "difflab set-up: Fashion-MNIST is not installed; run \`sudo sh -c 'apt-get update && apt-get install -y dataset-fashion-mnist'\` (until then its tests are skipped and the demo uses sklearn's digits)"
have_browser || echo "difflab set-up: no headless browser; run \`sudo sh -c 'apt-get update && apt-get install -y chromium chromium-driver'\` (until then the difflab ui browser test is skipped)"
exit 0
