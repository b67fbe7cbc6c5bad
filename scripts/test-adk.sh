#!/usr/bin/env bash
# The `adk` layout's tests, in an environment of their own.
#
# google-adk (whose RedisSessionService the tests drive) requires google-genai below 3, while the
# project runs google-genai 3: both cannot share one virtualenv. This script keeps a second one
# in .state/venv-adk with the project, its dev tools and the `adk` extra (pip resolves
# google-genai 2 there), and runs tests/test_layouts_adk.py in it against the same Redis and
# PostgreSQL as `make test`. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV=.state/venv-adk
STAMP="$VENV/.installed"

if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p .state
    "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev,adk]'
    touch "$STAMP"
fi

exports="$(bash scripts/services.sh up)"
eval "$exports"
exec "$VENV/bin/pytest" -q -p no:cacheprovider tests/test_layouts_adk.py "$@"
