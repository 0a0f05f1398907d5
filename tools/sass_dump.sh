#!/usr/bin/env bash
# SASS of one kernel from a built extension: bash tools/sass_dump.sh EXT_DIR NAME_PATTERN > out.sass
# (cuobjdump on the device; the pattern picks the mangled names, e.g. decode_attn_kernelILi128ELi1E).
so=$(ls "$1"/*.so | head -1)
for f in $(cuobjdump -symbols "$so" 2>/dev/null | grep -o "_Z[A-Za-z0-9_]*$2[A-Za-z0-9_]*" | sort -u); do
  cuobjdump -sass -fun "$f" "$so"
done
