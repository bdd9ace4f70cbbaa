#!/usr/bin/env bash
# Provides what tests/qemu_estimate.rs needs to run real QEMU live migrations:
# qemu-system-x86_64, a Debian kernel, and an initramfs whose /init is dirtier.c.
# Idempotent; everything is cached under
#   ${COMMONGROUND_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/commonground}/qemu/
# On success prints KEY=VALUE lines (QEMU, KERNEL, INITRD, ACCEL, and QEMU10 when QEMU 10.0
# from bookworm-backports could be provided beside the system's 7.2) on stdout and exits 0.
# Exits 77 when QEMU or the kernel cannot be provided here (no apt-get, no network,
# not root): the test then skips. Any other non-zero exit is a bug.
# COMMONGROUND_QEMU_ACCEL=tcg forces TCG even where /dev/kvm works.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${COMMONGROUND_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/commonground}/qemu
mkdir -p "$cache"
# Tests run in parallel and each runs this script: one at a time builds and probes.
exec 9>"$cache/.lock"
flock 9
log() { echo "prepare.sh: $*" >&2; }
skip() { log "cannot provide: $*"; exit 77; }

# --- packages -------------------------------------------------------------------------
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
[ -x /bin/busybox ] || missing+=(busybox-static)
command -v cpio >/dev/null || missing+=(cpio)
command -v gcc >/dev/null || missing+=(gcc libc6-dev)
# the relay test's two "nodes" are network namespaces joined by a veth pair
command -v ip >/dev/null || missing+=(iproute2)
command -v nft >/dev/null || missing+=(nftables)
updated=no
apt_update() {
    if [ "$updated" = no ]; then
        apt-get update -qq >&2 || skip "apt-get update failed"
        updated=yes
    fi
}
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || skip "apt-get not found and missing: ${missing[*]}"
    [ "$(id -u)" = 0 ] || skip "not root, cannot apt-get install ${missing[*]}"
    log "installing ${missing[*]}"
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
        || skip "apt-get install ${missing[*]} failed"
fi
qemu=$(command -v qemu-system-x86_64) || skip "qemu-system-x86_64 still missing"

