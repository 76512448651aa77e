#!/bin/sh
# Builds the images with podman, from the repository root (what `make images` runs):
#
#   sh infra/images/build.sh [FUNCTION...]     # default: all of them (predict deadletter monitor batch preprocess train console)
#
# Tags: localhost/bucketml-<function>:latest, the names infra/overlays/*/kustomization.yaml
# retag (`make push` tags and pushes them to a registry). The base image python:3.11-slim is
# pulled, or made from Debian's packages where no registry is reachable (base-image.sh).
# Builds use chroot isolation and the host's network, which work where podman cannot start a
# build container of its own (a sandboxed build machine); on a normal machine they are simply
# a little less isolated than podman's default, and the result is the same image.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PODMAN=${PODMAN:-podman}
ISOLATION=${BUCKETML_BUILD_ISOLATION:-chroot}

if ! command -v "$PODMAN" >/dev/null 2>&1; then
    echo "podman is missing (on Debian: apt-get install podman runc debootstrap)" >&2
    exit 1
fi
sh "$HERE/base-image.sh" "$PODMAN"

# A digest of everything an image is built from: the Dockerfile, the package set, the code,
# the build arguments and the base image. It is kept as a label, and an image whose label
# matches is up to date (BUCKETML_IMAGES_REBUILD=1 builds anyway; layers are cached either way).
inputs() {  # SET FUNCTION BUILD-ARGS...
    package_set=$1 function=$2
    (
        cd "$ROOT"
        printf '%s\n' "$*"
        "$PODMAN" image inspect --format '{{.Id}}' docker.io/library/python:3.11-slim
        find infra/images/Dockerfile infra/images/Dockerfile.dockerignore pyproject.toml requirements.txt \
            "infra/images/requirements-$package_set.txt" "functions/$function/main.py" shared/bucketml \
            -type f ! -path '*/__pycache__/*' ! -name '*.pyc' | LC_ALL=C sort | xargs sha256sum
    ) | sha256sum | cut -c1-64
}

build_one() {  # FUNCTION
    function=$1
    case $function in
        predict) set -- --build-arg IMAGE=predict --build-arg ASGI=true ;;
        deadletter | monitor | batch) set -- --build-arg IMAGE=predict ;;
        preprocess | train) set -- --build-arg IMAGE=pipeline ;;
        # The console: Jinja2 and python-multipart, in the pipeline set (never in predict's).
        console) set -- --build-arg IMAGE=pipeline --build-arg ASGI=true ;;
        *) echo "unknown function $function (predict, deadletter, monitor, batch, preprocess, train, console)" >&2; return 2 ;;
    esac
    image=localhost/bucketml-$function:latest
    digest=$(inputs "${2#IMAGE=}" "$function" "$@") || return 1
    if [ "${BUCKETML_IMAGES_REBUILD:-0}" != 1 ] \
            && [ "$("$PODMAN" image inspect --format '{{index .Labels "io.bucketml.inputs"}}' "$image" 2>/dev/null)" = "$digest" ]; then
        echo "$image is up to date"
        return 0
    fi
    previous=$("$PODMAN" image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
    started=$(date +%s)
    "$PODMAN" build --quiet --isolation "$ISOLATION" --network host --layers \
        -f "$ROOT/infra/images/Dockerfile" --ignorefile "$ROOT/infra/images/Dockerfile.dockerignore" "$@" \
        --build-arg FUNCTION="$function" --label "io.bucketml.inputs=$digest" -t "$image" "$ROOT" >/dev/null \
        || { echo "could not build $image" >&2; return 1; }
    # The image this build replaced keeps no tag: remove it, so rebuilds do not pile up
    # (podman refuses while a container still uses it; it is then left, which is harmless).
    if [ -n "$previous" ] && [ "$previous" != "$("$PODMAN" image inspect --format '{{.Id}}' "$image")" ]; then
        "$PODMAN" rmi "$previous" >/dev/null 2>&1 || true
    fi
    size=$("$PODMAN" image inspect --format '{{.Size}}' "$image" | awk '{printf "%d MB", $1/1000000}')
    echo "built $image ($size) in $(( $(date +%s) - started )) s"
}

build_in_turn() {  # FUNCTION...
    for each in "$@"; do
        build_one "$each" || return 1
    done
}

if [ $# -gt 0 ]; then
    build_in_turn "$@"
else
    # The two package sets build side by side (their time goes mostly to downloading and
    # unpacking packages); within a set, the second image reuses the first one's layers.
    build_in_turn predict deadletter monitor batch &
    first=$!
    build_in_turn preprocess train console &
    second=$!
    status=0
    wait "$first" || status=1
    wait "$second" || status=1
    exit "$status"
fi
