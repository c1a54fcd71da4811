#!/usr/bin/env bash
# Install the peer tools of benchmarks/peers.py, each apart from the package and from each other,
# under benchmarks/peers/.envs/ (gitignored). Idempotent: a peer whose folder holds a .done mark
# is skipped (--force reinstalls). Only PyPI is used; torch comes from the local CPU wheel.
#
#   bash benchmarks/peers/setup.sh [--force] [peer ...]     # peers: sv repeng nnterp tlens (default all)
#
# PYTHON: the package's interpreter (default: the repo's .venv/bin/python); it runs the package,
# the raw-hook baseline and the --target peers (steering-vectors, repeng). nnterp and
# TransformerLens get their own virtualenvs (nnterp 1.3.0 does not import on nnsight 0.8.1).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
ENVS="$HERE/.envs"
FORCE=0
PEERS=()
for a in "$@"; do
  case "$a" in
    --force) FORCE=1 ;;
    sv|repeng|nnterp|tlens) PEERS+=("$a") ;;
    *) echo "unknown argument $a (peers: sv repeng nnterp tlens; --force)" >&2; exit 2 ;;
  esac
done
[ ${#PEERS[@]} -eq 0 ] && PEERS=(sv repeng nnterp tlens)
mkdir -p "$ENVS"
# the CPU torch wheel on local disk; the +cpu local label also keeps pip off the CUDA builds
WHEELS="${TORCH_WHEELS:-/opt/wheels}"
TORCH_PIN="torch==2.13.0+cpu"
# transformers as in the package's environment, so every tool runs the same model code
TF_VER="$("$PY" -c 'import transformers; print(transformers.__version__)')"
SKLEARN="scikit-learn==1.8.0 joblib threadpoolctl"
PIPQ=(-q --disable-pip-version-check)

todo() {  # todo NAME: true when NAME must be (re)installed
  local d="$ENVS/$1"
  if [ "$FORCE" = 1 ] || [ ! -f "$d/.done" ]; then rm -rf "$d"; return 0; fi
  echo "$1: already installed ($d)"; return 1
}

for p in "${PEERS[@]}"; do
  case "$p" in
    sv)  # steering-vectors 0.12.2 pins transformers<5; --no-deps, it runs on transformers 5 unchanged
      if todo sv; then
        echo "sv: steering-vectors 0.12.2 + scikit-learn into $ENVS/sv (--target, --no-deps)"
        "$PY" -m pip install "${PIPQ[@]}" --no-deps --target "$ENVS/sv" steering-vectors==0.12.2 $SKLEARN
        touch "$ENVS/sv/.done"
      fi ;;
    repeng)  # repeng 0.4.0 needs numpy<2 (np.float_): numpy 1.26.4 in its own folder, first on its path
      if todo repeng; then
        echo "repeng: repeng 0.4.0 + numpy 1.26.4 + scikit-learn into $ENVS/repeng (--target, --no-deps)"
        "$PY" -m pip install "${PIPQ[@]}" --no-deps --target "$ENVS/repeng" repeng==0.4.0 numpy==1.26.4 $SKLEARN
        touch "$ENVS/repeng/.done"
      fi ;;
    nnterp)  # nnterp 1.3.0 imports nnsight.intervention.tracing, gone in 0.8: its own venv with nnsight 0.7.0
      if todo nnterp; then
        echo "nnterp: virtualenv $ENVS/nnterp with $TORCH_PIN, nnsight 0.7.0, nnterp 1.3.0, transformers $TF_VER"
        "$PY" -m venv "$ENVS/nnterp"
        "$ENVS/nnterp/bin/pip" install "${PIPQ[@]}" --find-links "$WHEELS" "$TORCH_PIN"
        "$ENVS/nnterp/bin/pip" install "${PIPQ[@]}" --find-links "$WHEELS" "$TORCH_PIN" nnsight==0.7.0 nnterp==1.3.0 \
          "transformers==$TF_VER"
        touch "$ENVS/nnterp/.done"
      fi ;;
    tlens)  # TransformerLens: its own venv (it pins its own transformers range)
      if todo tlens; then
        echo "tlens: virtualenv $ENVS/tlens with $TORCH_PIN and transformer-lens"
        "$PY" -m venv "$ENVS/tlens"
        "$ENVS/tlens/bin/pip" install "${PIPQ[@]}" --find-links "$WHEELS" "$TORCH_PIN"
        "$ENVS/tlens/bin/pip" install "${PIPQ[@]}" --find-links "$WHEELS" "$TORCH_PIN" transformer-lens==4.3.0
        touch "$ENVS/tlens/.done"
      fi ;;
  esac
done
echo "peers installed under $ENVS"
