#!/usr/bin/env bash
# Prove edged on Raspberry Pi OS (Debian bookworm, arm64) on an x86 machine:
#   1. build (or reuse, keyed by a hash of its inputs) an emulated bookworm arm64 root (qemu-user + binfmt),
#   2. install edged in it exactly as docs/raspberry-pi.md tells a Pi user (that block is executed as is),
#   3. run inside: `edged check-config` as the service user, the arm64 pytest subset (the daemon against a
#      mosquitto from the arm64 archive), `edged mot` on shared MOT15 sequences,
#   4. compare with x86: `edged mot` byte for byte, detector / encoder / tracking equivalence
#      (bench/arm64_equivalence.py) on the Raspberry Pi 5 and Pi 4 CPUs.
#
# Usage: scripts/check-arm64.sh [--rebuild] [--keep-root] [--quick]     (as root: it mounts and chroots)
#   --rebuild    ignore the cached base root and build it again
#   --keep-root  leave the work root (unmounted) for inspection instead of deleting it
#   --quick      skip the Pi 4 equivalence pass and the tracking clip (local iterations)
# Environment: EDGED_ARM64_CACHE (default /var/cache/edged-arm64), EDGED_SHARED (default ../shared),
#   EDGED_ARM64_DEBIAN_MIRROR (a Debian archive URL instead of the one in the machine's apt sources).
# Exit codes: 0 passed; 1 a check failed; 2 cannot run here (not root, no apt-get, no ../shared);
#             3 a package archive (Debian or PyPI) could not be reached: not a failure of edged.
set -euo pipefail

SCRIPT_VERSION=1
SUITE=bookworm
ARCH=arm64
# What a Raspberry Pi OS Lite image has before the user installs anything edged needs.
BASE_PACKAGES="sudo,systemd,python3,ca-certificates,procps"
# The emulated CPUs: QEMU's default "max" CPU has SME, and XNNPACK's SME kernels give wrong int8 results
# under qemu 7.2 (docs/arm64.md). Raspberry Pis have none: Pi 5 = Cortex-A76, Pi 4 = Cortex-A72.
PI5_CPU=cortex-a76
PI4_CPU=cortex-a72
# Test-only additions inside the root (not part of the Pi install).
TEST_APT="mosquitto"
TEST_PIP="pytest pytest-timeout hypothesis jsonschema scikit-image motmetrics"
TEST_FILES="tests/test_arm64.py tests/test_config.py tests/test_outbox.py tests/test_tracker.py tests/test_kalman.py
  tests/test_events.py tests/test_geometry.py tests/test_mot_cli.py tests/test_runtime.py tests/test_yolo.py
  tests/test_encoder.py"
# Deselected inside the root, for what the emulated system cannot offer (they run in the x86 suite):
# - the x86 reference runtime: TensorFlow is a dev-only oracle, not part of a Pi install;
# - a read-only bind mount in a private mount namespace: unshare cannot make a chroot's root private.
TEST_DESELECT="tests/test_runtime.py::test_tensorflow_lite_backend_gives_the_same_outputs
  tests/test_outbox.py::test_unwritable_state_dir_is_an_outbox_error_not_a_recovery"
MOT_SEQUENCES="TUD-Stadtmitte KITTI-13"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HELPER="$REPO/scripts/arm64/prepare.py"
SHARED="$(cd "${EDGED_SHARED:-$REPO/../shared}" 2>/dev/null && pwd || true)"
CACHE="${EDGED_ARM64_CACHE:-/var/cache/edged-arm64}"
REBUILD=0 KEEP_ROOT=0 QUICK=0
for arg in "$@"; do
  case "$arg" in
    --rebuild) REBUILD=1 ;;
    --keep-root) KEEP_ROOT=1 ;;
    --quick) QUICK=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "check-arm64: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

