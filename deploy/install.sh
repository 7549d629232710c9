#!/usr/bin/env bash
# Installs edge-gateway as a systemd service on a Jetson (JetPack 6/7) or on Debian/Ubuntu; idempotent.
# Usage and what it creates: deploy/README.md, or `deploy/install.sh --help`.
set -euo pipefail
umask 022

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")

# The fixed service layout: systemd/edge-gateway.service refers to these paths.
SVC_USER=edge-gateway
UNIT_NAME=edge-gateway.service
APP_DIR=/opt/edge-gateway
VENV=$APP_DIR/venv
CONF_DIR=/etc/edge-gateway
CONFIG=$CONF_DIR/config.yaml
CONFIG_EXAMPLE=$CONF_DIR/config.example.yaml
STATE_DIR=/var/lib/edge-gateway
CACHE_DIR=/var/cache/edge-gateway
# /etc, not /lib: this is an administrator's install, not a dpkg-owned unit, and /etc outranks /lib.
UNIT_PATH=/etc/systemd/system/$UNIT_NAME
MANIFEST=$APP_DIR/.install-manifest
STAMP=$APP_DIR/.install-stamp

# GPU onnxruntime for Jetson is not on PyPI; the Jetson AI Lab index has it per JetPack/CUDA release.
JP6_ORT_INDEX=https://pypi.jetson-ai-lab.io/jp6/cu126/+simple/
JP7_ORT_INDEX=https://pypi.jetson-ai-lab.io/sbsa/cu130/+simple/
NV_TEGRA_RELEASE=${EDGE_GATEWAY_NV_TEGRA_RELEASE:-/etc/nv_tegra_release}

usage() {
    cat <<EOF
usage: deploy/install.sh [options]          install or upgrade (run as root)
       deploy/install.sh --uninstall [--purge --yes]
       deploy/install.sh --detect           print the detected platform and exit

  --prefix-root DIR  install every path under DIR (DESTDIR-style, for tests); implies --no-service
  --no-service       skip the user, chown and systemctl steps
  --start            start (or restart) the service once it is enabled
  --source PATH      gateway source tree or wheel to install (default: $REPO)
  --wheels DIR       offline: pip installs only from this wheelhouse (--no-index --find-links DIR)
  --python PATH      interpreter for the venv (default: /usr/bin/python3)
  --cpu              CPU onnxruntime even on a Jetson
  --ort-index URL    index for onnxruntime-gpu on a Jetson (default: chosen from the L4T release)
  --no-deps          install the gateway alone, no dependencies or runtime extras (tests)
  --skip-check       do not run 'edge-gateway check' (the unit is then not enabled)
  --reinstall        run pip even when the stamp says this source is already installed
  --uninstall        remove what the install manifest lists; keeps $CONF_DIR and $STATE_DIR
  --purge            with --uninstall: also remove $CONF_DIR, $STATE_DIR and the user
  --yes              do not ask before --purge
EOF
}

ROOT="" NO_SERVICE=0 START=0 SOURCE=$REPO WHEELS="" PY="" FORCE_CPU=0 ORT_INDEX_OPT=""
NO_DEPS=0 SKIP_CHECK=0 REINSTALL=0 UNINSTALL=0 PURGE=0 YES=0 DETECT_ONLY=0
while (($#)); do
    case $1 in
        --prefix-root) ROOT=${2:?--prefix-root needs a directory}; NO_SERVICE=1; shift ;;
        --no-service) NO_SERVICE=1 ;;
        --start) START=1 ;;
        --source) SOURCE=${2:?--source needs a path}; shift ;;
        --wheels) WHEELS=${2:?--wheels needs a directory}; shift ;;
        --python) PY=${2:?--python needs a path}; shift ;;
        --cpu) FORCE_CPU=1 ;;
        --ort-index) ORT_INDEX_OPT=${2:?--ort-index needs a URL}; shift ;;
        --no-deps) NO_DEPS=1 ;;
        --skip-check) SKIP_CHECK=1 ;;
        --reinstall) REINSTALL=1 ;;
        --uninstall) UNINSTALL=1 ;;
        --purge) PURGE=1 ;;
        --yes) YES=1 ;;
        --detect) DETECT_ONLY=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "error: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if ((PURGE && !UNINSTALL)); then echo "error: --purge goes with --uninstall" >&2; exit 2; fi
