#!/usr/bin/env bash
# Build the tiny local Docker image used by the benchmark and by docker-dependent
# tests: /bin/true, /bin/sh and python3 (with its stdlib and shared libraries),
# nothing else. No registry is needed: the root is assembled from the host's own
# files (shared libraries found with ldd) and loaded with `docker import`.
#
# Usage: .ci/build-bench-image.sh [TAG]   (default nanoclaw-bench:latest)
# Env:   FORCE=1 rebuilds even if the image exists.
set -euo pipefail

TAG="${1:-nanoclaw-bench:latest}"
PY="$(readlink -f /usr/bin/python3)"          # e.g. /usr/bin/python3.11 (Debian's, not pyenv's)
PYVER="$(basename "$PY")"                      # python3.11

if [[ "${FORCE:-0}" != 1 ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "build-bench-image: $TAG already present, skipping (FORCE=1 to rebuild)"
    exit 0
fi

root="$(mktemp -d /tmp/nanoclaw-bench-root.XXXXXX)"
trap '[[ -n "${KEEP_ROOT:-}" ]] || rm -rf "$root"' EXIT

# Copy PATH into the root the way the host has it: the file itself at its real
# location, plus the symlink (if PATH's last component is one).
copy() {
    local p="$1" dir real link
    dir="$(readlink -f "$(dirname "$p")")"
    real="$(readlink -f "$p")"
    link="$dir/$(basename "$p")"
    for f in "$real" "$link"; do
        [[ -e "$root$f" || -L "$root$f" ]] && continue
        mkdir -p "$root$(dirname "$f")"
        cp -P --preserve=mode "$f" "$root$f"   # -P: a symlink stays a symlink
    done
}

# Shared libraries (and the dynamic loader) of an ELF file, as ldd lists them.
libs_of() {
    ldd "$1" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'
}

# usrmerge layout, like Debian 12 and like nanoclaw's host root.
mkdir -p "$root/usr/bin" "$root/usr/lib" "$root/usr/lib64" "$root/tmp" "$root/etc" "$root/proc" "$root/dev"
chmod 1777 "$root/tmp"
ln -s usr/bin "$root/bin"
ln -s usr/lib "$root/lib"
ln -s usr/lib64 "$root/lib64"
ln -s usr/sbin "$root/sbin"
mkdir -p "$root/usr/sbin"

elfs=(/usr/bin/true "$(readlink -f /bin/sh)" "$PY")
for f in "${elfs[@]}"; do copy "$f"; done
ln -sf "$(basename "$(readlink -f /bin/sh)")" "$root/usr/bin/sh"
ln -sf "$PYVER" "$root/usr/bin/python3"

# The stdlib, without its test suite; keep the bytecode caches so that
# `python3 -c pass` is not penalised by recompiling.
tar -C / --exclude="usr/lib/$PYVER/test" --exclude="usr/lib/$PYVER/idlelib" \
    --exclude="usr/lib/$PYVER/tkinter" --exclude="usr/lib/$PYVER/ensurepip" \
    -cf - "usr/lib/$PYVER" | tar -C "$root" -xf -
for so in "$root/usr/lib/$PYVER/lib-dynload/"*.so; do elfs+=("/${so#"$root"/}"); done

declare -A seen=()
for f in "${elfs[@]}"; do
    while read -r lib; do
        [[ -n "$lib" && -z "${seen[$lib]:-}" ]] || continue
        seen[$lib]=1
        copy "$lib"
    done < <(libs_of "$f")
done

printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"

# Sanity check with the host's chroot before handing it to docker.
chroot "$root" /bin/true
chroot "$root" /usr/bin/python3 -c 'import os, json, subprocess, ssl, hashlib'

echo "build-bench-image: root is $(du -sh "$root" | cut -f1); importing as $TAG"
tar -C "$root" --numeric-owner -cf - . | docker import \
    --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' \
    --change 'CMD ["/bin/sh"]' - "$TAG" >/dev/null
docker run --rm --network none "$TAG" /bin/true
docker run --rm --network none "$TAG" python3 -c pass
echo "build-bench-image: $TAG ready"