say() { printf '[check-arm64 %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { local code=$1; shift; say "ERROR: $*"; exit "$code"; }

[ "$(id -u)" -eq 0 ] || die 2 "run as root (it mounts /proc into the emulated system and chroots into it)"
command -v apt-get >/dev/null || die 2 "needs a Debian/Ubuntu host with apt-get"
[ -n "$SHARED" ] && [ -d "$SHARED/data" ] || die 2 "needs the shared data at ${EDGED_SHARED:-$REPO/../shared} (set EDGED_SHARED)"

mkdir -p "$CACHE/runs"
# Keep the logs and reports of the last 9 runs, and this one.
find "$CACHE/runs" -mindepth 1 -maxdepth 1 -type d -printf '%T@ %p\n' | sort -rn | tail -n +10 | cut -d' ' -f2- | xargs -r rm -rf
RUN="$CACHE/runs/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$RUN/out"
LOG="$RUN/check.log"
exec > >(tee -a "$LOG") 2>&1
exec 9>"$CACHE/lock"
flock -n 9 || die 2 "another check-arm64 run holds $CACHE/lock"
say "log: $LOG"

# ---------------------------------------------------------------------------------------------- steps
STEP_NAMES=() STEP_SECS=() STEP_RESULTS=()
NET_FAILURE=""

# Reachability of the archives, asked only after a step failed, so a network problem is reported as such.
DEBIAN_LINES=""
debian_reachable() {
  local uri
  for uri in $(printf '%s\n' "$DEBIAN_LINES" | awk '{print $2}' | sort -u); do
    if ! curl -fsS --max-time 30 -o /dev/null "${uri%/}/dists/$SUITE/Release" 2>/dev/null \
      && ! curl -fsS --max-time 30 -o /dev/null "${uri%/}/dists/$SUITE-security/Release" 2>/dev/null; then
      NET_FAILURE="cannot reach the Debian archive at $uri"
      return 1
    fi
  done
}
pypi_reachable() {
  local index
  index="$(python3 "$HELPER" pypi-index)"
  if ! curl -fsS --max-time 30 -o /dev/null "${index%/}/pip/"; then
    NET_FAILURE="cannot reach PyPI: $index (pip's index on this machine)"
    return 1
  fi
}

# step NAME NET -- command...: run a step with errexit intact (a failure exits the script; the EXIT trap
# records it). NET: debian | pypi | both | none, what to probe when it fails.
CURRENT_STEP="" CURRENT_NET="none" STEP_T0=""
step() {
  CURRENT_STEP=$1 CURRENT_NET=$2
  shift 3
  say "== $CURRENT_STEP"
  STEP_T0=$(date +%s.%N)
  "$@"
  record_step ok
  say "-- ${STEP_NAMES[-1]}: ok (${STEP_SECS[-1]} s)"
  CURRENT_STEP=""
}

record_step() {
  STEP_NAMES+=("$CURRENT_STEP") STEP_RESULTS+=("$1")
  STEP_SECS+=("$(awk -v a="$STEP_T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')")
}

summary() {
  local i
  say "== summary (times in seconds)"
  for i in "${!STEP_NAMES[@]}"; do
    printf '  %-46s %8s  %s\n' "${STEP_NAMES[$i]}" "${STEP_SECS[$i]}" "${STEP_RESULTS[$i]}"
  done
}

# ---------------------------------------------------------------------------------------------- mounts
WORK=""
MOUNTS=()           # mount points in the order they were made; undone in reverse
BINFMT_MOUNTED=0

mount_track() {     # mount_track TARGET mount-args...
  local target=$1
  shift
  mount "$@" "$target"
  MOUNTS+=("$target")
}

unmount_one() {
  local target=$1
  mountpoint -q "$target" 2>/dev/null || return 0
  umount "$target" 2>/dev/null || { say "umount $target failed; detaching it lazily"; umount -l "$target"; }
}

mounted_under() {   # mount points still attached under $1
  awk -v r="$1/" 'index($5 "/", r) == 1 { print $5 }' /proc/self/mountinfo
}

cleanup() {
  local rc=$? i left
  set +e
  if [ -n "$CURRENT_STEP" ]; then
    record_step "FAILED (exit $rc)"
    say "-- $CURRENT_STEP: FAILED with exit $rc after ${STEP_SECS[-1]} s"
    if [ "$rc" -ne 2 ] && [ "$rc" -ne 3 ]; then
      case "$CURRENT_NET" in
        debian) debian_reachable ;;
        pypi) pypi_reachable ;;
        both) debian_reachable && pypi_reachable ;;
      esac
      if [ -n "$NET_FAILURE" ]; then say "ERROR: $NET_FAILURE"; rc=3; else rc=1; fi
    fi
  fi
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
    unmount_one "${MOUNTS[$i]}"
  done
  MOUNTS=()
  if [ -n "$WORK" ] && [ -d "$WORK" ]; then
    # Anything still mounted (e.g. left by a process inside) goes too, deepest first.
    for left in $(mounted_under "$WORK" | sort -r); do unmount_one "$left"; done
    left="$(mounted_under "$WORK")"
    if [ -n "$left" ]; then
      say "ERROR: still mounted under $WORK: $left (root kept; unmount by hand)"
      rc=1
    elif [ "$KEEP_ROOT" -eq 1 ]; then
      say "work root kept (nothing mounted): $WORK"
    else
      rm -rf --one-file-system "$WORK"
    fi
  fi
  if [ "$BINFMT_MOUNTED" -eq 1 ]; then
    umount /proc/sys/fs/binfmt_misc 2>/dev/null || umount -l /proc/sys/fs/binfmt_misc
  fi
  [ "${#STEP_NAMES[@]}" -gt 0 ] && summary
  if [ "$rc" -eq 0 ]; then say "PASSED (log: $LOG)"; else say "FAILED with exit $rc (log: $LOG)"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------- host
