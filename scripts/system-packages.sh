#!/usr/bin/env bash
# The system packages `make test` needs, installed through apt when this user can (root, or sudo that asks
# no password); when it cannot, one line naming the exact command to run, and exit 2 before any test runs.
#
#   scripts/system-packages.sh                 check the default list, install what is missing
#   scripts/system-packages.sh --missing [P…]  only print the missing packages, one a line (exit 0)
#   scripts/system-packages.sh P…              the same as the first, for the packages P… instead
#
# Present packages are found with dpkg-query (no apt, no network): a second run takes milliseconds.
set -euo pipefail

# redis-server: the shared session store; prometheus: promtool and a real Prometheus; nginx-light: the load
# balancer of the scale-out topology; chromium + chromium-driver: the demo page test; docker-compose: offline
# validation of docker-compose.yml; podman, buildah, runc, mmdebstrap: the image test builds a Debian base,
# builds the image and runs it (runc, not crun: crun fails under cgroups' hybrid mode); binutils: readelf for
# the GPU image's provider check; ca-certificates: TLS to the package registries.
DEFAULT_PACKAGES=(
    redis-server prometheus nginx-light chromium chromium-driver docker-compose
    podman buildah runc mmdebstrap uidmap binutils ca-certificates
)

# Without dpkg (not Debian/Ubuntu): a command each package provides, to say what is missing.
declare -A COMMAND_OF=(
    [redis-server]=redis-server [prometheus]=promtool [nginx-light]=nginx [chromium]=chromium
    [chromium-driver]=chromedriver [docker-compose]=docker-compose [podman]=podman [buildah]=buildah
    [runc]=runc [mmdebstrap]=mmdebstrap [uidmap]=newuidmap [binutils]=readelf [python3-venv]=python3
)

missing_packages() {
    local package installed
    if command -v dpkg-query >/dev/null; then
        # One dpkg-query for all of them; unknown names are absent from its output (and it exits 1: ignored).
        installed=" $(dpkg-query -W -f='${Package}:${Status}\n' "$@" 2>/dev/null | sed -n 's/:install ok installed$//p' | tr '\n' ' ' || true) "
        for package in "$@"; do
            [[ "$installed" == *" $package "* ]] || echo "$package"
        done
    else
        for package in "$@"; do
            [[ -z "${COMMAND_OF[$package]:-}" ]] || command -v "${COMMAND_OF[$package]}" >/dev/null || echo "$package"
        done
    fi
}

only_report=false
if [[ "${1:-}" == "--missing" ]]; then
    only_report=true
    shift
fi
if [[ $# -gt 0 ]]; then
    packages=("$@")
else
    packages=("${DEFAULT_PACKAGES[@]}")
    # A Python without venv/ensurepip (Debian's python3 without python3-venv) cannot create .venv.
    "${PYTHON:-python3}" -c 'import ensurepip, venv' 2>/dev/null || packages+=(python3-venv)
fi

mapfile -t missing < <(missing_packages "${packages[@]}")
if $only_report; then
    printf '%s\n' "${missing[@]}" | sed '/^$/d'
    exit 0
fi
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "system packages: all ${#packages[@]} present"
    exit 0
fi

install=(apt-get install -y --no-install-recommends "${missing[@]}")
if ! command -v apt-get >/dev/null; then
    echo "error: missing system packages (no apt-get here): ${missing[*]} — install them with your package manager, then run make test again" >&2
    exit 2
fi
if [[ "$(id -u)" == 0 ]]; then
    sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    echo "error: missing system packages: ${missing[*]} — run: sudo apt-get update && sudo ${install[*]}   (then make test again)" >&2
    exit 2
fi

echo "system packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" "${install[@]}"; } >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "error: ${sudo[*]:+${sudo[*]} }${install[*]} failed (its last lines are above)" >&2
    exit 2
fi
mapfile -t still < <(missing_packages "${missing[@]}")
if [[ ${#still[@]} -gt 0 ]]; then
    echo "error: apt-get did not install: ${still[*]}" >&2
    exit 2
fi
