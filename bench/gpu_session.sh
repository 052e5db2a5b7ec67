#!/usr/bin/env bash
# One lent-GPU session's work (see bench/README.md): GPU checks, the Fashion-MNIST zoo models
# (UNet and DiT, trained side by side on the one GPU), FD against sampler steps, zoo entries.
# Usage on the GPU machine, from the repository root: OUT=/some/dir bash bench/gpu_session.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TQDM_DISABLE=1 DIFFLAB_CACHE=${DIFFLAB_CACHE:-/tmp/difflab-cache}
PY=${PY:-python3}
MIN=${MIN:-3}
L=/tmp/gpu-session; mkdir -p $L
nvidia-smi -L
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
UNET="difflab train --data fashion_mnist --model unet-s --minutes $MIN --batch-size 128 --save-every 100000 --out runs/gpu-fmnist-unet-s"
DIT="difflab train --data fashion_mnist --model DiT-XS/2 --lr 3e-4 --minutes $MIN --batch-size 128 --save-every 100000 --out runs/gpu-fmnist-dit-xs2"
$PY -m $DIT --no-progress > $L/train_dit.log 2>&1 &
DIT_PID=$!
$PY bench/gpu_checks.py --out $L > $L/gpu_checks.log 2>&1; echo "gpu_checks exit $?"; tail -6 $L/gpu_checks.log
$PY -m $UNET --no-progress > $L/train_unet.log 2>&1; echo "unet train exit $?"; tail -2 runs/gpu-fmnist-unet-s/log.jsonl
wait $DIT_PID; echo "dit train exit $?"; tail -2 runs/gpu-fmnist-dit-xs2/log.jsonl
$PY -m difflab.zoo publish runs/gpu-fmnist-dit-xs2 --name fmnist-dit-xs2 --n 10000 --device cuda --command "$DIT" > $L/zoo_dit.log 2>&1 &
ZOO_PID=$!
$PY bench/fd_vs_steps.py --run runs/gpu-fmnist-unet-s --n 5000 --out $L 2>&1 | grep -v "^\s*$" | tail -14
$PY -m difflab.zoo publish runs/gpu-fmnist-unet-s --name fmnist-unet-s --n 10000 --device cuda --command "$UNET" > $L/zoo_unet.log 2>&1; echo "zoo unet exit $?"
wait $ZOO_PID; echo "zoo dit exit $?"
tail -3 $L/zoo_*.log
cp runs/gpu-fmnist-unet-s/log.jsonl checkpoints/zoo/fmnist-unet-s/train_log.jsonl 2>/dev/null
cp runs/gpu-fmnist-dit-xs2/log.jsonl checkpoints/zoo/fmnist-dit-xs2/train_log.jsonl 2>/dev/null
tar cf $OUT/results.tar checkpoints/zoo $L
cp $L/gpu_checks.log $L/fd_vs_steps.md $OUT/ 2>/dev/null
ls -la $OUT
