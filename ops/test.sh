#!/usr/bin/env bash
# Sets up Sluice and runs every test against the local Redis and Postgres.
# A missing service fails the run here (SLUICE_REQUIRE_SERVICES=1); it never skips.
set -euo pipefail
cd "$(dirname "$0")/.."
ops/setup.sh
SLUICE_REQUIRE_SERVICES=1 .venv/bin/python -m pytest -p no:cacheprovider "$@"