host_deps() {
  local missing=()
  command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
  command -v update-binfmts >/dev/null || missing+=(binfmt-support)
  command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
  command -v git >/dev/null || missing+=(git)
  command -v curl >/dev/null || missing+=(curl)
  python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
  if [ "${#missing[@]}" -gt 0 ]; then
    say "installing on the host: ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  say "qemu: $(qemu-aarch64-static --version | head -1); mmdebstrap $(mmdebstrap --version | awk '{print $2}')"
}

enable_binfmt() {
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount binfmt_misc -t binfmt_misc /proc/sys/fs/binfmt_misc
    BINFMT_MOUNTED=1
  fi
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
  grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 || update-binfmts --enable qemu-aarch64
  # F flag: the kernel holds the interpreter open, so the root needs no copy of qemu.
  grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 || { say "qemu-aarch64 binfmt lacks the F flag"; return 1; }
}

# ---------------------------------------------------------------------------------------------- base root
BASE=""
base_key() {
  {
    echo "version=$SCRIPT_VERSION suite=$SUITE arch=$ARCH packages=$BASE_PACKAGES"
    printf '%s\n' "$DEBIAN_LINES"
    declare -f build_base
  } | sha256sum | cut -c1-16
}

build_base() {
  local tmp=$1
  local -a sources
  mapfile -t sources <<<"$DEBIAN_LINES"
  # A Raspberry Pi OS-like first boot: user pi with password-less sudo (as RPi OS sets it up).
  mmdebstrap --quiet --mode=root --arch="$ARCH" --variant=minbase --include="$BASE_PACKAGES" \
    --customize-hook='chroot "$1" useradd --create-home --shell /bin/bash --groups sudo pi' \
    --customize-hook='echo "pi ALL=(ALL) NOPASSWD: ALL" > "$1/etc/sudoers.d/010_pi-nopasswd"; chmod 0440 "$1/etc/sudoers.d/010_pi-nopasswd"' \
    --customize-hook='echo raspberrypi > "$1/etc/hostname"; printf "127.0.0.1 localhost\n127.0.1.1 raspberrypi\n::1 localhost\n" > "$1/etc/hosts"' \
    "$SUITE" "$tmp" "${sources[@]}"
}

ensure_base() {
  local key
  key=$(base_key)
  BASE="$CACHE/base-$key"
  if [ "$REBUILD" -eq 1 ] && [ -d "$BASE" ]; then rm -rf --one-file-system "$BASE"; fi
  if [ -f "$BASE/ok" ]; then
    say "reusing the cached $SUITE $ARCH root $BASE"
    return 0
  fi
  rm -rf --one-file-system "$BASE"
  mkdir -p "$BASE"
  say "building the $SUITE $ARCH root in $BASE (a few minutes, emulated)"
  build_base "$BASE/root"
  date -u +%FT%TZ >"$BASE/ok"
  # Keep one base: older keys are dead weight.
  local old
  for old in "$CACHE"/base-*; do
    [ "$old" = "$BASE" ] || { [ -z "$(mounted_under "$old")" ] && rm -rf --one-file-system "$old"; }
  done
}

