#!/usr/bin/env bash
# Run the data-plane benchmark (as root). Uses the project's .venv if there is one, else
# creates benchmarks/.venv with the project (for the svcproxy command) and matplotlib.
#   benchmarks/run.sh --duration 2 --reps 1      # quick run, about a minute
#   benchmarks/run.sh --smoke
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

if [[ -x .venv/bin/python ]]; then
    py=.venv/bin/python
else
    py=benchmarks/.venv/bin/python
    if [[ ! -x $py ]]; then
        python3 -m venv benchmarks/.venv
        "$py" -m pip install -q --upgrade pip
    fi
    # The project itself, so the svcproxy console script exists. A proxy that does not
    # install yet only makes the svcproxy target skip.
    if [[ -f pyproject.toml && ! -x benchmarks/.venv/bin/svcproxy ]]; then
        "$py" -m pip install -q -e . || echo "run.sh: pip install -e . failed; svcproxy will be skipped" >&2
    fi
fi
"$py" -c 'import matplotlib' 2>/dev/null || "$py" -m pip install -q -r benchmarks/requirements.txt
exec "$py" -m benchmarks.dataplane "$@"
