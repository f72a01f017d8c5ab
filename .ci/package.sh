#!/usr/bin/env bash
# CI, packaging: builds the amd64 .deb and checks its contents, conffile and
# unit; installs it and checks the user, group and file modes; purges it and
# checks the cleanup; builds the aarch64 binary and runs it under qemu-user.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive CARGO_TERM_COLOR=never

step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

step "tools (cargo-deb, cross gcc, qemu-user, aarch64 target)"
missing=()
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
command -v systemd-analyze >/dev/null || missing+=(systemd)
if ((${#missing[@]})); then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
rustup target list --installed | grep -qx aarch64-unknown-linux-gnu || rustup target add aarch64-unknown-linux-gnu
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb

step "build the .deb (amd64)"
rm -rf dist
scripts/build-debs.sh x86_64-unknown-linux-gnu
deb=$(ls dist/fieldgate_*_amd64.deb)

step "dpkg-deb: contents, modes, conffiles"
contents=$(dpkg-deb -c "$deb")
echo "$contents"
for path in ./usr/bin/fieldgate ./etc/fieldgate/fieldgate.toml ./usr/lib/systemd/system/fieldgate.service \
            ./usr/share/doc/fieldgate/examples/fieldgate.toml ./usr/share/doc/fieldgate/README.md; do
    grep -q " $path\$" <<<"$contents" || fail "$path missing from $deb"
done
grep -E ' \./usr/bin/fieldgate$' <<<"$contents" | grep -q '^-rwxr-xr-x' || fail "/usr/bin/fieldgate is not 0755"
grep -E ' \./etc/fieldgate/fieldgate.toml$' <<<"$contents" | grep -q '^-rw-r-----' || fail "the config is not 0640"
conffiles=$(dpkg-deb -I "$deb" conffiles)
[ "$conffiles" = "/etc/fieldgate/fieldgate.toml" ] || fail "conffiles: $conffiles"
dpkg-deb -I "$deb" postinst | grep -q 'adduser --quiet fieldgate dialout' || fail "postinst does not add the user to dialout"

step "dpkg -i: user, group, modes, unit"
dpkg -i "$deb"
getent passwd fieldgate >/dev/null || fail "no fieldgate user"
getent group fieldgate >/dev/null || fail "no fieldgate group"
id -nG fieldgate | tr ' ' '\n' | grep -qx dialout || fail "fieldgate is not in dialout"
[ "$(stat -c '%a %U %G' /etc/fieldgate/fieldgate.toml)" = "640 root fieldgate" ] || fail "config: $(stat -c '%a %U %G' /etc/fieldgate/fieldgate.toml)"
[ "$(stat -c '%a' /usr/bin/fieldgate)" = "755" ] || fail "binary mode"
/usr/bin/fieldgate --version
/usr/bin/fieldgate --config /etc/fieldgate/fieldgate.toml check >/dev/null
for profile in config/profiles/*.toml; do
    cmp -s "$profile" "/usr/share/fieldgate/profiles/$(basename "$profile")" || fail "$profile is not installed in /usr/share/fieldgate/profiles"
done
listed=$(/usr/bin/fieldgate --config /etc/fieldgate/fieldgate.toml profiles)
grep -q '^eastron-sdm630 .* /usr/share/fieldgate/profiles ' <<<"$listed" || fail "profiles does not list the installed library: $listed"
set +e
sim_out=$(/usr/bin/fieldgate --config /etc/fieldgate/fieldgate.toml simulate 2>&1); sim_rc=$?
set -e
[ "$sim_rc" = 2 ] && grep -q 'leaves out the simulator' <<<"$sim_out" || fail "the packaged binary must leave out the simulator: exit $sim_rc: $sim_out"
grep -q '^DeviceAllow=char-ttySC rw$' /usr/lib/systemd/system/fieldgate.service || fail "the unit does not allow SC16IS75x HATs (ttySC)"
grep -qx 'RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK' /usr/lib/systemd/system/fieldgate.service || fail "the unit's address families changed: the local API needs AF_INET/AF_INET6 and nothing more"
out=$(systemd-analyze verify /usr/lib/systemd/system/fieldgate.service 2>&1) || fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify: $out"
if [ -d /run/systemd/system ]; then
    systemctl is-enabled fieldgate | grep -qx enabled || fail "service not enabled"
else
    [ -L /etc/systemd/system/multi-user.target.wants/fieldgate.service ] || fail "service not enabled (no wants link)"
fi

step "dpkg --purge: cleanup"
mkdir -p /var/lib/fieldgate/outbox
dpkg --purge fieldgate
! getent passwd fieldgate >/dev/null || fail "fieldgate user left behind"
! getent group fieldgate >/dev/null || fail "fieldgate group left behind"
[ ! -e /var/lib/fieldgate ] || fail "/var/lib/fieldgate left behind"
[ ! -e /etc/fieldgate/fieldgate.toml ] || fail "config left behind after purge"
[ ! -e /usr/bin/fieldgate ] || fail "binary left behind"

step "aarch64: build, then --version and check under qemu-user"
scripts/build-debs.sh aarch64-unknown-linux-gnu
bin=target/aarch64-unknown-linux-gnu/release/fieldgate
file "$bin" 2>/dev/null || true
qemu-aarch64 -L /usr/aarch64-linux-gnu "$bin" --version
qemu-aarch64 -L /usr/aarch64-linux-gnu "$bin" --config config/fieldgate.toml check >/dev/null
size=$(stat -c %s "$bin")
echo "aarch64 binary: $size bytes"
# The budget with the local API, stripped (SPEC: a Pi-class gateway).
[ "$size" -le $((7 * 1000 * 1000)) ] || fail "the aarch64 binary is $size bytes, over the 7 MB budget"
ls -l dist/