if [[ -n $ROOT ]]; then
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd)
fi
if [[ -e $SOURCE ]]; then SOURCE=$(realpath "$SOURCE"); fi
if [[ -d $WHEELS ]]; then WHEELS=$(realpath "$WHEELS"); fi
# Scratch files (staged source, requirement lists) go here and are removed however the script ends.
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT

die() { echo "error: $*" >&2; exit 1; }
warn() { echo "warning: $*" >&2; }
# Every state-changing step prints one line: created, updated, removed, kept, unchanged or skipped (why).
step() { echo "step: $1: $2"; }
# A path of the service layout, under the prefix root when there is one.
p() { printf '%s%s' "$ROOT" "$1"; }

# ---------------------------------------------------------------- platform
IS_JETSON=0 L4T="" JETPACK="" ORT_PKG=onnxruntime ORT_INDEX="" ORT_WHY="" CUDA_PY_SPEC=""

l4t_from_release_file() {
    local line
    [[ -r $NV_TEGRA_RELEASE ]] || return 0
    line=$(head -n 1 "$NV_TEGRA_RELEASE")
    # "# R36 (release), REVISION: 4.3, GCID: ..., BOARD: generic, EABI: aarch64, DATE: ..."
    if [[ $line =~ R([0-9]+)\ \(release\),\ REVISION:\ ([0-9]+(\.[0-9]+)*) ]]; then
        echo "${BASH_REMATCH[1]}.${BASH_REMATCH[2]}"
    fi
}

l4t_from_dpkg() {
    local v
    command -v dpkg-query >/dev/null 2>&1 || return 0
    v=$(dpkg-query -W -f='${db:Status-Status} ${Version}' nvidia-l4t-core 2>/dev/null) || return 0
    # "installed 36.4.4-20250616085344"
    if [[ $v =~ ^installed\ ([0-9]+\.[0-9]+(\.[0-9]+)?) ]]; then echo "${BASH_REMATCH[1]}"; fi
}

detect_platform() {
    local major minor os_name
    ARCH=$(uname -m)
    # shellcheck source=/dev/null
    os_name=$(. /etc/os-release 2>/dev/null && echo "${PRETTY_NAME:-}") || os_name=""
    OS_NAME=${os_name:-unknown Linux}
    L4T=$(l4t_from_release_file)
    if [[ -z $L4T && ! -e $NV_TEGRA_RELEASE ]]; then L4T=$(l4t_from_dpkg); fi
    if [[ -n $L4T ]]; then
        IS_JETSON=1
        major=${L4T%%.*} minor=0
        if [[ $L4T == *.* ]]; then
            minor=${L4T#*.}
            minor=${minor%%.*}
        fi
        case $major in
            36)
                if ((minor >= 4)); then
                    JETPACK="JetPack 6.1/6.2 (CUDA 12.6, TensorRT 10.3, Python 3.10)"
                    ORT_INDEX=$JP6_ORT_INDEX CUDA_PY_SPEC="cuda-python==12.6.*"
                else
                    JETPACK="JetPack 6.0 (CUDA 12.2, TensorRT 8.6, Python 3.10)"
                    ORT_WHY="Jetson AI Lab GPU builds for JetPack 6 need CUDA 12.6, i.e. L4T R36.4+: upgrade JetPack or pass --ort-index"
                fi
                ;;
            38)
                JETPACK="JetPack 7 (CUDA 13.0, TensorRT 10, Python 3.12)"
                ORT_INDEX=$JP7_ORT_INDEX CUDA_PY_SPEC="cuda-python==13.0.*"
                ;;
            35) JETPACK="JetPack 5 (Python 3.8: edge-gateway needs 3.10+, pass --python)"
                ORT_WHY="no GPU build is known for JetPack 5" ;;
            *) JETPACK="unknown JetPack"
               ORT_WHY="no GPU build is known for L4T R$major: pass --ort-index URL to use one" ;;
        esac
    fi
    if [[ -n $ORT_INDEX_OPT ]]; then ORT_INDEX=$ORT_INDEX_OPT; fi
    if ((FORCE_CPU)); then ORT_INDEX="" ORT_WHY="--cpu"; fi
    if ((IS_JETSON)) && [[ -n $ORT_INDEX ]]; then ORT_PKG=onnxruntime-gpu; fi
    if [[ -z $PY ]]; then
        if [[ -x /usr/bin/python3 ]]; then PY=/usr/bin/python3; else PY=$(command -v python3 || echo python3); fi
    fi
}

