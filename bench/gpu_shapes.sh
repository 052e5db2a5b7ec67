#!/usr/bin/env bash
# One lent-GPU session's shapes work (issue 5): a better f=4 autoencoder, then a latent text-to-image
# model on it, and two pixel text-to-image UNets side by side (the zoo's 3-level unet-s and a 4-level
# one that reaches 4x4 px), all on the one GPU with the MiniLM states exported beforehand:
#   python bench/gpu_text_states.py export --config checkpoints/recipes/shapes-text-unet.json \
#       --out .gpu/shapes-states.safetensors
# Usage on the GPU machine, from the repository root: OUT=/some/dir bash bench/gpu_shapes.sh
# (SMOKE=1 shrinks every budget to a few steps, for a CPU check here).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TQDM_DISABLE=1 DIFFLAB_CACHE=${DIFFLAB_CACHE:-/tmp/difflab-cache}
PY=${PY:-python3}
ST=.gpu/shapes-states.safetensors
L=${L:-/tmp/gpu-shapes}; mkdir -p $L
EXCL=$($PY -c "import json; print(json.dumps(json.load(open('checkpoints/recipes/shapes-text-unet.json'))['data_kwargs']))")
AEKW=$($PY -c "import json,sys; d=json.loads(sys.argv[1]); d['n']=30000; print(json.dumps(d))" "$EXCL")
if [ "${SMOKE:-0}" = 1 ]; then X="--steps 3"; AEX="--steps 3 --minutes 1"; else X=""; AEX="--steps 40000 --minutes 2.5"; fi
nvidia-smi -L 2>/dev/null; $PY -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"
T="$PY bench/gpu_text_states.py run $ST -- train --no-progress"
$T --config checkpoints/recipes/shapes-text-unet4-gpu.json --out runs/gpu-shapes-text-unet4 $X > $L/unet4.log 2>&1 &
P1=$!
$T --config checkpoints/recipes/shapes-text-unet-gpu.json --out runs/gpu-shapes-text-unet3 $X > $L/unet3.log 2>&1 &
P2=$!
$PY -m difflab train-autoencoder --data shapes --data-kwargs "$AEKW" --factor 4 --z-channels 4 --channels 64 \
    --batch-size 128 --lr 1e-3 --no-progress --out runs/gpu-shapes-ae-f4 $AEX > $L/ae.log 2>&1
echo "ae exit $?"; tail -c 600 $L/ae.log
$T --config checkpoints/recipes/shapes-text-ldm-gpu.json --out runs/gpu-shapes-text-ldm $X > $L/ldm.log 2>&1
echo "ldm exit $?"
wait $P1; echo "unet4 exit $?"; wait $P2; echo "unet3 exit $?"
for r in unet4 unet3 ldm; do tail -n 1 runs/gpu-shapes-text-$r/log.jsonl 2>/dev/null; tail -c 300 $L/$r.log; done
mkdir -p $OUT
for r in gpu-shapes-text-unet4 gpu-shapes-text-unet3 gpu-shapes-text-ldm gpu-shapes-ae-f4; do
  (cd runs && tar cf $OUT/$r.tar --exclude=checkpoint.safetensors --exclude=autoencoder $r)
done
cp $L/*.log $OUT/ 2>/dev/null; ls -la $OUT
