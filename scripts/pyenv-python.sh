#!/usr/bin/env bash
# Prints the newest pyenv interpreter of CPython minor version $1 (e.g. 3.12), or nothing when
# none is installed. Used by matrix.sh and wheels.sh.
root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
ls -d "$root"/versions/"$1".*/bin/python"$1" 2>/dev/null | sort -V | tail -1
