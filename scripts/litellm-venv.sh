#!/usr/bin/env bash
# Create (or refresh) .litellm-venv: the LiteLLM proxy (PyPI `litellm[proxy]`) in a virtualenv
# of its own, for the integration tests in tests/litellm (`make test-litellm`). LiteLLM is large
# and pins many packages, so it never goes into the project's .venv.
#
#   scripts/litellm-venv.sh                          # install if missing/broken, else check
#   LITELLM_VENV_REFRESH=1 scripts/litellm-venv.sh   # rebuild the venv from scratch
#
# Environment: PYTHON (interpreter for the venv, default python3, >= 3.11), LITELLM_VENV
# (default <repo>/.litellm-venv), LITELLM_VERSION (default pinned below), LITELLM_WHEELHOUSE
# (default ~/.cache/budgetgate/litellm-wheels).
#
# Caching: the install is skipped when the venv already holds this version and
# `litellm --version` runs. Otherwise the venv is (re)built from a wheelhouse outside the repo,
# which `pip wheel` fills from the registry only when it lacks something: the registry here
# sends no HTTP caching headers, so pip's own cache (~/.cache/pip) keeps nothing between runs.
#
# Version pin: litellm >= 1.108.8 (1.108.x) and >= 1.110 cannot be installed with [proxy] from
# this machine's registry (it lacks litellm-enterprise 0.1.79.post2+, litellm-proxy-extras
# 0.4.110.post1+ / 0.4.111+, and the litellm-proxy package those versions require).
#
# Prints the litellm executable's path on the last line of stdout.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${LITELLM_VENV:-$ROOT/.litellm-venv}"
LITELLM_VERSION="${LITELLM_VERSION:-1.108.6}"
WHEELHOUSE="${LITELLM_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/budgetgate/litellm-wheels}"
SPEC="litellm[proxy]==${LITELLM_VERSION}"
STAMP="$VENV/.installed"
BIN="$VENV/bin/litellm"

log() { printf 'litellm-venv: %s\n' "$*" >&2; }

# The settings the tests use, so that the check never reaches the network either.
export LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS=True \
    LITELLM_LOCAL_AUTOROUTER_PRESETS=True LITELLM_LOCAL_POLICY_TEMPLATES=True \
    LITELLM_LOCAL_BLOG_POSTS=True

runs() { timeout 180 "$BIN" --version >/dev/null 2>&1; }

if [[ ${LITELLM_VENV_REFRESH:-0} != 1 && -x $BIN && -f $STAMP && "$(cat "$STAMP")" == "$SPEC" ]]; then
    if runs; then
        log "$SPEC already installed in $VENV"
        echo "$BIN"
        exit 0
    fi
    log "$BIN does not run"
fi

"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
    || { log "$PYTHON is older than 3.11 (set PYTHON=python3.X)"; exit 1; }

start=$SECONDS
if [[ -e $VENV ]]; then
    log "rebuilding $VENV"
    rm -rf "$VENV"
fi
log "installing $SPEC in $VENV (wheelhouse $WHEELHOUSE)"
"$PYTHON" -m venv "$VENV"
mkdir -p "$WHEELHOUSE"
pip_q() { "$VENV/bin/python" -m pip -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
from_wheelhouse() { pip_q install --no-index --find-links "$WHEELHOUSE" "$SPEC"; }
if ! from_wheelhouse 2>/dev/null; then
    pip_q wheel --wheel-dir "$WHEELHOUSE" --find-links "$WHEELHOUSE" "$SPEC"
    from_wheelhouse
fi
echo "$SPEC" >"$STAMP"
if ! runs; then
    log "installed $SPEC, but '$BIN --version' fails"
    exit 1
fi
log "installed $SPEC in $((SECONDS - start))s"
echo "$BIN"