print_platform() {
    local trt board
    if ((IS_JETSON)); then
        board=""
        if [[ -r /proc/device-tree/model ]]; then board=$(tr -d '\0' </proc/device-tree/model); fi
        echo "platform: $ARCH, $OS_NAME, NVIDIA Jetson${board:+ ($board)}, L4T R$L4T -> $JETPACK"
        trt=$(dpkg-query -W -f='${Version}' python3-libnvinfer 2>/dev/null) || trt=""
        echo "  TensorRT Python bindings: ${trt:+python3-libnvinfer $trt (apt)}${trt:-python3-libnvinfer not installed (apt-get install nvidia-tensorrt)}"
        echo "  venv: with system site packages, so JetPack's tensorrt imports"
        if [[ -n $CUDA_PY_SPEC ]]; then echo "  CUDA Python bindings: $CUDA_PY_SPEC (best effort; pycuda if that fails)"; fi
    else
        echo "platform: $ARCH, $OS_NAME, not a Jetson -> CPU path"
        echo "  venv: isolated (no system site packages)"
    fi
    if ((NO_DEPS)); then
        echo "  onnxruntime: not installed (--no-deps)"
    elif [[ $ORT_PKG == onnxruntime-gpu ]]; then
        echo "  onnxruntime: onnxruntime-gpu from ${WHEELS:-$ORT_INDEX}"
    else
        echo "  onnxruntime: CPU onnxruntime from ${WHEELS:-PyPI}${ORT_WHY:+ ($ORT_WHY)}"
    fi
    echo "  python: $PY"
}

# ---------------------------------------------------------------- manifest
# One "kind path" line per thing this installer created (paths without the prefix root), in creation order.
MANIFEST_LINES=()

load_manifest() {
    MANIFEST_LINES=()
    if [[ -f $(p "$MANIFEST") ]]; then mapfile -t MANIFEST_LINES <"$(p "$MANIFEST")"; fi
}

record() {
    local line="$1 $2" l
    for l in "${MANIFEST_LINES[@]}"; do [[ $l == "$line" ]] && return 0; done
    MANIFEST_LINES+=("$line")
    # Written at once, so an install that fails half-way can still be uninstalled.
    printf '%s\n' "$line" >>"$(p "$MANIFEST")"
}

