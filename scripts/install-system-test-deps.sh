#!/usr/bin/env bash
# System packages the test suite drives for real: a single-node Slurm (slurmctld, slurmd,
# munge) for the cluster-backend test, Chromium for the HTML report test (driven
# headless through Playwright), and Debian's Fashion-MNIST files (dataset-fashion-mnist,
# ~30 MB) for the test that reads the real data set. Idempotent; needs root and Debian's apt.
set -euo pipefail
need=()
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd >/dev/null || need+=(slurmd)
command -v sbatch >/dev/null || need+=(slurm-client)
command -v munged >/dev/null || need+=(munge)
command -v chromium >/dev/null || need+=(chromium)
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "install-system-test-deps: missing ${need[*]}; install them as root (Debian:" \
         "apt-get install slurmctld slurmd slurm-client munge chromium" \
         "dataset-fashion-mnist) or set ESCAPELAB_NO_SLURM=1 / ESCAPELAB_NO_BROWSER=1" \
         "(the real-Fashion-MNIST test skips without its package)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
