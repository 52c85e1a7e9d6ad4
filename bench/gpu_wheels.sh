#!/usr/bin/env bash
# The wheels the GPU machine lacks for bench/gpu_check.py, downloaded into .whl/ (or the folder given).
#
#     bench/gpu_wheels.sh [DEST]        # DEST defaults to .whl, at the repository root
#
# The GPU machine (DESIGN.md §5) has Python 3.12, torch 2.11 (CUDA 13), transformers 5.17, huggingface_hub 1.33,
# accelerate, safetensors, tokenizers, nvidia-ml-py and psutil, with their dependencies, and reaches no index.
# chatapp needs transformers 5.24 and huggingface_hub 2.4 (which imports httpx2, and httpx2 its own stack, at its
# top), bitsandbytes for nf4 and int8, and platformdirs (chatapp.config imports it for default folders). The
# versions are the ones chatapp's own environment runs (`pip show` in its .venv). bitsandbytes' wheel holds
# a library for every CUDA, ROCm and XPU release (43 MB); only the CPU and CUDA 13.x ones are kept, which brings
# the set to about 18 MB. Every wheel's Requires-Dist is then checked against what is shipped and what the
# machine has; a requirement neither covers fails the script.
#
# .gitignore keeps .whl/ out of commits. An ignored folder travels to the device only when the run names it (run's
# carry: [".whl"]). Working tree and wheels together must stay under 64 MiB.
#
# The device run, from the repository root, is then one command (split at && to fit here; paste it as it is):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 &&
#   timeout 540 python3 bench/gpu_check.py --out $OUT
set -euo pipefail

dest="${1:-.whl}"
mkdir -p "$dest"

wheels=(
  transformers==5.24.0
  huggingface_hub==2.4.0
  bitsandbytes==0.50.2
  platformdirs==4.14.8
  # huggingface_hub 2.4's HTTP stack; the machine has httpx (hub 1.33's), not these.
  httpx2==2.16.2
  httpcore2==2.16.2
  truststore==0.10.5
  # httpx2 asks for newer ones than an older machine may have; small, and then the versions tested here.
  anyio==4.16.0
  idna==3.20
  h11==0.16.0
  typing_extensions==4.16.0
)

# bitsandbytes' wheels are tagged manylinux_2_24, which the usual list below lacks.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$dest" "${wheels[@]}"

python3 - "$dest" <<'PY'
"""Slim bitsandbytes to its CPU and CUDA 13 libraries; check every wheel's requirements are met on the machine."""
import base64
import hashlib
import re
import sys
import zipfile
from pathlib import Path

from pip._vendor.packaging.markers import default_environment
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name

dest = Path(sys.argv[1])
KEEP = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")

for wheel in dest.glob("bitsandbytes-*.whl"):
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as old, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as new:
        names = [n for n in old.namelist() if not n.endswith(".so") or KEEP.search(n)]
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        rows = []
        for name in names:
            if name == record:
                continue
            data = old.read(name)
            new.writestr(old.getinfo(name), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append(f"{name},sha256={digest},{len(data)}")
        new.writestr(record, "\n".join([*rows, f"{record},,"]) + "\n")
    slim.replace(wheel)

# What the GPU machine has: the packages DESIGN.md lists and what transformers 5.17 and huggingface_hub 1.33 require.
ON_GPU = """torch transformers huggingface-hub accelerate safetensors tokenizers nvidia-ml-py psutil numpy packaging
pyyaml regex tqdm typer filelock fsspec hf-xet httpx click typing-extensions""".split()
shipped = {canonicalize_name(w.name.split("-")[0]) for w in dest.glob("*.whl")}
have = shipped | {canonicalize_name(n) for n in ON_GPU}
env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython"}
missing = []
for wheel in sorted(dest.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            continue
        if canonicalize_name(req.name) not in have:
            missing.append(f"{wheel.name}: {req}")
total = sum(w.stat().st_size for w in dest.glob("*.whl"))
for wheel in sorted(dest.glob("*.whl")):
    print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
print(f"{total / 2**20:7.2f} MiB  in all, {len(shipped)} wheels in {dest}")
if missing:
    sys.exit("requirements neither shipped nor on the GPU machine:\n  " + "\n  ".join(missing))
PY
