#!/usr/bin/env bash
# Run the main job on this machine's GPUs: NGPU ranks, config CONFIG (a name in configs/
# or a JSON path). Extra arguments go to `sta-dist run` (e.g. --steps 2 --layers 4).
#   NGPU=2 CONFIG=hunyuan_720p bash launch/torchrun.sh --steps 1
set -euo pipefail
NGPU=${NGPU:-$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))")}
CONFIG=${CONFIG:-hunyuan_720p}
exec torchrun --standalone --nproc-per-node "$NGPU" --no-python sta-dist run --config "$CONFIG" "$@"
