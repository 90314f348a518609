#!/usr/bin/env bash
# Builds the test cluster's Go binaries into CACHE_DIR/bin, once per pinned version.
# Each tool is its own Go module (tests/cluster/tools/NAME/go.mod) so that their dependency graphs
# never meet in one MVS resolution. A tool is rebuilt only when its go.mod, go.sum or recipe changes.
#
# usage: build.sh CACHE_DIR [TOOL...]     (default: every tool)
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 CACHE_DIR [TOOL...]" >&2
  exit 2
fi
cache_dir=$(realpath -m "$1")
shift
tools_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin_dir=$cache_dir/bin
mkdir -p "$bin_dir"

export GOMODCACHE=$cache_dir/go/mod
export GOCACHE=$cache_dir/go/build
export GOFLAGS=-modcacherw
export GOTOOLCHAIN=local
# Static binaries: no C toolchain needed, and one cgo setting keeps the shared build cache warm.
export CGO_ENABLED=0

# Versions stamped into the Kubernetes binaries, as the upstream release build does; without them
# they report v0.0.0-master and version checks (kubectl skew, helm kubeVersion) misbehave.
kubernetes_ldflags() {
  local version major minor pkg flags=""
  version=$(cd "$tools_dir/kubernetes" && go list -m -f '{{.Version}}' k8s.io/kubernetes)
  major=${version#v}
  major=${major%%.*}
  minor=${version#v*.}
  minor=${minor%%.*}
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "-s -w$flags"
}

# helm's version otherwise reads "v3.22" (its source default), without the patch release.
helm_ldflags() {
  local version
  version=$(cd "$tools_dir/helm" && go list -m -f '{{.Version}}' helm.sh/helm/v3)
  echo "-s -w -X helm.sh/helm/v3/internal/version.version=$version"
}

# Build tags per tool (part of the stamp key like the ldflags). Prometheus: only static and file
# service discovery; the cloud SDKs behind the others double its build time and are never used here.
prometheus_tags() { echo "remove_all_sd"; }

# Kueue's manager reads its metrics certificate from a fixed /etc/kueue/metrics/certs when its internal
# certificate management is off (as here: no webhook Service to patch). The build points that one
# path at $KUEUE_METRICS_CERT_DIR (tests/cluster/kueue.py): it builds from a copy of the module's source
# in the cache, changed by that one line (a module-cache file cannot be overlaid), through a go.mod
# there that replaces the module with the copy. Nothing of Kueue's source is kept in this repository.
kueue_buildflags() {
  local source copy=$cache_dir/kueue-src
  source=$(cd "$tools_dir/kueue" && go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)
  rm -rf "$copy" && cp -r "$source" "$copy" && chmod -R u+w "$copy"
  sed -i 's|metricsCertPath := "/etc/kueue/metrics/certs"|metricsCertPath := os.Getenv("KUEUE_METRICS_CERT_DIR")|' \
    "$copy/cmd/kueue/main.go"
  grep -q KUEUE_METRICS_CERT_DIR "$copy/cmd/kueue/main.go" || { echo "kueue: metrics cert path not found" >&2; return 1; }
  { cat "$tools_dir/kueue/go.mod"; echo "replace sigs.k8s.io/kueue => $copy"; } > "$cache_dir/kueue-build.mod"
  cp "$tools_dir/kueue/go.sum" "$cache_dir/kueue-build.sum"
  echo "-modfile=$cache_dir/kueue-build.mod"
}

# Kueue's CRDs, from the same module, where the harness applies them from.
kueue_after() {
  local crds
  crds=$(cd "$tools_dir/kueue" && go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)/config/components/crd/bases
  rm -rf "$cache_dir/share/kueue/crds" && mkdir -p "$cache_dir/share/kueue/crds"
  cp "$crds"/*.yaml "$cache_dir/share/kueue/crds/"
}

# recipe NAME -> "binary=package ..." ; the recipe text is part of the stamp key.
recipe() {
  case $1 in
    minio) echo "minio=github.com/minio/minio" ;;
    kubernetes)
      echo "kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver" \
        "kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager" \
        "kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler" \
        "kubectl=k8s.io/kubernetes/cmd/kubectl" ;;
    kwok) echo "kwok=sigs.k8s.io/kwok/cmd/kwok" ;;
    etcd) echo "etcd=go.etcd.io/etcd/server/v3 etcdctl=go.etcd.io/etcd/etcdctl/v3" ;;
    helm) echo "helm=helm.sh/helm/v3/cmd/helm" ;;
    kueue) echo "kueue=sigs.k8s.io/kueue/cmd/kueue" ;;
    prometheus)
      echo "prometheus=github.com/prometheus/prometheus/cmd/prometheus" \
        "promtool=github.com/prometheus/prometheus/cmd/promtool" ;;
    *) echo "unknown tool: $1" >&2; return 1 ;;
  esac
}

all_tools=(kubernetes etcd kwok minio helm prometheus kueue)
if [[ $# -gt 0 ]]; then
  selected=("$@")
else
  selected=("${all_tools[@]}")
fi

build_tool() {
  local name=$1 module_dir=$tools_dir/$1 entries key stamp entry binary pkg ldflags="-s -w" tags="" started
  local -a buildflags=()
  entries=$(recipe "$name")
  # The key covers what decides the binaries: the module pins, the packages, and the ldflags recipe.
  key=$(cat "$module_dir/go.mod" "$module_dir/go.sum" <(echo "$entries") <(declare -f "${name}_ldflags" "${name}_tags" "${name}_buildflags" "${name}_after" || true) |
    sha256sum | cut -c1-16)
  stamp=$bin_dir/.$name.$key
  local missing=0
  for entry in $entries; do
    [[ -x $bin_dir/${entry%%=*} ]] || missing=1
  done
  if [[ -e $stamp && $missing == 0 ]]; then
    echo "cluster-tools: $name up to date"
    return 0
  fi
  if declare -F "${name}_ldflags" >/dev/null; then
    ldflags=$("${name}_ldflags")
  fi
  if declare -F "${name}_tags" >/dev/null; then
    tags=$("${name}_tags")
  fi
  if declare -F "${name}_buildflags" >/dev/null; then
    read -r -a buildflags <<<"$("${name}_buildflags")"
  fi
  if ! command -v go >/dev/null; then
    echo "cluster-tools: building $name needs Go >= 1.26 on PATH" >&2
    exit 1
  fi
  started=$SECONDS
  echo "cluster-tools: building $name ..."
  rm -f "$bin_dir/.$name".*
  for entry in $entries; do
    binary=${entry%%=*}
    pkg=${entry#*=}
    (cd "$module_dir" && go build -trimpath -tags "$tags" -ldflags "$ldflags" "${buildflags[@]}" -o "$bin_dir/$binary.tmp" "$pkg")
    mv -f "$bin_dir/$binary.tmp" "$bin_dir/$binary"
  done
  if declare -F "${name}_after" >/dev/null; then
    "${name}_after"
  fi
  touch "$stamp"
  echo "cluster-tools: built $name in $((SECONDS - started)) s"
}

for tool in "${selected[@]}"; do
  build_tool "$tool"
done
