#!/usr/bin/env bash
# The paper's table on a CUDA GPU: qwen3-4b-shape (Qwen3-4B's architecture, seeded weights) in fp16 and
# bf16, documents of 255..3774 tokens, prefill vs reuse from the local store and from a peer (two
# `kvnet serve` processes on loopback), then the economics priced from the fp16 table.
#
#   bench/gpu_paper_table.sh [--device cuda] [--model qwen3-4b-shape] [--dtypes fp16,bf16]
#                            [--lengths 255,512,1024,2048,3774] [--runs 3] [--out docs/figures/gpu]
#                            [--price-per-hour 3.0] [--check]
#
# The GPU machine may have no network, so everything is installed BEFORE, on a machine with network
# (or into a copy of the tree that is then moved over, same Python and glibc):
#   1. ./setup.sh with a CUDA build of torch: KVNET_TORCH_VERSION must name a wheel that pip can get,
#      e.g.  .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
#      after ./setup.sh (torch must report torch.cuda.is_available() on the GPU machine).
#   2. The dev extra (it holds matplotlib): .venv/bin/pip install -e '.[dev]'  (setup.sh does this).
#   3. The synthetic model, built once from seeds (no network needed, but ~8 GB of disk and a few
#      minutes of CPU; doing it beforehand keeps it out of the GPU's time):
#        KVNET_CACHE_DIR=/some/dir .venv/bin/python -c "from kvnet.models import resolve; resolve('qwen3-4b-shape')"
#      and carry /some/dir along with KVNET_CACHE_DIR set to it on the GPU machine.
# --check verifies all of that and exits (0: ready). Without --check the same checks run first; a missing
# piece stops the script with a line saying what to install, before any GPU time is spent.
# Results: OUT/paper_table_<model>_<dtype>.{json,md,png} and OUT/economics_<model>.{json,md,png}.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DEVICE=cuda MODEL=qwen3-4b-shape DTYPES=fp16,bf16 LENGTHS=255,512,1024,2048,3774 RUNS=3 OUT=docs/figures/gpu
PRICE=3.0 CHECK_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --dtypes) DTYPES=$2; shift 2 ;;
    --lengths) LENGTHS=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --price-per-hour) PRICE=$2; shift 2 ;;
    --check) CHECK_ONLY=1; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "gpu_paper_table.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

# -- what must be there beforehand ------------------------------------------------------------------
"$PY" - "$DEVICE" "$MODEL" <<'EOF' || exit 2
import importlib, shutil, sys
device, model = sys.argv[1], sys.argv[2]
missing = []
for mod, how in (("torch", "a torch build (CUDA for --device cuda), see step 1"),
                 ("transformers", "./setup.sh (pip install -e '.[dev]')"),
                 ("libp2p", "./setup.sh (libp2p==0.8.1 needs gcc and libgmp-dev to build)"),
                 ("trio", "./setup.sh"), ("rich", "./setup.sh"), ("blake3", "./setup.sh"),
                 ("matplotlib", "pip install -e '.[dev]' (step 2)"), ("kvnet", "./setup.sh")):
    try:
        importlib.import_module(mod)
    except Exception as exc:  # noqa: BLE001
        missing.append(f"  {mod}: not importable ({type(exc).__name__}: {exc}); install: {how}")
if not missing and device.startswith("cuda"):
    import torch
    if not torch.cuda.is_available():
        missing.append(f"  CUDA: torch {torch.__version__} sees no CUDA device (built for CUDA: "
                       f"{torch.version.cuda or 'no'}); install a CUDA torch build (step 1)")
if not missing:
    from kvnet.models import SYNTHETIC_CONFIGS, SYNTHETIC_MARKER, SYNTHETIC_VERSION, cache_dir
    if model in SYNTHETIC_CONFIGS:
        folder = cache_dir() / "models" / f"{model}-v{SYNTHETIC_VERSION}"
        if not (folder / SYNTHETIC_MARKER).is_file():
            free = shutil.disk_usage(cache_dir().parent if not cache_dir().exists() else cache_dir()).free
            c = SYNTHETIC_CONFIGS[model]
            need = 2 * (c["vocab_size"] * c["hidden_size"] + c["num_hidden_layers"] * (
                c["hidden_size"] * c["head_dim"] * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])
                + 3 * c["hidden_size"] * c["intermediate_size"]))
            note = f"it will be built now from seeds (~{need / 1e9:.1f} GB; step 3 does it beforehand)"
            if free < need * 1.2:
                missing.append(f"  model {model}: not built in {folder} and only {free / 1e9:.1f} GB free; {note}")
            else:
                print(f"gpu_paper_table.sh: model {model} not built yet in {folder}: {note}", file=sys.stderr)
if missing:
    print("gpu_paper_table.sh: not ready:\n" + "\n".join(missing), file=sys.stderr)
    sys.exit(1)
import torch
where = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
print(f"gpu_paper_table.sh: ready (torch {torch.__version__}, device {device}: {where})", file=sys.stderr)
EOF
[ "$CHECK_ONLY" = 1 ] && exit 0

# -- the tables -------------------------------------------------------------------------------------
mkdir -p "$OUT"
first=""
IFS=, read -r -a dtypes <<<"$DTYPES"
for dtype in "${dtypes[@]}"; do
  base="$OUT/paper_table_${MODEL}_${dtype}"
  "$PY" -m bench.paper_table --model "$MODEL" --dtype "$dtype" --device "$DEVICE" --lengths "$LENGTHS" \
    --runs "$RUNS" --json "$base.json" --md "$base.md" --png "$base.png"
  [ -n "$first" ] || first="$base.json"
done

# -- the economics, priced from the first table -----------------------------------------------------
"$PY" -m bench.economics --paper --table "$first" --price-per-hour "$PRICE" \
  --json "$OUT/economics_${MODEL}.json" --md "$OUT/economics_${MODEL}.md" --png "$OUT/economics_${MODEL}.png"
echo "gpu_paper_table.sh: results in $OUT" >&2
