#!/usr/bin/env bash
# Build the bundled sample shard set (scikit-image photographs, no network) into DIR (default data/samples).
#   data/build_sample_shards.sh [DIR]
# Prints the train/val shard paths; DIR/asuka-sample-shards-v1/manifest.json lists samples and sha256 per shard.
set -euo pipefail
out="${1:-$(dirname "$0")/samples}"
python -m asuka.data.samples --out "$out"
