#!/usr/bin/env bash
# Builds fieldgate .debs for amd64, arm64 and armhf into dist/, natively on
# Debian/Ubuntu x86_64 (no Docker): Debian's cross gcc links, the linkers are
# set in .cargo/config.toml. Usage: scripts/build-debs.sh [TARGET...]
# The packaged binary is built without the `sim` feature: the simulator,
# `demo` and the embedded broker are test and demo machinery.
# Needs: rustup target add aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf
#        apt-get install gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf
#        cargo install cargo-deb
set -euo pipefail
cd "$(dirname "$0")/.."
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
mkdir -p dist
for target in "${targets[@]}"; do
    case "$target" in
        aarch64-*) export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc ;;
        armv7-*) export CC_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-gcc ;;
    esac
    cargo build --release --locked --no-default-features --target "$target"
    cargo deb --no-build --target "$target" --output dist/
    size=$(stat -c %s "target/$target/release/fieldgate")
    echo "$target: target/$target/release/fieldgate is $size bytes (stripped)"
done
ls -l dist/*.deb
