"""The compile half of ``python -m benchmarks.compile_check --target sm90`` (triton venv).

Compiles the captured Triton modules (``*.ttir`` beside their ``*.json`` launch parameters) for
sm_90a with the pip ``triton`` package (no GPU needed: ptxas ships in the wheel) and reports what
the hardware would run: registers, spills, shared memory, matrix-multiply instructions and their
input types. Writes ``compile.json`` and prints a table. Usage: ``python sm90_compile.py OUTDIR``
(it imports triton only, not jax or jmat).
"""
import glob
import json
import os
import re
import subprocess
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas

OUT = sys.argv[1]
PTXAS = get_ptxas(90).path
rows = []
for path in sorted(glob.glob(os.path.join(OUT, "*.ttir"))):
  stem = os.path.basename(path)[:-5]
  meta = json.load(open(path[:-5] + ".json"))
  options = {"num_warps": meta["num_warps"], "num_stages": meta["num_stages"]}
  row = dict(kernel=stem, dtype=meta["dtype"], **options)
  try:
    kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32), options=options)
  except Exception as e:  # recorded as a failure
    row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:600]}")
    rows.append(row)
    continue
  ptx = kernel.asm["ptx"]
  with open(os.path.join(OUT, stem + ".ptx"), "w") as f:
    f.write(ptx)
  # ptxas with the flags triton itself uses
  log = subprocess.run([PTXAS, "-lineinfo", "--regAllocOptLevel=2", "-v", "--gpu-name=sm_90a",
                        os.path.join(OUT, stem + ".ptx"), "-o", "/dev/null"],
                       capture_output=True, text=True).stderr
  regs = re.findall(r"Used (\d+) registers", log)
  spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
  # the A operand's type: wgmma.mma_async.sync.aligned.SHAPE.D.A.B,
  # mma.sync.aligned.SHAPE.row.col.D.A.B.C
  wgmma = r"wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k\d+\.\w+\.(\w+)\."
  mma = r"mma\.sync\.aligned\.m\d+n\d+k\d+\.row\.col\.\w+\.(\w+)\."
  mma_types = sorted(set(re.findall(wgmma, ptx)) | set(re.findall(mma, ptx)))
  row.update(ok=True, regs=int(regs[-1]) if regs else None,
             spill_bytes=sum(int(a) + int(b) for a, b in spills[-1:]),
             shared_kib=round(kernel.metadata.shared / 1024, 1),
             wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
             mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
             mma_input_types=mma_types,
             tma=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
             atomics=len(re.findall(r"\b(?:atom|red)\.global", ptx)))
  rows.append(row)
with open(os.path.join(OUT, "compile.json"), "w") as f:
  json.dump(rows, f, indent=1)
print(f"{'kernel':56s} {'dtype':8s} w/s  regs spill smemKiB wgmma mma.sync inputs")
for r in rows:
  if not r["ok"]:
    print(f"{r['kernel'][:56]:56s} FAILED {r['error'][:200]}")
    continue
  print(f"{r['kernel'][:56]:56s} {r['dtype']:8s} {r['num_warps']}/{r['num_stages']}  "
        f"{r['regs']:4d} "
        f"{r['spill_bytes']:5d} {r['shared_kib']:7.1f} {r['wgmma']:5d} {r['mma_sync']:8d} "
        f"{','.join(r['mma_input_types'])}")
