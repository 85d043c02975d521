#!/usr/bin/env bash
# Run the main job on this machine's GPUs: NGPU ranks, config CONFIG (a name in configs/
# or a JSON path). Extra arguments go to `sta-dist run` (e.g. --steps 2 --layers 4).
#   NGPU=2 CONFIG=hunyuan_720p bash launch/torchrun.sh --steps 1
# A misuse (bad NGPU, config or argument) is one line and exit code 2, before torchrun starts.
set -euo pipefail
NGPU=${NGPU:-$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))")}
CONFIG=${CONFIG:-hunyuan_720p}
if ! [[ $NGPU =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/torchrun.sh: error: NGPU must be an int >= 1, got NGPU='$NGPU'" >&2
  exit 2
fi
RANK=0 WORLD_SIZE=$NGPU sta-dist run --check --config "$CONFIG" "$@" >/dev/null  # as rank 0 of NGPU would check
exec torchrun --standalone --nproc-per-node "$NGPU" --no-python sta-dist run --config "$CONFIG" "$@"