# ---------------------------------------------------------------------------------------------- work root
CPU_NOW=""
prepare_work() {
  WORK="$CACHE/work"
  if [ -d "$WORK" ]; then
    [ -z "$(mounted_under "$WORK")" ] || { say "stale mounts under $WORK: $(mounted_under "$WORK")"; return 1; }
    rm -rf --one-file-system "$WORK"
  fi
  cp -a --reflink=auto "$BASE/root" "$WORK"
  cp /etc/resolv.conf "$WORK/etc/resolv.conf"
  # The chroot shares the host's kernel hostname: sudo wants to resolve it.
  printf '127.0.1.1 raspberrypi %s\n' "$(hostname)" >>"$WORK/etc/hosts"
  # No systemd as PID 1 in a chroot: systemctl enables units offline and records start requests.
  install -m 0755 "$REPO/scripts/arm64/systemctl" "$WORK/usr/local/bin/systemctl"
  # The machine's CA setup: its bundle now, and its local CAs so that a regenerated bundle keeps them.
  if [ -d /usr/local/share/ca-certificates ]; then
    cp -r /usr/local/share/ca-certificates/. "$WORK/usr/local/share/ca-certificates/"
  fi
  python3 "$HELPER" pip-config "$WORK" | sed 's/^/  pip config: /'
  # Emulation plumbing: sudo keeps the emulated CPU model (QEMU_CPU) for the processes it starts.
  echo 'Defaults env_keep += "QEMU_CPU"' >"$WORK/etc/sudoers.d/000_qemu_cpu"
  chmod 0440 "$WORK/etc/sudoers.d/000_qemu_cpu"
  # The clone in the install block comes from a snapshot of this working tree (no network to GitHub).
  snapshot_source "$WORK/srv/edged-src"
  local url
  : >"$WORK/etc/gitconfig"
  for url in $(grep -o 'https://[^ ]*\.git' <<<"$INSTALL_BLOCK" | sort -u); do
    printf '[url "file:///srv/edged-src"]\n\tinsteadOf = %s\n' "$url" >>"$WORK/etc/gitconfig"
  done
  mkdir -p "$WORK/opt/shared" "$WORK/check-out"
  mount_track "$WORK/proc" -t proc proc
  mount_track "$WORK/sys" -t sysfs -o ro sysfs
  mount_track "$WORK/opt/shared" --bind -o ro "$SHARED"
  mount_track "$WORK/check-out" --bind "$RUN/out"
  use_cpu pi5
}

snapshot_source() {
  local dest=$1
  mkdir -p "$dest"
  if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
    # Tracked and new files as they are in the working tree (uncommitted edits included).
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -xf - -C "$dest"
  else
    (cd "$REPO" && tar --exclude=.venv --exclude=.git --exclude=__pycache__ -cf - .) | tar -xf - -C "$dest"
  fi
  git -C "$dest" init -q
  git -C "$dest" add -A
  git -C "$dest" -c user.name=check-arm64 -c user.email=check-arm64@localhost commit -qm "snapshot of $REPO"
}

use_cpu() {   # pi5 | pi4: the emulated CPU (QEMU_CPU) and the /proc/cpuinfo that LiteRT's cpuinfo reads
  local board=$1
  if mountpoint -q "$WORK/proc/cpuinfo"; then umount "$WORK/proc/cpuinfo"; fi
  mount --bind "$REPO/scripts/arm64/cpuinfo-$board" "$WORK/proc/cpuinfo"
  MOUNTS+=("$WORK/proc/cpuinfo")
  case "$board" in pi5) CPU_NOW=$PI5_CPU ;; pi4) CPU_NOW=$PI4_CPU ;; esac
}

# in_root USER COMMAND...: run in the emulated system with a clean environment (nothing host-only leaks).
in_root() {
  local user=$1 home=/root
  shift
  [ "$user" = root ] || home="/home/$user"
  QEMU_CPU="$CPU_NOW" chroot --userspec="$user:$user" "$WORK" /usr/bin/env -i \
    HOME="$home" USER="$user" LOGNAME="$user" SHELL=/bin/bash LANG=C.UTF-8 TERM=dumb \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    QEMU_CPU="$CPU_NOW" ${CI:+CI="$CI"} "$@"
}

# ---------------------------------------------------------------------------------------------- inside
install_as_documented() {
  printf '%s' "$INSTALL_BLOCK" | sed 's/^/  | /'
  # As root: every line of the block runs under sudo anyway, and setuid sudo cannot gain root for
  # user pi under qemu-user (binfmt without the C flag).
  in_root root bash -c "cd ~ && set -euxo pipefail && $INSTALL_BLOCK"
}

