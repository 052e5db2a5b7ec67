#!/usr/bin/env bash
# The second lent-GPU call of session 4 (issue 5): f=2 and f=4 autoencoders (64 wide) trained on the
# GPU side by side, then a latent text-to-image model on the f=2 one. Same set-up as gpu_shapes.sh.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TQDM_DISABLE=1 OMP_NUM_THREADS=4
PY=${PY:-python3}
L=${L:-/tmp/gpu-shapes}; mkdir -p $L $OUT
AEKW=$($PY -c "import json; d=json.load(open('checkpoints/recipes/shapes-text-unet.json'))['data_kwargs']; d['n']=20000; print(json.dumps(d))")
if [ "${SMOKE:-0}" = 1 ]; then X="--steps 3"; AEX="--steps 3"; else X=""; AEX="--steps 40000 --minutes 1.25"; fi
AE=($PY -m difflab train-autoencoder --data shapes --data-kwargs "$AEKW" --z-channels 4 --channels 64 --batch-size 128 --no-progress $AEX)
"${AE[@]}" --factor 4 --out runs/gpu-shapes-ae-f4b > $L/ae4.log 2>&1 &
P=$!
"${AE[@]}" --factor 2 --out runs/gpu-shapes-ae-f2 > $L/ae2.log 2>&1; echo "ae2 exit $?"; cat $L/ae2.log
$PY bench/gpu_text_states.py run .gpu/shapes-states.safetensors -- train --no-progress \
    --config checkpoints/recipes/shapes-text-ldm2-gpu.json --out runs/gpu-shapes-text-ldm2 $X > $L/ldm2.log 2>&1
echo "ldm2 exit $?"; tail -n 1 runs/gpu-shapes-text-ldm2/log.jsonl; tail -c 300 $L/ldm2.log
wait $P; echo "ae4 exit $?"; cat $L/ae4.log
for r in gpu-shapes-ae-f2 gpu-shapes-ae-f4b gpu-shapes-text-ldm2; do
  (cd runs && tar cf $OUT/$r.tar --exclude=checkpoint.safetensors --exclude=autoencoder $r)
done
cp $L/*.log $OUT/ 2>/dev/null; ls -la $OUT