# ---------------------------------------------------------------- install steps
ensure_user() {
    local status=unchanged g groups=()
    if ((NO_SERVICE)); then step "user $SVC_USER" "skipped (--no-service)"; return; fi
    if ! id -u "$SVC_USER" >/dev/null 2>&1; then
        useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
            --shell /usr/sbin/nologin --comment "edge-gateway service" "$SVC_USER"
        status=created
    fi
    # The GPU device nodes on a Jetson (and /dev/dri elsewhere) belong to video and render.
    for g in video render; do
        if getent group "$g" >/dev/null && ! id -nG "$SVC_USER" | tr ' ' '\n' | grep -qx "$g"; then groups+=("$g"); fi
    done
    if ((${#groups[@]})); then
        usermod -a -G "$(IFS=,; echo "${groups[*]}")" "$SVC_USER"
        [[ $status == created ]] || status=updated
    fi
    step "user $SVC_USER (system user, no login shell, groups: $(id -nG "$SVC_USER" 2>/dev/null | tr ' ' ','))" "$status"
}

# unit_dir_mode KEY DEFAULT: the unit's mode for a directory systemd manages (e.g. StateDirectoryMode=0750).
# systemd resets state and cache directories to that mode (default 0755) at every start, and warns when
# the configuration directory differs from it: the installer agrees with the unit so reruns stay unchanged.
unit_dir_mode() {
    local mode
    mode=$(sed -n "s/^$1=0*\([0-7]\{3\}\)[[:space:]]*\$/\1/p" "$REPO/systemd/$UNIT_NAME" | tail -n 1)
    echo "${mode:-$2}"
}

# ensure_dir PATH MODE OWNER GROUP
ensure_dir() {
    local path=$1 mode=$2 owner=$3 group=$4 full status=unchanged who
    full=$(p "$path")
    if [[ ! -d $full ]]; then
        mkdir -p "$full"
        status=created
        record dir "$path"
    fi
    if [[ $(stat -c %a "$full") != "$mode" ]]; then
        chmod "$mode" "$full"
        [[ $status == created ]] || status=updated
    fi
    who="owner not set: --no-service"
    if ((!NO_SERVICE)); then
        who="$owner:$group"
        if [[ $(stat -c %U:%G "$full") != "$who" ]]; then
            chown "$who" "$full"
            [[ $status == created ]] || status=updated
        fi
    fi
    step "directory $path ($mode, $who)" "$status"
}

# ensure_file SRC DEST MODE GROUP KIND: DEST follows SRC; sets FILE_STATUS (created, updated or unchanged).
FILE_STATUS=unchanged
ensure_file() {
    local src=$1 dest=$2 mode=$3 group=$4 kind=$5 full
    full=$(p "$dest")
    FILE_STATUS=unchanged
    if [[ ! -f $full ]]; then
        FILE_STATUS=created
    elif ! cmp -s "$src" "$full"; then
        FILE_STATUS=updated
    fi
    if [[ $FILE_STATUS != unchanged ]]; then
        cp "$src" "$full.tmp.$$"
        mv -f "$full.tmp.$$" "$full"
        record "$kind" "$dest"
    fi
    if ! set_mode_owner "$full" "$mode" "$group" && [[ $FILE_STATUS == unchanged ]]; then FILE_STATUS=updated; fi
    step "$kind $dest" "$FILE_STATUS"
}

# set_mode_owner FILE MODE GROUP: owner root; returns 1 when it had to change something.
set_mode_owner() {
    local full=$1 mode=$2 group=$3 rc=0
    if [[ $(stat -c %a "$full") != "$mode" ]]; then chmod "$mode" "$full"; rc=1; fi
    if ((!NO_SERVICE)) && [[ $(stat -c %U:%G "$full") != "root:$group" ]]; then chown "root:$group" "$full"; rc=1; fi
    return $rc
}

ensure_config() {
    local full
    full=$(p "$CONFIG")
    if [[ -e $full ]]; then
        step "config $CONFIG" "unchanged (an existing config is never overwritten)"
        return
    fi
    cp "$HERE/example-config.yaml" "$full"
    set_mode_owner "$full" 640 "$SVC_USER" || true
    record config "$CONFIG"
    step "config $CONFIG (copied from deploy/example-config.yaml)" created
}

CODE_CHANGED=0

venv_matches() {
    local full=$1 want_ssp=$2 have want
    grep -qx "include-system-site-packages = $want_ssp" "$full/pyvenv.cfg" 2>/dev/null || return 1
    have=$("$full/bin/python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null) || return 1
    want=$("$PY" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
    [[ $have == "$want" ]]
}

ensure_venv() {
    local full want_ssp=false status=created args=()
    full=$(p "$VENV")
    if ((IS_JETSON)); then want_ssp=true args=(--system-site-packages); fi
    if [[ -e $full ]]; then
        if venv_matches "$full" "$want_ssp"; then
            step "venv $VENV (system site packages: $want_ssp)" unchanged
            return
        fi
        status=updated
        rm -rf "$full"
        rm -f "$(p "$STAMP")"
    fi
    "$PY" -m venv "${args[@]}" "$full"
    record venv "$VENV"
    step "venv $VENV (system site packages: $want_ssp)" "$status"
}

# source_files hash SRC: a hash of what pip would install (a wheel's bytes, or the tree's files);
# source_files copy SRC DEST: those files copied, so pip's in-tree build never writes into SRC.
# A git work tree gives its files (tracked and untracked, not ignored); otherwise caches and builds are left out.
source_files() {
    "$PY" - "$@" <<'PYEOF'
import hashlib, os, shutil, subprocess, sys
action, src = sys.argv[1], sys.argv[2]

def tree_files(src):
    try:
        out = subprocess.run(["git", "-C", src, "ls-files", "-z", "-co", "--exclude-standard"],
                             capture_output=True, check=True).stdout.decode()
        names = [n for n in out.split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = []
        skip = {"__pycache__", "build", "dist", "node_modules"}
        for top, dirs, files in os.walk(src):
            dirs[:] = [d for d in dirs if not (d.startswith(".") or d in skip or d.endswith(".egg-info"))]
            names += [os.path.relpath(os.path.join(top, f), src) for f in files if not f.endswith(".pyc")]
    return sorted(n for n in names if os.path.isfile(os.path.join(src, n)) and not os.path.islink(os.path.join(src, n)))

if action == "hash":
    h = hashlib.sha256()
    for name in [None] if os.path.isfile(src) else tree_files(src):
        path = src if name is None else os.path.join(src, name)
        h.update((name or "").encode() + b"\0")
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    print(h.hexdigest())
else:
    for name in tree_files(src):
        os.makedirs(os.path.dirname(os.path.join(sys.argv[3], name)), exist_ok=True)
        shutil.copy2(os.path.join(src, name), os.path.join(sys.argv[3], name))
PYEOF
}

# The gateway's own requirements (no extras), with onnxruntime swapped for the chosen build.
gateway_requirements() {
    "$(p "$VENV")/bin/python" - "$ORT_PKG" <<'PYEOF'
import re, sys
from importlib.metadata import requires
ort = sys.argv[1]
for req in requires("edge-gateway") or []:
    spec, _, marker = req.partition(";")
    if "extra" in marker:
        continue
    name = re.match(r"[A-Za-z0-9._-]+", spec).group(0)
    if re.sub(r"[-_.]+", "-", name).lower() == "onnxruntime":
        req = ort + req[len(name):]
    print(req)
PYEOF
}

pip_in_venv() {
    "$(p "$VENV")/bin/python" -m pip --disable-pip-version-check --no-input -q "$@"
}

installed() { pip_in_venv show "$1" >/dev/null 2>&1; }

CUDA_NOTE="" ORT_NOTE=""

install_onnxruntime() {
    local other=onnxruntime-gpu
    [[ $ORT_PKG == onnxruntime-gpu ]] && other=onnxruntime
    # Both builds own the same `onnxruntime` package directory: never leave the two side by side.
    if installed "$other"; then pip_in_venv uninstall -y "$other"; fi
    [[ $ORT_PKG == onnxruntime-gpu ]] || return 0
    if [[ -n $WHEELS ]]; then
        pip_in_venv install --no-deps --no-index --find-links "$WHEELS" onnxruntime-gpu && return 0
    else
        pip_in_venv install --no-deps --index-url "$ORT_INDEX" onnxruntime-gpu && return 0
    fi
    warn "onnxruntime-gpu could not be installed from ${WHEELS:-$ORT_INDEX}: installing the CPU build instead (rerun with --reinstall once the index is reachable)"
    ORT_PKG=onnxruntime ORT_NOTE="GPU build failed, CPU fallback"
}

install_cuda_bindings() {
    local nvcc=/usr/local/cuda/bin/nvcc
    if pip_in_venv install "${PIP_SRC[@]}" "$CUDA_PY_SPEC"; then CUDA_NOTE="$CUDA_PY_SPEC"; return; fi
    warn "$CUDA_PY_SPEC did not install; trying pycuda (compiles here, needs $nvcc and python3-dev)"
    if [[ -x $nvcc ]] && PATH="$(dirname "$nvcc"):$PATH" CUDA_ROOT=/usr/local/cuda pip_in_venv install "${PIP_SRC[@]}" pycuda; then
        CUDA_NOTE="pycuda"
        return
    fi
    warn "no CUDA Python bindings: TensorRT inference is unavailable, the gateway uses ONNX Runtime"
    CUDA_NOTE="none (TensorRT unavailable; ONNX Runtime is used)"
}

ensure_packages() {
    local stamp want have="" src=$SOURCE
    stamp=$(p "$STAMP")
    want=$(printf 'source_sha256=%s\npython=%s\nonnxruntime=%s %s\ncuda_python=%s\nno_deps=%s\n' \
        "$(source_files hash "$SOURCE")" "$PY" "$ORT_PKG" "$ORT_INDEX" "$CUDA_PY_SPEC" "$NO_DEPS")
    if [[ -f $stamp ]]; then have=$(<"$stamp"); fi
    if ((!REINSTALL)) && [[ $have == "$want" && -x $(p "$VENV")/bin/edge-gateway ]]; then
        step "python packages (gateway $(gateway_version), same source and options as the last install)" unchanged
        return
    fi
    PIP_SRC=()
    if [[ -n $WHEELS ]]; then PIP_SRC=(--no-index --find-links "$WHEELS"); fi
    if [[ -d $SOURCE ]]; then
        src=$SCRATCH/source
        source_files copy "$SOURCE" "$src"
    fi
    # --force-reinstall of the gateway alone: a changed source with an unchanged version must still land.
    pip_in_venv install --no-deps --force-reinstall "${PIP_SRC[@]}" "$src"
    if ((!NO_DEPS)); then
        install_onnxruntime
        gateway_requirements >"$SCRATCH/requirements.txt"
        # The default upgrade strategy (only-if-needed) leaves satisfied requirements untouched.
        pip_in_venv install "${PIP_SRC[@]}" -r "$SCRATCH/requirements.txt" \
            || die "pip could not install the gateway's requirements"
        if ((IS_JETSON)) && [[ -n $CUDA_PY_SPEC ]]; then install_cuda_bindings; fi
    fi
    printf '%s\n' "$want" >"$stamp"
    record file "$STAMP"
    CODE_CHANGED=1
    step "python packages (gateway $(gateway_version)${ORT_NOTE:+; $ORT_NOTE}${CUDA_NOTE:+; CUDA bindings: $CUDA_NOTE})" \
        "$([[ -n $have ]] && echo updated || echo created)"
}

gateway_version() {
    "$(p "$VENV")/bin/python" -c 'from importlib.metadata import version; print(version("edge-gateway"))' 2>/dev/null || echo "?"
}

report_runtime() {
    local py out
    ((NO_DEPS)) && return 0
    py=$(p "$VENV")/bin/python
    if out=$("$py" -c 'import onnxruntime as o; print(o.__version__, "providers:", ", ".join(o.get_available_providers()))' 2>&1); then
        echo "onnxruntime: $out"
    else
        warn "onnxruntime does not import in the venv: $(tail -n 1 <<<"$out")"
    fi
    if ((IS_JETSON)); then
        if out=$("$py" -c 'import tensorrt; print(tensorrt.__version__)' 2>&1); then
            echo "tensorrt: $out (from JetPack)"
        else
            warn "tensorrt does not import in the venv ($(tail -n 1 <<<"$out")): apt-get install python3-libnvinfer (JetPack: nvidia-tensorrt); until then the gateway uses ONNX Runtime"
        fi
    fi
}

CHECK=skipped

as_service_user() {
    if ((NO_SERVICE)); then "$@"; else runuser -u "$SVC_USER" -- "$@"; fi
}

run_check() {
    local out
    if ((SKIP_CHECK)); then echo "check: skipped (--skip-check)"; return; fi
    # As the service user, from its working directory: a config it cannot read fails here, not at boot.
    if out=$(cd "$(p "$STATE_DIR")" && PYTHONDONTWRITEBYTECODE=1 as_service_user \
        "$(p "$VENV")/bin/edge-gateway" --log-level warning check "$(p "$CONFIG")" 2>&1); then
        CHECK=ok
        echo "check: OK: $out"
    else
        CHECK=failed
        echo "check: FAILED (the unit is enabled only once it passes; expected with the example config):"
        echo "    ${out//$'\n'/$'\n'    }"
    fi
}

run_build_engines() {
    local gw help
    gw=$(p "$VENV")/bin/edge-gateway
    if [[ $CHECK == skipped ]]; then echo "build-engines: skipped (--skip-check)"; return; fi
    if [[ $CHECK != ok ]]; then echo "build-engines: skipped (the config check did not pass)"; return; fi
    if help=$(PYTHONDONTWRITEBYTECODE=1 "$gw" --help 2>&1) && grep -qw "build-engines" <<<"$help"; then
        if (cd "$(p "$STATE_DIR")" && as_service_user "$gw" build-engines "$(p "$CONFIG")"); then
            echo "build-engines: done"
        else
            warn "edge-gateway build-engines failed: the gateway builds missing engines at start, or uses ONNX Runtime"
        fi
    else
        echo "build-engines: not in this version; TensorRT engines will be built later"
    fi
}

have_systemd() { [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; }

ensure_service() {
    if ((NO_SERVICE)); then step "systemd enable" "skipped (--no-service)"; return; fi
    if ! have_systemd; then step "systemd enable" "skipped (systemd is not running here)"; return; fi
    if ((UNIT_CHANGED)); then systemctl daemon-reload; fi
    if [[ $CHECK != ok ]]; then
        step "systemd enable $UNIT_NAME" "skipped (the config check did not pass)"
        if ((CODE_CHANGED)) && systemctl is-active --quiet "$UNIT_NAME"; then
            warn "$UNIT_NAME keeps running the code it loaded before this upgrade: fix the config, then systemctl restart edge-gateway"
        fi
        return
    fi
    if systemctl is-enabled --quiet "$UNIT_NAME"; then
        step "systemd enable $UNIT_NAME" unchanged
    else
        systemctl enable --quiet "$UNIT_NAME"
        step "systemd enable $UNIT_NAME" updated
    fi
    if systemctl is-active --quiet "$UNIT_NAME"; then
        if ((CODE_CHANGED || UNIT_CHANGED)); then
            systemctl restart "$UNIT_NAME"
            step "systemd restart $UNIT_NAME (new version)" updated
        fi
    elif ((START)); then
        systemctl start "$UNIT_NAME"
        step "systemd start $UNIT_NAME" updated
    fi
}

summary() {
    local gw=$APP_DIR/venv/bin/edge-gateway
    echo
    echo "summary: edge-gateway $(gateway_version) in $(p "$VENV"); config $(p "$CONFIG"): check $CHECK"
    if [[ $CHECK == ok ]]; then
        if ((NO_SERVICE)); then
            echo "next: service steps were skipped; run: $(p "$VENV")/bin/edge-gateway run $(p "$CONFIG")"
        elif ((!START)); then
            echo "next: sudo systemctl start edge-gateway   (logs: journalctl -u edge-gateway -f)"
        else
            echo "running: journalctl -u edge-gateway -f"
        fi
        return
    fi
    cat <<EOF
next: 1. edit $CONFIG (PLC endpoints, tags, models, broker, password files)
      2. sudo -u $SVC_USER $gw check $CONFIG
      3. rerun this installer: it enables the unit once the check passes (--start starts it too)
      logs, once running: journalctl -u edge-gateway -f
EOF
}

install_all() {
    local mode=""
    detect_platform
    if ((NO_SERVICE)); then mode=" (service steps skipped)"; fi
    echo "edge-gateway install${ROOT:+ into prefix root $ROOT}$mode"
    print_platform
    ((NO_SERVICE)) || (($(id -u) == 0)) || die "run as root (sudo), or pass --prefix-root DIR / --no-service"
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
        || die "$PY is missing or older than Python 3.10 (pass --python PATH)"
    "$PY" -c 'import ensurepip, venv' 2>/dev/null || die "$PY cannot create a venv: apt-get install python3-venv"
    [[ -e $SOURCE ]] || die "--source $SOURCE does not exist"
    [[ -z $WHEELS || -d $WHEELS ]] || die "--wheels $WHEELS is not a directory"

    ensure_user
    ensure_dir "$APP_DIR" 755 root root
    load_manifest
    # The config directory holds password files: readable by the service's group only.
    ensure_dir "$CONF_DIR" "$(unit_dir_mode ConfigurationDirectoryMode 750)" root "$SVC_USER"
    ensure_dir "$STATE_DIR" "$(unit_dir_mode StateDirectoryMode 755)" "$SVC_USER" "$SVC_USER"
    ensure_dir "$CACHE_DIR" "$(unit_dir_mode CacheDirectoryMode 755)" "$SVC_USER" "$SVC_USER"
    ensure_venv
    ensure_packages
    report_runtime
    ensure_file "$HERE/example-config.yaml" "$CONFIG_EXAMPLE" 640 "$SVC_USER" file
    ensure_config
    mkdir -p "$(dirname "$(p "$UNIT_PATH")")"
    ensure_file "$REPO/systemd/$UNIT_NAME" "$UNIT_PATH" 644 root unit
    UNIT_CHANGED=0
    [[ $FILE_STATUS == unchanged ]] || UNIT_CHANGED=1
    run_check
    run_build_engines
    ensure_service
    summary
}

# ---------------------------------------------------------------- uninstall
confirm_purge() {
    ((YES)) && return 0
    [[ -t 0 ]] || die "--purge deletes $CONF_DIR, $STATE_DIR (the database) and $CACHE_DIR: add --yes"
    local answer
    read -r -p "delete $CONF_DIR, $STATE_DIR (the database) and $CACHE_DIR? [y/N] " answer
    [[ $answer == [yY]* ]] || die "nothing removed"
}

remove_path() {
    local kind=$1 path=$2 full
    full=$(p "$path")
    if [[ ! -e $full && ! -L $full ]]; then step "$kind $path" "unchanged (already gone)"; return; fi
    case $kind in
        config) if ((!PURGE)); then step "$kind $path" "kept (--purge removes it)"; return; fi; rm -f "$full" ;;
        venv) rm -rf "$full" ;;
        dir)
            if [[ $path == "$CACHE_DIR" ]] || { ((PURGE)) && [[ $path == "$CONF_DIR" || $path == "$STATE_DIR" ]]; }; then
                rm -rf "$full"  # the cache holds engines rebuilt at the next start; purge takes all data
            elif [[ $path == "$CONF_DIR" || $path == "$STATE_DIR" ]]; then
                step "$kind $path" "kept (--purge removes it)"
                return
            elif [[ $path == "$APP_DIR" ]]; then
                rm -f "$(p "$MANIFEST")" "$(p "$STAMP")"
                rmdir "$full" 2>/dev/null || { step "$kind $path" "kept (not empty)"; return; }
            else
                rmdir "$full" 2>/dev/null || { step "$kind $path" "kept (not empty)"; return; }
            fi
            ;;
        *) rm -f "$full" ;;
    esac
    step "$kind $path" removed
}

uninstall_all() {
    local i line unit_recorded=0 d mode=""
    if ((PURGE)); then mode=" (purge)"; fi
    echo "edge-gateway uninstall${ROOT:+ from prefix root $ROOT}$mode"
    ((NO_SERVICE)) || (($(id -u) == 0)) || die "run as root (sudo), or pass --prefix-root DIR / --no-service"
    ((PURGE)) && confirm_purge
    load_manifest
    if ((${#MANIFEST_LINES[@]} == 0)); then echo "nothing recorded in $(p "$MANIFEST")"; fi
    for line in "${MANIFEST_LINES[@]}"; do [[ $line == "unit "* ]] && unit_recorded=1; done
    if ((unit_recorded && !NO_SERVICE)) && have_systemd; then
        systemctl disable --now --quiet "$UNIT_NAME" || true
        step "systemd $UNIT_NAME" "removed (disabled and stopped)"
    fi
    for ((i = ${#MANIFEST_LINES[@]} - 1; i >= 0; i--)); do
        line=${MANIFEST_LINES[i]}
        remove_path "${line%% *}" "${line#* }"
    done
    rm -f "$(p "$MANIFEST")" "$(p "$STAMP")"
    if ((unit_recorded && !NO_SERVICE)) && have_systemd; then systemctl daemon-reload; fi
    if ((PURGE)); then
        for d in "$CONF_DIR" "$STATE_DIR" "$CACHE_DIR"; do
            if [[ -e $(p "$d") ]]; then rm -rf "$(p "$d")"; step "dir $d" removed; fi
        done
        if ((!NO_SERVICE)) && id -u "$SVC_USER" >/dev/null 2>&1; then
            userdel "$SVC_USER"
            step "user $SVC_USER" removed
        fi
    elif ((!NO_SERVICE)); then
        echo "kept: user $SVC_USER, $CONF_DIR and $STATE_DIR (--uninstall --purge removes them)"
    fi
}

if ((DETECT_ONLY)); then
    detect_platform
    print_platform
elif ((UNINSTALL)); then
    uninstall_all
else
    install_all
fi
