# Sourced by scripts/run and scripts/test: find a Python >= 3.11, make .venv, install Baton.
# Usage: ensure_venv EXTRA   (EXTRA is "" or "test")

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${BATON_VENV:-$repo/.venv}

python_ok() {
    "$1" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

# As root, Baton's workers run as other users (nobody, www-data), and they import the
# stdlib after dropping privileges: an interpreter under a private home (pyenv in
# /root) would fail them. Prefer one that `nobody` can run.
readable_by_nobody() {
    [ "$(id -u)" != 0 ] && return 0
    command -v runuser >/dev/null || return 0
    runuser -u nobody -- "$(readlink -f "$(command -v "$1")")" -c 'import json, email.parser' 2>/dev/null
}

pick_python() {
    local candidates=("${PYTHON:-}" python3 python3.13 python3.12 python3.11 /usr/bin/python3) first="" py
    for py in "${candidates[@]}"; do
        [ -n "$py" ] && command -v "$py" >/dev/null && python_ok "$py" || continue
        [ -z "$first" ] && first=$py
        if readable_by_nobody "$py"; then echo "$py"; return 0; fi
    done
    if [ -n "$first" ]; then
        echo "warning: no Python >= 3.11 readable by 'nobody' found; using $first (workers switching users may fail to import)" >&2
        echo "$first"; return 0
    fi
    echo "error: Baton needs Python >= 3.11 with the venv module; set PYTHON=/path/to/python3" >&2
    return 1
}

ensure_venv() {
    local extra=$1 spec stamp
    if [ ! -x "$venv/bin/python" ]; then
        local py
        py=$(pick_python) || exit 1
        echo "creating $venv with $py" >&2
        "$py" -m venv "$venv" || exit 1
    fi
    spec="$repo"
    [ -n "$extra" ] && spec="$repo[$extra]"
    stamp="$venv/.baton-installed-$extra"
    # Reinstall only when the project's metadata changed; the install is editable.
    if [ ! -e "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec" || exit 1
        touch "$stamp"
    fi
    # Each worker execs a fresh interpreter as its app's user, who may not write bytecode
    # beside Baton's sources: compile them here (only what changed), so a worker start
    # reads bytecode instead of compiling every module again.
    "$venv/bin/python" -m compileall -q "$repo/supervisor" >/dev/null || true
}
