#!/usr/bin/env bash
# The GPU check, run on a lent CUDA machine through the workplace's device tool:
#   run(command="bash benchmarks/gpu_run.sh", carry=[".whl"])
# .whl holds cp312 wheels the machine lacks (lmdb; nixl-cu13 minus its unused nixl_ep part).
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
# cuFile: compat mode on (POSIX under cuFile where nvidia-fs is absent), logs to $OUT
cat > /tmp/cufile.json <<'EOF'
{"logging": {"dir": "/tmp", "level": "ERROR"},
 "properties": {"allow_compat_mode": true, "max_direct_io_size_kb": 16384, "max_device_cache_size_kb": 131072},
 "execution": {"max_io_threads": 8, "parallel_io": true}}
EOF
export CUFILE_ENV_PATH_JSON=/tmp/cufile.json CUFILE_LOGFILE_PATH=$OUT/cufile.log
export PYTHONUNBUFFERED=1

step probe
timeout 60 python3 - <<'EOF'
import torch
from kvbm_fs.tiers.diskio import probe_gds, probe_direct_io
from kvbm_fs.tiers.gds import open_device_io
print("probe_gds:", probe_gds(20))
print("O_DIRECT here:", probe_direct_io("."))
for b in ("GDS_MT", "GDS"):
    eng, why = open_device_io("cuda", b, 30)
    print(b, "->", why)
    if eng is not None:
        eng.close()
EOF

step tests on the GPU
timeout 300 python3 -m pytest -q -p no:cacheprovider --junitxml="$OUT/junit.xml" \
  tests/test_disk_device.py tests/test_tier_conformance.py tests/test_keys_layout_codec.py \
  tests/test_store.py tests/test_nixl_io.py -k "not Remote" 2>&1 | tail -40

step gpu_check
timeout 240 python3 benchmarks/gpu_check.py --out "$OUT/gpu_check.json" | tail -40

step bench_gds
timeout 300 python3 benchmarks/bench_gds.py --dir "$PWD/benchmarks/.scratch" --out "$OUT/bench_gds.json" | tail -60

step done