# --- kernel: extracted from a Debian linux-image .deb, never installed -----------------
kernel=$cache/vmlinuz
if [ ! -s "$kernel" ]; then
    command -v apt-get >/dev/null || skip "apt-get not found, cannot fetch a kernel"
    # The metapackage names the current kernel package; the cloud flavour is smaller and
    # has what a serial-console, initramfs-only guest needs.
    pkg=""
    for meta in linux-image-cloud-amd64 linux-image-amd64; do
        pkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
        if [ -z "$pkg" ]; then
            apt_update
            pkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
        fi
        [ -n "$pkg" ] && break
    done
    [ -n "$pkg" ] || skip "no linux-image package known to apt"
    tmp=$(mktemp -d)
    chmod 755 "$tmp" # apt-get download runs as _apt where it can
    trap 'rm -rf "$tmp"' EXIT
    log "downloading $pkg"
    (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "$pkg" >&2) || skip "apt-get download $pkg failed"
    dpkg-deb --fsys-tarfile "$tmp"/*.deb | tar -x -C "$tmp" --wildcards './boot/vmlinuz-*'
    cp "$tmp"/boot/vmlinuz-* "$kernel.tmp"
    mv "$kernel.tmp" "$kernel"
    echo "$pkg" > "$cache/vmlinuz.package"
fi

# --- initramfs: /init is dirtier.c, busybox beside it for debugging ------------------
key=$(cat "$here/dirtier.c" "$here/prepare.sh" | sha256sum | cut -c1-16)
initrd=$cache/initramfs-$key.cpio.gz
if [ ! -s "$initrd" ]; then
    root=$(mktemp -d)
    gcc -static -O2 -Wall -o "$root/init" "$here/dirtier.c"
    mkdir -p "$root/bin" "$root/proc" "$root/dev"
    cp /bin/busybox "$root/bin/busybox"
    (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -9 > "$initrd.tmp"
    rm -rf "$root"
    mv "$initrd.tmp" "$initrd"
    # Old initramfs images of earlier sources are of no use.
    find "$cache" -maxdepth 1 -name 'initramfs-*.cpio.gz' ! -name "$(basename "$initrd")" -delete
fi

# --- accelerator: KVM when /dev/kvm is there and boots the guest, TCG otherwise ---------
# Nested KVM can accept a VM and still never run Linux in it, so the probe boots the real
# guest and waits for the dirtier's "ready"; the verdict is cached per QEMU, kernel, initramfs.
probe_kvm() {
    local dir rc=1 pid i
    dir=$(mktemp -d)
    "$qemu" -accel kvm -machine pc -m 128 -smp 1 -nodefaults -no-user-config -display none \
        -serial "file:$dir/serial" -kernel "$kernel" -initrd "$initrd" \
        -append "console=ttyS0 quiet panic=-1 alloc_mib=8 dirty_mib_s=0" >/dev/null 2>&1 &
    pid=$!
    for i in $(seq 150); do
        if grep -q 'cg-dirtier: ready' "$dir/serial" 2>/dev/null; then rc=0; break; fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -rf "$dir"
    return $rc
}
accel=tcg
if [ "${COMMONGROUND_QEMU_ACCEL:-}" != tcg ] && [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
    verdict=$cache/kvm-$( ("$qemu" --version; cat "$cache/vmlinuz.package" 2>/dev/null; echo "$key") | sha256sum | cut -c1-16)
    if [ ! -f "$verdict" ]; then
        if probe_kvm; then echo kvm > "$verdict"; else echo tcg > "$verdict"; fi
    fi
    accel=$(cat "$verdict")
    [ "$accel" = kvm ] || log "/dev/kvm is present but does not boot the guest (nested KVM?): TCG"
fi

# --- QEMU 10.0 from bookworm-backports, beside the system's QEMU ------------------------
# The .debs are downloaded (not installed) and extracted into $cache/qemu10/root; a wrapper
# runs that binary with its own data dir (-L) and module dir, so the system QEMU (7.2 on
# Debian 12) stays what it is. The outcome is cached: $cache/qemu10/wrapper on success,
# $cache/qemu10/failed (the reason) otherwise; remove $cache/qemu10 to try again.
# COMMONGROUND_QEMU10=0 skips this.
qemu10_try() {
    local dir=$cache/qemu10 root tmp mirror list pkgs missing_libs
    root=$dir/root
    mkdir -p "$dir"
    command -v apt-get >/dev/null || { echo "no apt-get"; return 1; }
    [ "$(id -u)" = 0 ] || { echo "not root (cannot add the bookworm-backports source)"; return 1; }
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        # the same Debian mirror host the machine already uses
        mirror=$(grep -rhsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
            | grep -oE 'https?://[^ ]+/debian/?( |$)' | grep -v security | head -1 | tr -d ' ')
        [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
        log "adding deb ${mirror%/} bookworm-backports main"
        echo "deb ${mirror%/} bookworm-backports main" > /etc/apt/sources.list.d/bookworm-backports.list
    fi
    list=$(apt-cache madison qemu-system-x86 2>/dev/null | awk -F'|' '/bookworm-backports/ {gsub(/ /, "", $2); print $2; exit}')
    if [ -z "$list" ]; then
        apt-get update -qq >&2 || { echo "apt-get update failed"; return 1; }
        list=$(apt-cache madison qemu-system-x86 2>/dev/null | awk -F'|' '/bookworm-backports/ {gsub(/ /, "", $2); print $2; exit}')
    fi
    [ -n "$list" ] || { echo "bookworm-backports has no qemu-system-x86"; return 1; }
    case "$list" in *:10.0*|10.0*) ;; *) echo "bookworm-backports has qemu-system-x86 $list, not 10.0.x"; return 1 ;; esac
    tmp=$(mktemp -d)
    chmod 755 "$tmp"
    pkgs=(qemu-system-x86 qemu-system-common qemu-system-data)
    log "downloading QEMU $list from bookworm-backports: ${pkgs[*]}"
    for p in "${pkgs[@]}"; do
        (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "$p/bookworm-backports" >&2) \
            || { rm -rf "$tmp"; echo "apt-get download $p/bookworm-backports failed"; return 1; }
    done
    rm -rf "$root"
    mkdir -p "$root"
    for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$root"; done
    rm -rf "$tmp"
    [ -x "$root/usr/bin/qemu-system-x86_64" ] || { echo "no qemu-system-x86_64 in the backports .deb"; return 1; }
    missing_libs=$(ldd "$root/usr/bin/qemu-system-x86_64" 2>&1 | awk '/not found/ {print $1}' | tr '\n' ' ')
    [ -z "$missing_libs" ] || { echo "shared libraries missing for QEMU 10: $missing_libs"; return 1; }
    # -L: the backports data dir first (its option ROMs match its machine types), then the
    # system one (seabios etc. that the data package links to).
    cat > "$dir/wrapper.tmp" <<WRAP
#!/bin/sh
export QEMU_MODULE_DIR=$root/usr/lib/x86_64-linux-gnu/qemu
exec $root/usr/bin/qemu-system-x86_64 -L $root/usr/share/qemu -L /usr/share/qemu -L /usr/share/seabios "\$@"
WRAP
    chmod 755 "$dir/wrapper.tmp"
    "$dir/wrapper.tmp" --version 2>&1 | grep -q 'version 10\.0' \
        || { echo "the extracted QEMU does not run: $("$dir/wrapper.tmp" --version 2>&1 | head -3)"; return 1; }
    mv "$dir/wrapper.tmp" "$dir/wrapper"
}
qemu10=""
if [ "${COMMONGROUND_QEMU10:-1}" != 0 ]; then
    if [ -x "$cache/qemu10/wrapper" ]; then
        qemu10=$cache/qemu10/wrapper
    elif [ -f "$cache/qemu10/failed" ]; then
        log "no QEMU 10 (cached: $(cat "$cache/qemu10/failed"); remove $cache/qemu10 to retry)"
    elif why=$(qemu10_try); then
        qemu10=$cache/qemu10/wrapper
        log "QEMU 10: $("$qemu10" --version | head -1)"
    else
        mkdir -p "$cache/qemu10"
        echo "$why" > "$cache/qemu10/failed"
        log "no QEMU 10: $why"
    fi
fi

echo "QEMU=$qemu"
echo "KERNEL=$kernel"
echo "INITRD=$initrd"
echo "ACCEL=$accel"
[ -z "$qemu10" ] || echo "QEMU10=$qemu10"
