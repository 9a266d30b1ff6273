#!/usr/bin/env bash
# GPU checks and GPU timings, for a lent CUDA machine (run from the repo root; results to $OUT or
# benchmarks/results/gpu). The image there has torch, h5py, safetensors, tqdm, matplotlib, pandas,
# pyarrow; sigpy, PyWavelets, nibabel and nilearn travel as wheels in .whl/, fetched here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     sigpy==0.1.27 PyWavelets==1.9.0 nibabel==5.4.2 nilearn==0.14.1
# (Ray and MLflow are too large to carry: the cohort tests stay on the CPU machines.)
# Each step has its own time limit so one slow step cannot starve the others.
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=Agg
LOG=$OUT/steps.log  # one log for all steps: a lent machine returns few files
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOG"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$LOG"

step() {  # step NAME SECONDS CMD...: run with a limit, append to the log, say how it ended
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name: $*" >>"$LOG"
  timeout "$limit" "$@" >"$OUT/.step" 2>&1
  local rc=$?
  cat "$OUT/.step" >>"$LOG"; rm -f "$OUT/.step"
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}

step pytest_cuda 150 python3 -m pytest -q -p no:cacheprovider tests/refine_more/reconstruction/test_cuda.py tests/refine_more/networks/test_encoding.py tests/refine_more/physics/test_operators.py
step hash_encoding 60 python3 benchmarks/hash_encoding.py --device cuda --repeats 10 --out "$OUT/hash_encoding_cuda.json"
step operator 60 python3 benchmarks/operator.py --shape 48 176 176 --coils 20 --images 8 --device cuda \
  --out "$OUT/operator_cuda.json"
step full_size 150 python3 benchmarks/full_size.py --device cuda --iters 20 5 --out "$OUT/full_size_cuda.json"
step adaptation ${ADAPT_LIMIT:-200} python3 benchmarks/adaptation.py --set device=cuda --no-noise-floor \
  --out "$OUT/adaptation_cuda.json"
exit 0
