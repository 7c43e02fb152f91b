#!/bin/sh
# Builds the shardkv container image from this checkout:
#
#   deploy/build-image.sh [--tag NAME] [--bin-dir DIR]
#
# Without --bin-dir it builds the release binaries (cargo build --release) and uses
# target/release. No base image is pulled: the image is FROM scratch with the three
# binaries, the shared libraries `ldd` lists for them (taken from this machine,
# which built them, so they match), dash as /bin/sh, and a user `shardkv` (10001).
# Tests pass --bin-dir target/debug to reuse the binaries `cargo test` built.
set -eu

tag=shardkv:latest
bin_dir=
while [ $# -gt 0 ]; do
  case $1 in
    --tag) tag=$2; shift 2 ;;
    --bin-dir) bin_dir=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "build-image.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

repo=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$bin_dir" ]; then
  (cd "$repo" && cargo build --release --locked --bins)
  bin_dir=$repo/target/release
fi
for b in shardmaster kvnode shardctl; do
  [ -x "$bin_dir/$b" ] || { echo "build-image.sh: no $bin_dir/$b" >&2; exit 2; }
done
command -v ldd >/dev/null || { echo "build-image.sh: needs ldd" >&2; exit 2; }

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT INT TERM
root=$stage/rootfs
mkdir -p "$root/usr/local/bin" "$root/bin" "$root/etc" "$root/tmp" "$stage/data"
chmod 1777 "$root/tmp"
for b in shardmaster kvnode shardctl; do
  cp "$bin_dir/$b" "$root/usr/local/bin/$b"
  # Debug info is most of a binary's size; symbols stay, so backtraces keep names.
  if command -v strip >/dev/null; then strip --strip-debug "$root/usr/local/bin/$b"; fi
done
cp "$repo/deploy/shardkv-init" "$root/usr/local/bin/shardkv-init"
cp "$(command -v dash)" "$root/bin/sh"

# Every shared library (and the dynamic loader) at the path the binaries look for it.
for f in "$root"/usr/local/bin/shardmaster "$root"/usr/local/bin/kvnode \
         "$root"/usr/local/bin/shardctl "$root"/bin/sh; do
  ldd "$f" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
done | sort -u | while read -r lib; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done

cat > "$root/etc/passwd" <<PASSWD
root:x:0:0:root:/root:/bin/sh
shardkv:x:10001:10001:shardkv:/data:/bin/sh
PASSWD
cat > "$root/etc/group" <<GROUP
root:x:0:
shardkv:x:10001:
GROUP
echo 'hosts: files dns' > "$root/etc/nsswitch.conf"

cp "$repo/deploy/Dockerfile" "$stage/Dockerfile"
docker build --quiet --tag "$tag" "$stage" >/dev/null
echo "built image $tag"
