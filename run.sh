#!/usr/bin/env bash
# One entry point for a fresh machine (Debian, Python >= 3.10):
#   ./run.sh demo        set everything up, then run the muTransfer demo on FashionMNIST
#   ./run.sh test        set everything up, then run the test suite (CI runs exactly this)
#   ./run.sh test-slow   the slow tests only
#   ./run.sh bench       the benchmarks
#   ./run.sh mutants     the mutation check: every planted bug of tests/mutants/catalogue.toml must fail the suite
#   ./run.sh setup       only the set-up (idempotent; fast when already done)
# Anything after the command is passed on (e.g. ./run.sh demo --quick, ./run.sh test -k coord).
set -euo pipefail
cd "$(dirname "$0")"
PY=${MULOCAL_PYTHON:-python3}
VENV=${MULOCAL_VENV:-.venv}

log() { echo "[run.sh] $*" >&2; }

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment $VENV"
    "$PY" -m venv "$VENV"
  fi
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    log "installing PyTorch (CPU)"
    "$VENV/bin/python" -m pip install -q "torch==2.13.0" || "$VENV/bin/python" -m pip install -q torch
  fi
  if [ ! -f "$VENV/.mulocal-installed" ] || [ pyproject.toml -nt "$VENV/.mulocal-installed" ] \
     || ! "$VENV/bin/python" -c "import mulocal, pytest, ray, tensorboard, mlflow, sqlalchemy" 2>/dev/null; then
    log "installing mulocal, its test dependencies and the Ray, TensorBoard and MLflow extras (tested too)"
    "$VENV/bin/python" -m pip install -q -e ".[test,ray,tensorboard,mlflow]"
    touch "$VENV/.mulocal-installed"
  fi
  if ! "$VENV/bin/python" -c "import mup" 2>/dev/null; then
    # test-only: tests/test_adapter_mup.py compares the adapter with microsoft/mup; mup's declared dependencies
    # (torchvision, pandas, seaborn, ...) are for its examples, not its optimizers and shapes: --no-deps
    log "installing microsoft/mup (test-only, without its example dependencies)"
    "$VENV/bin/python" -m pip install -q --no-deps "mup>=1.0" || log "could not install mup: its comparison is skipped"
  fi
  if ! "$VENV/bin/mulocal" data check fashion-mnist --json >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      log "installing Debian's dataset-fashion-mnist"
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >&2 \
        || log "apt could not install dataset-fashion-mnist; trying a download"
    elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
      (sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist) >&2 || true
    fi
    "$VENV/bin/mulocal" data check fashion-mnist --json >/dev/null 2>&1 || "$VENV/bin/mulocal" data fetch fashion-mnist
  fi
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  demo) setup; exec "$VENV/bin/mulocal" demo "$@" ;;
  test) setup; exec "$VENV/bin/python" -m pytest -q "$@" ;;
  test-slow) setup; exec "$VENV/bin/python" -m pytest -q -m slow "$@" ;;
  mutants) setup; exec "$VENV/bin/python" tests/mutants/run.py "$@" ;;
  bench) setup; for b in benchmarks/bench_*.py; do "$VENV/bin/python" "$b" "$@"; done ;;
  *) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 2 ;;  # the comment block above, without its '#'s
esac
