#!/bin/sh
# Writes the lock files from pyproject.toml: every package pinned, with the hashes of its
# files on PyPI, for CPython 3.11 on Linux x86_64 (whatever machine this runs on).
#
#   sh requirements/refresh.sh              # after a change to pyproject.toml: pins kept where they still fit
#   sh requirements/refresh.sh --upgrade    # the newest versions pyproject.toml allows
#
# Needs uv (PyPI package uv; UV=/path/to/uv to use one off the PATH). server.txt is what the
# server needs; test.txt adds the test and benchmark tools, with the server's pins unchanged.
set -eu
cd "$(dirname "$0")/.."
uv=${UV:-uv}
compile() {
    "$uv" pip compile pyproject.toml --quiet --generate-hashes --no-config \
        --index-url https://pypi.org/simple --python-version 3.11 \
        --python-platform x86_64-manylinux_2_28 \
        --custom-compile-command "sh requirements/refresh.sh" "$@"
}
compile --output-file requirements/server.txt "$@"
compile --extra test --extra bench --constraint requirements/server.txt \
    --output-file requirements/test.txt "$@"
