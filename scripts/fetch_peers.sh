#!/usr/bin/env bash
# Here (not on the device): copies the public NSA kernels that benchmarks/bench_peers.py compares
# against out of the fetch tool's mirrors into peers/ (git-ignored through .git/info/exclude), so a
# device call can carry them (`carry: ["peers"]`). Benchmark-only inputs: never imported by the
# package, never committed. Fetch the mirrors first with the fetch tool:
#   github:mdy666/Scalable-Flash-Native-Sparse-Attention  (flash-nsa, MIT)
#   github:fla-org/flash-linear-attention                 (fla, MIT)
# Usage: scripts/fetch_peers.sh [mirror-root]     (default /work/.mirror)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=${1:-/work/.mirror}
grep -qxF '/peers/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/peers/' >> .git/info/exclude; }
rm -rf peers && mkdir -p peers
: > peers/VERSIONS
copy() {  # name, mirror folder, paths to take from its newest commit
  local name=$1 mirror=$2 git_dir=$root/$2/repo; shift 2
  [ -d "$git_dir" ] || { echo "no mirror at $git_dir: fetch it first" >&2; exit 1; }
  mkdir -p "peers/$name"
  git --git-dir "$git_dir" archive HEAD "$@" | tar -x -C "peers/$name"
  echo "$name $(git --git-dir "$git_dir" log -1 --format='%H %cs') $mirror" >> peers/VERSIONS
}
copy flash-nsa mdy666+Scalable-Flash-Native-Sparse-Attention flash_nsa LICENSE
copy fla fla-org+flash-linear-attention fla LICENSE
# Bytecode and tests are not needed; keep what travels small (the device call carries <= 64 MiB).
find peers -name '__pycache__' -prune -exec rm -rf {} +
cat peers/VERSIONS
du -sh peers
