#!/usr/bin/env bash
# make compat: prove the version floors in pyproject.toml. For the oldest torch and transformers
# that pyproject.toml admits, and for the newest the registry serves, create a venv under
# build/compat/<name>/, build _C in a copy of the tree (CPU only) and run the op and HF tests.
#   COMPAT_WHICH="oldest newest" (default both)   PYTEST_ARGS (extra pytest args)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
req() {  # req NAME [floor]: NAME's requirement in pyproject.toml, or its ">=" floor pinned
  "$PY" - "$@" <<'PYEOF'
import re, sys, tomllib
data = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = data["dependencies"] + sum(data["optional-dependencies"].values(), [])
for r in reqs:
    m = re.fullmatch(rf"{re.escape(sys.argv[1])}\s*>=\s*([0-9.]+)(,.*)?", r.strip())
    if m:
        print(f"{sys.argv[1]}=={m.group(1)}" if len(sys.argv) > 2 else r.strip()); break
else:
    sys.exit(f"no '{sys.argv[1]}>=' floor in pyproject.toml")
PYEOF
}
TEST_DEPS="ninja pybind11 packaging pyyaml tqdm tabulate pytest hypothesis numpy safetensors"
status=0
for which in ${COMPAT_WHICH:-oldest newest}; do
  case $which in
    oldest) torch_req=$(req torch floor); tf_req=$(req transformers floor) ;;
    newest) torch_req=$(req torch); tf_req=$(req transformers) ;;
    *) echo "COMPAT_WHICH: oldest and/or newest, got $which" >&2; exit 2 ;;
  esac
  dir=$ROOT/build/compat/$which
  echo "== compat $which: $torch_req, $tf_req ($dir)"
  test -x "$dir/venv/bin/python" || "$PY" -m venv "$dir/venv"
  "$dir/venv/bin/python" -m pip install -q --upgrade "$torch_req" "$tf_req" $TEST_DEPS
  "$dir/venv/bin/python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  rm -rf "$dir/tree" && mkdir -p "$dir/tree"
  git ls-files -z | xargs -0 cp --parents -t "$dir/tree"
  (cd "$dir/tree" && TRUTHGPT_BUILD_CUDA=0 "$dir/venv/bin/python" setup.py -q build_ext --inplace) || { status=1; continue; }
  (cd "$dir/tree" && "$dir/venv/bin/python" -m pytest tests/ops tests/integrations -q -p no:cacheprovider ${PYTEST_ARGS:-}) || status=1
done
exit $status
