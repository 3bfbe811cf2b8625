#!/usr/bin/env bash
# The GPU check, run on a lent CUDA machine through the workplace's device tool:
#   run(command="bash benchmarks/gpu_run.sh", carry=[".whl"])      ("... gpu_run.sh quick": skip the search)
# .whl holds cp312 wheels the machine lacks (lmdb; nixl-cu13 minus its unused nixl_ep part, to fit
# the 64 MiB the tool carries), made here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     -d .whl lmdb==3.0.0 nixl-cu13==1.5.1
# and nixl_ep_cu13/, headers and scripts dropped from the nixl wheel (and from its RECORD).
# Everything it prints and measures lands in $OUT (log, JSON results, junit XML).
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
step() { echo; echo "=== $* ($(date +%T))"; }

step machine
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.is_available())"
ls /proc/driver/nvidia-fs 2>&1 | head -3
grep -i nvidia_fs /proc/modules || echo "nvidia_fs module: not loaded"
df -hT . /tmp | cat

step install wheels
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
SP=$(python3 -c "import site; print(site.getsitepackages()[0])")
LIBS=$(find "$SP/nvidia" /usr/local/cuda*/lib* \( -name 'libcufile.so.0' -o -name 'libcudart.so.13' \) 2>/dev/null | xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:-}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
# cuFile configurations to try: compat mode allowed (the default), and forced
printf '%s\n' '{"logging": {"dir": "/tmp", "level": "ERROR"}, "properties": {"allow_compat_mode": true}}' > /tmp/cufile-compat.json
printf '%s\n' '{"logging": {"dir": "/tmp", "level": "ERROR"}, "properties": {"allow_compat_mode": true, "force_compat_mode": true}}' > /tmp/cufile-force.json
export CUFILE_LOGFILE_PATH=$OUT/cufile.log PYTHONUNBUFFERED=1
mkdir -p benchmarks/.scratch

step probe
timeout 60 python3 -m kvbm_fs.cli gds . --no-trial

# which (cuFile config, filesystem, backend) combinations move bytes into the GPU?
matrix() {
  for cfg in compat force; do for dir in "$PWD/benchmarks/.scratch" /dev/shm; do for b in GDS_MT GDS; do
    CUFILE_ENV_PATH_JSON=/tmp/cufile-$cfg.json timeout 60 python3 benchmarks/gds_try.py $cfg $dir $b 2>/dev/null | grep '^RESULT' \
      || echo "RESULT $cfg $dir $b {\"ok\": false, \"error\": \"crashed or timed out\"}"
  done; done; done
}
step matrix
if [ "${1:-}" = quick ]; then  # skip the search: the combination found before, with the udev facts written
  echo 'RESULT compat '"$PWD"'/benchmarks/.scratch GDS_MT {"loads": 0}' > /tmp/matrix.txt
else
  matrix | tee /tmp/matrix.txt
fi
if ! grep -q '"loads": [1-9]' /tmp/matrix.txt; then
  step "nothing moved: give cuFile the udev facts this VM lacks (ID_FS_USAGE), then retry"
  mkdir -p /run/udev/data
  for b in /sys/block/*; do printf 'E:ID_FS_USAGE=filesystem\nE:ID_FS_TYPE=ext4\n' > "/run/udev/data/b$(cat $b/dev)"; done
  ls /run/udev/data | tr '\n' ' '; echo
  [ "${1:-}" = quick ] && sed -i 's/"loads": 0/"loads": 1/' /tmp/matrix.txt || matrix | tee /tmp/matrix.txt
fi
best=$(grep '"loads": [1-9]' /tmp/matrix.txt | head -1)
echo "chosen: ${best:-none}"
if [ -n "$best" ]; then
  set -- $best
  export CUFILE_ENV_PATH_JSON=/tmp/cufile-$2.json KVBM_FS_GDS_MODE=$4 BENCH_DIR=$3
else
  export CUFILE_ENV_PATH_JSON=/tmp/cufile-compat.json KVBM_FS_GDS_MODE=on BENCH_DIR=$PWD/benchmarks/.scratch
fi
tail -5 "$OUT/cufile.log" 2>/dev/null

step tests on the GPU
TESTS="tests/test_disk_device.py tests/test_tier_conformance.py tests/test_store.py tests/test_nixl_io.py"
[ "${1:-}" = quick ] && TESTS=tests/test_disk_device.py
timeout 240 python3 -m pytest -q -p no:cacheprovider --junitxml="$OUT/junit.xml" $TESTS -k "not Remote" 2>&1 | tail -25

step bench_gds
timeout 300 python3 benchmarks/bench_gds.py --gds "$KVBM_FS_GDS_MODE" --dir "$BENCH_DIR" --out "$OUT/bench_gds.json" | tail -70

step done