installed_versions() {
  in_root root bash -c '
    set -e
    echo "kernel arch: $(uname -m), emulated CPU: $QEMU_CPU"
    . /etc/os-release; echo "os: $PRETTY_NAME"
    dpkg-query -W -f "deb: \${Package} \${Version}\n" python3 python3-venv git mosquitto libsqlite3-0 systemd sudo
    /opt/edged/.venv/bin/python -c "import sys, sqlite3; print(\"python:\", sys.version.split()[0], \"sqlite:\", sqlite3.sqlite_version)"
    /opt/edged/.venv/bin/pip --version
    /opt/edged/.venv/bin/pip freeze --all | sed "s/^/pip: /"' | tee "$RUN/out/versions.txt"
}

service_installed() {
  # install-service wrote the unit, the config and the user, enabled the unit and asked systemd to start it.
  in_root root bash -c '
    set -e
    test -f /etc/systemd/system/edged.service
    test -L /etc/systemd/system/multi-user.target.wants/edged.service
    grep -x "systemctl enable --now edged.service" /var/log/check-arm64-systemctl.log
    id edged | grep "(video)"
    grep "^ExecStart=" /etc/systemd/system/edged.service'
  # The service user reads everything it needs (a 0700 home would fail here) and finds its state
  # directory before the service ever ran (systemd is not PID 1 here to make it).
  in_root edged /opt/edged/.venv/bin/edged check-config /etc/edged/edged.yaml
  in_root root bash -c 'set -e; test "$(stat -c %U:%a /var/lib/edged)" = edged:700'
  # The command docs/raspberry-pi.md gives the operator (sudo as root: setuid sudo cannot raise user pi
  # under qemu-user). pi itself cannot read the config (0640 root:edged, it may hold credentials).
  in_root root sudo -u edged /opt/edged/.venv/bin/edged check-config /etc/edged/edged.yaml
  if in_root pi /opt/edged/.venv/bin/edged check-config /etc/edged/edged.yaml 2>"$RUN/out/pi-check.txt"; then
    echo "user pi could read /etc/edged/edged.yaml"; return 1
  fi
  grep "cannot read the file: Permission denied" "$RUN/out/pi-check.txt"
}

test_tools() {
  in_root root bash -c "set -euxo pipefail; sudo apt-get install -y -q $TEST_APT; sudo /opt/edged/.venv/bin/pip install $TEST_PIP"
}

pytest_subset() {
  local files deselect="" t
  files=$(echo $TEST_FILES)   # one line for bash -c
  for t in $TEST_DESELECT; do deselect+=" --deselect $t"; done
  in_root root bash -c "cd /opt/edged && /opt/edged/.venv/bin/python -m pytest -m 'arm64 or not slow' -p no:cacheprovider \
    --junitxml=/check-out/pytest-arm64.xml -q -rs $files$deselect"
}

mot_identical() {
  local seq ok=0
  mkdir -p "$RUN/out/mot"
  for seq in $MOT_SEQUENCES; do
    in_root root /opt/edged/.venv/bin/edged mot --det "/opt/shared/data/mot15/$seq/det/det.txt" --out "/check-out/mot/$seq.arm64.txt"
    (cd "$REPO" && "$X86_VENV/bin/python" -m edged mot --det "$SHARED/data/mot15/$seq/det/det.txt" --out "$RUN/out/mot/$seq.x86.txt")
    if cmp "$RUN/out/mot/$seq.arm64.txt" "$RUN/out/mot/$seq.x86.txt"; then
      say "edged mot $seq: arm64 and x86 outputs are byte-identical ($(wc -l <"$RUN/out/mot/$seq.x86.txt") rows, sha256 $(sha256sum "$RUN/out/mot/$seq.x86.txt" | cut -c1-16))"
    else
      say "edged mot $seq: arm64 and x86 outputs DIFFER"
      ok=1
    fi
  done
  return $ok
}

# An x86 venv with exactly the versions pip installed in the arm64 root: both sides run the same releases.
X86_VENV=""
x86_venv() {
  local freeze key
  freeze="$RUN/out/arm64-freeze.txt"
  in_root root /opt/edged/.venv/bin/pip freeze | grep -v -E '^(-e |edged[ =@])' >"$freeze"
  echo "motmetrics" >>"$freeze"   # edged eval's scorer, for the tracking comparison on the host
  key=$(sha256sum "$freeze" | cut -c1-16)
  X86_VENV="$CACHE/x86-venv-$key"
  if [ ! -x "$X86_VENV/bin/python" ] || [ ! -f "$X86_VENV/ok" ]; then
    rm -rf "$X86_VENV"
    python3 -m venv "$X86_VENV"
    "$X86_VENV/bin/pip" install -q -r "$freeze"
    touch "$X86_VENV/ok"
  fi
  for old in "$CACHE"/x86-venv-*; do [ "$old" = "$X86_VENV" ] || rm -rf "$old"; done
  say "x86 venv $X86_VENV: $(grep -E '^(numpy|opencv-python-headless|ai-edge-litert|scipy)==' "$freeze" | tr '\n' ' ')"
}

EQ="bench/arm64_equivalence.py"
equivalence_x86() {
  local extra=()
  [ "$QUICK" -eq 0 ] || extra=(--no-track)
  (cd "$REPO" && "$X86_VENV/bin/python" "$EQ" dump --shared "$SHARED" --out "$RUN/out/eq/x86" "${extra[@]}")
}
equivalence_arm64() {   # equivalence_arm64 BOARD [extra args]
  local board=$1
  shift
  use_cpu "$board"
  in_root root bash -c "cd /opt/edged && /opt/edged/.venv/bin/python $EQ dump --shared /opt/shared --out /check-out/eq/arm64-$board \
    --pixels-from /check-out/eq/x86 $*"
  use_cpu pi5
}
equivalence_compare() {
  local board=$1
  (cd "$REPO" && "$X86_VENV/bin/python" "$EQ" compare "$RUN/out/eq/x86" "$RUN/out/eq/arm64-$board" --gt-dir "$SHARED/data/mot15" \
    --report "$RUN/out/eq/report-$board.md" --check)
}

# ---------------------------------------------------------------------------------------------- main
step "host tools (qemu-user-static, binfmt, mmdebstrap)" debian -- host_deps
if [ -n "${EDGED_ARM64_DEBIAN_MIRROR:-}" ]; then
  DEBIAN_LINES="deb $EDGED_ARM64_DEBIAN_MIRROR $SUITE main"$'\n'"deb $EDGED_ARM64_DEBIAN_MIRROR $SUITE-updates main"
else
  DEBIAN_LINES="$(python3 "$HELPER" apt-sources "$SUITE")" || die 2 "no Debian archive in this machine's apt sources"
fi
say "Debian archive (from the machine's apt sources, or EDGED_ARM64_DEBIAN_MIRROR):"
printf '%s\n' "$DEBIAN_LINES" | sed 's/^/  /'
INSTALL_BLOCK="$(python3 "$HELPER" doc-block "$REPO/docs/raspberry-pi.md" install)"
if grep -q 'check-arm64:install:begin' "$REPO/README.md"; then
  [ "$(python3 "$HELPER" doc-block "$REPO/README.md" install)" = "$INSTALL_BLOCK" ] \
    || die 1 "README.md and docs/raspberry-pi.md give different install blocks"
fi
step "binfmt for arm64 (qemu-aarch64)" none -- enable_binfmt
step "$SUITE $ARCH root (cached by input hash)" debian -- ensure_base
step "work copy of the root + mounts" none -- prepare_work
step "install as docs/raspberry-pi.md says (apt, venv, pip)" both -- install_as_documented
step "service installed; edged check-config as the service user" none -- service_installed
step "test tools (mosquitto, pytest...)" both -- test_tools
step "versions installed" none -- installed_versions
step "pytest arm64 subset (Pi 5 CPU)" none -- pytest_subset
step "x86 venv with the same releases" pypi -- x86_venv
step "edged mot: arm64 output == x86 output (cmp)" none -- mot_identical
step "equivalence dump, x86" none -- equivalence_x86
if [ "$QUICK" -eq 1 ]; then
  step "equivalence dump, arm64 Pi 5 CPU" none -- equivalence_arm64 pi5 --no-track
else
  step "equivalence dump, arm64 Pi 5 CPU" none -- equivalence_arm64 pi5
  step "equivalence dump, arm64 Pi 4 CPU" none -- equivalence_arm64 pi4 --no-track --no-video
  step "equivalence x86 vs Pi 4" none -- equivalence_compare pi4
fi
step "equivalence x86 vs Pi 5" none -- equivalence_compare pi5
